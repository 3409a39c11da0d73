"""BEiT: parameter counts, the blockwise mask generator (statistics and a hand check), the tokenizer, the loss on
masked positions only, init, schedule, views, timm compatibility, and the CLI through both stages (resume, reuse of a
tokenizer file, --stage tokenizer, two processes, bench.py)."""
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import beit
from common.evaluation import codebook_usage_bars
from common.training import parse_config
from common.vit import count_params
from conftest import (ROOT, TINY, assert_encoder_matches_timm_beit, assert_loss_ignores_visible_targets,
                      assert_same_law, read_log, run_script)

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# TINY plus a 2x tokenizer (16 px view -> 4 x 4 tokens = the patch grid) small enough for seconds
BEIT_TINY = TINY + ["--vocab-size", "64", "--dvae-stride", "4", "--dvae-hidden", "16", "--dvae-codebook-dim", "16",
                    "--tokenizer-epochs", "1", "--tokenizer-batch-size", "16"]



def tiny_tokenizer(vocab=64):
    torch.manual_seed(0)
    return beit.DVAE(vocab, stride=4, hidden=16, codebook_dim=16)


def tiny_beit(img_size=16, **kw):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    return beit.BEiT(tok, img_size, 4, "vit_nano", 64, **kw)


def test_paper_parameter_counts():
    """Trainable parameters of the official pre-training models (reference B9; unilm#383 logs 91,965,776); the
    frozen tokenizer does not count."""
    with torch.device("meta"):
        base = beit.BEiT(beit.DVAE(8192, 8, 256, 512), 224, 16, "vit_base", 8192, layer_scale=0.1)
        large = beit.BEiT(beit.DVAE(8192, 8, 256, 512), 224, 16, "vit_large", 8192, layer_scale=1e-5)
    assert count_params(base) == 91_965_776
    assert count_params(base.lm_head) == 768 * 8192 + 8192
    assert count_params(base.encoder) + 768 == 85_666_128  # the official backbone holds the mask token
    assert count_params(large) == 311_534_016
    assert count_params(base.tokenizer) == 0 and count_params(base.tokenizer, trainable=False) > 20e6
    cfg, _ = parse_config(beit.Config, beit.PRESETS, ["--data", "imagenet", "--model", "vit_large"])
    assert beit.layer_scale(cfg) == 1e-5 and beit.layer_scale(beit.Config(model="vit_base")) == 0.1


# ------------------------------------------------------------------------------------------------------- masking
def test_mask_generator_statistics_at_imagenet_size():
    """2000 masks at 14 x 14 with the official arguments: never more than 75, every block's target area >= 16 while
    the budget allows it, aspect in [0.3, 1/0.3], sides below the grid and rounded from the drawn area and aspect;
    the count is 75 for most images but not all; the per-position frequency is symmetric under flips."""
    gen = beit.MaskingGenerator(14, 75, 16, None, 0.3)
    rng = random.Random(0)
    counts, freq, log_aspects = [], np.zeros((14, 14)), []
    for _ in range(2000):
        boxes = []
        mask = gen.draw(rng, boxes)
        counts.append(int(mask.sum()))
        freq += mask
        log_aspects += [math.log(b[5]) for b in boxes]
        replay = np.zeros((14, 14), dtype=np.int64)
        for top, lft, h, w, area, aspect in boxes:
            left = 75 - replay.sum()  # the budget when this block was drawn
            assert 0.3 - 1e-9 <= aspect <= 1 / 0.3 + 1e-9
            assert min(16, left) - 1e-9 <= area <= max(16, left) + 1e-9  # U(16, budget left)
            assert (h, w) == (round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect)))
            assert h < 14 and w < 14
            assert 0 < h * w - replay[top:top + h, lft:lft + w].sum() <= left  # new patches within the budget
            replay[top:top + h, lft:lft + w] = 1
        assert np.array_equal(replay, mask)  # the blocks are the mask
        assert len(boxes) >= 1
    counts = np.array(counts)
    assert counts.max() == 75 and counts.min() >= 16
    assert 0.5 < (counts == 75).mean() < 1.0  # 10 failed draws end an image early sometimes
    assert 70 < counts.mean() < 75
    freq /= 2000
    assert np.abs(freq - freq[::-1]).max() < 0.06 and np.abs(freq - freq[:, ::-1]).max() < 0.06
    assert freq[5:9, 5:9].mean() > freq[[0, 0, -1, -1], [0, -1, 0, -1]].mean()  # blocks cover the centre more
    # the aspect is log-uniform in [0.3, 1/0.3] (official: exp(uniform(log 0.3, log 1/0.3))), and the accepted blocks
    # keep that symmetry (a block and its transpose fit alike): log r averages 0, half the blocks are tall. A uniform
    # draw of r in [0.3, 3.33] gives E[log r] = 0.44 and only 23 % of the draws below 1.
    log_aspects = np.array(log_aspects)
    assert len(log_aspects) > 4000
    assert abs(log_aspects.mean()) < 0.05, log_aspects.mean()
    assert abs((log_aspects < 0).mean() - 0.5) < 0.04
    assert log_aspects.min() < math.log(0.4) and log_aspects.max() > math.log(2.5)  # the whole range is drawn


def test_mask_generator_hand_check_on_a_small_grid():
    """5 x 5 grid, budget 6, blocks >= 3, Random(7). Its draws: random() = 0.32383, 0.15085 -> target area
    3 + 3 x 0.32383 = 3.9715, aspect exp(log 0.3 + log(1/0.09) x 0.15085) = 0.43139 -> h = round(sqrt(1.7133)) = 1,
    w = round(sqrt(9.2063)) = 3; randint(0, 4) = 0, randint(0, 2) = 0: a 1 x 3 block at (0, 0), 3 patches. Budget
    left 3: area uniform(3, 3) = 3, aspect 0.37632 -> h = round(sqrt(1.129)) = 1, w = round(sqrt(7.972)) = 3;
    randint(0, 4) = 4, randint(0, 2) = 0: a 1 x 3 block at (4, 0): 6 patches, done."""
    gen = beit.MaskingGenerator(5, 6, 3)
    boxes = []
    mask = gen.draw(random.Random(7), boxes)
    expected = np.zeros((5, 5), dtype=np.int64)
    expected[0, :3] = expected[4, :3] = 1
    assert np.array_equal(mask, expected)
    assert [b[:4] for b in boxes] == [(0, 0, 1, 3), (4, 0, 1, 3)]
    assert boxes[0][4] == pytest.approx(3.9715, abs=1e-4) and boxes[0][5] == pytest.approx(0.43139, abs=1e-5)
    # the batch of a step: images drawn in a row from one Random, the same for the same seed, on any device
    batch = gen(3, random.Random(7))
    assert batch.dtype == torch.bool and batch.shape == (3, 25)
    assert torch.equal(batch[0], torch.from_numpy(expected).flatten().bool())
    assert torch.equal(batch, gen(3, random.Random(7))) and not torch.equal(batch[0], batch[1])


