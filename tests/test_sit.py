"""SiT / GMML: parameter counts, the corruption sampler, the two views, the losses, the teacher, timm compatibility,
synchronised BatchNorm and gathered negatives over 2 processes, the CLI end to end, exact resume, bench.py's row.

Run by pytest. Also the 2-process worker: `torchrun --nproc_per_node 2 tests/test_sit.py OUT` (see test_two_processes).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sit  # noqa: E402
from common import UserError  # noqa: E402
from common.training import cosine_lr, parse_config  # noqa: E402
from common.vit import count_params  # noqa: E402
from conftest import ROOT, TINY, assert_same_law, read_log, run_script  # noqa: E402

SIT_TINY = TINY + ["--head-hidden-dim", "64", "--out-dim", "32"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def config(*argv):
    return parse_config(sit.Config, sit.PRESETS, argv=list(map(str, argv)))[0]


def images(n, size, seed=0):
    """Distinct random 'normalised' images that are never 0 (so a zero-filled pixel is a corrupted one)."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) + 3.0


# ------------------------------------------------------------------------------------------------- model sizes
@pytest.mark.parametrize("model,total,encoder,cls_head,rec_head", [
    ("vit_tiny", 24_420_099, 5_524_416, 18_637_056, 258_627),
    ("vit_small", 41_827_587, 21_665_664, 19_423_488, 738_435),
    ("vit_base", 109_156_611, 85_798_656, 20_996_352, 2_361_603)])
def test_official_parameter_counts(model, total, encoder, cls_head, rec_head):
    """The official FullPipline(vit_*, CLSHead(D, 256), RECHead(D)) at 224 px, counted from Sara-Ahmed/SiT HEAD."""
    with torch.device("meta"):
        m = sit.SiT(224, 16, model)
    assert (count_params(m), count_params(m.encoder), count_params(m.cls_head), count_params(m.rec_head)) == (
        total, encoder, cls_head, rec_head)
    assert count_params(m.teacher) == 0 and count_params(m.teacher, trainable=False) == encoder + cls_head


# -------------------------------------------------------------------------------------------------- corruption
def corruption_types(x, corrupted, mask):
    """'drop' where every corrupted value is 0 (zeros fill), else 'replace'; [B] list."""
    m = mask.bool().expand_as(x)
    return ["drop" if (corrupted[i][m[i]] == 0).all() else "replace" for i in range(len(x))]


def test_corruption_covers_the_target_with_one_type_per_image():
    """Each image is either dropped (zeros) at >= 50 % of its pixels or replaced at >= 30 %, overshooting by less
    than one block (the sampler stops once the union reaches the target); about half are replaced; the pixels
    outside the mask are untouched and the mask is the same on the 3 channels."""
    cfg = config("--img-size", 32, "--patch-size", 4)
    x = images(256, 32)
    corrupted, mask = sit.gmml_corrupt(x, cfg, torch.Generator().manual_seed(0))
    assert mask.shape == (256, 1, 32, 32) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(corrupted[~mask.bool().expand_as(x)], x[~mask.bool().expand_as(x)])
    kinds = corruption_types(x, corrupted, mask)
    covered = mask.mean(dim=(1, 2, 3))
    one_block = (int(0.3 * 32) - 1) ** 2 / 32 ** 2  # the largest block: 8 x 8 px of 32 x 32
    for kind, target in (("drop", 0.5), ("replace", 0.3)):
        c = covered[[k == kind for k in kinds]]
        assert c.min() >= target and c.max() < target + one_block, (kind, c.min(), c.max())
    assert abs(kinds.count("replace") / 256 - 0.5) < 0.13  # 4 sigma of a binomial(256, 0.5) share


def test_replace_blocks_come_from_another_image_at_the_same_coordinates():
    cfg = config("--img-size", 32, "--patch-size", 4)
    x = images(32, 32, seed=1)
    corrupted, mask = sit.gmml_corrupt(x, cfg, torch.Generator().manual_seed(1))
    m = mask.bool().expand_as(x)
    partners = []
    for i, kind in enumerate(corruption_types(x, corrupted, mask)):
        if kind == "replace":
            same = [j for j in range(len(x)) if torch.equal(corrupted[i][m[i]], x[j][m[i]])]
            assert len(same) == 1, same  # every corrupted pixel is the pixel of one clean image, same place
            partners.append((i, same[0]))
    assert len(partners) >= 8 and sum(i != j for i, j in partners) >= len(partners) - 2  # itself only by chance
    assert len({j for _, j in partners}) > len(partners) // 2  # partners drawn per image
    # official randint(0, B) per image: a draw with replacement, not a permutation (roll, flip, randperm): here 15
    # replaced images have 11 distinct partners
    assert len({j for _, j in partners}) < len(partners)


def test_noise_fill_and_a_fill_type_per_image():
    cfg = config("--img-size", 32, "--patch-size", 4, "--drop-type", "zeros-noise", "--replace-prob", 0)
    x = images(64, 32, seed=2)
    corrupted, mask = sit.gmml_corrupt(x, cfg, torch.Generator().manual_seed(2))
    m = mask.bool().expand_as(x)
    zeros = [bool((corrupted[i][m[i]] == 0).all()) for i in range(64)]
    assert 16 <= sum(zeros) <= 48  # one of the two fills per image
    noise = torch.cat([corrupted[i][m[i]] for i in range(64) if not zeros[i]])
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05  # N(0, 1) in normalised space
    cfg = config("--img-size", 32, "--patch-size", 4, "--drop-type", "noise", "--replace-prob", 0)
    corrupted, mask = sit.gmml_corrupt(x, cfg, torch.Generator().manual_seed(2))
    noise = [corrupted[i][m[i]] for m in [mask.bool().expand_as(x)] for i in range(64)]
    assert all(abs(n.std() - 1) < 0.1 for n in noise)  # --drop-type noise: every image noise-filled, none zeros


