"""finetune.py: fine-tuning and linear probing as a program (files, exact resume in 1 and 2 processes, timm names,
the linear probe's frozen encoder and LARS, --eval-only)."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import finetune
from conftest import ROOT, TINY, read_log, run_script

MAE_TINY = TINY + ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2"]
# fine-tuning the tiny encoder on 64 synthetic images: 8 steps of 8 an epoch, the small-image recipe otherwise
FT = ["--batch-size", "8", "--subset", "64", "--workers", "0", "--log-every", "1", "--warmup-epochs", "0.5"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory):
    """A tiny MAE pre-trained for one epoch on the synthetic set: its encoder.pth (config.json beside it); the run's
    last line is the finetune.py command for it."""
    out = tmp_path_factory.mktemp("mae")
    proc = run_script("mae.py", *MAE_TINY, "--epochs", "1", "--out", out)
    assert f"python finetune.py --init {out}/encoder.pth" in proc.stdout  # the run ends on the command to run next
    return out / "encoder.pth"


def test_a_run_writes_its_files_and_model_pth_loads_strict_into_timm(encoder_path, tmp_path):
    """Two epochs: validation top-1 / top-5 in log.jsonl every epoch; last.pth = the last epoch, best.pth = the best
    one, results.json the final numbers; model.pth loads strict into timm's VisionTransformer (mean pooling: "avg")
    and gives the fine-tuned classifier's logits. The encoder starts as encoder.pth and the recipe is MAE's."""
    timm = pytest.importorskip("timm")
    out = tmp_path / "ft"
    proc = run_script("finetune.py", "--init", encoder_path, *FT, "--epochs", "2", "--out", out)
    assert "fine-tune (pretrained): 2 epochs of 8 steps, lr 0.000125, from" in proc.stdout
    assert "(mae vit_nano, ours layout)" in proc.stdout
    epochs = read_log(out, "epoch")
    assert [e["epoch"] for e in epochs] == [0, 1] and all(0 <= e["top1"] <= e["top5"] <= 100 for e in epochs)
    results = json.loads((out / "results.json").read_text())
    assert (results["top1"], results["top5"]) == (epochs[-1]["top1"], epochs[-1]["top5"])
    best = max(epochs, key=lambda e: e["top1"])
    assert results["best"] == {"epoch": best["epoch"], "top1": best["top1"], "top5": best["top5"]}
    assert load(out / "best.pth")["epoch"] == best["epoch"] and load(out / "last.pth")["epoch"] == 1
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["layer_decay"], cfg["blr"], cfg["pool"], cfg["model"], cfg["img_size"]) == (0.75, 4e-3, "mean",
                                                                                           "vit_nano", 16)
    ref = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=2,
                                                           num_heads=2, num_classes=12, global_pool="avg")
    ref.load_state_dict(load(out / "model.pth"), strict=True)
    source = finetune.read_init(str(encoder_path))
    encoder, _ = finetune.build_encoder(source, 16)
    pretrained = load(encoder_path)
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in pretrained.items())  # the start: encoder.pth
    baseline, _ = finetune.build_encoder(source, 16, random_init=True)  # --random-init: the same model, initialised
    assert baseline.state_dict().keys() == encoder.state_dict().keys()
    assert not torch.equal(baseline.blocks[0].attn.qkv.weight, pretrained["blocks.0.attn.qkv.weight"])
    ours = finetune.Classifier(encoder, 12, "mean")
    ours.load_state_dict(load(out / "last.pth")["model"])
    imgs = torch.randn(3, 3, 16, 16)
    assert torch.allclose(ours.eval()(imgs), ref.eval()(imgs), atol=1e-5)
    assert not torch.equal(ours.encoder.blocks[0].attn.qkv.weight, pretrained["blocks.0.attn.qkv.weight"])  # trained


def test_a_beit_encoder_fine_tunes_into_a_model_pth_strict_for_timm_beit(tmp_path):
    """A BEiT encoder (one relative-position table shared by the blocks) fine-tunes with a table per block, as the
    official fine-tuning does: model.pth loads strict into timm's Beit classifier (use_rel_pos_bias, mean pooling)
    and gives the fine-tuned model's logits."""
    timm = pytest.importorskip("timm")
    import beit
    from common.training import parse_config
    cfg, _ = parse_config(beit.Config, beit.PRESETS, [*TINY, "--vocab-size", "64"])
    encoder = beit.build_model(cfg).encoder
    torch.save(encoder.state_dict(), tmp_path / "encoder.pth")
    (tmp_path / "config.json").write_text(json.dumps({"method": "beit", **dataclasses.asdict(cfg)}))
    out = tmp_path / "ft"
    proc = run_script("finetune.py", "--init", tmp_path / "encoder.pth", *FT, "--epochs", "1", "--max-steps", "2",
                      "--out", out)
    assert "(beit vit_nano, ours layout)" in proc.stdout
    ref = timm.models.beit.Beit(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=12,
                                use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1, global_pool="avg")
    ref.load_state_dict(load(out / "model.pth"), strict=True)
    source = finetune.read_init(str(tmp_path / "encoder.pth"))
    ours = finetune.Classifier(finetune.build_encoder(source, 16)[0], 12, "mean")
    ours.load_state_dict(load(out / "last.pth")["model"])
    imgs = torch.randn(3, 3, 16, 16)
    assert torch.allclose(ours.eval()(imgs), ref.eval()(imgs), atol=1e-5)
    tables = [ours.encoder.blocks[i].attn.relative_position_bias_table for i in range(2)]
    assert not torch.equal(*tables)  # one table per block, each fine-tuned on its own