def mask_statistics(masks, grid):
    """Histograms of per-image statistics (independent draws) that describe a blockwise law, from [n, grid * grid]
    bool masks: the masked count (64 or fewer, 65, ..., 75), the masked patches in the central half of the grid
    (where blocks overlap most; bins of 4) and the masked horizontal neighbour pairs (the blocks' shapes; bins of 5)."""
    counts = masks.sum(1).clamp(min=64) - 64  # [n] in 0..11
    grid_masks = masks.view(-1, grid, grid)
    q = grid // 4
    centre = grid_masks[:, q:grid - q, q:grid - q].sum(dim=(1, 2)) // 4  # [n]
    pairs = (grid_masks[:, :, 1:] & grid_masks[:, :, :-1]).sum(dim=(1, 2)) // 5  # [n]
    return [torch.bincount(s, minlength=grid * grid) for s in (counts, centre, pairs)]


def test_batched_masks_follow_the_official_law():
    """The masks training draws (the whole batch on the device, MaskingGenerator.batched) against the official
    per-image draws (`draw`, the law the tests above pin down), 4000 images each at 14 x 14, 75 patches, blocks >=
    16: the same distribution of the masked count, of the masked patches in the centre and of the block shapes
    (masked neighbour pairs), by chi-square; at most 75 masked; a function of the generator."""
    gen = beit.MaskingGenerator(14, 75, 16, None, 0.3)
    batched = gen.batched(4000, torch.Generator().manual_seed(0))
    rng = random.Random(0)
    official = torch.stack([torch.from_numpy(gen.draw(rng)).flatten().bool() for _ in range(4000)])  # [4000, 196]
    assert batched.shape == (4000, 196) and batched.dtype == torch.bool and batched.sum(1).max() == 75
    for ours, theirs in zip(mask_statistics(batched, 14), mask_statistics(official, 14)):
        assert_same_law(ours, theirs)
    assert torch.equal(gen.batched(8, torch.Generator().manual_seed(3)), gen.batched(8, torch.Generator().manual_seed(3)))
    assert not torch.equal(batched[:8], gen.batched(8, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("img,patch,grid,num,min_block", [(224, 16, 14, 75, 16), (32, 4, 8, 24, 5),
                                                          (28, 4, 7, 19, 4), (32, 2, 16, 98, 21)])
def test_mask_budget_scales_with_the_grid(img, patch, grid, num, min_block):
    """75/196 and 16/196 of the grid, rounded: the ImageNet fractions on every grid."""
    gen = beit.mask_generator(beit.Config(img_size=img, patch_size=patch))
    assert (gen.height, gen.num_masking_patches, gen.min_num_patches) == (grid, num, min_block)


def test_mask_generator_takes_every_masking_flag():
    """--num-mask-patches, --min/max-mask-patches-per-block and --min-aspect reach the generator: the aspect range is
    [log min_aspect, log 1/min_aspect]."""
    gen = beit.mask_generator(beit.Config(img_size=32, patch_size=4, num_mask_patches=20, min_mask_patches_per_block=3,
                                          max_mask_patches_per_block=10, min_aspect=0.5))
    assert (gen.height, gen.width, gen.num_masking_patches) == (8, 8, 20)
    assert (gen.min_num_patches, gen.max_num_patches) == (3, 10)
    assert gen.log_aspect_ratio == pytest.approx((math.log(0.5), math.log(2.0)), rel=1e-12)
    default = beit.mask_generator(beit.Config(img_size=32, patch_size=4))
    assert default.max_num_patches == 24
    assert default.log_aspect_ratio == pytest.approx((math.log(0.3), math.log(1 / 0.3)))


def test_step_masks_follow_the_step_generator():
    cfg = beit.Config(img_size=32, patch_size=4)
    gen = beit.mask_generator(cfg)
    a = gen.batched(8, torch.Generator().manual_seed(5))
    assert torch.equal(a, gen.batched(8, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, gen.batched(8, torch.Generator().manual_seed(6)))
    assert (a.sum(1) <= 24).all()


def test_pretraining_step_draws_the_masks_of_its_step():
    """pretraining_step (main's step and bench.py's): masks drawn batched from the step's generator, the tokenizer
    view as the tokenizer's input, slots = the generator's budget -> exactly model(imgs, view, those masks, budget)."""
    m = tiny_beit().eval()
    masks = beit.MaskingGenerator(4, 6, 2)
    imgs, view = torch.randn(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        loss, acc = beit.pretraining_step(m, (imgs, view), masks, torch.Generator().manual_seed(11))
        mask = masks.batched(3, torch.Generator().manual_seed(11))
        expected = m(imgs, view, mask, 6)
        other = beit.pretraining_step(m, (imgs, view), masks, torch.Generator().manual_seed(12))[0]
    assert mask.sum(1).max() > 2  # the budget matters: more masked patches than the smallest block
    assert loss.item() == pytest.approx(expected[0].item(), rel=1e-6)
    assert acc.item() == pytest.approx(expected[1].item())
    assert other.item() != pytest.approx(loss.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_shapes_and_decode():
    tok = tiny_tokenizer()
    view = torch.rand(3, 3, 16, 16)
    ids = tok.get_codebook_indices(view)
    assert ids.shape == (3, 16) and ids.dtype == torch.long and 0 <= ids.min() and ids.max() < 64
    assert torch.equal(ids, tok.logits(view).argmax(1).flatten(1))  # argmax, row-major
    img = tok.decode(ids, (4, 4))
    assert img.shape == (3, 3, 16, 16) and img.min() >= 0 and img.max() <= 1
    assert beit.DVAE(64, stride=8, hidden=8, codebook_dim=8).get_codebook_indices(torch.rand(1, 3, 24, 16)).shape == (1, 6)
    tok.schedule = beit.dvae_schedule(beit.Config())
    loss, hard, terms = tok(view, *tok.prepare(view, torch.Generator().manual_seed(0), 0.0))
    assert torch.equal(hard, ids) and terms["tau"] == 1.0 and terms["beta"] == 0.0 and torch.isfinite(loss)
    assert 0 <= terms["kl"] <= math.log(64) + 1e-5
    assert beit.cosine_anneal(1.0, 0.05, 1.0, 1 / 16) == 1 / 16 and beit.cosine_anneal(0.025, 0.05, 1.0, 0.0) == pytest.approx(0.5)


def test_pixel_map_and_encoder_input():
    """DALL-E's map_pixels x -> 0.8 x + 0.1 (eps 0.1) and its inverse, clamped to [0, 1]; the encoder sees the mapped
    view; its logits are [B, V, h, w]."""
    x = torch.tensor([0.0, 0.25, 1.0])
    assert torch.allclose(beit.map_pixels(x), torch.tensor([0.1, 0.3, 0.9]))
    y = torch.tensor([0.1, 0.3, 0.9, 0.0, 1.0])
    assert torch.allclose(beit.unmap_pixels(y), torch.tensor([0.0, 0.25, 1.0, 0.0, 1.0]))
    tok = tiny_tokenizer()
    view = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert tok.logits(view).shape == (2, 64, 4, 4)
        assert torch.allclose(tok.logits(view), tok.encoder(0.8 * view + 0.1), atol=1e-6)
        # decode: the codes' embeddings as a [B, d, h, w] map (row-major), the image unmap(sigmoid(location))
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
        z = torch.zeros(2, 16, 4, 4)  # [B, d, h, w]: code of id i * 4 + j at (i, j)
        for b in range(2):
            for i in range(4):
                for j in range(4):
                    z[b, :, i, j] = tok.codebook.weight[ids[b, i * 4 + j]]
        mu = tok.decoder(z)[:, :3]
        assert torch.allclose(tok.decode(ids, (4, 4)), ((torch.sigmoid(mu) - 0.1) / 0.8).clamp(0, 1), atol=1e-6)


def dvae_loss_by_hand(tok, view, seed, progress):
    """DALL-E's stage-1 loss written out: tau and beta from their half-cosine schedules, Gumbel noise -log(-log u)
    from the generator's uniforms (one per logit), relaxed one-hots softmax((logits + g) / tau) (or the sample's
    one-hot with --dvae-straight-through), the decoder on their mix of codes, the reconstruction NLL per pixel
    dimension, KL(q || uniform) per position, loss = nll + beta kl / (3 s^2)."""
    s = tok.schedule

    def anneal(span, start, end):
        return end if progress >= span else end + (start - end) * (1 + math.cos(math.pi * progress / span)) / 2
    tau, beta = anneal(s["temp_anneal"], 1.0, s["temp_end"]), anneal(s["kl_warmup"], 0.0, s["kl_weight"])
    logits = tok.encoder(0.8 * view + 0.1)  # [B, V, h, w]
    u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(seed))
    soft = torch.softmax((logits - torch.log(-torch.log(u))) / tau, dim=1)
    mix = soft
    if s["straight_through"]:
        mix = F.one_hot(soft.argmax(1), logits.shape[1]).permute(0, 3, 1, 2).float()
    z = (mix.unsqueeze(2) * tok.codebook.weight.view(1, *tok.codebook.weight.shape, 1, 1)).sum(1)  # [B, d, h, w]
    stats = tok.decoder(z)
    mu, log_b = stats[:, :3], stats[:, 3:].clamp(min=math.log(1e-3))
    if s["recon"] == "laplace":
        x = 0.8 * view + 0.1
        # logit-Laplace: a Laplace(mu, b) on logit(x), times the Jacobian 1 / (x (1 - x)) of the logit
        laplace = torch.distributions.Laplace(mu, log_b.exp())
        log_density = laplace.log_prob(torch.log(x / (1 - x))) - torch.log(x * (1 - x))
        nll = -log_density.mean()
    else:
        mean = ((torch.sigmoid(mu) - 0.1) / 0.8).clamp(0, 1)
        nll = -torch.distributions.Normal(mean, 0.1).log_prob(view).mean()
    q = torch.softmax(logits, dim=1)
    kl = (q * torch.log(q * logits.shape[1])).sum(1).mean()
    return nll + beta * kl / (3 * tok.stride ** 2), nll, kl, tau, beta


@pytest.mark.parametrize("recon,straight_through", [("gauss", False), ("laplace", False), ("gauss", True)])
def test_dvae_loss_recomputed_by_hand(recon, straight_through):
    tok = tiny_tokenizer()
    tok.schedule = beit.dvae_schedule(beit.Config(dvae_kl_warmup=0.5, dvae_temp_anneal=0.6, dvae_temp_end=0.2,
                                                  dvae_kl_weight=5.0, dvae_recon=recon,
                                                  dvae_straight_through=straight_through))
    view = torch.rand(2, 3, 16, 16)
    if recon == "laplace":  # log-scales below the floor log(1e-3) in one channel: the clamp counts
        with torch.no_grad():
            tok.decoder[-1].bias[3] -= 9.0
    for progress in (0.2, 0.7):  # within both schedules; after both
        loss, ids, terms = tok(view, *tok.prepare(view, torch.Generator().manual_seed(3), progress))
        ref, nll, kl, tau, beta = dvae_loss_by_hand(tok, view, 3, progress)
        assert terms["tau"] == pytest.approx(tau, rel=1e-12) and terms["beta"] == pytest.approx(beta, rel=1e-12)
        assert 0 < beta and tau < 1
        assert terms["nll"].item() == pytest.approx(nll.item(), rel=1e-5)
        assert terms["kl"].item() == pytest.approx(kl.item(), rel=1e-4, abs=1e-6)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        assert torch.equal(ids, tok.get_codebook_indices(view))
    # gradients: the relaxed sample's (through the encoder) -- for straight-through the gradient at the hard
    # one-hot, passed to the soft sample unchanged
    grads = torch.autograd.grad(loss, [tok.encoder[-1].weight, tok.decoder[-1].weight])
    ref_grads = torch.autograd.grad(dvae_loss_by_hand(tok, view, 3, 0.7)[0], [tok.encoder[-1].weight,
                                                                             tok.decoder[-1].weight])
    if straight_through:  # the reference's one-hot has no gradient: rebuild the straight-through path by hand
        s = tok.schedule
        logits = tok.encoder(0.8 * view + 0.1)
        u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(3))
        soft = torch.softmax((logits - torch.log(-torch.log(u))) / s["temp_end"], dim=1)
        hard = F.one_hot(soft.argmax(1), 64).permute(0, 3, 1, 2).float().requires_grad_(True)
        z = torch.einsum("bvhw,vd->bdhw", hard, tok.codebook.weight)
        mean = ((torch.sigmoid(tok.decoder(z)[:, :3]) - 0.1) / 0.8).clamp(0, 1)
        nll = -torch.distributions.Normal(mean, 0.1).log_prob(view).mean()
        (g_hard,) = torch.autograd.grad(nll, hard, retain_graph=True)
        q = torch.softmax(logits, dim=1)
        kl = (q * torch.log(q * 64)).sum(1).mean()
        surrogate = (soft * g_hard).sum() + s["kl_weight"] * kl / (3 * 16)
        ref_grads = (torch.autograd.grad(surrogate, tok.encoder[-1].weight)[0],
                     torch.autograd.grad(nll, tok.decoder[-1].weight)[0])
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-7)


def test_dvae_config_reaches_the_tokenizer():
    cfg = beit.Config(vocab_size=32, dvae_stride=2, dvae_hidden=8, dvae_codebook_dim=12, dvae_kl_weight=5.0,
                      dvae_kl_warmup=0.3, dvae_temp_anneal=0.2, dvae_temp_end=0.1, dvae_recon="laplace",
                      dvae_straight_through=True)
    tok = beit.new_dvae(cfg)
    assert tok.config == dict(vocab_size=32, stride=2, hidden=8, codebook_dim=12)
    assert tok.codebook.weight.shape == (32, 12) and tok.encoder[0][0].out_channels == 8
    assert tok.schedule == dict(temp_anneal=0.2, temp_end=0.1, kl_warmup=0.3, kl_weight=5.0, straight_through=True,
                                recon="laplace")
    assert beit.new_dvae(cfg, dict(vocab_size=16, stride=4, hidden=4, codebook_dim=6)).config["codebook_dim"] == 6


def test_tokenizer_uses_many_codes_after_a_short_fit(one_thread):
    """A short stage-1 fit on synthetic images: the tokens of 64 images use more than a handful of the 64 codes,
    and decoding them is closer to the images than at init."""
    from common.data import render_synthetic
    imgs = torch.stack([torch.from_numpy(render_synthetic(i, 16, 0)[0]) for i in range(64)]).permute(0, 3, 1, 2) / 255
    tok = tiny_tokenizer()
    tok.schedule = beit.dvae_schedule(beit.Config(dvae_kl_warmup=0.2, dvae_temp_anneal=0.5))  # beta 6.6, relaxed
    opt = torch.optim.AdamW(tok.parameters(), lr=3e-3)
    before = tok.recon_error(imgs).item()
    for step in range(150):
        loss, _, _ = tok(imgs, *tok.prepare(imgs, torch.Generator().manual_seed(step), step / 150))
        opt.zero_grad()
        loss.backward()
        opt.step()
    used = tok.get_codebook_indices(imgs).unique().numel()
    assert used > 8, used
    assert tok.recon_error(imgs).item() < 0.8 * before


# ----------------------------------------------------------------------------------------------- model and loss
def test_codebook_usage_picture_has_one_bar_per_used_code():
    counts = torch.zeros(64)
    counts[[3, 10, 40, 41, 63]] = torch.tensor([1.0, 5.0, 500.0, 50.0, 2.0])
    bars = codebook_usage_bars(counts, height=20)  # [20, 64]
    assert bars.shape == (20, 64) and (bars.sum(0) > 0).sum() == 5  # five used codes, five bars, first to last
    heights = bars.sum(0)[:5].tolist()
    assert heights == sorted(heights, reverse=True) and heights[0] == 20 and heights[-1] >= 1
    assert bars[:, 5:].sum() == 0


def test_loss_is_cross_entropy_on_masked_positions_only():
    m = tiny_beit().eval()
    imgs, view = torch.randn(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 2, 5]] = True
    mask[1, [0, 15]] = True
    ids = m.tokenizer.get_codebook_indices(view)
    with torch.no_grad():
        loss, acc = m(imgs, view, mask, 6)
        x = m.forward_encoder(imgs, mask)
        logits = m.lm_head(x[mask])  # the official lm_head(x[bool_masked_pos]): [5, V]
    assert loss.item() == pytest.approx(F.cross_entropy(logits, ids[mask]).item(), rel=1e-6)
    assert acc.item() == pytest.approx((logits.argmax(-1) == ids[mask]).float().mean().item())
    # accuracy = right predictions / masked positions (padding slots count for neither): targets that agree with
    # the predictions at 2 of the 5 masked positions give 0.4
    with torch.no_grad():
        pred = m.lm_head(m.forward_encoder(imgs, mask)).argmax(-1)  # [B, N]
    target = (pred + 1) % 64
    target[0, 5], target[1, 15] = pred[0, 5], pred[1, 15]
    m.tokenizer.get_codebook_indices = lambda v: target
    with torch.no_grad():
        assert m(imgs, view, mask, 6)[1].item() == pytest.approx(0.4)
    del m.tokenizer.get_codebook_indices
    # other targets at visible positions change nothing; at a masked one, the loss
    assert_loss_ignores_visible_targets(m, imgs, view, mask, 6, ids, loss, changed=(0, 1))
    order, valid = beit.masked_positions(mask, 6)
    assert order[0, :3].tolist() == [1, 2, 5] and valid.sum() == 5 and order[1, :2].tolist() == [0, 15]


def test_hidden_patches_do_not_reach_the_encoder():
    m = tiny_beit().eval()
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :6] = True
    hidden = mask.view(2, 1, 4, 4).float().repeat_interleave(4, 2).repeat_interleave(4, 3)  # [B, 1, H, W]
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = m.forward_encoder(imgs, mask)
        assert torch.equal(out, m.forward_encoder(imgs + 5 * torch.randn_like(imgs) * hidden, mask))
        assert not torch.allclose(out, m.forward_encoder(imgs + 5 * torch.randn_like(imgs) * (1 - hidden), mask))


