"""The resident (on-device, batched) augmentation against torchvision's PIL pipeline, and the two training paths."""
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

from common import UserError, data
from common.data import (IMAGENET_MEAN, IMAGENET_STD, LoaderData, ResidentData, ResizedCropFlip, SyntheticDataset,
                         crop_resize_flip, epoch_order, load_image, mix_seed, pretrain_transform, sample_resized_crops,
                         seeded_rng)
from conftest import photo_like

CPU = torch.device("cpu")


@pytest.mark.parametrize("size,scale", [((32, 32), (0.2, 1.0)), ((28, 40), (0.67, 1.0)), ((96, 64), (0.08, 1.0))])
def test_crop_statistics_match_torchvision(size, scale):
    """Area fraction, log aspect ratio and crop centre have the distribution of RandomResizedCrop.get_params."""
    H, W = size
    ratio = (3 / 4, 4 / 3)
    n = 20000
    g = torch.Generator().manual_seed(0)
    top, left, h, w = sample_resized_crops(n, H, W, scale, ratio, g, CPU)
    ours = torch.stack([h * w / (H * W), torch.log(w / h), (top + h / 2) / H, (left + w / 2) / W], 1)
    torch.manual_seed(0)
    img = torch.zeros(3, H, W)
    ref = torch.tensor([[hh * ww / (H * W), math.log(ww / hh), (i + hh / 2) / H, (j + ww / 2) / W]
                        for i, j, hh, ww in (T.RandomResizedCrop.get_params(img, scale, ratio) for _ in range(n))])
    assert torch.all((h >= 1) & (h <= H) & (w >= 1) & (w <= W) & (top >= 0) & (left >= 0))
    assert torch.all((top + h <= H) & (left + w <= W))  # every crop lies inside the image
    # mean and spread agree to within a few standard errors
    se = ref.std(0) / math.sqrt(n)
    assert torch.all((ours.mean(0) - ref.mean(0)).abs() < 5 * se + 1e-3), (ours.mean(0), ref.mean(0))
    assert torch.all((ours.std(0) / ref.std(0) - 1).abs() < 0.05), (ours.std(0), ref.std(0))
    for q in (0.1, 0.5, 0.9):
        assert torch.allclose(ours.quantile(q, 0), ref.quantile(q, 0), atol=0.03)