def test_corruption_is_a_function_of_the_generator():
    cfg = config("--img-size", 32, "--patch-size", 4, "--drop-type", "noise")
    x = images(16, 32)
    a = sit.gmml_corrupt(x, cfg, torch.Generator().manual_seed(5))
    b = sit.gmml_corrupt(x, cfg, torch.Generator().manual_seed(5))
    c = sit.gmml_corrupt(x, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def blocks_one_round_at_a_time(targets, H, align, generator):
    """The official block loop written out as the repository drew it before the blocks were batched: one block per
    image per round, added while the image's union is below its target. [n, H, H] bool."""
    n, a, max_side = len(targets), max(1, align), int(H * 0.3)
    rows, cols = torch.arange(H).view(1, H, 1), torch.arange(H).view(1, 1, H)
    mask, active = torch.zeros(n, H, H, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
    while active.any():
        top, left = (torch.randint(0, H - a, (n,), generator=generator) // a * a for _ in range(2))
        h, w = ((torch.minimum(torch.randint(a, max_side, (n,), generator=generator), H - corner) / a).round().long() * a
                for corner in (top, left))
        block = ((rows >= top.view(n, 1, 1)) & (rows < (top + h).view(n, 1, 1))
                 & (cols >= left.view(n, 1, 1)) & (cols < (left + w).view(n, 1, 1)))
        mask |= block & active.view(n, 1, 1)
        active = mask.sum(dim=(1, 2)) < targets
    return mask


@pytest.mark.parametrize("align", [1, 4])
def test_batched_blocks_follow_the_loop_law(align):
    """sample_blocks (all rounds drawn at once, no host sync) against the loop it replaces, 3000 images of 32 x 32
    each with targets from U(0.3, 0.6) of the pixels: the same distribution of the covered fraction (the overshoot
    of the last block), of the covered pixels in the central half and of the masked horizontal neighbour pairs per
    image (the blocks' shapes), by chi-square."""
    n, H = 3000, 32
    targets = (0.3 + 0.3 * torch.rand(n, generator=torch.Generator().manual_seed(1))) * H * H

    def statistics(mask):
        overshoot = ((mask.sum(dim=(1, 2)) - targets) / 8).long()  # [n], in bins of 8 pixels
        centre = mask[:, 8:24, 8:24].sum(dim=(1, 2)) // 16
        pairs = (mask[:, :, 1:] & mask[:, :, :-1]).sum(dim=(1, 2)) // 16
        return [torch.bincount(s, minlength=H * H) for s in (overshoot, centre, pairs)]

    ours = sit.sample_blocks(targets, H, H, align, torch.Generator().manual_seed(0), "cpu")
    loop = blocks_one_round_at_a_time(targets, H, align, torch.Generator().manual_seed(0))
    assert (ours.sum(dim=(1, 2)) >= targets).all()
    for a, b in zip(statistics(ours), statistics(loop)):
        assert_same_law(a, b)


@pytest.mark.parametrize("align", [1, 4])
def test_block_sizes_and_the_patch_grid(align):
    """A target below one pixel draws exactly one block per image: sides 1 .. int(0.3 H) - 1 px without --align;
    with --align 4, sides and corners on the 4-px grid (H = 32: sides 4 or 8)."""
    n, H = 4000, 32
    mask = sit.sample_blocks(torch.full((n,), 0.01), H, H, align, torch.Generator().manual_seed(0), "cpu")
    rows, cols = mask.any(dim=2), mask.any(dim=1)  # [n, H] each
    h, w = rows.sum(1), cols.sum(1)
    assert torch.equal(mask.sum(dim=(1, 2)), h * w)  # one rectangle per image
    top, left = rows.float().argmax(1), cols.float().argmax(1)
    if align == 1:
        assert set(h.tolist()) == set(range(1, 9)) and set(w.tolist()) == set(range(1, 9))
        assert top.max() == H - 2  # official randint(0, H - 1): the last row is never a top edge
    else:
        assert set(h.tolist()) == {4, 8} and set(w.tolist()) == {4, 8}
        assert (top % 4 == 0).all() and (left % 4 == 0).all()
        # randint(4, 9) = 4 .. 8 px, / 4 rounded half to even: 4, 5 -> 4 px and 6 (1.5 -> 2), 7, 8 -> 8 px: P(4) = 2/5
        # (floor: 4/5, ceil: 1/5); no block reaches the border here (top <= 24), so none is cut
        assert abs((h == 4).float().mean().item() - 0.4) < 0.035 and abs((w == 4).float().mean().item() - 0.4) < 0.035


def test_drop_target_is_uniform_between_half_and_drop_perc():
    """official np.random.uniform(min(0.5, d), d): with --drop-perc 0.8 the images cover from 50 % to 80 % (+ the
    overshoot of the last block), not always one end; --drop-replace 0 turns replacement off whatever
    --replace-prob says."""
    one_block = (int(0.3 * 32) - 1) ** 2 / 32 ** 2
    cfg = config("--img-size", 32, "--patch-size", 4, "--drop-perc", 0.8, "--replace-prob", 0)
    x = images(256, 32, seed=3)
    corrupted, mask = sit.gmml_corrupt(x, cfg, torch.Generator().manual_seed(3))
    covered = mask.mean(dim=(1, 2, 3))
    assert set(corruption_types(x, corrupted, mask)) == {"drop"}
    assert covered.min() >= 0.5 and covered.max() < 0.8 + one_block
    assert covered.min() < 0.53 and covered.max() > 0.78  # both ends of U(0.5, 0.8) are reached
    assert abs((covered < 0.65).float().mean().item() - 0.5) < 0.15  # about half below the middle
    cfg = config("--img-size", 32, "--patch-size", 4, "--drop-replace", 0, "--replace-prob", 1)
    corrupted, mask = sit.gmml_corrupt(x, cfg, torch.Generator().manual_seed(4))
    assert set(corruption_types(x, corrupted, mask)) == {"drop"} and mask.mean(dim=(1, 2, 3)).min() >= 0.5


def test_blocks_snap_to_the_patch_grid_only_with_align():
    """Default (official: no --drop_align): pixel blocks, so a patch is often partly hidden; --align: every 4 x 4
    patch is corrupted whole or not at all."""
    x = images(64, 32, seed=5)
    for align in (False, True):
        cfg = config("--img-size", 32, "--patch-size", 4, *(["--align"] if align else []))
        mask = sit.gmml_corrupt(x, cfg, torch.Generator().manual_seed(5))[1].view(64, 8, 4, 8, 4)
        whole = (mask == mask[:, :, :1, :, :1]).all(dim=(2, 4))  # [64, 8, 8]: patch corrupted whole or not at all
        if align:
            assert whole.all()
        else:
            assert whole.float().mean() < 0.6 and not whole.all(dim=(1, 2)).any()  # every image has split patches


def test_bad_corruption_settings_are_one_line_errors():
    for argv, message in ((["--drop-perc", 1], "--drop-perc must be in (0, 1)"),
                          (["--drop-type", "zeros-blur"], "unknown --drop-type 'blur'"),
                          (["--img-size", 16, "--patch-size", 4, "--align"], "drop --align"),
                          (["--replace-prob", 1.5], "--replace-prob must be in [0, 1]")):
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            config(*argv)


# ----------------------------------------------------------------------------------------------------- views
def test_batched_blur_equals_torchvision_per_image():
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.8, 1.2, 2.0])
    got = sit.gaussian_blur(x, sigma, 7)
    ref = torch.stack([TF.gaussian_blur(x[i], [7, 7], [sigma[i].item()] * 2) for i in range(4)])
    assert torch.allclose(got, ref, atol=1e-6)


def test_two_views_on_both_data_paths():
    """Resident: BatchedViews on the device; DataLoader: DataAugmentationSiT through PIL. Both give two normalised
    views per image, different from each other, with about 20 % grayscale images each."""
    from common.data import LoaderData, ResidentData, build_train_data
    from common.training import Dist
    cfg = config("--img-size", 16, "--patch-size", 4, "--subset", 512, "--batch-size", 256, "--workers", 0)
    dist = Dist(0, 1, 0, torch.device("cpu"))
    quiet = dict(log=lambda msg: None, transform=sit.DataAugmentationSiT(16), augment=sit.BatchedViews(16))
    resident = build_train_data(cfg, dist, sit.CROP_SCALE, **quiet)
    cfg.resident = False
    loader = build_train_data(cfg, dist, sit.CROP_SCALE, **quiet)
    assert isinstance(resident, ResidentData) and isinstance(loader, LoaderData)
    for data in (resident, loader):
        views = [torch.cat(v) for v in zip(*(v for v, _ in data.epoch(0)))]  # 2 x [512, 3, 16, 16]
        assert len(views) == 2 and all(v.shape == (512, 3, 16, 16) for v in views)
        assert not torch.equal(views[0], views[1])
        for v in views:
            rgb = v * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(
                1, 3, 1, 1)  # back to [0, 1]
            assert rgb.min() > -1e-3 and rgb.max() < 1 + 1e-3
            gray = ((rgb - rgb.mean(1, keepdim=True)).abs().amax(dim=(1, 2, 3)) < 1e-2).float().mean()
            assert 0.12 < gray < 0.28, gray  # RandomGrayscale(0.2) (the synthetic images are colourful)



def test_batched_views_follow_the_official_recipe(monkeypatch):
    """BatchedViews' wiring, read from the calls it makes: crops of scale 0.2-1 and aspect 3/4-4/3; colour jitter
    (0.4, 0.4, 0.2, 0.1) with p 0.8; blur on every image of view 1 and ~10 % of view 2, sigma ~ U(0.1, 2) x 16 / 224
    over a 3-tap kernel; solarization (pixels >= 128 -> 255 - pixel) on ~20 % of view 2 only. A bright grey image
    stays grey and above 128 through crop, jitter (brightness >= 0.6 x 230) and blur, so it is dark iff solarized."""
    calls = {"crop": [], "jitter": [], "blur": []}
    crops, jitter, blur = sit.sample_resized_crops, sit.color_jitter, sit.gaussian_blur

    def record_crops(n, h, w, scale, ratio, *args):
        calls["crop"].append((scale, ratio))
        return crops(n, h, w, scale, ratio, *args)

    def record_jitter(x, generator, **kw):
        calls["jitter"].append(kw)
        return jitter(x, generator, **kw)

    def mark_blur(x, sigma, kernel_size):  # a blurred image comes out 100 higher: countable after the view
        calls["blur"].append((sigma, kernel_size))
        return blur(x, sigma, kernel_size) + 100

    aug = sit.BatchedViews(16)
    grey = torch.full((512, 3, 20, 20), 230, dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    solarized = [((v * std + mean).mean(dim=(1, 2, 3)) < 0.5).float().mean().item()
                 for v in aug(grey, torch.Generator().manual_seed(0))]
    assert solarized[0] == 0 and abs(solarized[1] - 0.2) < 0.07, solarized
    monkeypatch.setattr(sit, "sample_resized_crops", record_crops)
    monkeypatch.setattr(sit, "color_jitter", record_jitter)
    monkeypatch.setattr(sit, "gaussian_blur", mark_blur)
    views = aug(torch.randint(0, 256, (512, 3, 20, 20), generator=torch.Generator().manual_seed(1), dtype=torch.uint8),
                torch.Generator().manual_seed(1))
    blurred = [(v.abs().amax(dim=(1, 2, 3)) > 50).float().mean().item() for v in views]
    assert blurred[0] == 1 and abs(blurred[1] - 0.1) < 0.05, blurred
    assert calls["crop"] == [((0.2, 1.0), (3 / 4, 4 / 3))] * 2
    assert calls["jitter"] == [dict(p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)] * 2
    lo, hi = 0.1 * 16 / 224, 2.0 * 16 / 224
    sigma = torch.cat([s for s, _ in calls["blur"]])
    assert [k for _, k in calls["blur"]] == [3, 3] and sigma.min() >= lo and sigma.max() <= hi
    wide = sit.BatchedViews(224)  # at 224 px: the official radii, +-3 sigma of the widest: 13 taps
    assert wide.radius == pytest.approx((0.1, 2.0)) and wide.kernel_size == 13
    assert sigma.min() < lo + 0.05 * (hi - lo) and sigma.max() > hi - 0.05 * (hi - lo)  # the whole range


def test_pil_views_are_the_official_transforms():
    """DataAugmentationSiT (the DataLoader path) is the official pipeline, step by step; its blur blurs with
    probability p."""
    from PIL import Image, ImageFilter
    aug = sit.DataAugmentationSiT(32)
    names = ["RandomResizedCrop", "RandomHorizontalFlip", "RandomApply", "RandomGrayscale", "PILGaussianBlur"]
    assert [type(t).__name__ for t in aug.view1.transforms] == names + ["ToTensor", "Normalize"]
    assert [type(t).__name__ for t in aug.view2.transforms] == names + ["RandomSolarize", "ToTensor", "Normalize"]
    for view, blur_p in ((aug.view1, 1.0), (aug.view2, 0.1)):
        crop, flip, jitter, gray, blur = view.transforms[:5]
        assert crop.size == (32, 32) and crop.scale == (0.2, 1.0) and crop.ratio == (3 / 4, 4 / 3)
        assert crop.interpolation == TF.InterpolationMode.BICUBIC and flip.p == 0.5 and gray.p == 0.2
        cj = jitter.transforms[0]
        assert jitter.p == 0.8 and (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4),
                                                                                           (0.8, 1.2), (-0.1, 0.1))
        assert blur.p == blur_p and blur.radius == pytest.approx((0.1 * 32 / 224, 2.0 * 32 / 224))
        assert list(view.transforms[-1].mean) == [0.485, 0.456, 0.406] and list(view.transforms[-1].std) == [
            0.229, 0.224, 0.225]
    solarize = aug.view2.transforms[5]
    assert solarize.threshold == 128 and solarize.p == 0.2
    img = Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=torch.Generator().manual_seed(0),
                                        dtype=torch.uint8).numpy())
    always, never = sit.PILGaussianBlur(1.0, (1.0, 1.0)), sit.PILGaussianBlur(0.0, (1.0, 1.0))
    assert always(img).tobytes() == img.filter(ImageFilter.GaussianBlur(1.0)).tobytes() != img.tobytes()
    assert never(img) is img

