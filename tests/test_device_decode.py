"""--decode device: the workers draw ResizedCropFlip's crops and read the JPEGs' bytes, the training device decodes
them in batches. On the CPU the same code runs with decode_jpeg(device="cpu"): the twin of the GPU path that these
tests check against ResizedCropFlip and PIL."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from torchvision import transforms as T

import mae
from common import UserError
from common.data import (IMAGENET_MEAN, IMAGENET_STD, DeviceDecodeCrop, FileDataset, JpegCrop, LoaderData,
                         ResizedCropFlip, build_train_data, draft_scale, epoch_order, load_image, mix_seed,
                         seeded_rng)
from common.training import Dist, parse_config
from conftest import TINY, photo_like, read_log, run_script

CPU = torch.device("cpu")
MAE_TINY = TINY + ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2"]


def pil_crop_resize(path, box, flip, size):
    """PIL's full-size decode of `path`, cut to box (top, left, h, w) and resized as decode_batch resizes: the
    twin's output where torchvision's decode equals PIL's. uint8 [3, S, S]."""
    top, left, h, w = box
    crop = np.array(load_image(path).crop((left, top, left + w, top + h)))  # [h, w, 3]
    x = torch.from_numpy(crop).permute(2, 0, 1)[None].float()  # [1, 3, h, w]
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)[0].clamp(0, 255).round().byte()
    return x.flip(-1) if flip else x


@pytest.mark.parametrize("width,height", [(500, 375), (2000, 1500)])
def test_twin_draws_resized_crop_flips_crops_and_decodes_like_pil(tmp_path, width, height):
    """From the same seed DeviceDecodeCrop draws RandomResizedCrop.get_params' box on the full size and
    RandomHorizontalFlip's flip, and nothing more (the next draw is the same); the CPU twin's pixels are PIL's full
    decode of that box, resized in float and rounded, exactly: torchvision's libjpeg-turbo decode is PIL's. Against
    ResizedCropFlip: within 2 levels where it decodes at full size (500 x 375 at 224 px: its uint8 resize rounds
    each pass, ours once), within 3 levels on average where it decodes at 1/s (2000 x 1500)."""
    path = tmp_path / "photo.jpg"
    photo_like(width, height).save(path, quality=90)
    S, scale = 224, (0.2, 1.0)
    samples, boxes, flips, references = [], [], [], []
    for seed in range(12):
        with seeded_rng(seed):
            samples.append(load_image(path, DeviceDecodeCrop(S, scale)))
            after = torch.rand(1)
        with seeded_rng(seed):
            boxes.append(T.RandomResizedCrop.get_params(Image.new("RGB", (width, height)), scale, (3 / 4, 4 / 3)))
            flips.append(bool(torch.rand(1) < 0.5))
            assert torch.equal(torch.rand(1), after)
        with seeded_rng(seed):
            references.append(load_image(path, ResizedCropFlip(S, scale)))
    assert all(isinstance(s, JpegCrop) and s.path == str(path) for s in samples)
    assert [s.box for s in samples] == boxes and [s.flip for s in samples] == flips
    assert 0 < sum(flips) < len(flips)
    out = DeviceDecodeCrop(S, scale).decode_batch(samples, CPU)  # one decode_jpeg call for the 12
    assert out.dtype == torch.uint8 and out.shape == (12, 3, S, S)
    gaps = []
    for k, (box, flip) in enumerate(zip(boxes, flips)):
        assert torch.equal(out[k], pil_crop_resize(path, box, flip, S)), k
        gaps.append((out[k].int() - references[k].int()).abs())
    reduced = [draft_scale(h, w, S) > 1 for _, _, h, w in boxes]
    if width == 500:
        assert not any(reduced) and max(g.max().item() for g in gaps) <= 2
    else:
        assert all(reduced) and max(g.float().mean().item() for g in gaps) < 3


def test_a_mixed_folder_decodes_jpegs_on_the_device_and_the_rest_in_the_workers(tmp_path, monkeypatch):
    """A folder of an RGB JPEG, a PNG, a CMYK JPEG and a grayscale JPEG: the workers decode no JPEG the device
    takes (no pixel load) and give ResizedCropFlip's uint8 crop for the two others; the batch comes out normalised,
    [4, 3, S, S], each image ResizedCropFlip's of the same draws (exactly where the worker made it, within 2 levels
    where the twin did); the log line says where JPEGs are decoded."""
    photo = photo_like(60, 45)  # under 2 S on every side: ResizedCropFlip decodes at full size too
    photo.save(tmp_path / "a.jpg", quality=90)
    photo.save(tmp_path / "b.png")
    photo.convert("CMYK").save(tmp_path / "c.jpg", quality=90)
    photo.convert("L").save(tmp_path / "d.jpg", quality=90)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK" and Image.open(tmp_path / "d.jpg").mode == "L"
    S, seed, epoch = 32, 3, 1
    cfg = SimpleNamespace(data="folder", data_path=str(tmp_path), img_size=S, subset=0, seed=seed,
                          skip_bad_images=False, batch_size=4, workers=0, resident=True, decode="device")
    logs = []
    data = build_train_data(cfg, Dist(0, 1, 0, CPU), (0.2, 1.0), log=logs.append)
    assert isinstance(data, LoaderData) and logs[-1].endswith("JPEGs decoded on cpu in batches")
    ds = data.loader.dataset
    names = [f.rsplit("/", 1)[-1] for f in ds.files]
    assert names == ["a.jpg", "b.png", "c.jpg", "d.jpg"]
    decoded = set()  # the files whose pixels a worker decodes
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda img: decoded.add(img.filename) or real_load(img))
    samples = [ds[(i, epoch)][0] for i in range(4)]
    monkeypatch.undo()
    assert decoded == {ds.files[1], ds.files[2]}  # b.png and the CMYK c.jpg; a.jpg and d.jpg are left to the device
    assert [type(s) for s in samples] == [JpegCrop, torch.Tensor, torch.Tensor, JpegCrop]
    expected = []
    for i in range(4):
        with seeded_rng(mix_seed(seed, epoch, i)):
            expected.append(load_image(ds.files[i], ResizedCropFlip(S, (0.2, 1.0))))
    assert torch.equal(samples[1], expected[1]) and torch.equal(samples[2], expected[2])
    (x, labels), = list(data.epoch(epoch))
    assert x.dtype == torch.float32 and x.shape == (4, 3, S, S) and labels.tolist() == [-1] * 4
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    levels = ((x * std + mean) * 255).round()  # back to 0..255
    for j, i in enumerate(epoch_order(4, seed, epoch, 0, 1).tolist()):
        gap = (levels[j] - expected[i]).abs().max().item()
        assert gap == 0 if i in (1, 2) else gap <= 2, (names[i], gap)
    gray = levels[epoch_order(4, seed, epoch, 0, 1).tolist().index(3)]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # decoded to RGB as PIL's "L" -> "RGB"


