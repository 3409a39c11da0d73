"""The end of a pre-training run: encoder.pth on disk before the monitors, a stop signal during the monitors ends
them within seconds (results.json says what was skipped), --max-steps caps BEiT's stage 1 too, and the monitors'
image caps (--eval-images, and the default of a --max-steps run)."""
import json
import os
import signal
import subprocess
import sys
import time
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
TOKENIZER_STEPS = ["--tokenizer-epochs", "3", "--tokenizer-batch-size", "16"]  # 64 images: 12 stage-1 steps uncapped


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------ a signal in the monitors
def test_sigterm_during_the_monitors_stops_them_within_seconds(tmp_path):
    """encoder.pth is on disk when the monitors start (the log line says so); SIGTERM then stops them at the next
    batch: exit 0 within seconds, results.json with what finished and a "stopped" line naming what did not. Uncut,
    the monitors here take well over 10 s: 6,000 images of 48 px at batch 1, for each of the two encoders."""
    out = tmp_path / "run"
    args = [*MAE_TINY, "--img-size", "48", "--batch-size", "1", "--subset", "5000", "--max-steps", "1",
            "--eval-images", "0", "--out", out]
    proc = subprocess.Popen([sys.executable, str(ROOT / "mae.py"), *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    before = []
    for line in proc.stdout:
        before.append(line)
        if "encoder.pth; the monitors" in line:
            break
    else:
        raise AssertionError("the monitors did not start:\n" + "".join(before[-30:]))
    assert (out / "encoder.pth").is_file() and not (out / "results.json").exists()  # written before the monitors
    t = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    seconds = time.perf_counter() - t
    assert proc.returncode == 0, rest[-3000:]
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
    proc = subprocess.Popen([sys.executable, str(ROOT / "igpt.py"), *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    before = []
    for line in proc.stdout:
        before.append(line)
        if "encoder.pth; the per-layer monitors next" in line:
            break
    else:
        raise AssertionError("the monitors did not start:\n" + "".join(before[-30:]))
    assert (out / "encoder.pth").is_file() and not (out / "results.json").exists()
    t = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    seconds = time.perf_counter() - t
    assert proc.returncode == 0, rest[-3000:]
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