# ---------------------------------------------------------------------------------------------------- losses
def test_reconstruction_loss_ignores_uncorrupted_pixels():
    g = torch.Generator().manual_seed(0)
    target, recon = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    mask = (torch.rand(2, 1, 8, 8, generator=g) < 0.4).float()
    loss = sit.reconstruction_loss(recon, target, mask)
    assert sit.reconstruction_loss(recon + 100 * (1 - mask), target, mask) == pytest.approx(loss.item(), abs=1e-6)
    assert sit.reconstruction_loss(recon + 0.5 * mask, target, mask) != pytest.approx(loss.item(), abs=1e-3)
    m = mask.bool().expand_as(target)
    assert loss.item() == pytest.approx((recon - target).abs()[m].mean().item(), rel=1e-6)  # official indexing


def test_info_nce_equals_a_hand_computation_on_three_samples():
    q = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [0.0, 3.0, 1.0]])
    k = torch.tensor([[2.0, 0.5, 1.0], [0.0, -1.0, 0.5], [1.0, 1.0, 1.0]])
    tau = 0.2
    total = 0.0
    for i in range(3):
        def cos(a, b):
            return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
        logits = [cos(q[i].tolist(), k[j].tolist()) / tau for j in range(3)]
        total += -logits[i] + math.log(sum(math.exp(z) for z in logits))
    expected = total / 3 * 2 * tau
    assert sit.info_nce(q, k, tau).item() == pytest.approx(expected, rel=1e-6)
    # student view 1 against teacher view 2 and view 2 against view 1, summed
    s, t = torch.cat([q, k]), torch.cat([k.flip(0), q.flip(0)])
    assert sit.contrastive_loss(s, t, tau).item() == pytest.approx(
        (sit.info_nce(q, q.flip(0), tau) + sit.info_nce(k, k.flip(0), tau)).item(), rel=1e-6)


