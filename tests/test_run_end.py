"""The end of a pre-training run: encoder.pth on disk before the monitors, a stop signal during the monitors ends
them within seconds (results.json says what was skipped), --max-steps caps BEiT's stage 1 too, and the monitors'
image caps (--eval-images, and the default of a --max-steps run)."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import beit
import beit2
import mae
from common import evaluation
from common.training import Dist, Preempted, parse_config
from conftest import ROOT, TINY, read_log
from test_mae import run_main_in_process

MAE_TINY = TINY + ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2"]
PICTURE_ARGS = {  # every method at its tiny size (BEiT and BEiT v2 with a one-epoch tokenizer of 6 steps)
    "mae": MAE_TINY, "simmim": TINY + ["--mask-patch-size", "8"],
    "beit": TINY + ["--vocab-size", "64", "--dvae-stride", "4", "--dvae-hidden", "16", "--dvae-codebook-dim", "16",
                    "--tokenizer-epochs", "1", "--tokenizer-batch-size", "16"],
    "beit2": TINY + ["--vocab-size", "64", "--vqkd-codebook-dim", "8", "--tokenizer-epochs", "1",
                     "--tokenizer-batch-size", "16"],
    "sit": TINY + ["--head-hidden-dim", "64", "--out-dim", "32"], "convmae": MAE_TINY,
    "igpt": ["--model", "igpt_nano", "--img-size", "8", "--palette-size", "8", "--palette-images", "32",
             "--batch-size", "16", "--workers", "0", "--n-samples", "2", "--log-every", "1"]}
TOKENIZER_STEPS = ["--tokenizer-epochs", "3", "--tokenizer-batch-size", "16"]  # 64 images: 12 stage-1 steps uncapped


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------ a signal in the monitors
def sigterm_in_the_monitors(script, args, started):
    """Run `script args`, send SIGTERM once its output says `started` (the monitors begin); returns (its output
    after that line, the seconds from the signal to its exit, its exit code). encoder.pth of args' --out is checked
    to be on disk, and results.json not yet, when the signal goes."""
    out = Path(args[args.index("--out") + 1])
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    before = []
    for line in proc.stdout:
        before.append(line)
        if started in line:
            break
    else:
        raise AssertionError("the monitors did not start:\n" + "".join(before[-30:]))
    assert (out / "encoder.pth").is_file() and not (out / "results.json").exists()  # written before the monitors
    t = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    return rest, time.perf_counter() - t, proc.returncode


def test_sigterm_during_the_monitors_stops_them_within_seconds(tmp_path):
    """encoder.pth is on disk when the monitors start (the log line says so); SIGTERM then stops them at the next
    batch: exit 0 within seconds, results.json with what finished and a "stopped" line naming what did not. Uncut,
    the monitors here take well over 10 s: 6,000 images of 48 px at batch 1, for each of the two encoders."""
    out = tmp_path / "run"
    args = [*MAE_TINY, "--img-size", "48", "--batch-size", "1", "--subset", "5000", "--max-steps", "1",
            "--eval-images", "0", "--out", out]
    rest, seconds, code = sigterm_in_the_monitors("mae.py", args, "encoder.pth; the monitors")
    assert code == 0, rest[-3000:]
    assert seconds < 10, f"{seconds:.1f}s after SIGTERM\n{rest[-3000:]}"
    assert "received SIGTERM: stopping the monitors" in rest and "--eval-only --resume auto" in rest
    results = json.loads((out / "results.json").read_text())
    assert results["global_step"] == 1 and results["stopped"].startswith("a stop signal during the monitors: skipped")
    skipped = results["stopped"].split("skipped ")[1].split(", ")
    assert "random_init/linear_mean" in skipped  # the last monitor never ran
    for name in ("pretrained", "random_init"):  # what finished is kept; each monitor either finished or is named
        for key in evaluation.MONITORS:
            assert (key in results["eval"][name]) != (f"{name}/{key}" in skipped), (name, key)
    encoder = load(out / "encoder.pth")
    model = load(out / "checkpoint.pth")["model"]
    assert all(torch.equal(v, model[f"encoder.{k}"]) for k, v in encoder.items())


def test_sigterm_during_igpts_per_layer_monitors_stops_them_within_seconds(tmp_path):
    """iGPT's own monitors (a probe of every layer) stop the same way: exit 0 within seconds of SIGTERM, encoder.pth
    on disk, results.json naming the encoders whose probes did not finish (test_igpt checks that the features and
    the probes end at their next batch or step)."""
    out = tmp_path / "run"
    args = ["--model", "igpt_nano", "--img-size", "8", "--palette-size", "8", "--palette-images", "32", "--subset",
            "5000", "--batch-size", "1", "--workers", "0", "--n-samples", "0", "--max-steps", "1", "--eval-images", "0",
            "--out", out]
    rest, seconds, code = sigterm_in_the_monitors("igpt.py", args, "encoder.pth; the per-layer monitors next")
    assert code == 0, rest[-3000:]
    assert seconds < 10, f"{seconds:.1f}s after SIGTERM\n{rest[-3000:]}"
    assert "received SIGTERM: stopping the monitors" in rest and "--eval-only --resume auto" in rest
    results = json.loads((out / "results.json").read_text())
    assert results["global_step"] == 1 and results["palette_size"] == 8
    assert results["stopped"] == "a stop signal during the monitors: skipped pretrained, random_init"
    assert results["eval"] == {"pretrained": {}, "random_init": {}}


def test_beits_own_numbers_survive_a_stop_in_the_monitors(tmp_path, monkeypatch):
    """BEiT's results.json holds its masked-token accuracy and its tokenizer's statistics also when a stop signal cut
    the monitors short (they were added after the monitors, and lost when the stop ended the process there)."""
    out = tmp_path / "run"
    argv = [*TINY, "--vocab-size", "64", "--dvae-stride", "4", "--dvae-hidden", "16", "--dvae-codebook-dim", "16",
            *TOKENIZER_STEPS, "--epochs", "1", "--out", out]

    def monitors_cut_short(encoder, build_model, run):  # a SIGTERM arrives during the first monitor
        run.stop.requested = True
        return {"pretrained": {}, "random_init": {}, "skipped": ["pretrained/knn_cls"]}
    monkeypatch.setattr(evaluation, "monitors", monitors_cut_short)
    monkeypatch.setattr(sys, "argv", ["beit.py", *map(str, argv)])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(Preempted):
            beit.main()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    results = json.loads((out / "results.json").read_text())
    assert results["stopped"] == "a stop signal during the monitors: skipped pretrained/knn_cls"
    (epoch,) = read_log(out, "epoch")
    assert results["mlm_acc"] == pytest.approx(epoch["mlm_acc"], abs=1e-5)
    assert results["tokenizer"]["path"] == str(out / "tokenizer.pth") and "codes_used" in results["tokenizer"]


# ----------------------------------------------------------------------------------- --max-steps caps stage 1 too
def mae_teacher(tmp_path):
    """A BEiT v2 teacher: an encoder.pth of this repository (a tiny MAE encoder at its init) with its config.json."""
    cfg, _ = parse_config(mae.Config, mae.PRESETS, MAE_TINY)
    torch.save(mae.build_model(cfg).encoder.state_dict(), tmp_path / "encoder.pth")
    (tmp_path / "config.json").write_text(json.dumps({"model": cfg.model, "img_size": cfg.img_size,
                                                      "patch_size": cfg.patch_size}))
    return tmp_path / "encoder.pth"


@pytest.mark.parametrize("module,extra", [
    (beit, ["--vocab-size", "64", "--dvae-stride", "4", "--dvae-hidden", "16", "--dvae-codebook-dim", "16"]),
    (beit2, ["--vocab-size", "64", "--vqkd-codebook-dim", "8"])])
def test_max_steps_caps_the_tokenizer_then_pretraining(module, extra, tmp_path, monkeypatch, one_thread):
    """`--max-steps 2` of the two-stage methods (stage all): 2 tokenizer steps (of 12), marked unfinished in
    tokenizer.pth, then 2 pre-training steps on that tokenizer."""
    out = tmp_path / "run"
    argv = [*TINY, *extra, *TOKENIZER_STEPS, "--max-steps", "2", "--out", out]
    if module is beit2:
        argv += ["--teacher", mae_teacher(tmp_path)]
    run_main_in_process(module, argv, monkeypatch)  # (report stubbed: no monitors)
    assert [s["step"] for s in read_log(out, "tokenizer_step")] == [0, 1]
    (done,) = read_log(out, "tokenizer_done")
    assert done["global_step"] == 2
    saved = load(out / "tokenizer.pth")
    assert not saved["complete"] and (saved["epoch"], saved["step"]) == (0, 2)
    assert [s["step"] for s in read_log(out, "step")] == [0, 1]


# ---------------------------------------------------------------------------------------- every run's pictures
@pytest.mark.parametrize("method", list(PICTURE_ARGS))
def test_a_capped_run_writes_its_curves_and_its_picture(method, tmp_path, monkeypatch, one_thread):
    """`--max-steps 3` of every method (ending mid-epoch) writes curves.png -- a panel per curve of its log: loss and
    lr per step, and a tokenizer's loss where there is one -- and its picture of where it stopped (reconstructions,
    or iGPT's samples)."""
    import importlib
    from PIL import Image
    module = importlib.import_module(method)
    out = tmp_path / "run"
    argv = [*PICTURE_ARGS[method], "--subset", "96", "--epochs", "1", "--max-steps", "3", "--out", out]
    if method == "beit2":
        argv += ["--teacher", mae_teacher(tmp_path)]
    if method == "igpt":  # its own report
        monkeypatch.setattr(module, "report_igpt", lambda *a, **k: {})
        monkeypatch.setattr(module, "report", None, raising=False)
    run_main_in_process(module, argv, monkeypatch)  # (report stubbed: no monitors)
    assert [s["step"] for s in read_log(out, "step")] == [0, 1, 2]
    curves = evaluation.read_curves(out / "log.jsonl")
    expected = ["loss", "lr"] + (["tokenizer loss"] if method in ("beit", "beit2") else [])
    assert list(curves) == expected and curves["loss"][0] == [0, 1, 2]
    width, height = Image.open(out / "curves.png").size
    assert (width, height) == (340 * len(expected), 20 + 190)  # a panel per curve, one row
    assert Image.open(out / ("samples_e0.png" if method == "igpt" else "recon_e0.png")).size[0] > 0