def test_forward_encoder_by_hand():
    """The encoder input: each masked patch's embedding replaced by the mask token (no position embedding: the
    relative bias), the cls token in front, the blocks, the final norm, the cls dropped. Without a mask: the encoder's
    own features."""
    m = tiny_beit().eval()
    enc = m.encoder
    imgs = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 3, 4]] = mask[1, [7, 15]] = True
    with torch.no_grad():
        assert torch.allclose(m.forward_encoder(imgs, torch.zeros_like(mask)), enc.forward_features(imgs)[:, 1:],
                              atol=1e-6)
        x = enc.patch_embed(imgs).clone()  # [B, N, D]
        x[mask] = m.mask_token[0, 0]
        x = torch.cat([enc.cls_token.expand(2, -1, -1), x], dim=1)
        bias = enc.rel_pos_bias()
        for block in enc.blocks:
            x = block(x, bias)
        assert torch.allclose(m.forward_encoder(imgs, mask), enc.norm(x)[:, 1:], atol=1e-6)


def test_official_init_shared_with_simmim():
    torch.manual_seed(0)
    m = beit.BEiT(tiny_tokenizer(), 32, 4, "vit_nano", 64)
    enc = m.encoder
    sigma_std = 0.02 * math.sqrt(1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / math.erf(1 / math.sqrt(2)))
    for name, w in [("qkv", enc.blocks[1].attn.qkv.weight), ("fc1", enc.blocks[0].mlp.fc1.weight),
                    ("cls", enc.cls_token), ("mask", m.mask_token), ("head", m.lm_head.weight)]:
        assert w.abs().max() <= 0.02, name  # truncated at +-1 sigma
        if w.numel() > 1000:
            assert w.std().item() == pytest.approx(sigma_std, rel=0.05), name
    for layer, block in enumerate(enc.blocks, start=1):
        for w in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert w.std().item() * math.sqrt(2 * layer) == pytest.approx(sigma_std, rel=0.05)
        assert torch.all(block.gamma_1 == 0.1) and block.attn.qkv.bias is None
    assert torch.all(m.lm_head.bias == 0) and enc.pos_embed is None
    assert m.mask_token.std().item() == pytest.approx(sigma_std, rel=0.3)  # 64 values: drawn, not left at zero
    assert torch.all(enc.rel_pos_bias.relative_position_bias_table == 0)
    assert not any(p.requires_grad for p in m.tokenizer.parameters())
    m.train()
    assert m.encoder.training and not m.tokenizer.training