def test_recipe_takes_another_methods_table(capsys):
    """--recipe METHOD fine-tunes with METHOD's FINETUNE table whatever --init's method (one recipe for several
    encoders); an unknown name is one line."""
    import simmim
    source = finetune.Source("x.pth", "mae", {"model": "vit_micro", "patch_size": 4, "img_size": 32}, {}, "ours")
    own, _ = finetune.recipe_preset(source, "folder", 32, linear_probe=False)
    other, values = finetune.recipe_preset(source, "folder", 32, linear_probe=False, recipe="simmim")
    assert values == finetune.recipe_values(simmim.FINETUNE, 32, "vit_micro") != finetune.recipe_values(
        finetune.importlib.import_module("mae").FINETUNE, 32, "vit_micro")
    assert own != other and (other["model"], other["patch_size"]) == ("vit_micro", 4)
    with pytest.raises(finetune.UserError, match="--recipe 'dino': choose from mae, simmim"):
        finetune.parse(["--init", "x.pth", "--recipe", "dino"])


def test_the_progress_bar_shows_the_last_validation(encoder_path, tmp_path, monkeypatch, capsys):
    """On a terminal, epoch 1's progress bar carries epoch 0's validation top-1 and top-5 beside the step's loss."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr("common.training.interactive", lambda: True)
    try:
        finetune.main(["--init", str(encoder_path), *FT, "--epochs", "2", "--out", str(tmp_path / "ft")])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    top1, top5 = (read_log(tmp_path / "ft", "epoch")[0][k] for k in ("top1", "top5"))
    redraws = re.split(r"[\r\n]", capsys.readouterr().err)  # each redraw of a bar
    epoch0, epoch1 = ([r for r in redraws if r.startswith(f"epoch {e}:")] for e in (0, 1))
    assert epoch0 and not any("val_top1" in r for r in epoch0)  # nothing validated yet
    assert all(f"val_top1={top1}, val_top5={top5}" in r for r in epoch1 if "loss=" in r)
    assert any(re.search(r"loss=[\d.]+, .*val_top1=", r) for r in epoch1)  # beside the step's loss


def test_ctrl_c_then_resume_auto_ends_bitwise_as_one_run(encoder_path, tmp_path):
    """SIGINT mid-epoch, then `--resume auto --out DIR`: the same logged losses and bitwise the same weights as an
    uninterrupted run (drop path draws from the global generator, mixup from (seed, rank, step))."""
    args = ["--init", encoder_path, *FT, "--epochs", "6", "--max-steps", "40", "--mixup", "0.8", "--cutmix", "1.0"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_script("finetune.py", *args, "--out", full)
    proc = subprocess.Popen([sys.executable, str(ROOT / "finetune.py"), *map(str, args), "--out", str(part)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (part / "log.jsonl").exists() or len(read_log(part, "step")) < 3:
        assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    stopped = int(re.search(r"stopped by signal after step (\d+)", stdout).group(1))
    assert 2 <= stopped < 39
    run_script("finetune.py", "--resume", "auto", "--out", part, "--max-steps", "40")
    assert [s["loss"] for s in read_log(part, "step")] == [s["loss"] for s in read_log(full, "step")]
    a, b = load(full / "model.pth"), load(part / "model.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_stopped_and_resumed_equal_one_run(encoder_path, tmp_path):
    """torchrun x2 (gloo): Ctrl-C mid-run (SIGINT to the whole process group, as a terminal sends it: each worker
    gets it from there and again forwarded by torchrun), then `--resume auto` == an uninterrupted run, bitwise."""
    args = ["--init", encoder_path, *FT, "--epochs", "12"]  # 64 images / (8 x 2) = 4 steps an epoch, 48 in all
    full, part = tmp_path / "full", tmp_path / "part"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29500 + os.getpid() % 1000), str(ROOT / "finetune.py"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(*extra):
        proc = subprocess.run(command + [*map(str, extra)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    torchrun("--out", full)
    proc = subprocess.Popen(command + ["--out", str(part)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    while not (part / "log.jsonl").exists() or len(read_log(part, "step")) < 2:
        assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)  # torchrun itself exits 1 on a signal; its workers save and exit 0
    stopped = int(re.search(r"stopped by signal after step (\d+); checkpoint saved", stdout).group(1))
    assert 1 <= stopped < 47
    torchrun("--out", part, "--resume", "auto")
    assert [s["step"] for s in read_log(full, "step")] == list(range(48))
    assert {s["step"]: s["loss"] for s in read_log(part, "step")} == {s["step"]: s["loss"] for s in
                                                                       read_log(full, "step")}
    a, b = load(full / "model.pth"), load(part / "model.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_linear_probe_trains_only_its_head_and_eval_only_reads_a_checkpoint(encoder_path, tmp_path):
    """--linear-probe: the encoder's weights stay those of encoder.pth, the head is BatchNorm (no affine) + linear on
    the cls token, trained by LARS without weight decay at blr 6.4 (small images); --eval-only --resume gives the
    same top-1."""
    out = tmp_path / "lp"
    run_script("finetune.py", "--init", encoder_path, "--linear-probe", *FT, "--epochs", "2", "--out", out)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["blr"], cfg["weight_decay"], cfg["mixup"], cfg["smoothing"], cfg["drop_path"]) == (6.4, 0, 0, 0, 0)
    model, pretrained = load(out / "last.pth")["model"], load(encoder_path)
    assert all(torch.equal(model["encoder." + k], v) for k, v in pretrained.items())
    assert set(k for k in model if not k.startswith("encoder.")) == {
        "head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked", "head.1.weight", "head.1.bias"}
    top1 = json.loads((out / "results.json").read_text())["top1"]
    proc = run_script("finetune.py", "--eval-only", "--resume", out / "checkpoint.pth", "--out", tmp_path / "eval")
    assert f"linear probe pretrained: top-1 {top1}\n" in proc.stdout


def test_linear_probe_model_trains_the_head_alone(encoder_path):
    """The probe's encoder takes no gradient (no backward through it); its head reads the normalised cls token."""
    encoder, _ = finetune.build_encoder(finetune.read_init(str(encoder_path)), 16)
    probe = finetune.LinearProbe(encoder, 12)
    trainable = [n for n, p in probe.named_parameters() if p.requires_grad]
    assert trainable == ["head.1.weight", "head.1.bias"] and probe.pool == "cls"
    probe.eval()
    imgs = torch.randn(2, 3, 16, 16)
    assert torch.allclose(probe(imgs), probe.head(encoder.forward_features(imgs)[:, 0]), atol=1e-6)