def reference_crop(H, W, scale, ratio, targets, log_ratios, u_top, u_left):
    """torchvision's RandomResizedCrop.get_params for one image, line by line, on given draws: the first of the 10
    tries (area, log aspect) that fits wins, placed at randint(0, H - h + 1) (= floor(u x (H - h + 1))); if none fits,
    the whole image clamped to the aspect range, centred. Returns (top, left, h, w, whether it fell back)."""
    for target, log_r in zip(targets, log_ratios):
        aspect = torch.exp(log_r)
        w, h = int(torch.round(torch.sqrt(target * aspect))), int(torch.round(torch.sqrt(target / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return int(torch.floor(u_top * (H - h + 1))), int(torch.floor(u_left * (W - w + 1))), h, w, False
    in_ratio = W / H
    if in_ratio < min(ratio):
        w, h = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(H * max(ratio))), H
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w, True


@pytest.mark.parametrize("size,scale,ratio", [
    ((32, 32), (0.2, 1.0), (3 / 4, 4 / 3)), ((16, 24), (0.08, 1.0), (0.5, 1.5)), ((16, 16), (0.6, 1.0), (1.2, 3.0)),
    ((30, 20), (1.5, 2.0), (3 / 4, 4 / 3)), ((20, 30), (1.5, 2.0), (3 / 4, 4 / 3)), ((20, 24), (1.5, 2.0), (3 / 4, 4 / 3))])
def test_crops_equal_torchvisions_get_params_on_the_same_draws(size, scale, ratio):
    """Every crop, exactly, against get_params replayed on the same draws (areas and log aspects [n, 10] for the
    tries, then the two position draws [2, n]): an asymmetric aspect range tells width from height, areas above 1
    and extreme aspects force the fallback (taller, wider and in-range images)."""
    H, W = size
    n = 300
    top, left, h, w = sample_resized_crops(n, H, W, scale, ratio, torch.Generator().manual_seed(1), CPU)
    g = torch.Generator().manual_seed(1)
    targets = H * W * torch.empty(n, 10).uniform_(scale[0], scale[1], generator=g)
    log_ratios = torch.empty(n, 10).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    u = torch.rand(2, n, generator=g)
    expected = [reference_crop(H, W, scale, ratio, targets[i], log_ratios[i], u[0, i], u[1, i]) for i in range(n)]
    assert torch.stack([top, left, h, w], 1).tolist() == [list(map(float, e[:4])) for e in expected]
    fallbacks = sum(e[4] for e in expected)
    if scale[0] > 1:
        assert fallbacks == n and len(set(expected)) == 1  # nothing fits: every image takes the one fallback
    elif size == (16, 16):
        assert 0 < fallbacks < n and (1, 0, 13, 16, True) in expected  # some fall back (16 x 16 / 1.2), some fit
    else:
        assert fallbacks < n


def test_flip_rate_and_identity_crop():
    images = torch.randint(0, 256, (400, 3, 8, 8), dtype=torch.uint8)
    data = ResidentData(images, torch.zeros(400), 400, 8, (1.0, 1.0), (1.0, 1.0), "bilinear", 0, 0, 1, CPU)
    out, _ = next(data.epoch(0))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (images.float() / 255 - mean) / std  # normalised as the DataLoader path's ToTensor + Normalize
    src = x[epoch_order(400, 0, 0, 0, 1)]
    same = torch.isclose(out, src, atol=1e-4).flatten(1).all(1)
    flipped = torch.isclose(out, src.flip(-1), atol=1e-4).flatten(1).all(1)
    assert torch.all(same ^ flipped)  # the whole image, either as is or mirrored
    assert 0.4 < flipped.float().mean() < 0.6


def test_crop_resize_matches_tensor_resized_crop():
    """One grid_sample = crop + bilinear resize with the same pixel-centre convention as torchvision's resize."""
    torch.manual_seed(0)
    img = torch.rand(1, 3, 20, 30)
    top, left, h, w = torch.tensor([3.0]), torch.tensor([5.0]), torch.tensor([10.0]), torch.tensor([12.0])
    ours = crop_resize_flip(img, top, left, h, w, torch.tensor([False]), 24, "bilinear")
    ref = TF.resized_crop(img, 3, 5, 10, 12, [24, 24], T.InterpolationMode.BILINEAR, antialias=False)
    assert torch.allclose(ours, ref, atol=1e-5)
    flipped = crop_resize_flip(img, top, left, h, w, torch.tensor([True]), 24, "bilinear")
    assert torch.allclose(flipped, ref.flip(-1), atol=1e-5)


def test_resident_and_loader_paths_agree_in_distribution():
    """Both pipelines give normalised batches of the same shape and similar per-channel statistics."""
    ds = SyntheticDataset("pretrain", 32)
    ds.ids = ds.ids[:256]
    images, labels = ds.as_uint8()
    resident = ResidentData(images, labels, 64, 32, (0.2, 1.0), (3 / 4, 4 / 3), "bicubic", 0, 0, 1, CPU)
    ds.transform = ResizedCropFlip(32, (0.2, 1.0))
    loader = LoaderData(ds, 64, 0, 0, 1, 0, CPU)
    a = torch.cat([x for x, _ in resident.epoch(0)])
    b = torch.cat([x for x, _ in loader.epoch(0)])
    assert a.shape == b.shape == (256, 3, 32, 32)
    assert torch.allclose(a.mean((0, 2, 3)), b.mean((0, 2, 3)), atol=0.1)
    assert torch.allclose(a.std((0, 2, 3)), b.std((0, 2, 3)), rtol=0.1)
    # same images in the same order: labels agree batch by batch
    la = torch.cat([y for _, y in resident.epoch(0)])
    lb = torch.cat([y for _, y in loader.epoch(0)])
    assert torch.equal(la, lb)


def test_resident_batches_are_a_function_of_seed_epoch_step_and_rank():
    """The resident path's contract (exact resume relies on it): rank r's batch `step` of epoch e holds the images
    epoch_order(seed, e) deals it, augmented from a generator seeded with mix_seed(seed, e, step, r); resuming at a
    step gives the rest of the epoch; another epoch gives other batches."""
    images = torch.randint(0, 256, (50, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(50)
    data = ResidentData(images, labels, 8, 16, (0.3, 1.0), (3 / 4, 4 / 3), "bilinear", 4, 1, 2, CPU)
    assert data.steps_per_epoch == 3  # 50 images // 2 ranks // batch 8
    epoch1 = list(data.epoch(1))
    order = epoch_order(50, 4, 1, 1, 2)
    for step, (x, y) in enumerate(epoch1):
        idx = order[step * 8: (step + 1) * 8]
        assert torch.equal(y, labels[idx]) and x.shape == (8, 3, 16, 16)
        assert torch.equal(x, data.augment(images[idx], torch.Generator().manual_seed(mix_seed(4, 1, step, 1))))
    resumed = list(data.epoch(1, start_step=1))
    assert len(resumed) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(epoch1[1:], resumed))
    assert not torch.equal(epoch1[0][0], next(data.epoch(2))[0])


def test_loader_path_is_reproducible_per_epoch_and_resumable():
    ds = SyntheticDataset("pretrain", 16)
    ds.ids = ds.ids[:48]
    ds.transform = pretrain_transform(16, (0.2, 1.0))
    loader = LoaderData(ds, 8, 0, 0, 1, 0, CPU)
    e1 = [x for x, _ in loader.epoch(1)]
    again = [x for x, _ in loader.epoch(1)]
    resumed = [x for x, _ in loader.epoch(1, start_step=3)]
    assert all(torch.equal(a, b) for a, b in zip(e1, again))
    assert len(resumed) == 3 and all(torch.equal(a, b) for a, b in zip(e1[3:], resumed))
    assert not torch.equal(e1[0], next(iter(loader.epoch(2)))[0])
    # the contract: image i of epoch e is augmented from seed (seed, e, i), whichever batch and process it lands in
    order = epoch_order(48, 0, 1, 0, 1)
    for j in (0, 5):
        i = int(order[j])
        with data.seeded_rng(mix_seed(0, 1, i)):
            assert torch.equal(e1[0][j], ds.transform(ds.load(i)[0]))


def test_a_method_can_bring_its_own_views_on_both_paths():
    """build_train_data's hook for methods with several views (BEiT's two sizes, SiT's two crops): the DataLoader
    path carries the tuple a PIL transform returns, the resident path the tuple of the method's batched augment, and
    with a transform but no batched augment the DataLoader path is taken (the default crop would be wrong)."""
    from types import SimpleNamespace
    from common.data import build_train_data
    from common.training import Dist

    cfg = SimpleNamespace(data="synthetic", data_path="", img_size=16, subset=48, seed=0, skip_bad_images=False, batch_size=8, workers=0,
                          resident=True, decode="workers")
    dist = Dist(0, 1, 0, CPU)
    pil_views = T.Compose([T.Resize(8), T.ToTensor()])
    transform = lambda img: (T.ToTensor()(img), pil_views(img))  # noqa: E731 (two views of one image)
    calls = []

    def augment(images, generator):
        calls.append(images.dtype)
        x = images.float() / 255
        return x, x[..., ::2, ::2]

    data = build_train_data(cfg, dist, (0.2, 1.0), log=lambda msg: None, transform=transform, augment=augment)
    assert isinstance(data, ResidentData)
    (full, half), labels = next(data.epoch(0))
    assert calls == [torch.uint8] and full.shape == (8, 3, 16, 16) and half.shape == (8, 3, 8, 8)
    assert torch.equal(half, full[..., ::2, ::2]) and labels.shape == (8,)

    data = build_train_data(cfg, dist, (0.2, 1.0), log=lambda msg: None, transform=transform)
    assert isinstance(data, LoaderData)
    (full, half), labels = next(data.epoch(0))
    assert full.shape == (8, 3, 16, 16) and half.shape == (8, 3, 8, 8) and labels.shape == (8,)
    assert full.min() >= 0 and full.max() <= 1  # the method's ToTensor, not the default normalisation


# ----------------------------------------------------------------------- batched colour ops (SiT, BEiT)
def test_batched_colour_ops_equal_torchvision_tensor_ops():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 12, 12, generator=g)
    x[0, :, :3, :3] = 0.5  # grey pixels (no hue) and channel ties
    factors = torch.tensor([0.6, 0.9, 1.2, 1.4])
    for ours, theirs in ((data.adjust_brightness, TF.adjust_brightness), (data.adjust_contrast, TF.adjust_contrast),
                         (data.adjust_saturation, TF.adjust_saturation)):
        got = ours(x, factors.view(4, 1, 1, 1))
        assert torch.allclose(got, torch.stack([theirs(x[i], factors[i].item()) for i in range(4)]), atol=1e-6)
    shifts = torch.tensor([-0.1, -0.03, 0.05, 0.1])
    got = data.adjust_hue(x, shifts)
    assert torch.allclose(got, torch.stack([TF.adjust_hue(x[i], shifts[i].item()) for i in range(4)]), atol=1e-5)


def test_colour_jitter_applies_the_four_ops_in_each_images_random_order():
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    got = data.color_jitter(x, torch.Generator().manual_seed(7), p=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
                            hue=0.1)  # SiT's
    g = torch.Generator().manual_seed(7)  # the same draws, replayed with torchvision's ops image by image
    u = torch.rand(6, 5, generator=g)
    order = torch.rand(6, 4, generator=g).argsort(dim=1)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    centre, spread = (1, 1, 1, 0), (0.4, 0.4, 0.2, 0.1)
    for i in range(6):
        y = x[i]
        if u[i, 0] < 0.8:
            for k in order[i].tolist():
                y = ops[k](y, centre[k] + spread[k] * (2 * u[i, 1 + k].item() - 1))
        assert torch.allclose(got[i], y, atol=1e-5), i
    assert (u[:, 0] >= 0.8).any() and (u[:, 0] < 0.8).any()  # this seed exercises both branches
    assert len({tuple(o) for o in order.tolist()}) > 1


# ----------------------------------------------------------------------- the DataLoader's JPEG path (ResizedCropFlip)
def crop_spy(monkeypatch):
    """Records (size of the image, box) of every PIL crop: the box ResizedCropFlip cuts, in decoded pixels."""
    calls = []
    crop = Image.Image.crop

    def spy(img, box=None):
        calls.append((img.size, tuple(box)))
        return crop(img, box)

    monkeypatch.setattr(Image.Image, "crop", spy)
    return calls


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a.sort().values, grid, right=True) / len(a)  # at every sample of either
    cdf_b = torch.searchsorted(b.sort().values, grid, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def box_statistics(boxes, width, height):
    """[n, 4] (top, left, h, w) -> [n, 4]: area fraction, log aspect w / h, centre x / W, centre y / H."""
    top, left, h, w = boxes.double().unbind(1)
    return torch.stack([h * w / (width * height), torch.log(w / h), (left + w / 2) / width,
                        (top + h / 2) / height], 1)


def test_resized_crop_flip_draws_torchvisions_boxes_and_flips(monkeypatch):
    """The crop box is drawn in full-size coordinates with RandomResizedCrop's law (KS test on area, aspect and
    centre against get_params from other seeds, alpha = 0.001), and from the same seed it is get_params' box and
    RandomHorizontalFlip's flip exactly: a 500 x 375 photo (no DCT reduction at 224 px or, in memory, at any size)."""
    W, H, n = 500, 375, 1500
    img = photo_like(W, H)
    calls = crop_spy(monkeypatch)
    transform = ResizedCropFlip(16, (0.2, 1.0))
    outs = []
    for seed in range(n):
        with seeded_rng(seed):
            outs.append(transform(img))
    ours = torch.tensor([(t, l, b - t, r - l) for _, (l, t, r, b) in calls])  # PIL boxes -> (top, left, h, w)
    assert all(size == (W, H) for size, _ in calls)
    reference = []
    for seed in range(n, 3 * n):
        with seeded_rng(seed):
            reference.append(T.RandomResizedCrop.get_params(img, (0.2, 1.0), (3 / 4, 4 / 3)))
    a, b = box_statistics(ours, W, H), box_statistics(torch.tensor(reference), W, H)
    critical = 1.95 * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))  # alpha = 0.001: sqrt(ln(2 / alpha) / 2)
    for k, name in enumerate(("area", "log aspect", "centre x", "centre y")):
        assert ks_statistic(a[:, k], b[:, k]) < critical, name
    # the same seed: the same box as get_params, and the flip of RandomHorizontalFlip's draw right after it
    flips = []
    for seed in range(50):
        with seeded_rng(seed):
            top, left, h, w = T.RandomResizedCrop.get_params(img, (0.2, 1.0), (3 / 4, 4 / 3))
            flips.append(bool(torch.rand(1) < 0.5))
        assert tuple(ours[seed].tolist()) == (top, left, h, w)
        crop = torch.from_numpy(np.array(img.crop((left, top, left + w, top + h)))).permute(2, 0, 1)[None]
        plain = torch.nn.functional.interpolate(crop, size=(16, 16), mode="bicubic", antialias=True)[0]
        assert torch.equal(outs[seed], plain.flip(-1) if flips[-1] else plain)
    assert 15 < sum(flips) < 35