def tiny_sit(**kw):
    torch.manual_seed(0)
    return sit.SiT(**{**dict(img_size=16, patch_size=4, model="vit_nano", out_dim=32, head_hidden_dim=64), **kw})


def test_teacher_gets_no_gradient_and_moves_by_the_ema_rule():
    m = tiny_sit()
    assert m.teacher["encoder"].blocks[-1].drop_path.drop_prob == 0 and m.encoder.blocks[-1].drop_path.drop_prob > 0
    s_params, t_params = list(m.student_parameters()), list(m.teacher.parameters())
    assert len(t_params) == len(list(m.encoder.parameters())) + len(list(m.cls_head.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(s_params, t_params))  # the teacher starts as the student
    cfg = config(*SIT_TINY)
    x = images(4, 16) - 3
    loss = sit.training_loss(m, (x, x.flip(-1)), cfg, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in t_params)
    assert all(p.grad is not None for p in s_params)
    with torch.no_grad():
        for p in s_params:
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in t_params]
    sit.update_teacher(m, 0.9)
    for t0, t1, s in zip(before, t_params, s_params):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s, atol=1e-6)
    # the momentum schedule: cosine from 0.996 to 1 over the run
    assert cosine_lr(0, 0.996, 1.0, 0, 10) == 0.996 and cosine_lr(10, 0.996, 1.0, 0, 10) == 1.0
    assert cosine_lr(5, 0.996, 1.0, 0, 10) == pytest.approx(0.998)