def test_lr_schedule_equals_the_official_cosine_scheduler():
    """utils.cosine_scheduler: np.linspace(0, lr, W) then the cosine over the remaining iterations."""
    cfg = beit.Config(epochs=5, warmup_epochs=2, lr=1.5e-3, min_lr=1e-5)
    spe = 7
    W, T = 2 * spe, 5 * spe
    official = np.concatenate([np.linspace(0, 1.5e-3, W), [1e-5 + 0.5 * (1.5e-3 - 1e-5) * (1 + math.cos(
        math.pi * i / (T - W))) for i in range(T - W)]])
    ours = [beit.beit_lr(i, spe, cfg) for i in range(T)]
    assert ours == pytest.approx(official.tolist(), rel=1e-12, abs=1e-15)


def test_two_views_share_one_crop(one_thread):
    """Resident path: the model view and the tokenizer view come from the same crop box and flip (at equal sizes
    they are equal up to the normalisation); colour jitter factors stay within 1 -/+ 0.4."""
    from common.data import IMAGENET_MEAN, IMAGENET_STD, color_jitter
    imgs = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    model_view, tok_view = beit.two_view_augment(16, 16)(imgs, torch.Generator().manual_seed(0))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose((model_view * std + mean).clamp(0, 1), tok_view, atol=1e-5)
    small = beit.two_view_augment(16, 8)(imgs, torch.Generator().manual_seed(0))[1]
    assert small.shape == (6, 3, 8, 8) and small.min() >= 0 and small.max() <= 1
    x = torch.full((2, 3, 4, 4), 0.5)
    y = color_jitter(x, torch.Generator().manual_seed(0), brightness=0.4, contrast=0.4, saturation=0.4)  # BEiT's
    assert ((y / 0.5) >= 0.6 ** 3 - 1e-6).all() and ((y / 0.5) <= 1.4 ** 3 + 1e-6).all()