@pytest.mark.parametrize("size", [(2000, 1500), (1500, 2000)])
def test_jpeg_is_decoded_no_smaller_than_the_crop_needs(tmp_path, monkeypatch, size):
    """A JPEG is decoded at 1/s (s = 1, 2, 4, 8) so that the crop keeps >= S pixels on its shorter side, and at the
    largest such s: smaller than the full size whenever the crop allows; the output stays close to PIL's full
    decode + crop + resize (pretrain_transform) of the same box."""
    W, H = size
    path = tmp_path / "photo.jpg"
    photo_like(W, H).save(path, quality=90)
    S = 224
    calls = crop_spy(monkeypatch)
    transform, reference = ResizedCropFlip(S, (0.2, 1.0)), pretrain_transform(S, (0.2, 1.0))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    gaps, reductions = [], set()
    for seed in range(40):
        with seeded_rng(seed):
            out = load_image(path, transform)
        decoded, box = calls[-1]  # the decoded image's size, our crop in its pixels
        with seeded_rng(seed):
            expected = reference(load_image(path))  # full decode, PIL crop + bicubic resize, float
        _, full_box = calls[-1]  # pretrain_transform's box (the same draw) in full-size pixels
        s = round(W / decoded[0])
        reductions.add(s)
        assert decoded == (math.ceil(W / s), math.ceil(H / s))  # what libjpeg decodes at 1/s
        assert min(box[2] - box[0], box[3] - box[1]) >= S  # never fewer pixels than the output needs
        shorter = min(full_box[2] - full_box[0], full_box[3] - full_box[1])
        assert s == max(k for k in (1, 2, 4, 8) if shorter >= k * S or k == 1)  # the largest s that keeps them
        assert all(abs(v * s - f) <= s / 2 for v, f in zip(box, full_box))  # the box, rounded to decoded pixels
        gaps.append(((out / 255 - mean) / std - expected).mul(std).abs().mean().item() * 255)
    assert reductions >= {2, 4}  # both reductions happened (the draws cover crops of 650-1500 px)
    assert max(gaps) < 3  # mean |difference| against the full decode, in 0..255 levels