def test_gradients_are_clipped_per_parameter():
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([6.0, 8.0, 0.0, 0.0]), torch.tensor([0.6, 0.8])  # norms 10 and 1
    total = sit.clip_gradients([a, b], 3.0)
    assert total.item() == pytest.approx(math.sqrt(101))
    assert a.grad.norm().item() == pytest.approx(3.0, rel=1e-5)  # clipped on its own
    assert torch.equal(b.grad, torch.tensor([0.6, 0.8]))  # below the limit: untouched (a global clip would scale it)



def test_heads_are_the_official_layers():
    """CLSHead: Linear, BN, ReLU, Linear, BN, GELU, Linear, BN without affine (the official mix of ReLU and GELU);
    RECHead: three Linear(D, D) + GELU, then a transposed convolution with kernel = stride = the patch size."""
    head = sit.CLSHead(8, out_dim=4, hidden_dim=16)
    assert [type(m) for m in head.mlp] == [torch.nn.Linear, sit.SyncBatchNorm1d, torch.nn.ReLU, torch.nn.Linear,
                                           sit.SyncBatchNorm1d, torch.nn.GELU, torch.nn.Linear, sit.SyncBatchNorm1d]
    assert [(m.in_features, m.out_features) for m in head.mlp[::3]] == [(8, 16), (16, 16), (16, 4)]
    assert [m.affine for m in head.mlp[1::3]] == [True, True, False]
    rec = sit.RECHead(8, patch_size=4)
    assert [type(m) for m in rec.mlp] == [torch.nn.Linear, torch.nn.GELU] * 3
    assert rec.convTrans.kernel_size == rec.convTrans.stride == (4, 4) and rec.convTrans.out_channels == 3


def test_reconstruction_is_each_patch_token_decoded_into_its_own_patch():
    """The student's outputs rebuilt by hand from the encoder's tokens: the cls output is token 0; patch token k (of
    the row-major grid) goes through the three Linear + GELU and becomes the 4 x 4 x 3 pixels of patch k through the
    transposed convolution's weight [D, 3, 4, 4] and bias."""
    m = tiny_sit().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cls, recon = m.reconstruct(x)
        tokens = m.encoder.forward_features(x)  # [2, 1 + 16, 64]
        h = tokens[:, 1:]
        for linear in m.rec_head.mlp[::2]:
            h = F.gelu(h @ linear.weight.T + linear.bias)
        conv = m.rec_head.convTrans
        patches = torch.einsum("bnd,dcuv->bncuv", h, conv.weight) + conv.bias.view(1, 1, 3, 1, 1)  # [2, 16, 3, 4, 4]
        expected = patches.view(2, 4, 4, 3, 4, 4).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 16, 16)
    assert torch.equal(cls, tokens[:, 0])
    assert recon.shape == (2, 3, 16, 16) and torch.allclose(recon, expected, atol=1e-5)


def test_official_initialisation():
    """trunc_normal(std 0.02, cut at +-2, i.e. a plain normal) for pos_embed, the cls token and every Linear (biases
    0) of the encoder and both heads; the patch conv and the transposed conv keep PyTorch's default (uniform, bound
    1 / sqrt(fan_in) = 1 / sqrt(48): std 0.083); the teacher is a copy of the student."""
    m = tiny_sit()
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert len(linears) == 2 * 4 + 3 + 3 + 2 * 4 + 3  # encoder blocks (qkv, proj, fc1, fc2), heads, the teacher's
    weights = torch.cat([mod.weight.flatten() for mod in linears])
    assert abs(weights.std().item() - 0.02) < 0.001 and weights.abs().max() > 0.06  # not cut at +-1 std
    assert all((mod.bias == 0).all() for mod in linears)
    for p in (m.encoder.pos_embed, m.encoder.cls_token):
        assert abs(p.std().item() - 0.02) < 0.006 and abs(p.mean().item()) < 0.006
    for conv in (m.encoder.patch_embed.proj, m.rec_head.convTrans):
        bound = 1 / math.sqrt(48)
        assert conv.weight.abs().max() <= bound and abs(conv.weight.std().item() - bound / math.sqrt(3)) < 0.01