def test_curves_follow_the_log_through_a_resume_and_the_epochs_numbers():
    """read_curves: the last record of a step wins (a resumed run logs the steps after its checkpoint again), and
    an epoch's numbers -- its mean loss, a method's own (mlm_acc), a fine-tune's validation, the monitors of the
    pre-trained encoder (not of the random-init one) -- become per-epoch curves."""
    records = [{"kind": "step", "step": 0, "loss": 2.0, "lr": 0.1}, {"kind": "step", "step": 1, "loss": 1.9, "lr": 0.2},
               {"kind": "epoch", "epoch": 0, "loss": 1.95, "img_per_s": 9.0, "seconds": 1, "mlm_acc": 0.1},
               {"kind": "checkpoint", "epoch": 1, "step": 0, "seconds": 0.1},
               {"kind": "step", "step": 2, "loss": 1.8, "lr": 0.3},  # stopped here, resumed from step 2
               {"kind": "step", "step": 2, "loss": 1.7, "lr": 0.3}, {"kind": "step", "step": 3, "loss": 1.6, "lr": 0.2},
               {"kind": "epoch", "epoch": 1, "loss": 1.65, "img_per_s": 9.0, "seconds": 1, "mlm_acc": 0.2},
               {"kind": "eval", "epoch": 1, "pretrained": {"knn_cls": 50.0}, "random_init": {"knn_cls": 30.0}}]
    path = Path(tempfile.mkdtemp()) / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert evaluation.read_curves(path) == {
        "loss": ([0, 1, 2, 3], [2.0, 1.9, 1.7, 1.6]), "lr": ([0, 1, 2, 3], [0.1, 0.2, 0.3, 0.2]),
        "epoch loss": ([0, 1], [1.95, 1.65]), "mlm_acc": ([0, 1], [0.1, 0.2]), "pretrained/knn_cls": ([1], [50.0])}