def test_resized_crop_flip_equals_pil_crop_resize_without_reduction(tmp_path):
    """Where nothing is reduced (a 500 x 375 JPEG at 224 px; a PNG, which has no DCT scaling, even at 32 px; a 16-bit
    grayscale PNG through to_rgb) the output is PIL's crop + bicubic resize of the same box (pretrain_transform from
    the same seed) within 2 levels of 0..255: torch's antialiased bicubic is PIL's filter."""
    photo = photo_like(500, 375)
    photo.save(tmp_path / "a.jpg", quality=90)
    photo.resize((1000, 750)).save(tmp_path / "b.png")
    gray16 = (np.asarray(photo.convert("L"), dtype=np.int32) * 257).astype(np.uint16)  # 0..65535
    Image.fromarray(gray16).save(tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").mode.startswith("I;16")
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for name, S in (("a.jpg", 224), ("b.png", 32), ("c.png", 64)):
        for seed in range(10):
            with seeded_rng(seed):
                ours = load_image(tmp_path / name, ResizedCropFlip(S, (0.2, 1.0)))
            with seeded_rng(seed):
                expected = pretrain_transform(S, (0.2, 1.0))(load_image(tmp_path / name))
            assert ours.dtype == torch.uint8 and ours.shape == (3, S, S)
            levels = (expected * std + mean) * 255  # back to 0..255
            assert (ours - levels).abs().max() <= 2.01, (name, seed)


def test_a_full_size_jpeg_crop_is_torchvisions_decode_and_pils_pixels(tmp_path, monkeypatch):
    """Where no DCT scaling applies, an RGB JPEG is decoded by torchvision's decode_jpeg (faster than PIL's): the crop
    is PIL's full decode cropped to the same box, bit for bit. A grayscale JPEG stays with PIL."""
    photo_like(500, 375).save(tmp_path / "a.jpg", quality=90)
    photo_like(500, 375).convert("L").save(tmp_path / "g.jpg", quality=90)
    used = []
    real = data.decode_jpeg_file
    monkeypatch.setattr(data, "decode_jpeg_file", lambda path: used.append(path) or real(path))
    transform = ResizedCropFlip(224, (0.2, 1.0))
    for name in ("a.jpg", "g.jpg"):
        for top, left, h, w in ((0, 0, 375, 375), (40, 100, 230, 300)):
            with Image.open(tmp_path / name) as img:
                ours = transform.crop(img, top, left, h, w)
            pil = Image.open(tmp_path / name).convert("RGB").crop((left, top, left + w, top + h))
            assert torch.equal(ours, torch.from_numpy(np.array(pil)).permute(2, 0, 1)), (name, top, left)
    assert used == [str(tmp_path / "a.jpg")] * 2
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "a.jpg").read_bytes()[:3000])  # a header, then nothing
    with pytest.raises(UserError, match="cannot read image .*cut.jpg"):
        load_image(tmp_path / "cut.jpg", transform)