def test_training_losses_recomputed_by_hand():
    """training_losses (what main() calls) against its parts rebuilt from the same generator: each view corrupted on
    its own, the teacher on the *clean* views, the student on the corrupted ones, the contrastive loss pairing each
    student view with the teacher's other view, the L1 on the corrupted pixels only against the clean image, and
    contrastive + lmbda x reconstruction."""
    m = tiny_sit(drop_path=0.0, lmbda=5.0)
    cfg = config(*SIT_TINY)
    views = (images(4, 16, seed=6) - 3, images(4, 16, seed=7) - 3)
    loss, c_loss, r_loss = sit.training_losses(m, views, cfg, torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(8)
    corrupted, masks = zip(*(sit.gmml_corrupt(v, cfg, g) for v in views))
    clean, corrupted, mask = torch.cat(views), torch.cat(corrupted), torch.cat(masks).bool().expand(8, 3, 16, 16)
    with torch.no_grad():
        teacher = m.teacher["cls_head"](m.teacher["encoder"].forward_features(clean)[:, 0])
        cls, recon = m.reconstruct(corrupted)
        student = m.cls_head(cls)
    c_expected = sit.info_nce(student[:4], teacher[4:], 0.2) + sit.info_nce(student[4:], teacher[:4], 0.2)
    r_expected = (recon - clean).abs()[mask].mean()
    assert c_loss.item() == pytest.approx(c_expected.item(), rel=1e-5)
    assert r_loss.item() == pytest.approx(r_expected.item(), rel=1e-5)
    assert r_loss.item() != pytest.approx((recon - clean).abs()[~mask].mean().item(), rel=1e-2)
    assert loss.item() == pytest.approx(c_loss.item() + 5.0 * r_loss.item(), rel=1e-6)

def test_tiny_model_learns_one_batch():
    m = tiny_sit(lmbda=5.0)
    cfg = config(*SIT_TINY)
    coarse = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    x = F.interpolate(coarse, size=16, mode="bilinear", align_corners=False)  # smooth: corrupted pixels are predictable
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    first = last = None
    for i in range(60):
        loss, c_loss, r_loss = sit.training_losses(m, (x, x.flip(-1)), cfg, torch.Generator().manual_seed(i % 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sit.update_teacher(m, 0.99)
        first = first or (c_loss.item(), r_loss.item())
        last = (c_loss.item(), r_loss.item())
    assert last[1] < first[1] * 0.7 and last[0] < first[0] * 0.7, (first, last)


def test_encoder_loads_into_timm_with_same_features():
    timm = pytest.importorskip("timm")
    m = tiny_sit(img_size=32)
    ref = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2,
                                                           num_heads=2, num_classes=0)
    ref.load_state_dict(m.encoder.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    m.eval(), ref.eval()
    with torch.no_grad():
        assert torch.allclose(m.encoder.forward_features(x), ref.forward_features(x), atol=1e-5)


# ------------------------------------------------------------------------------------------------ 2 processes
def ddp_case():
    """The 2-process comparison: a tiny SiT (no drop path, lmbda 0: the contrastive loss and its BatchNorms are
    under test; each rank's reconstruction loss is a mean over its own pixels, as officially) and 8 images."""
    model = tiny_sit(drop_path=0.0, lmbda=0.0)
    cfg = config(*SIT_TINY)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]
    corrupted, masks = zip(*(sit.gmml_corrupt(v, cfg, g) for v in views))
    return model, views, corrupted, masks


def sit_step(model, views, corrupted, masks):
    """Loss, backward, then the student's and teacher's embeddings (a second forward) and the running statistics."""
    loss, c_loss, _, _ = model(torch.cat(views), torch.cat(corrupted), torch.cat(masks))
    loss.backward()
    net = getattr(model, "module", model)
    with torch.no_grad():
        student = net.cls_head(net.reconstruct(torch.cat(corrupted))[0])
        teacher = net.teacher["cls_head"](net.teacher["encoder"].forward_features(torch.cat(views))[:, 0])
    grads = [p.grad for p in net.student_parameters()]
    stats = [b for n, b in net.named_buffers() if "running" in n]
    return loss.detach(), c_loss.detach(), student, teacher, grads, stats


def ddp_worker(out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from common.training import setup_distributed
    d = setup_distributed("cpu")
    model, views, corrupted, masks = ddp_case()
    part = slice(4 * d.rank, 4 * d.rank + 4)  # this rank's 4 of the 8 images, both views
    loss, c_loss, student, teacher, grads, stats = sit_step(DDP(model), *[[v[part] for v in t] for t in
                                                                       (views, corrupted, masks)])

    def gather(t):
        parts = [torch.empty_like(t) for _ in range(2)]
        dist.all_gather(parts, t.contiguous())
        return parts

    def in_batch_order(t):  # [view 1 rank 0, view 2 rank 0], [.. rank 1] -> [view 1 ranks 0, 1, view 2 ranks 0, 1]
        a, b = gather(t)
        return torch.cat([a[:4], b[:4], a[4:], b[4:]])

    result = {"loss": sum(gather(loss)) / 2, "c_loss": sum(gather(c_loss)) / 2, "student": in_batch_order(student),
              "teacher": in_batch_order(teacher), "grads": grads, "stats": stats}
    if d.rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def torchrun(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29700 + os.getpid() % 1000), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_equal_one_with_twice_the_batch(tmp_path):
    """torchrun x2 (gloo) with 4 images each == one process with all 8: the same loss (the negatives are the teacher
    embeddings of *both* ranks), the same embeddings and running statistics (the BatchNorms of both heads see the
    global batch) and the same gradients (DDP's average, through the synchronised statistics' backward)."""
    torchrun(Path(__file__), tmp_path / "ddp.pt")
    got = torch.load(tmp_path / "ddp.pt", weights_only=True)
    loss, c_loss, student, teacher, grads, stats = sit_step(*ddp_case())
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert got["c_loss"].item() == pytest.approx(c_loss.item(), rel=1e-5)
    assert torch.allclose(got["student"], student, atol=1e-4) and torch.allclose(got["teacher"], teacher, atol=1e-4)
    assert len(got["stats"]) == len(stats) == 12  # running mean and var of the 3 BNs of the student's and teacher's heads
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got["stats"], stats))
    assert sum(g.norm() for g in grads) > 10  # gradients of order 0.1-1: atol 1e-4 is fp32 noise (the biases before
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(got["grads"], grads))  # a BN: 0 + noise)