# ------------------------------------------------------------------------------------------ the monitors' image caps
@pytest.mark.parametrize("flags,expected", [
    ([], (5000, 1000)),  # a normal run evaluates everything
    (["--max-steps", "3"], evaluation.SMOKE_EVAL_IMAGES),  # a smoke run: the default cap
    (["--eval-images", "300"], (300, 300)),
    (["--max-steps", "3", "--eval-images", "0"], (5000, 1000)),  # 0 = all, also for a smoke run
    (["--max-steps", "3", "--subset", "800"], (800, 500)),  # within --subset's draw
])
def test_eval_images_caps_the_monitors(flags, expected, monkeypatch):
    """The features the monitors extract, per split and encoder, under --eval-images and --max-steps: a seeded
    draw of the split (the same twice, not its first images) that keeps every class's share."""
    cfg, _ = parse_config(mae.Config, mae.PRESETS, ["--img-size", "8", "--patch-size", "4", "--model", "vit_nano",
                                                    "--batch-size", "500", "--workers", "0", "--amp", "fp32", *flags])
    cpu, logs = torch.device("cpu"), []
    run = SimpleNamespace(cfg=cfg, dist=Dist(0, 1, 0, cpu), device=cpu, is_main=True, log=logs.append)  # no signals
    extracted = []

    def labels_of(ds):
        return labels_of(ds.dataset)[ds.indices] if isinstance(ds, torch.utils.data.Subset) else torch.as_tensor(
            np.asarray(ds.labels))

    def spy(encoder, loader, run):  # the labels of the images the loader holds, with zero features
        y = labels_of(loader.dataset)
        extracted.append((loader.dataset, y))
        return torch.zeros(len(y), 4), torch.zeros(len(y), 4), y
    monkeypatch.setattr(evaluation, "extract_features", spy)
    monkeypatch.setattr(evaluation, "linear_probe", lambda *a, **k: 0.0)
    evaluation.evaluate(None, None, run)
    assert [len(y) for _, y in extracted] == [*expected, *expected]  # train, val of each encoder
    (train, train_y), (val, val_y) = extracted[:2]
    for y in (train_y, val_y):  # 12 classes in equal shares in the full splits: each keeps its share
        counts = y.bincount(minlength=12)
        assert counts.max() - counts.min() <= 1
    if expected[0] < 5000 and not cfg.subset:
        idx = np.asarray(train.indices)
        assert not np.array_equal(idx, np.arange(len(idx)))  # a random draw, not the first images
        assert torch.equal(extracted[2][1], train_y)  # the same images for the random-init encoder
        assert any(f"monitors on {expected[0]} of 5000 train" in line for line in logs)  # and the run says it evaluates a part