def test_an_unreadable_file_is_named_and_skip_bad_images_replaces_it(tmp_path):
    """Text named .JPEG: the worker's header read fails, a UserError naming the file (suggesting
    --skip-bad-images), or with --skip-bad-images' list a readable replacement. A truncated JPEG, whose header
    reads well, fails in the batched decode: a UserError naming that file, not the batch."""
    good, bad, cut = tmp_path / "good.jpg", tmp_path / "odd_text.JPEG", tmp_path / "cut.jpg"
    photo_like(64, 48).save(good, quality=90)
    bad.write_text("this is text, not an image")
    cut.write_bytes(good.read_bytes()[:-400])  # the entropy-coded data cut short
    transform = DeviceDecodeCrop(16, (0.2, 1.0))
    ds = FileDataset([str(bad), str(good)], [-1, -1], 0)
    ds.transform = transform
    with pytest.raises(UserError, match=r"cannot read image .*odd_text\.JPEG.*--skip-bad-images"):
        ds[(0, 0)]
    ds.bad_images_log = str(tmp_path / "bad_images.txt")
    sample, _ = ds[(0, 0)]
    assert isinstance(sample, JpegCrop) and sample.path == str(good)
    assert (tmp_path / "bad_images.txt").read_text() == f"{bad}\n"
    samples = [load_image(good, transform), load_image(cut, transform)]
    assert isinstance(samples[1], JpegCrop)  # the worker reads the header only
    with pytest.raises(UserError, match=r"cannot read image .*cut\.jpg on cpu"):
        transform.decode_batch(samples, CPU)
    assert transform.decode_batch(samples[:1], CPU).shape == (1, 3, 16, 16)


def jpeg_folder(root, n):
    root.mkdir()
    for i in range(n):
        photo_like(40, 30, seed=i).save(root / f"{i:02d}.jpg", quality=90)
    return root


def test_mae_trains_with_device_decode_and_skips_a_bad_file(tmp_path):
    """mae.py --decode device on a folder of JPEGs, their bytes read by a worker process and decoded by the CPU twin
    in the main process: the run says where it decodes, trains its 2 steps with a finite loss and records --decode in
    config.json; a text file named .JPEG among them ends the run with one line naming it (exit 2), and
    --skip-bad-images lists it and trains on."""
    root = jpeg_folder(tmp_path / "data", 15)
    (root / "odd_text.JPEG").write_text("this is text, not an image")
    args = [*MAE_TINY, "--data", "folder", "--data-path", root, "--subset", "0", "--batch-size", "8",
            "--max-steps", "2", "--decode", "device", "--no-resident", "--workers", "1"]  # 2 steps of 8: every file
    proc = run_script("mae.py", *args, "--out", tmp_path / "stop", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot read image")
    assert "odd_text.JPEG" in proc.stderr.strip().splitlines()[-1]
    out = tmp_path / "out"
    proc = run_script("mae.py", *args, "--skip-bad-images", "--out", out)
    assert "data: folder, 16 images, DataLoader with 1 workers, JPEGs decoded on cpu in batches" in proc.stdout
    assert (out / "bad_images.txt").read_text() == f"{root / 'odd_text.JPEG'}\n"
    steps = read_log(out, "step")
    assert [s["step"] for s in steps] == [0, 1] and all(math.isfinite(s["loss"]) for s in steps)
    assert json.loads((out / "config.json").read_text())["decode"] == "device"


def test_device_decode_with_a_methods_own_views_is_one_line(tmp_path):
    """BEiT brings its own two-view transform (made in the workers): --decode device is refused with one line,
    exit 2, not ignored."""
    root = jpeg_folder(tmp_path / "data", 16)
    proc = run_script("beit.py", *TINY, "--data", "folder", "--data-path", root, "--subset", "0", "--decode", "device",
                      "--no-resident", "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: --decode device decodes the default crop's JPEGs; this method's own views")


@pytest.mark.parametrize("argv,message", [
    (["--decode", "gpu"], "unknown --decode 'gpu'; choose workers or device"),
    (["--decode", "device"], "--decode device decodes image files (--data imagenet or folder); --data synthetic is "
                             "held in memory"),
    (["--decode", "device", "--data", "cifar10", "--no-resident"], "--data cifar10 is held in memory"),
])
def test_a_bad_decode_setting_is_one_line(argv, message):
    with pytest.raises(UserError) as e:
        parse_config(mae.Config, mae.PRESETS, argv)
    assert message in str(e.value) and "\n" not in str(e.value)
