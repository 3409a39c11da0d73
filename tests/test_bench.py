"""bench.py: the FLOP count against a hand formula, the training table and the loader table at a tiny size."""
import dataclasses
import importlib
import json
import re

import pytest
import torch
from conftest import run_script

import bench
import mae
from common import UserError
from common.training import cpu_has_fast_bf16
from common.vit import VisionTransformer, count_params, explicit_attention

# One thread: the runs below check numbers, not speed, and two OpenMP threads on two busy cores slow a step ~20x.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def vit_flops_by_hand(B, N, D, p, depth):
    """Forward matmul FLOPs of a ViT on all N patches + cls (2 per multiply-add): the patch projection
    (a conv = a [3p^2 -> D] matmul per patch), then per block qkv, q k^T, attn v, proj and the 4x MLP."""
    T = N + 1
    patch_embed = 2 * N * D * 3 * p * p
    block = 2 * T * D * 3 * D + 2 * T * T * D + 2 * T * T * D + 2 * T * D * D + 2 * 2 * T * D * 4 * D
    return B * (patch_embed + depth * block)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32-sdpa", "bf16-explicit-attention"])
def test_flop_count_equals_hand_formula(amp):
    # fp32 on the CPU runs SDPA (which FlopCounterMode alone would count as 0 there); bf16 on the CPU runs the
    # explicit softmax(q k^T) v: both must give the formula exactly.
    torch.manual_seed(0)
    B, img, p, D, depth = 3, 16, 4, 32, 2
    enc = VisionTransformer(img_size=img, patch_size=p, embed_dim=D, depth=depth, num_heads=2)
    x = torch.randn(B, 3, img, img)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        fwd, train = bench.count_flops(lambda: enc.forward_features(x).float().sum())
    expected = vit_flops_by_hand(B, (img // p) ** 2, D, p, depth)
    assert fwd == expected
    # backward: every matmul twice (grad of input and of weight), except the patch projection, whose input (the
    # image) needs no gradient
    assert train == 3 * expected - B * 2 * (img // p) ** 2 * D * 3 * p * p


def conv_flops_by_hand(B, c_in, c_out, k, groups, out_hw):
    """Forward FLOPs of a Conv2d (2 per multiply-add): every output value sums (C_in / groups) x k x k products."""
    return 2 * B * out_hw * c_out * (c_in // groups) * k * k


def test_conv_flop_count_equals_hand_formula_for_grouped_and_strided_convs():
    """ConvMAE's kinds of convolution: a strided patch embedding (k = s), a 5x5 depthwise conv, a 1x1 conv and a
    grouped 3x3 conv. Forward by the formula; backward = the input and the weight gradient, each one forward,
    except the first conv's input gradient (the image needs none). torch 2.14's own formula counts the grouped
    weight gradients `groups` times too large (1,544,192 here instead of 743,424)."""
    torch.manual_seed(0)
    B = 2
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 2, stride=2), torch.nn.Conv2d(8, 8, 5, padding=2, groups=8),
                              torch.nn.Conv2d(8, 16, 1), torch.nn.Conv2d(16, 16, 3, padding=1, groups=4))
    fwd, train = bench.count_flops(lambda: net(torch.randn(B, 3, 16, 16)).sum())
    convs = [(3, 8, 2, 1), (8, 8, 5, 8), (8, 16, 1, 1), (16, 16, 3, 4)]  # (C_in, C_out, k, groups), all at 8 x 8
    by_hand = [conv_flops_by_hand(B, *c, out_hw=8 * 8) for c in convs]
    assert fwd == sum(by_hand) == 256_000
    assert train == 3 * sum(by_hand) - by_hand[0]


def test_bench_training_table(tmp_path):
    out = tmp_path / "bench.json"
    flags = ["--model", "vit_nano", "--img-size", "16", "--patch-size", "4", "--batch-size", "2", "--steps", "2",
             "--methods", "mae", "--no-compile", "--device", "cpu", "--json", str(out), "--profile", "1"]
    proc = run_script("bench.py", *flags, env=ONE_THREAD)
    result = json.loads(out.read_text())
    assert result["torch"] == torch.__version__ and result["command"].startswith("python ")
    assert result["hardware"] in proc.stdout and "| mae | vit_nano/4 16px batch 2 |" in proc.stdout
    # bf16 is timed only where it is fast: emulated on an AVX2-only CPU, its 2048^2 peak matmul alone takes ~25 s
    fast_bf16 = cpu_has_fast_bf16()
    assert ("not run (use --compile)" in proc.stdout) == fast_bf16
    assert 0 < result["peak_tflops"]["fp32"] < 1e4
    assert (0 < result["peak_tflops"]["bf16"] < 1e4) if fast_bf16 else result["peak_tflops"]["bf16"] is None
    (row,) = result["rows"]
    assert row["profile"]["precision"] == ("bf16" if cpu_has_fast_bf16() else "fp32")  # the eager column profiled
    assert row["profile"]["ops"][0]["op"] in proc.stdout and "1 profiled steps:" in proc.stdout
    cfg = bench.method_config(mae, bench.parse_args(flags))
    model = mae.build_model(cfg)
    assert row["params"] == count_params(model) and row["tokens_per_img"] == 16
    for precision in ("fp32", "bf16") if fast_bf16 else ("fp32",):  # tokens/s = img/s x 16 patches
        assert f"| {row[precision]['img_s'] * 16:.0f} |" in proc.stdout
    if not fast_bf16:
        assert row["bf16"] is None and "bf16 not run (--bf16 to force it)" in proc.stdout
    fwd, train = bench.count_flops(lambda: mae.training_loss(model, torch.randn(2, 3, 16, 16), cfg,
                                                             torch.Generator().manual_seed(0)))
    assert row["fwd_gflop_per_img"] == pytest.approx(fwd / 2 / 1e9, rel=1e-9)
    assert row["train_gflop_per_img"] == pytest.approx(train / 2 / 1e9, rel=1e-9)
    assert 2 * fwd < train < 3 * fwd  # backward ~2x forward, less the image's gradient
    for precision in ("fp32", "bf16") if fast_bf16 else ("fp32",):
        r = row[precision]
        assert r["img_s"] > 0 and r["step_ms"] == pytest.approx(2 / r["img_s"] * 1e3)
        assert 0 < r["mfu"] < 1
        assert 0.05 < r["peak_mem_gib"] < 64  # RSS of a process holding torch
    assert row["compiled_bf16"] is None


def test_bench_bad_flags():
    proc = run_script("bench.py", "--methods", "mae,nope", "--device", "cpu", check=False, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: unknown method 'nope'; choose from " + ", ".join(bench.METHODS)]
    with pytest.raises(UserError, match="unknown model 'vit_giant'"):
        bench.parse_args(["--model", "vit_giant"])
    with pytest.raises(UserError, match="--steps must be positive"):
        bench.parse_args(["--steps", "0"])
    with pytest.raises(UserError, match="--img-size 30 is not divisible by --patch-size 16"):
        bench.method_config(mae, bench.parse_args(["--img-size", "30", "--batch-size", "8"]))


def test_help_gives_each_default_once(capsys):
    """Every flag's help says its default exactly once: the formatter appends it unless the help already says it."""
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    options = capsys.readouterr().out.split("options:\n")[1]
    flags = [" ".join(entry.split()) for entry in re.split(r"\n(?=  -)", options)][1:]  # one per flag, unwrapped
    assert len(flags) == 28  # --help itself (first) has no default
    counts = {flag.split()[0]: flag.count("(default:") for flag in flags}
    assert set(counts.values()) == {1}, counts


def test_bench_loader(tmp_path):
    out = tmp_path / "loader.json"
    proc = run_script("bench.py", "--loader", "--loader-images", "16", "--small-images", "64", "--batch-size", "8",
                      "--device", "cpu", "--json", out, env=ONE_THREAD)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["path"], r["workers"]) for r in rows] == [("DataLoader", w) for w in (0, 1, 2)] * 2 + [
        ("resident on cpu", 0)]
    assert [r["images"] for r in rows] == [16] * 3 + [64] * 4  # one full epoch of each
    assert all(r["img_s"] > 0 and r["first_batch_s"] > 0 for r in rows)
    # torchvision's pipeline on the same folder with 1 and 2 workers, each printed right after our row
    reference = result["torchvision_rows"]
    assert [(r["path"], r["workers"], r["images"]) for r in reference] == [("torchvision ImageFolder", w, 16)
                                                                          for w in (1, 2)]
    ratios = [rows[w]["img_s"] / reference[w - 1]["img_s"] for w in (1, 2)]
    assert result["speedup"] == pytest.approx(sum(ratios) / 2)
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == f"speedup {result['speedup']:.2f}x"  # the run's last line
    ours = next(i for i, line in enumerate(lines) if line.startswith("| JPEG folder 500x375 -> 224 | DataLoader | 1 |"))
    assert lines[ours + 1].startswith("| JPEG folder 500x375 -> 224 | torchvision ImageFolder | 1 | 8 | 16 |")


def test_bench_loader_times_a_given_folder(tmp_path):
    """--data-path: a flat folder of images (no class subfolders) timed through both pipelines, --loader-epochs
    epochs of it per row."""
    from PIL import Image

    for i in range(8):
        Image.new("RGB", (60 + i, 40), (i * 30, 100, 200)).save(tmp_path / f"{i}.jpg")
    out = tmp_path / "loader.json"
    run_script("bench.py", "--loader", "--data-path", tmp_path, "--loader-epochs", "2", "--small-images", "16",
               "--batch-size", "4", "--img-size", "32", "--device", "cpu", "--json", out, env=ONE_THREAD)
    result = json.loads(out.read_text())
    ours = [r for r in result["rows"] if r["pipeline"] == f"JPEG folder {tmp_path} -> 32"]
    assert [(r["workers"], r["images"]) for r in ours] == [(w, 16) for w in (0, 1, 2)]  # 2 epochs of 8
    assert [(r["workers"], r["images"]) for r in result["torchvision_rows"]] == [(1, 16), (2, 16)]
    with pytest.raises(UserError, match="is not a folder"):
        bench.parse_args(["--loader", "--data-path", str(tmp_path / "0.jpg")])


def test_profile_lists_the_top_ops_of_a_step_by_their_share():
    """--profile's table: the ops of the profiled steps by self time, per step, shares of the step's total. A step of
    3 matmuls and one softmax: mm leads, with 3 calls per step."""
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def step(i):
        x = a @ b @ b @ b
        torch.softmax(x, dim=-1)

    ops = bench.profile_ops(step, 0, 2, torch.device("cpu"), top=50)
    shares = [o["share"] for o in ops]
    assert shares == sorted(shares, reverse=True) and 0.99 < sum(shares) <= 1.0 + 1e-9
    assert ops[0]["op"] == "aten::mm" and ops[0]["calls"] == 3
    assert {o["op"] for o in ops} >= {"aten::mm", "aten::_softmax"} and all(o["ms"] > 0 for o in ops)
    table = bench.profile_table({"method": "m", "model": "x", "profile": {"precision": "fp32", "steps": 2, "ops": ops}})
    assert "| `aten::mm` | 3 |" in table and table.count("\n") == len(ops) + 2


def test_demo_preset_benchmarks_the_bare_run_and_counts_its_steps():
    """--preset demo: each method at the size `python METHOD.py` trains (MAE: ViT-micro/4 at 32 px, batch 128) and
    the steps of that run, 3 epochs x 78 full batches of the 10,000 synthetic images."""
    args = bench.parse_args(["--preset", "demo"])
    cfg = bench.method_config(mae, args)
    demo = mae.PRESETS["demo"]
    assert (cfg.model, cfg.img_size, cfg.patch_size, cfg.batch_size) == (
        demo["model"], demo["img_size"], demo["patch_size"], demo["batch_size"]) == ("vit_micro", 32, 4, 128)
    assert bench.demo_steps(cfg) == 3 * 78
    assert bench.method_config(mae, bench.parse_args(["--preset", "demo", "--batch-size", "2"])).batch_size == 2
    with pytest.raises(UserError, match="--preset demo benchmarks each demo's own model"):
        bench.parse_args(["--preset", "demo", "--model", "vit_base"])


def test_demo_preset_end_to_end(tmp_path):
    """`bench.py --preset demo` as a user runs it (one method, a small batch): the demo's model in the row, and the
    steps of a demo run at that batch (3 epochs x 625 batches of 16)."""
    out = tmp_path / "bench.json"
    proc = run_script("bench.py", "--preset", "demo", "--methods", "mae", "--batch-size", "16", "--steps", "1",
                      "--no-compile", "--device", "cpu", "--json", str(out), env=ONE_THREAD)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "vit_micro/4 32px batch 16" and row["run_steps"] == 3 * 625
    assert "| mae | vit_micro/4 32px batch 16 |" in proc.stdout and "pays off after" not in proc.stdout


def test_compile_table_says_after_how_many_steps_compiling_pays_off():
    """60 s of compiling that saves 100 ms per step is won back after 600 steps; a compiled step that is not faster
    never pays off."""
    def row(eager_ms, compiled_ms):
        return {"method": "mae", "model": "m", "run_steps": 234, "bf16": {"step_ms": eager_ms},
                "compiled_bf16": {"step_ms": compiled_ms, "compile_s": 60.0}}

    table = bench.compile_table([row(500.0, 400.0), row(500.0, 520.0)]).splitlines()
    assert table[2] == "| mae | m | 500.0 | 400.0 | 60 | 600 | 234 |"
    assert table[3] == "| mae | m | 500.0 | 520.0 | 60 | never (not faster) | 234 |"


# ------------------------------------------------------------------------------------------------------ memory
NANO = ["--model", "vit_nano", "--img-size", "32"]  # every method's ImageNet recipe at a tiny size


@pytest.mark.parametrize("method", bench.METHODS)
def test_grad_checkpointing_is_wired_into_every_method(method):
    """--grad-checkpointing reaches every block stack of each method's build_model, gives the same loss and
    gradients in a training step (masks, corruption, drop path replayed alike) and keeps fewer bytes for backward:
    no block call saves any (each keeps only its inputs, which count before the call)."""
    module = importlib.import_module(method)
    cfg = bench.method_config(module, bench.parse_args([*NANO, "--batch-size", "2"]))
    runs = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = module.build_model(dataclasses.replace(cfg, grad_checkpointing=checkpointing)).train()
        switches = [m.grad_checkpointing for m in model.modules() if hasattr(m, "grad_checkpointing")]
        assert switches and set(switches) == {checkpointing}
        batch = bench.bench_batch(module, cfg, torch.device("cpu"))
        torch.manual_seed(1)
        loss = module.training_loss(model, batch, cfg, torch.Generator().manual_seed(2))
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        runs[checkpointing] = loss, grads, bench.saved_bytes(module, model, cfg)[:2]
    (loss, grads, (saved, block)), (loss_ckpt, grads_ckpt, (saved_ckpt, block_ckpt)) = runs[False], runs[True]
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-6, msg=name)
    assert saved_ckpt < saved and block_ckpt == 0 < block