def test_loader_yields_normalised_floats_from_uint8_workers(tmp_path):
    """The dataset (in the workers) gives uint8 [3, S, S], decoded from the file at reduced size (a 1200 x 900 JPEG
    at 32 px: 1/8) with the draws of (seed, epoch, index); LoaderData.epoch gives the batch as floats normalised with
    the ImageNet mean and std on the device, as ToTensor + Normalize would; build_train_data takes this path for a
    folder of JPEGs."""
    from types import SimpleNamespace

    from common.data import build_train_data
    from common.training import Dist

    for i in range(8):
        photo_like(1200, 900, seed=i).save(tmp_path / f"{i}.jpg", quality=90)
    cfg = SimpleNamespace(data="folder", data_path=str(tmp_path), img_size=32, subset=0, seed=3, skip_bad_images=False, batch_size=4,
                          workers=0, resident=True, decode="workers")
    loader = build_train_data(cfg, Dist(0, 1, 0, CPU), (0.2, 1.0), log=lambda msg: None)
    assert isinstance(loader, LoaderData) and isinstance(loader.loader.dataset.transform, ResizedCropFlip)
    ds = loader.loader.dataset
    raw, label = ds[(5, 1)]
    assert raw.dtype == torch.uint8 and raw.shape == (3, 32, 32) and label == -1
    with seeded_rng(mix_seed(3, 1, 5)):
        assert torch.equal(raw, load_image(ds.files[5], ResizedCropFlip(32, (0.2, 1.0))))  # the draft path
    with seeded_rng(mix_seed(3, 1, 5)):
        assert not torch.equal(raw, ResizedCropFlip(32, (0.2, 1.0))(load_image(ds.files[5])))  # not a full decode
    (x, _), _ = list(loader.epoch(1))
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32)
    order = epoch_order(8, 3, 1, 0, 1)[:4]
    raw = torch.stack([ds[(int(i), 1)][0] for i in order]).float()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(x, (raw / 255 - mean) / std, atol=1e-5)


def test_default_workers_share_this_process_cores_among_the_local_ranks(monkeypatch):
    """--workers by default: the cores of this process's CPU affinity (not the machine's count) divided among the
    LOCAL_WORLD_SIZE processes torchrun starts on the node, at least 1."""
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.setattr(data.os, "cpu_count", lambda: 96)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert data.default_workers() == 12
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert data.default_workers() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert data.default_workers() == 1
    monkeypatch.delattr(data.os, "sched_getaffinity")  # macOS, Windows: the machine's count
    assert data.default_workers() == 96 // 16
