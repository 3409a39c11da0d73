"""Reliability: exact resume, atomic checkpoints, preemption by signal, the non-finite guard, bad input, DDP."""
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import mae
from finetune import finetune_recipe
from common import UserError
from common.training import atomic_save, cli
from conftest import ROOT, TINY, read_log, run_script

MAE_TINY = TINY + ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------- exact resume
SIMMIM_TINY = TINY + ["--mask-patch-size", "8"]  # drop path 0.1 by default: the global RNG must be restored too


@pytest.mark.parametrize("script,args,stop_at", [("mae.py", MAE_TINY, 6), ("mae.py", MAE_TINY, 4),
                                                 ("simmim.py", SIMMIM_TINY, 6)])  # 4 steps per epoch
def test_exact_resume(tmp_path, script, args, stop_at):
    """K steps in one go == k steps, stop (mid-epoch or at an epoch end), resume to K: bitwise the same per-step
    losses and final weights and optimizer state."""
    full, part = tmp_path / "full", tmp_path / "part"
    run_script(script, *args, "--epochs", "3", "--max-steps", "10", "--out", full)
    run_script(script, *args, "--epochs", "3", "--max-steps", stop_at, "--out", part)
    ckpt = load(part / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["step"], ckpt["global_step"]) == (stop_at // 4, stop_at % 4, stop_at)
    run_script(script, *args, "--epochs", "3", "--max-steps", "10", "--out", part, "--resume", "auto")
    losses_full = {s["step"]: s["loss"] for s in read_log(full, "step")}
    losses_part = {s["step"]: s["loss"] for s in read_log(part, "step")}  # both segments, one log
    assert sorted(losses_part) == list(range(10))
    assert losses_part == losses_full
    a, b = load(full / "checkpoint.pth"), load(part / "checkpoint.pth")
    assert a["global_step"] == b["global_step"] == 10
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(), b["optimizer"]["state"][0].values()))