def test_two_views_by_hand(one_thread):
    """The resident path written out: colour jitter (0.4, 0.4, 0.4) on the whole image first, then one crop box
    (scale 0.08-1, ratio 3/4-4/3) and one flip per image from the same generator, the model view bicubic and
    normalised, the tokenizer view bicubic at its size and clamped to [0, 1]."""
    from common.data import IMAGENET_MEAN, IMAGENET_STD, color_jitter, crop_resize_flip, sample_resized_crops
    imgs = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    model_view, tok_view = beit.two_view_augment(16, 8)(imgs, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    x = color_jitter(imgs.float() / 255, g, brightness=0.4, contrast=0.4, saturation=0.4)
    box = sample_resized_crops(6, 20, 20, (0.08, 1.0), (3 / 4, 4 / 3), g, "cpu")
    flip = torch.rand(6, generator=g) < 0.5
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(model_view, (crop_resize_flip(x, *box, flip, 16, "bicubic") - mean) / std, atol=1e-5)
    assert torch.allclose(tok_view, crop_resize_flip(x, *box, flip, 8, "bicubic").clamp(0, 1), atol=1e-6)
    assert not torch.allclose(x, imgs.float() / 255, atol=1e-3) and 0 < flip.sum() < 6


def test_two_view_transform_one_box_for_both_views():
    """The PIL path (official DataAugmentationForBEiT): one jittered, flipped image and one crop box for both
    views, the model view bicubic + normalised, the tokenizer view with the tokenizer's interpolation."""
    from PIL import Image
    from common.data import IMAGENET_MEAN, IMAGENET_STD
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for seed in range(3):
        torch.manual_seed(seed)
        model_view, tok_view = beit.two_view_transform(16, 16, "bicubic")(img)
        assert model_view.shape == tok_view.shape == (3, 16, 16)
        assert torch.allclose(model_view * std + mean, tok_view, atol=1e-5)  # same box, same resize, same pixels
        torch.manual_seed(seed)
        lanczos = beit.two_view_transform(16, 16, "lanczos")(img)
        assert torch.allclose(lanczos[0], model_view) and not torch.allclose(lanczos[1], tok_view, atol=1e-3)


def test_encoder_loads_into_timm_beit_with_same_features():
    assert_encoder_matches_timm_beit(tiny_beit(img_size=32).encoder)


def test_bad_flags_are_one_line_errors():
    from common import UserError
    for bad in (["--stage", "tokens"], ["--num-mask-patches", "300"], ["--dvae-stride", "6"], ["--min-aspect", "2"],
                ["--min-mask-patches-per-block", "100"], ["--vocab-size", "1"], ["--dvae-kl-warmup", "2"]):
        with pytest.raises(UserError):
            parse_config(beit.Config, beit.PRESETS, ["--data", "imagenet", *bad])
    with pytest.raises(UserError, match="cannot read tokenizer"):
        beit.load_tokenizer(ROOT / "requirements.txt", "dvae", lambda config: beit.new_dvae(beit.Config(), config))


# ------------------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """`python beit.py` (tiny): stage 1 into <out>/tokenizer.pth, stage 2, monitors, files."""
    out = tmp_path_factory.mktemp("beit") / "run"
    proc = run_script("beit.py", *BEIT_TINY, "--out", out, env=ONE_THREAD)
    return out, proc


def test_cli_walks_tokenizer_pretraining_monitors_files(first_run):
    out, proc = first_run
    assert "stage 1: dvae tokenizer" in proc.stdout
    for name in ("config.json", "log.jsonl", "tokenizer.pth", "tokenizer_e0.png", "codebook_e0.png", "checkpoint.pth",
                 "encoder.pth",
                 "recon_e0.png", "recon_e1.png", "results.json"):
        assert (out / name).is_file(), name
    (tok_epoch,) = read_log(out, "tokenizer_epoch")
    assert {"recon_error", "perplexity", "codes_used", "nll", "kl"} <= set(tok_epoch)
    assert 1 <= tok_epoch["perplexity"] <= 64 and 0 < tok_epoch["codes_used"] <= 1 and tok_epoch["recon_error"] > 0
    used = tok_epoch["codes_used"] * 64  # a fraction of 64 codes (rounded to 4 places): a whole number of codes,
    assert abs(used - round(used)) < 0.01 and tok_epoch["perplexity"] <= round(used) + 0.01  # >= the perplexity
    saved = torch.load(out / "tokenizer.pth", weights_only=True)
    assert saved["kind"] == "dvae" and saved["complete"] and "optimizer" not in saved
    assert saved["config"] == dict(vocab_size=64, stride=4, hidden=16, codebook_dim=16)
    cfg = json.loads((out / "config.json").read_text())
    # stage 1's log: each epoch's means are the means of its steps' values; the lr is the cosine from
    # --tokenizer-lr to --tokenizer-min-lr over the stage (4 steps); loss = nll + beta kl / (3 x 4 x 4)
    tok_steps = read_log(out, "tokenizer_step")
    assert [s["step"] for s in tok_steps] == list(range(4))
    for key in ("loss", "nll", "kl"):
        assert tok_epoch[key] == pytest.approx(np.mean([s[key] for s in tok_steps]), abs=1e-5), key
    lo, hi = cfg["tokenizer_min_lr"], cfg["tokenizer_lr"]
    assert [s["lr"] for s in tok_steps] == pytest.approx([lo + (hi - lo) * (1 + math.cos(math.pi * i / 4)) / 2
                                                          for i in range(4)], rel=1e-9)
    assert all(s["loss"] == pytest.approx(s["nll"] + s["beta"] * s["kl"] / 48, abs=2e-6) for s in tok_steps)
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "beit" and results["global_step"] == 8  # 64 images / 16 x 2 epochs
    assert 0 <= results["mlm_acc"] <= 1 and 0 < results["final_loss"] < 2 * math.log(64)
    assert results["tokenizer"]["codes_used"] == tok_epoch["codes_used"]
    for which in ("pretrained", "random_init"):
        assert set(results["eval"][which]) == {"knn_cls", "knn_mean", "linear_cls", "linear_mean"}
    epochs = read_log(out, "epoch")
    assert len(epochs) == 2 and all(0 <= e["mlm_acc"] <= 1 for e in epochs)
    # the values a wrong loop would change: final_loss is the last epoch's mean step loss, mlm_acc its accuracy
    losses = [s["loss"] for s in read_log(out, "step")]
    assert [e["loss"] for e in epochs] == pytest.approx([np.mean(losses[:4]), np.mean(losses[4:])], rel=1e-6)
    assert results["final_loss"] == pytest.approx(epochs[-1]["loss"], rel=1e-12)
    assert results["mlm_acc"] == pytest.approx(epochs[-1]["mlm_acc"], abs=6e-6)
    # the tokenizer file holds what stage 1 measured: its recon_error recomputed from the saved dVAE
    tok, _ = beit.load_tokenizer(out / "tokenizer.pth", "dvae", lambda c: beit.DVAE(**c))
    views = beit.fixed_views(beit.Config(**{k: v for k, v in cfg.items() if k in beit.Config.__dataclass_fields__}),
                             type("R", (), {"device": torch.device("cpu")}), 16, 256)
    with torch.no_grad():
        ids = tok.logits(views).argmax(1).flatten(1)
        decoded = tok.decode(ids, (4, 4))
    assert tok_epoch["recon_error"] == pytest.approx(((decoded - views) ** 2).mean().item(), rel=0.02)
    assert cfg["lr"] == pytest.approx(cfg["blr"] * 16 / 256) and cfg["clip_grad"] == 3.0
    lrs = [s["lr"] for s in read_log(out, "step")]  # warm-up 0.5 epoch = 2 steps: linspace(0, lr, 2), then cosine
    assert lrs[:4] == pytest.approx([0.0, cfg["lr"], cfg["lr"], cfg["min_lr"] + 0.5 * (cfg["lr"] - cfg["min_lr"]) * (
        1 + math.cos(math.pi / 6))], rel=1e-6)
    assert lrs == pytest.approx([0.0, cfg["lr"]] + [cfg["min_lr"] + 0.5 * (cfg["lr"] - cfg["min_lr"]) * (
        1 + math.cos(math.pi * j / 6)) for j in range(6)], rel=1e-6)  # the cosine runs on across the epochs
    state = torch.load(out / "encoder.pth", weights_only=True)
    assert "mask_token" not in state and not any(k.startswith("tokenizer") for k in state)


def test_resume_reuses_the_tokenizer(first_run):
    out, _ = first_run
    before = (out / "tokenizer.pth").read_bytes()
    proc = run_script("beit.py", *BEIT_TINY, "--epochs", "3", "--out", out, "--resume", "auto", env=ONE_THREAD)
    assert "stage 1:" not in proc.stdout and f"tokenizer: dvae from {out}/tokenizer.pth" in proc.stdout
    assert (out / "tokenizer.pth").read_bytes() == before
    assert [s["step"] for s in read_log(out, "step")] == list(range(12))  # 8 steps, then 4 more


def main_in_process(module, argv, monkeypatch):
    """`module.main()` in this process with `argv`, every pretraining_step recorded (its generator's seed, the mask
    generator, the batch size, the returned loss and accuracy); the monitors and exports are skipped (report
    stubbed). Returns the records. The signal handlers Run installs are restored."""
    import signal
    calls = []
    real = module.pretraining_step

    def spy(model, batch, masks, generator):
        loss, acc = real(model, batch, masks, generator)
        calls.append(dict(seed=generator.initial_seed(), masks=masks, batch=batch[0].shape[0], loss=loss.item(),
                          acc=acc.item()))
        return loss, acc
    monkeypatch.setattr(module, "pretraining_step", spy)
    # report without the monitors: results.json holds the method's own numbers (mlm_acc, tokenizer)
    monkeypatch.setattr(module, "report", lambda method, encoder, build_model, run, extra=None:
                        run.write_json("results.json", extra))
    monkeypatch.setattr(sys, "argv", [module.__name__ + ".py", *map(str, argv)])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        module.main()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return calls


def test_main_steps_draw_fresh_masks_and_average_the_accuracy(first_run, tmp_path, monkeypatch, one_thread):
    """main()'s loop, in process with the CLI run's tokenizer: step `it` draws its masks from the generator seeded
    by (seed, rank 0, it) -- new masks every step of every epoch -- with the run's mask generator; an epoch's
    mlm_acc is the mean of its steps' accuracies, results.json's the last epoch's; the step log has each loss."""
    from common.data import mix_seed
    first, _ = first_run
    out = tmp_path / "run"
    calls = main_in_process(beit, [*BEIT_TINY, "--blr", "0.05", "--tokenizer", first / "tokenizer.pth", "--out", out],
                            monkeypatch)  # (a high lr: the head soon predicts the common tokens, accuracy > 0)
    assert [c["seed"] for c in calls] == [mix_seed(0, 0, it) for it in range(8)]
    assert all(type(c["masks"]) is beit.MaskingGenerator and c["masks"].num_masking_patches == 6 and c["batch"] == 16
               for c in calls)
    epochs = read_log(out, "epoch")
    accs = [np.mean([c["acc"] for c in calls[:4]]), np.mean([c["acc"] for c in calls[4:]])]
    assert [e["mlm_acc"] for e in epochs] == pytest.approx(accs, abs=6e-6)
    assert json.loads((out / "results.json").read_text())["mlm_acc"] == pytest.approx(accs[1], rel=1e-6)
    assert [s["loss"] for s in read_log(out, "step")] == pytest.approx([c["loss"] for c in calls], rel=1e-6)
    assert 0 < accs[0] < accs[1]  # (the accuracies are not all zero, so a dropped sum would show)


def test_stage_tokenizer_into_a_new_path_then_ddp_pretraining_reusing_it(first_run, tmp_path):
    """--stage tokenizer with a --tokenizer PATH that does not exist trains it there (and nothing else); a
    2-process gloo run of pre-training then loads an existing tokenizer file instead of training one."""
    path = tmp_path / "tok" / "dvae.pth"
    proc = run_script("beit.py", *BEIT_TINY, "--stage", "tokenizer", "--tokenizer", path, "--out", tmp_path / "s1",
                      env=ONE_THREAD)
    assert "stage 1 done" in proc.stdout and path.is_file() and not (tmp_path / "s1" / "checkpoint.pth").exists()
    assert torch.load(path, weights_only=True)["complete"]
    out = tmp_path / "ddp"
    first, _ = first_run
    ddp = torchrun_beit(*BEIT_TINY, "--tokenizer", first / "tokenizer.pth", "--out", out)
    assert "stage 1:" not in ddp.stdout and f"tokenizer: dvae from {first}/tokenizer.pth" in ddp.stdout
    assert [s["step"] for s in read_log(out, "step")] == list(range(4))  # 64 images / (16 x 2 ranks) x 2 epochs
    (done,) = read_log(out, "done")
    assert done["world_size"] == 2 and done["replicas_identical"] is True
    assert not (out / "tokenizer.pth").exists()


def torchrun_beit(*args, timeout=300):
    """beit.py under `torchrun --nproc_per_node 2` on CPU (gloo), one thread per process."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29500 + (hash(str(args)) % 1000)), str(ROOT / "beit.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_stage_one_under_ddp_keeps_the_replicas_identical(tmp_path):
    """Stage 1 on 2 processes (gloo): each rank tokenizes its own shard, DDP averages the gradients, so both ranks
    end with the same tokenizer; the steps are the global batch's (64 images / (16 x 2 ranks) x 2 epochs)."""
    out = tmp_path / "ddp"
    proc = torchrun_beit(*BEIT_TINY, "--stage", "tokenizer", "--tokenizer-epochs", "2", "--out", out)
    assert "stage 1 done" in proc.stdout and "DDP check: parameters identical on 2 ranks" in proc.stdout
    (done,) = read_log(out, "tokenizer_done")
    assert done == dict(kind="tokenizer_done", global_step=4, world_size=2, replicas_identical=True)
    assert [s["step"] for s in read_log(out, "tokenizer_step")] == list(range(4))
    assert torch.load(out / "tokenizer.pth", weights_only=True)["complete"]


def test_stage_one_stopped_mid_epoch_then_continued_equals_an_uninterrupted_run(tmp_path):
    """--stage tokenizer --max-steps 3 leaves an unfinished tokenizer file (optimizer and position inside it); the
    next run continues it from step 3 and ends with bitwise the tokenizer and step losses of one uninterrupted run."""
    args = [*BEIT_TINY, "--stage", "tokenizer", "--tokenizer-epochs", "2"]  # 4 steps an epoch, 8 in all
    full, part = tmp_path / "full", tmp_path / "part"
    run_script("beit.py", *args, "--out", full, env=ONE_THREAD)
    proc = run_script("beit.py", *args, "--max-steps", "3", "--out", part, env=ONE_THREAD)
    assert "stage 1 stopped after 3 steps" in proc.stdout and "stage 1 done" not in proc.stdout
    saved = torch.load(part / "tokenizer.pth", weights_only=True)
    assert not saved["complete"] and (saved["epoch"], saved["step"]) == (0, 3) and "optimizer" in saved
    proc = run_script("beit.py", *args, "--out", part, env=ONE_THREAD)
    assert "unfinished stage 1 (epoch 0, step 3): continuing it" in proc.stdout and "stage 1 done" in proc.stdout
    losses = {s["step"]: s["loss"] for s in read_log(full, "tokenizer_step")}
    assert sorted(losses) == list(range(8))
    # DALL-E's schedules over the whole stage (progress = step / 8, across the epoch boundary): half cosines from
    # tau 1 and beta 0 to their ends over the run's fractions (the demo preset's: 0.5 and 0.2 of stage 1)
    cfg = json.loads((full / "config.json").read_text())

    def anneal(progress, span, start, end):
        return end if progress >= span else end + (start - end) * (1 + math.cos(math.pi * progress / span)) / 2
    for s in read_log(full, "tokenizer_step"):
        p = s["step"] / 8
        assert s["tau"] == pytest.approx(anneal(p, cfg["dvae_temp_anneal"], 1, cfg["dvae_temp_end"]), abs=1e-6)
        assert s["beta"] == pytest.approx(anneal(p, cfg["dvae_kl_warmup"], 0, cfg["dvae_kl_weight"]), abs=1e-6)
    assert 0 < cfg["dvae_kl_warmup"] < 0.5 and 0.5 <= cfg["dvae_temp_anneal"] < 1  # both move across the boundary
    assert {s["step"]: s["loss"] for s in read_log(part, "tokenizer_step")} == losses
    a, b = (torch.load(d / "tokenizer.pth", weights_only=True) for d in (full, part))
    assert a["complete"] and b["complete"] and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_bench_row_counts_the_tokenizer(one_thread):
    """bench.py's row for BEiT (in process, with a tiny tokenizer: the ImageNet one takes minutes here): the step it
    times includes the tokenizer's forward, and its FLOPs are the tokenizer's plus the encoder's and the head's."""
    import argparse
    from dataclasses import replace
    import bench
    args = bench.parse_args(["--model", "vit_nano", "--img-size", "16", "--patch-size", "4", "--batch-size", "2",
                             "--steps", "1", "--no-compile"])
    cfg = replace(bench.method_config(beit, args), vocab_size=64, dvae_hidden=16, dvae_codebook_dim=16)
    row = bench.bench_method(beit, cfg, argparse.Namespace(**{**vars(args), "compile": False, "bf16": True}), torch.device("cpu"))
    model = beit.build_model(cfg)
    assert row["params"] == count_params(model) == count_params(model.encoder) + 64 + 64 * 64 + 64
    batch = beit.bench_batch(torch.randn(2, 3, 16, 16), cfg)
    assert batch[1].shape == (2, 3, 32, 32)  # the ImageNet tokenizer's stride 8 x the 4 x 4 patch grid
    fwd, _ = bench.count_flops(lambda: beit.training_loss(model, batch, cfg, torch.Generator().manual_seed(0)))
    tok_fwd, _ = bench.count_flops(lambda: model.tokenizer.logits(batch[1]).sum().requires_grad_())
    assert row["fwd_gflop_per_img"] == pytest.approx(fwd / 2 / 1e9, rel=1e-9)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    without, _ = bench.count_flops(lambda: model.lm_head(model.forward_encoder(batch[0], mask)[:, :6]).sum())
    assert tok_fwd > 0 and fwd == pytest.approx(without + tok_fwd, rel=1e-9)  # the tokenizer is in the step
    assert row["fp32"]["img_s"] > 0 and row["bf16"]["img_s"] > 0


def test_bench_gives_a_row_for_beit_and_one_for_beit_v2(one_thread):
    """beit.py and beit2.py are two methods: bench.py times both, each with its own tokenizer in the step (v1: the
    ImageNet dVAE; v2: a VQ-KD of the encoder's size) and its own model (v2: + the patch-aggregation blocks)."""
    import argparse
    import beit2
    import bench
    args = bench.parse_args(["--model", "vit_nano", "--img-size", "16", "--patch-size", "4", "--batch-size", "2",
                             "--steps", "1", "--no-compile", "--no-bf16"])
    v1, v2 = bench.method_config(beit, args), bench.method_config(beit2, args)
    assert (isinstance(beit.build_model(v1), beit2.BEiTv2), isinstance(beit2.build_model(v2), beit2.BEiTv2)) == (
        False, True)
    rows = [bench.bench_method(module, cfg, argparse.Namespace(**vars(args)), torch.device("cpu"))
            for module, cfg in ((beit, v1), (beit2, v2))]
    assert [r["model"] for r in rows] == ["BEiT vit_nano/4 16px batch 2", "BEiT v2 vit_nano/4 16px batch 2"]
    assert rows[1]["params"] == count_params(beit2.build_model(v2)) != rows[0]["params"]
    assert rows[1]["fwd_gflop_per_img"] > 0 and rows[1]["fwd_gflop_per_img"] != rows[0]["fwd_gflop_per_img"]
    assert rows[1]["fp32"]["img_s"] > 0 and rows[1]["bf16"] is None