def test_ddp_cli_two_processes(tmp_path):
    """sit.py under torchrun x2: the teacher and student stay identical on both ranks (EMA included), one writer."""
    out = tmp_path / "run"
    torchrun(ROOT / "sit.py", *SIT_TINY, "--epochs", "1", "--out", out)
    steps = read_log(out, "step")
    assert [s["step"] for s in steps] == [0, 1]  # 64 images / (16 x 2 ranks)
    done = read_log(out, "done")
    assert len(done) == 1 and done[0]["world_size"] == 2 and done[0]["replicas_identical"] is True
    assert json.loads((out / "config.json").read_text())["lr"] == pytest.approx(2e-3 * 32 / 256)


# ------------------------------------------------------------------------------------------- CLI and resume
def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_cli_end_to_end_and_exact_resume(tmp_path):
    """8 steps in one go writes the files of a run; 3 steps, stop, resume to 8 gives bitwise the same per-step losses
    and final weights, the teacher's included (drop path draws from the global generator; corruption from the step)."""
    full, part = tmp_path / "full", tmp_path / "part"
    proc = run_script("sit.py", *SIT_TINY, "--out", full, env=ONE_THREAD)
    for name in ("config.json", "log.jsonl", "checkpoint.pth", "encoder.pth", "recon_e0.png", "recon_e1.png",
                 "results.json"):
        assert (full / name).is_file(), name
    results = json.loads((full / "results.json").read_text())
    assert results["global_step"] == 8 and set(results["eval"]["random_init"]) == {"knn_cls", "knn_mean",
                                                                                 "linear_cls", "linear_mean"}
    epochs = read_log(full, "epoch")
    assert len(epochs) == 2 and all(e["contrastive"] > 0 and e["reconstruction"] > 0 for e in epochs)
    lmbda = json.loads((full / "config.json").read_text())["lmbda"]
    step_losses = [s["loss"] for s in read_log(full, "step")]
    for e in epochs:  # the epoch's two parts add up to its loss, the mean of its 4 step losses
        assert lmbda == 5.0 and e["loss"] == pytest.approx(e["contrastive"] + lmbda * e["reconstruction"], rel=1e-5)
        assert e["loss"] == pytest.approx(sum(step_losses[4 * e["epoch"]:4 * e["epoch"] + 4]) / 4, rel=1e-5)
    assert "contrastive" in proc.stdout and "replace (30%)" in proc.stdout
    run_script("sit.py", *SIT_TINY, "--max-steps", 3, "--out", part, env=ONE_THREAD)
    run_script("sit.py", *SIT_TINY, "--out", part, "--resume", "auto", env=ONE_THREAD)
    losses = {s["step"]: s["loss"] for s in read_log(full, "step")}
    assert sorted(losses) == list(range(8))
    assert {s["step"]: s["loss"] for s in read_log(part, "step")} == losses
    a, b = load(full / "checkpoint.pth")["model"], load(part / "checkpoint.pth")["model"]
    assert any(k.startswith("teacher.") for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["teacher.encoder.cls_token"], a["encoder.cls_token"])  # the teacher lags the student
    enc = load(full / "encoder.pth")
    assert all(torch.equal(enc[k], a["encoder." + k]) for k in enc)