def test_checkpoint_contents(tmp_path):
    out = tmp_path / "run"
    run_script("mae.py", *MAE_TINY, "--epochs", "1", "--out", out, "--ckpt-every-steps", "2")
    ckpt = load(out / "checkpoint.pth")  # weights_only: plain tensors and containers only
    assert {"method", "config", "epoch", "step", "global_step", "model", "optimizer", "scaler", "rng"} <= set(ckpt)
    assert ckpt["method"] == "mae" and ckpt["config"]["model"] == "vit_nano"
    assert len(ckpt["rng"]) == 1 and {"python", "numpy", "torch"} <= set(ckpt["rng"][0])  # one state per rank
    saved = [c for c in read_log(out, "checkpoint")]
    assert [(c["epoch"], c["step"]) for c in saved] == [(0, 2), (1, 0), (1, 0)]  # step 2, step 4 = epoch end
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    atomic_save({"w": torch.arange(5)}, path)
    before = path.read_bytes()

    def torn_save(obj, f):  # writes half a file, then the disk "fills up"
        f.write(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        atomic_save({"w": torch.zeros(5)}, path)
    assert path.read_bytes() == before
    assert torch.equal(load(path)["w"], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


# ------------------------------------------------------------------------------------------------------- preemption
def start(out, *extra):
    return subprocess.Popen([sys.executable, str(ROOT / "mae.py"), *MAE_TINY, "--epochs", "1000", "--out", str(out),
                             *map(str, extra)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(proc, out, n, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        if (out / "log.jsonl").exists() and len(read_log(out, "step")) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("training did not start")


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
    out = tmp_path / "run"
    proc = start(out)
    wait_for_steps(proc, out, 3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "received SIGTERM" in stdout + stderr and "--resume auto" in stdout + stderr
    ckpt = load(out / "checkpoint.pth")
    done = len(read_log(out, "step"))
    assert ckpt["global_step"] == done  # the step in flight was finished, and it is in the checkpoint
    assert (ckpt["epoch"], ckpt["step"]) == (done // 4, done % 4)
    run_script("mae.py", *MAE_TINY, "--epochs", "1000", "--out", out, "--resume", "auto", "--max-steps", done + 2)
    assert [s["step"] for s in read_log(out, "step")] == list(range(done + 2))


def test_ctrl_c_then_the_printed_resume_hint_alone_continues_bitwise(tmp_path):
    """Ctrl-C (SIGINT), then the command the run printed, as printed (`--resume auto --out DIR --max-steps N`, the
    run's own cap): config.json supplies the rest, and the run ends bitwise where one uninterrupted run ends."""
    args = [*MAE_TINY, "--epochs", "10", "--max-steps", "30", "--blr", "0.01"]  # 4 steps an epoch
    full, out = tmp_path / "full", tmp_path / "run"
    run_script("mae.py", *args, "--out", full)
    proc = subprocess.Popen([sys.executable, str(ROOT / "mae.py"), *map(str, args), "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(proc, out, 3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    hint = re.search(r"Continue with (--resume auto .*)", stdout).group(1)
    stopped = int(re.search(r"stopped by signal after step (\d+)", stdout).group(1))
    assert 2 <= stopped < 29 and hint == f"--resume auto --out {out} --max-steps 30"
    assert [s["step"] for s in read_log(out, "step")] == list(range(stopped + 1))  # the same numbering
    proc = run_script("mae.py", *hint.split())
    assert f"continuing at step {stopped + 1}" in proc.stdout and "differ from the checkpoint" not in proc.stdout
    assert [s["loss"] for s in read_log(out, "step")] == [s["loss"] for s in read_log(full, "step")]
    a, b = load(full / "checkpoint.pth"), load(out / "checkpoint.pth")
    assert a["global_step"] == b["global_step"] == 30
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert json.loads((out / "results.json").read_text())["final_loss"] == a["last_loss"] == b["last_loss"]
    saved = json.loads((out / "config.json").read_text())
    assert (saved["model"], saved["max_steps"], saved["resume"]) == ("vit_nano", 30, "auto")


def test_resume_flags_that_contradict_the_run_and_state_dicts_that_do_not_fit(tmp_path, capsys):
    """A flag that contradicts the checkpoint: one line with both values. A model that does not fit (another
    decoder): one line naming the first missing, unexpected and mis-shaped keys. --resume auto needs --out."""
    out = tmp_path / "run"
    run_script("mae.py", *MAE_TINY, "--epochs", "1", "--out", out)
    code, err = run_main(["--resume", "auto", "--out", out, "--img-size", "32"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--img-size 32 contradicts" in err and "img-size 16" in err
    code, err = run_main(["--resume", "auto", "--out", out, "--decoder-depth", "2", "--decoder-dim", "16"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not fit this model" in err
    assert "12 missing: decoder_blocks.1.norm1.weight, " in err and "19 mis-shaped: mask_token (1, 1, 32) vs (1, 1, 16) here" in err
    code, err = run_main(["--resume", "auto"], capsys)
    assert code == 2 and "--resume auto needs --out" in err
    torch.save({"x": np.zeros(2)}, tmp_path / "pickled.pth")
    code, err = run_main(["--resume", tmp_path / "pickled.pth", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "not a file of tensors and plain data saved by torch.save" in err
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    code, err = run_main(["--resume", tmp_path / "notes.txt", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "notes.txt: not a file of tensors and plain data saved by torch.save" in err
    whole = (out / "checkpoint.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[:len(whole) // 2])  # a copy cut short
    code, err = run_main(["--resume", tmp_path / "cut.pth", "--out", tmp_path / "o"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cut.pth: not a complete file saved by torch.save" in err


def test_second_signal_exits_at_once(tmp_path):
    """The first signal waits for the end of the accumulation (64 micro-steps here); a second exits at once."""
    out = tmp_path / "run"
    proc = start(out, "--batch-size", "1", "--accum-iter", "64")
    wait_for_steps(proc, out, 2)
    proc.send_signal(signal.SIGINT)
    for line in proc.stdout:  # wait until the handler has seen the first one (signals do not queue)
        if "received SIGINT" in line:
            break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT  # killed by the re-delivered signal
    assert not (out / "checkpoint.pth").exists()  # it did not wait to save


# ------------------------------------------------------------------------------------------------ non-finite guard
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    run_script("mae.py", *MAE_TINY, "--epochs", "1", "--out", out)
    good = (out / "checkpoint.pth").read_bytes()
    proc = run_script("mae.py", *MAE_TINY, "--epochs", "3", "--out", out, "--resume", "auto", "--lr", "1e30",
                      check=False)
    assert proc.returncode == 1
    assert "differ from the checkpoint's: epochs 1 -> 3" in proc.stdout  # a changed setting is reported
    err = proc.stderr.strip().splitlines()[-1]
    assert "non-finite at step" in err or "non-finite" in err
    assert "--amp fp32" in err and "Traceback" not in proc.stderr
    step = int(err.split("step ")[1].split(";")[0])
    assert step >= 4  # the resumed run diverged after the good epoch
    assert (out / "checkpoint.pth").read_bytes() == good
    assert all(torch.isfinite(v).all() for v in load(out / "checkpoint.pth")["model"].values())


# ---------------------------------------------------------------------------------------------------------- bad input
def run_main(argv, capsys):
    """mae.py's cli(main) in this process: (exit code, stderr)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    old = sys.argv
    sys.argv = ["mae.py", *map(str, argv)]
    try:
        with pytest.raises(SystemExit) as e:
            cli(mae.main)
    finally:
        sys.argv = old
        for s, h in handlers.items():
            signal.signal(s, h)
    return e.value.code, capsys.readouterr().err


def image_folder(root, n=4, size=(20, 20), bad=None):
    """A folder/<class>/ tree of valid PNGs, plus the file `bad` (name, bytes) when given."""
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    if bad:
        (root / "a" / bad[0]).write_bytes(bad[1])
    return root


def truncated_png(tmp_path):
    Image.fromarray(np.zeros((20, 20, 3), np.uint8) + 100).save(tmp_path / "x.png")
    return (tmp_path / "x.png").read_bytes()[:60]


BAD_INPUTS = [
    (["--data", "folder", "--data-path", "/nonexistent/images"], "does not exist"),
    (["--data", "imagenet"], "needs --data-path"),
    (["--img-size", "18", "--patch-size", "4"], "not divisible by --patch-size"),
    (["--mask-ratio", "0"], "--mask-ratio must be in (0, 1)"),
    (["--mask-ratio", "1"], "--mask-ratio must be in (0, 1)"),
    (["--mask-ratio", "-0.2"], "--mask-ratio must be in (0, 1)"),
    (["--data", "imagenet1k"], "unknown dataset"),
    (["--model", "vit_gigantic"], "unknown model"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--epochs", "-3"], "--epochs must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--batch-size", "65"], "larger than the 64 images"),
    (["--resume", "/nonexistent/ckpt.pth"], "does not exist"),
    (["--eval-only"], "--eval-only needs --resume"),
    (["--out", "/proc/mim-test-out"], "not writable"),
    (["--amp", "fp16"], "fp16 needs CUDA"),
    (["--epochs", "2", "--warmup-epochs", "2"], "--warmup-epochs 2 is not shorter than --epochs 2"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_one_line_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code, err = run_main(MAE_TINY + ["--out", out] + argv, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("case", ["empty", "no-images", "corrupt-jpeg", "truncated-png"])
def test_bad_folders(tmp_path, capsys, case):
    root = tmp_path / "data"
    if case == "empty":
        root.mkdir()
        expected = "is empty"
    elif case == "no-images":
        (root / "a").mkdir(parents=True)
        (root / "a" / "notes.txt").write_text("hello")
        expected = "no images"
    elif case == "corrupt-jpeg":
        image_folder(root, bad=("broken.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg at all" * 10))
        expected = "broken.jpg"
    else:
        image_folder(root, bad=("cut.png", truncated_png(tmp_path)))
        expected = "cut.png"
    code, err = run_main(MAE_TINY + ["--data", "folder", "--data-path", root, "--subset", "0", "--batch-size", "3",
                                     "--out", tmp_path / "out"], capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


def class_folders(root, splits):
    """root/<split>/<class>/ PNGs; splits: {split: {class: n}}. Class k's images are grey level 40 k (+ noise)."""
    for split, classes in splits.items():
        for c, n in classes.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                level = 40 * "abcd".index(c) + np.random.default_rng(i).integers(0, 8, (20, 20, 3))
                Image.fromarray(level.astype(np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_class_folders_that_would_shift_labels_exit_2_naming_the_folder(tmp_path, capsys):
    """One class list, train/'s, numbers every split: val/ without class b keeps c at 2, config.json records the
    list; a val/ class that train/ lacks, an empty class folder and a split passed as --data-path are one line each,
    exit 2, naming the folder."""
    data = class_folders(tmp_path / "data", {"train": {"a": 3, "b": 3, "c": 3}, "val": {"a": 2, "c": 2}})
    from common.data import build_dataset
    assert build_dataset("imagenet", "val", str(data)).labels == [0, 0, 2, 2]  # c is 2 in both splits
    assert build_dataset("imagenet", "pretrain", str(data)).labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    args = [*MAE_TINY, "--data", "imagenet", "--data-path", data, "--subset", "0", "--batch-size", "3"]
    run_script("mae.py", *args, "--epochs", "1", "--max-steps", "1", "--out", tmp_path / "ok")
    saved = json.loads((tmp_path / "ok" / "config.json").read_text())
    assert saved["classes"] == ["a", "b", "c"] and saved["resident"] is False  # JPEG/PNG folders: DataLoader

    class_folders(data, {"val": {"d": 1}})
    code, err = run_main([*args, "--out", tmp_path / "o1"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"class folder {data / 'val' / 'd'} has no counterpart in the training split" in err
    (data / "val" / "d" / "0.png").unlink()
    (data / "val" / "d").rmdir()
    (data / "train" / "b0").mkdir()  # sorts between a and b: every later label would shift by one
    code, err = run_main([*args, "--out", tmp_path / "o2"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"class folder {data / 'train' / 'b0'} holds no images" in err
    (data / "train" / "b0").rmdir()
    code, err = run_main([*args[:-5], data / "train", "--subset", "0", "--batch-size", "3", "--out", tmp_path / "o3"],
                         capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"is a split; pass the folder that holds train/ and val/: --data-path {data}" in err
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))  # refused before anything is written


def test_preview_grid_of_a_class_sorted_folder_shows_every_class(tmp_path):
    """The 8 reconstruction rows of a 4-class folder: every class twice (round-robin over classes, each class's
    images in a seeded order), not the first 8 files (5 of class a)."""
    from common.data import preview_images, preview_indices
    labels = [0] * 5 + [1] * 3 + [2] * 1 + [3] * 6
    drawn = preview_indices(labels, 8, seed=0)
    assert [labels[i] for i in drawn] == [0, 1, 2, 3, 0, 1, 3, 0] and len(set(drawn)) == 8
    assert drawn == preview_indices(labels, 8, seed=0) != preview_indices(labels, 8, seed=1)
    assert sorted(preview_indices([-1] * 5, 8, seed=0)) == [0, 1, 2, 3, 4]  # unlabelled: all of them, fewer than 8
    data = class_folders(tmp_path / "data", {"train": dict.fromkeys("abcd", 5), "val": dict.fromkeys("abcd", 5)})
    cfg = SimpleNamespace(data="imagenet", data_path=str(data), img_size=20, subset=0, seed=0, skip_bad_images=False)
    rows = preview_images(cfg, dist=None)  # [8, 3, 20, 20], normalised
    from common.data import IMAGENET_MEAN, IMAGENET_STD
    pixels = rows * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    shown = (pixels.mean((1, 2, 3)) * 255 / 40).floor().long().tolist()  # grey level 40 k + [0, 8): class k
    assert shown == [0, 1, 2, 3, 0, 1, 2, 3]


def test_corrupt_image_in_worker_process_is_one_line(tmp_path):
    """Through a DataLoader worker the error still names the file in one line, without a traceback."""
    root = image_folder(tmp_path / "data", bad=("broken.jpg", b"not an image"))
    proc = run_script("mae.py", *MAE_TINY, "--data", "folder", "--data-path", root, "--subset", "0", "--batch-size",
                      "3", "--workers", "1", "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot read image") and "broken.jpg" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_bad_image_with_two_workers_exits_at_once(tmp_path):
    """A text file named .JPEG read by one of two workers: the run exits 2 with the one line, and does not wait for
    the workers, which ignore SIGTERM (the interpreter's exit would stop them with it, then wait forever)."""
    root = class_folders(tmp_path / "data", {"train": dict.fromkeys("abcd", 6), "val": dict.fromkeys("abcd", 3)})
    (root / "train" / "b" / "odd_text.JPEG").write_text("this is text, not an image")
    proc = run_script("mae.py", *MAE_TINY, "--data", "folder", "--data-path", root, "--subset", "0", "--batch-size",
                      "3", "--workers", "2", "--out", tmp_path / "out", check=False, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "killed by signal" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot read image") and "odd_text.JPEG" in proc.stderr


def test_skip_bad_images_lists_the_file_once_and_finishes(tmp_path):
    """--skip-bad-images with 2 workers: the same folder trains, evaluates and finishes; bad_images.txt names the
    file once, though the training loader's workers and the monitors' loaders each met it."""
    root = class_folders(tmp_path / "data", {"train": dict.fromkeys("abcd", 6), "val": dict.fromkeys("abcd", 3)})
    bad = root / "train" / "b" / "odd_text.JPEG"
    bad.write_text("this is text, not an image")
    proc = run_script("mae.py", *MAE_TINY, "--data", "folder", "--data-path", root, "--subset", "0", "--batch-size",
                      "3", "--workers", "2", "--skip-bad-images", "--out", tmp_path / "out", timeout=300)
    assert (tmp_path / "out" / "bad_images.txt").read_text() == f"{bad}\n"
    assert "warning: skipped an unreadable image" in proc.stderr and (tmp_path / "out" / "encoder.pth").exists()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["eval"]["pretrained"]["knn_cls"] > 50  # 4 classes


def test_a_replacement_for_a_bad_image_is_a_fixed_readable_draw(tmp_path):
    """A bad file is replaced by a readable image drawn from (seed, index): the same draw every time; a dataset of
    nothing but bad files stops after MAX_REPLACEMENTS tries with one error naming the list."""
    from common.data import FileDataset, eval_transform
    root = image_folder(tmp_path / "data", bad=("broken.jpg", b"not an image"))
    files = sorted(str(p) for p in root.rglob("*.*"))
    ds = FileDataset(files, list(range(len(files))), len(files))
    ds.transform, ds.bad_images_log = eval_transform(16), str(tmp_path / "bad.txt")
    i = files.index(str(root / "a" / "broken.jpg"))
    img, label = ds[i]
    assert img.shape == (3, 16, 16) and label != i and ds[i][1] == label  # another image, the same one again
    ds.seed = 1
    assert {ds[i][1] for ds.seed in range(8)} != {label}  # the draw depends on the seed
    assert (tmp_path / "bad.txt").read_text().splitlines() == [files[i]]
    ds.bad_images_log = None
    with pytest.raises(UserError, match=r"cannot read image .*broken\.jpg.*--skip-bad-images"):
        ds[i]
    ds.files, ds.bad_images_log = [files[i]] * 3, str(tmp_path / "bad.txt")
    with pytest.raises(UserError, match="20 unreadable images in a row"):
        ds[0]


def test_a_bad_image_ends_every_process_of_a_torchrun(tmp_path):
    """The same under torchrun with 2 processes (gloo): the process that reads the file exits 2 with the one line,
    and the other one, waiting for it in a collective, ends too: the run is over within seconds, not at the
    collective's timeout (a cluster job would otherwise hold its GPUs for it)."""
    root = class_folders(tmp_path / "data", {"train": dict.fromkeys("abcd", 6), "val": dict.fromkeys("abcd", 3)})
    (root / "train" / "b" / "odd_text.JPEG").write_text("this is text, not an image")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29500 + sum(map(ord, str(tmp_path))) % 200), str(ROOT / "mae.py"), *MAE_TINY, "--data",
                           "folder", "--data-path", str(root), "--subset", "0", "--batch-size", "3", "--workers", "2",
                           "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert time.perf_counter() - t < 30 and proc.returncode != 0
    assert re.search(r"^error: cannot read image .*odd_text\.JPEG", proc.stderr, re.MULTILINE)
    assert re.search(r"exitcode\s*: 2 ", proc.stderr)  # torchrun's summary: the process that read it exited 2


def test_unusual_but_valid_images_load(tmp_path):
    """CMYK, palette (with transparency), 16-bit, grayscale and RGBA files are valid and train as RGB."""
    root = tmp_path / "data" / "a"
    root.mkdir(parents=True)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    rgb.convert("CMYK").save(root / "cmyk.jpg")
    p = rgb.convert("P")
    p.info["transparency"] = 0
    p.save(root / "palette.png", transparency=0)
    Image.fromarray((np.arange(480).reshape(20, 24) * 130).astype(np.uint16)).save(root / "gray16.png")
    rgb.convert("L").save(root / "gray.png")
    rgb.convert("RGBA").save(root / "rgba.png")
    rgb.save(root / "plain.jpg")
    out = tmp_path / "out"
    run_script("mae.py", *MAE_TINY, "--data", "folder", "--data-path", tmp_path / "data", "--subset", "0",
               "--batch-size", "3", "--epochs", "1", "--out", out)
    assert read_log(out, "epoch")[0]["loss"] > 0


@pytest.mark.parametrize("script,args", [("mae.py", MAE_TINY), ("simmim.py", TINY + ["--mask-patch-size", "8"])])
def test_warmup_as_long_as_the_run_is_one_line(tmp_path, script, args):
    proc = run_script(script, *args, "--epochs", "3", "--warmup-epochs", "3", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--warmup-epochs 3 is not shorter than --epochs 3" in proc.stderr and not (tmp_path / "o").exists()


def test_train_val_folder_with_uppercase_jpeg_through_evaluation_and_finetune(tmp_path):
    """The ImageNet layout (train/ and val/ class folders, `.JPEG` names) through pre-training with a seeded
    --subset, the monitors and fine-tuning; the subset keeps both classes in train and val."""
    for split, n in (("train", 12), ("val", 6)):
        for c, colour in (("n01", (200, 30, 30)), ("n02", (30, 30, 200))):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(n):
                noise = np.random.default_rng(i).integers(0, 40, (24, 24, 3))
                Image.fromarray((np.array(colour) + noise).clip(0, 255).astype(np.uint8)).save(
                    tmp_path / "data" / split / c / f"{c}_{i}.JPEG", format="JPEG")
    out = tmp_path / "out"
    proc = run_script("mae.py", *MAE_TINY, "--data", "folder", "--data-path", tmp_path / "data", "--subset", "16",
                      "--batch-size", "4", "--epochs", "1", "--finetune-epochs", "1", "--out", out)
    assert "data: folder, 16 images" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results["eval"]["pretrained"]) == {"knn_cls", "knn_mean", "linear_cls", "linear_mean"}
    assert results["eval"]["pretrained"]["knn_mean"] == 100.0  # two colours: trivially separable
    # one fine-tune epoch separates them too (checked with seeds 0-3, bf16 and fp32); the log says the same
    assert results["finetune"]["pretrained"] == 100.0 and (out / "encoder.pth").exists()
    assert "fine-tune pretrained: top-1 100.0" in proc.stdout


def test_logs_without_a_terminal_are_lines_not_bar_redraws(tmp_path):
    """stdout/stderr are pipes here (as under SLURM, CI or `> log`): no tqdm redraws, one plain line per logged step;
    --max-steps ending mid-epoch still writes the reconstruction grid of where it stopped."""
    out = tmp_path / "run"
    proc = run_script("mae.py", *MAE_TINY, "--max-steps", "3", "--out", out)  # 4 steps per epoch
    assert "\r" not in proc.stderr + proc.stdout and "it/s" not in proc.stderr
    # one step numbering: the console's "step N" is log.jsonl's "step" (from 0); "1/4" counts the epoch's steps done
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [re.match(r"step (\d) \(epoch 0, (\d)/4\): loss [\d.]+, lr", line).groups() for line in lines] == [
        ("0", "1"), ("1", "2"), ("2", "3")]
    assert [s["step"] for s in read_log(out, "step")] == [0, 1, 2]
    assert (out / "recon_e0.png").exists()
    # a capped run's final loss: the mean over the steps of its last (partial) epoch, as an uncapped run's
    final = json.loads((out / "results.json").read_text())["final_loss"]
    assert final == pytest.approx(sum(s["loss"] for s in read_log(out, "step")) / 3, rel=1e-6)


def test_eval_every_leaves_training_randomness_alone(tmp_path):
    """SimMIM draws drop path from the global generator: an evaluation between epochs (probe heads built with
    nn.Linear, the baseline encoder's init) must not shift it, or the losses after it would differ."""
    args = [*TINY, "--mask-patch-size", "8", "--epochs", "3", "--drop-path", "0.5"]
    run_script("simmim.py", *args, "--out", tmp_path / "plain")
    run_script("simmim.py", *args, "--eval-every", "1", "--out", tmp_path / "eval")
    assert len(read_log(tmp_path / "eval", "eval")) == 2
    assert [s["loss"] for s in read_log(tmp_path / "eval", "step")] == [s["loss"] for s in read_log(tmp_path / "plain", "step")]


def test_resume_rejects_corrupt_other_method_and_other_size(tmp_path, capsys):
    out = tmp_path / "run"
    run_script("mae.py", *MAE_TINY, "--epochs", "1", "--out", out)
    ckpt = out / "checkpoint.pth"
    (tmp_path / "corrupt.pth").write_bytes(ckpt.read_bytes()[:1000])
    code, err = run_main(MAE_TINY + ["--out", tmp_path / "o1", "--resume", tmp_path / "corrupt.pth"], capsys)
    assert code == 2 and "cannot read checkpoint" in err
    other = load(ckpt)
    other["method"] = "simmim"
    torch.save(other, tmp_path / "other.pth")
    code, err = run_main(MAE_TINY + ["--out", tmp_path / "o2", "--resume", tmp_path / "other.pth"], capsys)
    assert code == 2 and "is a simmim checkpoint" in err
    code, err = run_main(MAE_TINY + ["--out", tmp_path / "o3", "--resume", ckpt, "--model", "vit_micro"], capsys)
    assert code == 2 and "vit_nano" in err and "vit_micro" in err
    before = ckpt.read_bytes()  # a fresh run must not overwrite an existing one
    code, err = run_main(MAE_TINY + ["--out", out], capsys)
    assert code == 2 and "already holds a run" in err and ckpt.read_bytes() == before
    (tmp_path / "afile").write_text("x")
    code, err = run_main(MAE_TINY + ["--out", tmp_path / "afile"], capsys)
    assert code == 2 and "is a file" in err and (tmp_path / "afile").read_text() == "x"


# -------------------------------------------------------------------------------------------------------- distributed
def torchrun(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29500 + os.getpid() % 1000), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_ddp_two_processes(tmp_path):
    """torchrun x2 on CPU/gloo: identical replicas, global batch and lr scaling, rank-0-only writes."""
    out = tmp_path / "run"
    torchrun(ROOT / "mae.py", *MAE_TINY, "--accum-iter", "2", "--blr", "1e-3", "--out", out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr"] == pytest.approx(1e-3 * 16 * 2 * 2 / 256)  # blr x (batch x processes x accum) / 256
    steps = read_log(out, "step")
    assert [s["step"] for s in steps] == list(range(4))  # 64 images / (16 x 2 ranks) = 2 steps per epoch, 2 epochs
    done = read_log(out, "done")
    assert len(done) == 1 and done[0]["world_size"] == 2 and done[0]["replicas_identical"] is True
    assert len(read_log(out, "epoch")) == 2  # one writer


def test_ddp_grad_sync_skipped_on_accumulation_steps():
    torchrun(ROOT / "tests" / "ddp_worker.py")


@pytest.mark.parametrize("script,args", [("mae.py", MAE_TINY), ("simmim.py", SIMMIM_TINY)])
def test_ddp_finetune(tmp_path, script, args):
    """torchrun x2 through fine-tuning (mean pooling: the encoder's final norm must be gone, or DDP fails at the
    second step) and its random-init baseline; encoder.pth and results.json exist with both top-1s."""
    out = tmp_path / "run"
    proc = torchrun(ROOT / script, *args, "--epochs", "1", "--subset", "128", "--finetune-epochs", "2",
                    "--finetune-baseline", "--out", out)
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["finetune"]["pretrained"] <= 100 and 0 <= results["finetune"]["random_init"] <= 100
    assert results["eval"]["pretrained"] and (out / "encoder.pth").exists()
    # the recipe's batch (64 per process) over 2 processes: 128 images make 1 step an epoch, at the lr of the
    # global batch; the head starts at ~0, so the first epoch's loss (the mean over both ranks) is ln 12; the top-1
    # is a count over the 128 val images, as the log says
    table = importlib.import_module(script[:-3]).FINETUNE
    recipe = finetune_recipe(table, SimpleNamespace(img_size=16, model="vit_nano"))
    lr = recipe.blr * recipe.batch_size * 2 / recipe.lr_batch_div
    for name, label in (("pretrained", "pretrained"), ("random_init", "random-init")):
        assert f"fine-tune ({label}): 2 epochs of 1 steps, lr {lr:.3g}, " in proc.stdout
        first = float(re.search(rf"fine-tune {label} epoch 0: loss ([\d.]+)", proc.stdout).group(1))
        assert first == pytest.approx(math.log(12), abs=2e-3)
        top1 = results["finetune"][name]
        assert top1 in {round(100 * k / 128, 2) for k in range(129)}
        assert f"fine-tune {label}: top-1 {top1}\n" in proc.stdout


def test_ddp_exact_resume(tmp_path):
    """2 processes, stopped after 3 steps and resumed == 6 steps uninterrupted: bitwise the same logged losses (the
    mean over both ranks) and weights. SimMIM's drop path differs per rank, so every rank's RNG must resume."""
    args = [*SIMMIM_TINY, "--drop-path", "0.5", "--epochs", "3", "--max-steps", "6"]  # 2 steps per epoch
    full, part = tmp_path / "full", tmp_path / "part"
    torchrun(ROOT / "simmim.py", *args, "--out", full)
    torchrun(ROOT / "simmim.py", *args, "--max-steps", "3", "--out", part)
    assert len(load(part / "checkpoint.pth")["rng"]) == 2  # one state per rank
    torchrun(ROOT / "simmim.py", *args, "--out", part, "--resume", "auto")
    losses_full = {s["step"]: s["loss"] for s in read_log(full, "step")}
    assert sorted(losses_full) == list(range(6))
    assert {s["step"]: s["loss"] for s in read_log(part, "step")} == losses_full
    a, b = load(full / "checkpoint.pth")["model"], load(part / "checkpoint.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