def test_lars_step_by_hand():
    """LARS on a matrix: g = grad + wd p, scaled by 0.001 |p| / |g|, then momentum 0.9; a vector (bias) gets neither
    the decay nor the trust ratio."""
    w, b = torch.randn(3, 4), torch.randn(3)
    gw, gb = torch.randn(3, 4), torch.randn(3)
    pw, pb = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
    opt = finetune.LARS([pw, pb], lr=0.5, weight_decay=0.1)
    for _ in range(2):
        pw.grad, pb.grad = gw.clone(), gb.clone()
        opt.step()
    mu_w = mu_b = 0
    for _ in range(2):
        g = gw + 0.1 * w
        mu_w = 0.9 * mu_w + g * 0.001 * w.norm() / g.norm()
        mu_b = 0.9 * mu_b + gb
        w, b = w - 0.5 * mu_w, b - 0.5 * mu_b
    assert torch.allclose(pw.detach(), w, atol=1e-6) and torch.allclose(pb.detach(), b, atol=1e-6)


def test_init_errors_are_one_line(tmp_path, capsys):
    """No --init, a missing file, and a file of no known layout: one line each, exit 2."""
    from common.training import cli
    for argv, message in (([], "--init is required"), (["--init", str(tmp_path / "nope.pth")], "does not exist")):
        with pytest.raises(SystemExit) as e:
            cli(lambda: finetune.main(argv))
        assert e.value.code == 2 and message in capsys.readouterr().err
    torch.save({"cls_token": torch.zeros(1, 1, 8)}, tmp_path / "lone.pth")
    with pytest.raises(SystemExit) as e:
        cli(lambda: finetune.main(["--init", str(tmp_path / "lone.pth")]))
    assert e.value.code == 2 and "cannot tell which code base wrote this checkpoint" in capsys.readouterr().err