def test_the_stand_in_saves_what_fused_attention_saves():
    """The GPU table counts attention as the fused kernel keeps it: causal bf16 SDPA on the CPU is such a kernel
    (q, k, v, output, fp32 log-sum-exp), and the stand-in saves exactly as many bytes; the bf16 CPU path of
    common/vit.py keeps the [B, H, N, N] attention besides q, k and v."""
    q, k, v = (torch.randn(2, 4, 64, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def saved(attention):
        sizes = {}

        def pack(t):
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = attention(q, k, v, None, True)
        return sum(sizes.values()), out

    fused, out = saved(lambda *a: torch.nn.functional.scaled_dot_product_attention(*a[:3], is_causal=True))
    stand_in, out_stand_in = saved(bench.fused_attention_stand_in)
    explicit, _ = saved(explicit_attention)
    assert stand_in == fused == 4 * 2 * 4 * 64 * 16 * 2 + 2 * 4 * 64 * 4
    assert explicit > fused and explicit >= 3 * q.nbytes + 2 * 4 * 64 * 64 * 2  # q, k, v and [B, H, N, N]
    torch.testing.assert_close(out_stand_in, out)


def test_gpu_memory_table_lists_every_method_and_every_preset_batch_fits():
    """`bench.py --memory --no-host-memory` at a tiny size: a row per method; the state is 20 bytes per trainable
    parameter plus the frozen ones; each row's need is its line at the preset's batch with the preset's
    checkpointing, within 72 GB (the recipes at full size: docs/PERFORMANCE.md)."""
    result = bench.bench_memory(bench.parse_args(["--memory", "--no-host-memory", *NANO]))
    assert result["host_rows"] == []
    table = bench.memory_table(result).splitlines()
    assert [r["method"] for r in result["gpu_rows"]] == list(bench.METHODS)
    assert [line.split(" | ")[0] for line in table[2:]] == [f"| {m}" for m in bench.METHODS]
    assert bench.GPU_BUDGET == 72e9
    for r in result["gpu_rows"]:
        module = importlib.import_module(r["method"])
        recipe = module.Config(**module.PRESETS["imagenet"])
        assert (r["batch"], r["checkpointing"]) == (recipe.batch_size, recipe.grad_checkpointing)
        model = module.build_model(bench.method_config(module, bench.parse_args([*NANO, "--batch-size", "2"])))
        frozen = sum(t.nbytes for t in [*model.parameters(), *model.buffers()] if not t.requires_grad)
        assert r["state_bytes"] == 20 * count_params(model) + frozen
        kind = "checkpointed" if r["checkpointing"] else "plain"
        need = r["state_bytes"] + r["fixed_bytes"][kind] + r["per_image_bytes"][kind] * r["batch"]
        assert r["need_gb"] == pytest.approx(need / 1e9) and r["fits"] and need <= 72e9
        assert 0 < r["per_image_bytes"]["checkpointed"] < r["per_image_bytes"]["plain"]
    assert next(r for r in result["gpu_rows"] if r["method"] == "igpt")["checkpointing"]  # its preset needs it


def test_gpu_fit_finds_the_largest_batch_and_flags_a_batch_over_the_budget():
    """The arithmetic on a row: the largest batch is the last whose need is within 72 GB, one more is over it; a
    row fits or not by its checkpointing state, and the table says NO where it does not."""
    row = {"method": "igpt", "model": "m", "batch": 128, "accum_iter": 1, "checkpointing": False,
           "trainable_params": 76_000_000, "state_bytes": 1.5e9,
           "fixed_bytes": {"plain": 0.5e9, "checkpointed": 0.3e9},
           "per_image_bytes": {"plain": 0.66e9, "checkpointed": 0.06e9}}
    bench.gpu_fit(row)
    assert row["largest_batch"] == {"plain": 106, "checkpointed": 1170}  # (72 - 2) / 0.66, (72 - 1.8) / 0.06
    assert row["need_gb"] == pytest.approx(2.0 + 0.66 * 128) and not row["fits"]
    assert bench.memory_table({"host_rows": [], "gpu_rows": [row]}).splitlines()[2].endswith("| off | 86.5 | NO |")
    for batch, fits in ((106, True), (107, False)):
        assert bench.gpu_fit({**row, "batch": batch})["fits"] == fits
    row = bench.gpu_fit({**row, "checkpointing": True})
    assert row["fits"] and row["need_gb"] == pytest.approx(1.8 + 0.06 * 128)


# ------------------------------------------------------------------------------------------------------ --quality
TINY_QUALITY = ["--quality-epochs", "1", "--quality-finetune-epochs", "1", "--quality-flags",
                "--data synthetic --model vit_nano --img-size 16 --subset 64 --batch-size 16 --max-steps 3 "
                "--eval-images 200 --log-every 1", "--quality-finetune-flags",
                "--img-size 16 --subset 64 --batch-size 8 --max-steps 2"]


def test_quality_runs_the_protocol_end_to_end_and_writes_the_table(tmp_path):
    """`bench.py --quality` on a tiny budget (two methods, 3 steps each, the synthetic set): every run of the
    protocol (pre-training with its monitors, finetune.py on its encoder with MAE's recipe, the same fine-tune of its
    architecture from scratch), then the table between its markers in the doc -- each row's numbers those of the runs' own files --
    and results.png beside it. Run again, it reuses the finished runs and replaces the table, not adds one."""
    doc = tmp_path / "docs" / "RESULTS.md"
    doc.parent.mkdir()
    doc.write_text("# Results\n\nbefore\n")
    argv = ["--quality", "--methods", "mae,simmim", "--quality-out", tmp_path / "runs", "--quality-doc", doc,
            "--json", tmp_path / "q.json", *TINY_QUALITY]
    run_script("bench.py", *argv, env=ONE_THREAD, timeout=600)
    runs = tmp_path / "runs" / "seed0"
    for method in ("mae", "simmim"):
        pretrain = json.loads((runs / method / "results.json").read_text())
        config = json.loads((runs / method / "config.json").read_text())
        assert (config["seed"], config["epochs"], config["blr"]) == (0, 1, {"mae": 1.5e-3, "simmim": 2e-3}[method])
        tuned = json.loads((runs / method / "finetune" / "results.json").read_text())
        assert tuned["recipe"]["blr"] == mae.FINETUNE["small"]["blr"]  # MAE's recipe for both encoders
        steps = [json.loads(line) for line in (runs / method / "log.jsonl").read_text().splitlines()
                 if '"kind": "step"' in line]
        p = pretrain["eval"]["pretrained"]
        r = pretrain["eval"]["random_init"]
        scratch = json.loads((runs / method / "finetune-random-init" / "results.json").read_text())
        assert json.loads((runs / method / "finetune-random-init" / "config.json").read_text())["random_init"]
        assert scratch["recipe"] == tuned["recipe"]  # the same fine-tune, from the same architecture at random init
        row = (f"| {method} | {steps[0]['loss']:.3f} -> {pretrain['final_loss']:.3f} | {p['knn_mean']:.1f} | "
               f"{p['linear_mean']:.1f} | {r['knn_mean']:.1f}, {r['linear_mean']:.1f} | {tuned['top1']:.1f} | "
               f"{scratch['top1']:.1f} |")
        assert row in doc.read_text(), (row, doc.read_text())
    text = doc.read_text()
    assert text.startswith("# Results\n\nbefore\n") and text.count(bench.QUALITY_BEGIN) == 1
    assert "python bench.py --quality --methods mae,simmim" in text
    assert (doc.parent / "results.png").stat().st_size > 0
    again = run_script("bench.py", *argv, env=ONE_THREAD)
    assert "mae.py" not in again.stdout and again.stdout.count("| mae |") == 1  # nothing ran again
    assert doc.read_text() == text  # the same table in the same place


def test_quality_table_merges_seeds_and_shows_the_codebook_where_there_is_one():
    """Two seeds of a row read 'mean ± half the range' in every column; the codebook column shows the tokenizer's
    use and perplexity, '-' for a method without one; a row without a fine-tune (iGPT) says '-' there."""
    def seed(knn, codes=None, perplexity=None, finetune=(80.0, 75.0)):
        return {"loss_start": 2.0, "loss_end": 1.0, "knn": knn, "linear": 70.0, "random_knn": knn - 10,
                "random_linear": 60.0, "finetune": finetune[0], "scratch": finetune[1], "minutes": 3.0,
                "img_per_s": 500.0, "codes_used": codes, "perplexity": perplexity}
    rows = {"mae": [seed(50.0), seed(54.0)], "beit2": [seed(40.0, 0.5, 100.0), seed(40.0, 0.7, 120.0)],
            "igpt": [seed(60.0, finetune=(None, None))]}
    lines = bench.quality_table(rows).splitlines()
    assert lines[2] == ("| mae | 2.000 ± 0.000 -> 1.000 ± 0.000 | 52.0 ± 2.0 | 70.0 ± 0.0 | 42.0 ± 2.0, 60.0 ± 0.0 | "
                        "80.0 ± 0.0 | 75.0 ± 0.0 | 3.0 ± 0.0 | 500 ± 0 | - |")
    assert lines[3].endswith("| 40.0 ± 0.0 | 70.0 ± 0.0 | 30.0 ± 0.0, 60.0 ± 0.0 | 80.0 ± 0.0 | 75.0 ± 0.0 | 3.0 ± 0.0 "
                             "| 500 ± 0 | 60 ± 10 %, 110 ± 10 |")
    assert lines[4] == "| igpt | 2.000 -> 1.000 | 60.0 | 70.0 | 50.0, 60.0 | - | - | 3.0 | 500 | - |"
    assert len(lines) == 5