def test_main_wires_the_schedules_the_clipping_and_the_teacher_update(tmp_path, monkeypatch):
    """sit.main() itself (in this process, the final evaluation skipped), 2 epochs of 4 micro-steps with
    --accum-iter 2, its calls recorded: the mean gradient of the two micro-steps, per-parameter clipping at 3 of
    *every* student parameter, an optimizer step, then the teacher EMA at the updates (micro-steps 1, 3, 5, 7) with
    momentum 1 - 0.004 (1 + cos(pi it / 8)) / 2 (official: cosine from 0.996 to 1 over all iterations); weight decay
    of the decayed group (the >= 2-D weights) a cosine from 0.04 to 0.1, the other group 0; the lr warmed up over
    half an epoch, then a cosine; every schedule read at `it` = the update's first micro-step (0, 2, 4, 6); the
    corruption drawn from the step's generator. The checkpoint's teacher is the EMA of the recorded students,
    recomputed."""
    import random
    import signal
    import numpy as np
    from common import training
    from common.data import mix_seed
    rec = {"teacher": [], "clip": [], "opt": [], "seed": [], "micro": []}
    update_teacher, clip_gradients, training_losses = sit.update_teacher, sit.clip_gradients, sit.training_losses

    def record_update(model, momentum):
        grads_cleared = all(p.grad is None for p in model.student_parameters())  # after step and zero_grad
        if not rec["teacher"]:
            rec["teacher0"] = {k: p.detach().clone() for k, p in model.teacher.named_parameters()}
        rec["teacher"].append((momentum, grads_cleared, {k: p.detach().clone() for k, p in model.named_parameters()
                                                         if not k.startswith("teacher.")}))
        update_teacher(model, momentum)

    def record_clip(parameters, clip):
        parameters = list(parameters)
        rec["clip"].append((clip, {id(p) for p in parameters}, len(rec["opt"])))
        if len(rec["clip"]) == 1:
            rec["grad"] = [p.grad.clone() for p in parameters]  # the first update's accumulated gradient
        return clip_gradients(parameters, clip)

    def record_losses(model, views, cfg, generator):
        rec["seed"].append(generator.initial_seed())
        losses = training_losses(model, views, cfg, generator)
        if len(rec["seed"]) <= 2:  # the gradient of each micro-step of the first accumulation, from its own graph
            rec["micro"].append(torch.autograd.grad(losses[0], list(model.student_parameters()), retain_graph=True))
        return losses

    class AdamW(torch.optim.AdamW):
        def step(self, *args, **kwargs):
            rec["opt"].append([(g["lr"], g["weight_decay"]) for g in self.param_groups])
            rec["groups"] = [{id(p): p.ndim for p in g["params"]} for g in self.param_groups]
            return super().step(*args, **kwargs)

    monkeypatch.setattr(sit, "update_teacher", record_update)
    monkeypatch.setattr(sit, "clip_gradients", record_clip)
    monkeypatch.setattr(sit, "training_losses", record_losses)
    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    monkeypatch.setattr(sit, "report", lambda *args, **kwargs: None)  # the kNN / linear monitors: not under test
    monkeypatch.setattr(training, "reuse_freed_host_memory", lambda device: False)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["sit.py", *SIT_TINY, "--accum-iter", "2", "--out", str(out)])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    py_rng, np_rng = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            sit.main()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        random.setstate(py_rng)
        np.random.set_state(np_rng)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["momentum_teacher"], cfg["weight_decay"], cfg["weight_decay_end"], cfg["clip_grad"], cfg["seed"]) == (
        0.996, 0.04, 0.1, 3.0, 0)
    firsts = [0, 2, 4, 6]  # the updates come at micro-steps 1, 3, 5, 7; their schedules are read at the first of each
    half_cos = [(1 + math.cos(math.pi * it / 8)) / 2 for it in firsts]  # 1 at the start, 0 at the end of 8 steps
    assert [m for m, _, _ in rec["teacher"]] == pytest.approx([1 - 0.004 * c for c in half_cos], abs=1e-12)
    assert all(cleared for _, cleared, _ in rec["teacher"])
    peak, min_lr = 2e-3 * 32 / 256, cfg["min_lr"]
    lrs = [0.0, peak * 2 / 4 / 0.5] + [min_lr + (peak - min_lr) * (1 + math.cos(math.pi * (it / 4 - 0.5) / 1.5)) / 2
                                       for it in firsts[2:]]
    assert [[lr for lr, _ in groups] for groups in rec["opt"]] == [pytest.approx([lr, lr], rel=1e-9) for lr in lrs]
    assert [[wd for _, wd in groups] for groups in rec["opt"]] == [
        pytest.approx([0.1 - 0.06 * c, 0.0], abs=1e-12) for c in half_cos]
    assert all(n >= 2 for n in rec["groups"][0].values()) and all(n <= 1 for n in rec["groups"][1].values())
    every = set(rec["groups"][0]) | set(rec["groups"][1])  # all the student's trainable parameters
    assert [(clip, ids == every, before) for clip, ids, before in rec["clip"]] == [(3.0, True, k) for k in range(4)]
    assert rec["seed"] == [mix_seed(0, 0, it) for it in range(8)]
    assert all(torch.allclose(g, (g0 + g1) / 2, rtol=1e-4, atol=1e-7) for g, g0, g1 in zip(rec["grad"], *rec["micro"]))
    teacher = rec["teacher0"]
    for c, (_, _, student) in zip(half_cos, rec["teacher"]):
        m = 1 - 0.004 * c
        teacher = {k: m * v + (1 - m) * student[k] for k, v in teacher.items()}
    saved = load(out / "checkpoint.pth")["model"]
    assert all(torch.allclose(saved["teacher." + k], v, atol=1e-7) for k, v in teacher.items())
    assert not torch.equal(saved["teacher.encoder.cls_token"], rec["teacher0"]["encoder.cls_token"])


# ------------------------------------------------------------------------------------------------------ bench
def test_bench_row_counts_both_views_and_the_teacher(monkeypatch):
    """bench.py's row: trainable parameters of the student, and forward FLOPs = student (encoder + both heads) and
    teacher (encoder + contrastive head) on the 2B views, plus the 2 x 2 InfoNCE logits matmuls (B x B x C each)."""
    import bench
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    monkeypatch.setattr(bench, "PRECISIONS", bench.PRECISIONS[:1])  # fp32 only: bf16 is emulated (slow) on AVX2
    args = bench.parse_args(["--model", "vit_nano", "--img-size", "16", "--patch-size", "4", "--batch-size", "4",
                             "--steps", "1", "--no-compile", "--device", "cpu"])
    cfg = bench.method_config(sit, args)
    row = bench.bench_method(sit, cfg, args, torch.device("cpu"))
    torch.manual_seed(0)
    m = sit.build_model(cfg)
    assert row["params"] == count_params(m) and row["tokens_per_img"] == 2 * 16 and row["fp32"]["img_s"] > 0

    def flops(forward):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            forward()
        return counter.get_total_flops()

    x = torch.randn(8, 3, 16, 16)
    student = flops(lambda: (lambda cls, recon: (m.cls_head(cls), recon))(*m.reconstruct(x)))
    teacher = flops(lambda: m.teacher["cls_head"](m.teacher["encoder"].forward_features(x)[:, 0]))
    logits = 2 * (2 * 4 * 4 * cfg.out_dim)
    assert row["fwd_gflop_per_img"] * 4 * 1e9 == pytest.approx(student + teacher + logits, rel=1e-9)


if __name__ == "__main__":  # the worker of test_two_processes_equal_one_with_twice_the_batch
    ddp_worker(sys.argv[1])
