"""common/evaluation.py: kNN, linear probe, layer-wise lr decay, the fine-tuning classifier, image grids."""
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

import mae
import simmim
from common.evaluation import (Classifier, FinetuneRecipe, finetune_lr, finetune_recipe, finetune_step, knn_accuracy,
                               layer_decay_groups, layer_id, linear_probe, mix_batch, save_image_grid)
from common.vit import VisionTransformer
from conftest import TINY, run_script


def clustered(n_per_class, num_classes, dim, noise, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[y] + noise * torch.randn(len(y), dim, generator=g), y


def test_knn_and_linear_probe_on_separable_and_random_features():
    xtr, ytr = clustered(50, 5, 16, 0.5, 0)
    xva, yva = clustered(20, 5, 16, 0.5, 1)
    assert knn_accuracy(xtr, ytr, xva, yva, 5) == 100.0
    assert linear_probe(xtr, ytr, xva, yva, 5, epochs=30, batch_size=64) > 95.0
    g = torch.Generator().manual_seed(5)
    rand_x, rand_y = torch.randn(1000, 16, generator=g), torch.randint(0, 5, (1000,), generator=g)
    assert knn_accuracy(rand_x[:500], rand_y[:500], rand_x[500:], rand_y[500:], 5) < 30.0  # chance is 20 %


def test_knn_weighted_vote_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    test = torch.tensor([[0.1, 1.0]])
    # k = 3: two far neighbours of class 0 against one very close neighbour of class 1; exp(sim / 0.07) decides
    assert knn_accuracy(train, labels, test, torch.tensor([1]), 2, k=3) == 100.0


def test_knn_uses_k_20_by_default():
    # one training point of class 1 right next to the query, 19 of class 0 a little further: the nearest neighbour
    # alone (k = 1) says 1, the weighted vote of 20 says 0 (19 x exp(0.9 / 0.07) > exp(1 / 0.07))
    test = torch.tensor([[1.0, 0.0]])
    near = torch.tensor([[1.0, 0.0]])
    far = torch.tensor([[math.cos(a), math.sin(a)] for a in np.linspace(0.44, 0.46, 19)])  # cos ~ 0.9
    train, labels = torch.cat([near, far]), torch.tensor([1] + [0] * 19)
    assert knn_accuracy(train, labels, test, torch.tensor([1]), 2, k=1) == 100.0
    assert knn_accuracy(train, labels, test, torch.tensor([0]), 2) == 100.0  # the default k


def test_layer_decay_map_and_scales():
    enc = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2)
    model = Classifier(enc, 10)
    assert layer_id("encoder.patch_embed.proj.weight", 3) == 0 and layer_id("encoder.cls_token", 3) == 0
    assert layer_id("encoder.blocks.2.mlp.fc1.weight", 3) == 3 and layer_id("head.weight", 3) == 4
    groups = layer_decay_groups(model, 0.05, 0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale_of[id(named["encoder.patch_embed.proj.weight"])] == 0.5 ** 4
    assert scale_of[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.5 ** 3
    assert scale_of[id(named["head.weight"])] == 1.0
    assert wd_of[id(named["encoder.cls_token"])] == 0.0 and wd_of[id(named["encoder.blocks.0.norm1.weight"])] == 0.0
    assert wd_of[id(named["head.weight"])] == 0.05
    assert "encoder.pos_embed" not in {n for n, p in named.items() if id(p) in scale_of}  # frozen here


def test_classifier_pools_mean_before_final_norm():
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    clf = Classifier(enc, 3)
    imgs = torch.randn(2, 3, 16, 16)
    tokens = enc.run_blocks(enc.prepend_cls(enc.embed(imgs)))
    assert torch.allclose(clf(imgs), clf.head(clf.fc_norm(tokens[:, 1:].mean(1))), atol=1e-6)
    assert clf.head.weight.abs().max() < 1e-4  # MAE's trunc_normal(2e-5) head


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_classifier_holds_only_parameters_it_uses(pool):
    """DDP (without find_unused_parameters) fails at the second step on a parameter that gets no gradient: with mean
    pooling the encoder's final norm is unused, and must be gone (as the official code deletes it)."""
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, pos_embed=None,
                            rel_pos_bias=True, qv_bias=True, init_values=0.1)  # SimMIM's encoder: shared table too
    clf = Classifier(enc, 3, pool)
    clf.head.weight.data.normal_()  # so that gradients reach the encoder
    clf(torch.randn(2, 3, 16, 16)).square().sum().backward()
    unused = [n for n, p in clf.named_parameters() if p.grad is None]
    assert unused == []
    assert ("encoder.norm.weight" in dict(clf.named_parameters())) == (pool == "cls")


# ------------------------------------------------------------------------------------------- fine-tuning recipes
def test_mixup_targets_sum_to_one_and_weight_labels_by_lambda():
    B, C = 6, 4
    imgs = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, 8, 8)  # image i is the constant i
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    recipe = FinetuneRecipe(mixup=0.8, cutmix=0.0, smoothing=0.1)
    for seed in range(5):
        mixed, y = mix_batch(imgs, labels, C, recipe, np.random.default_rng(seed))
        lam = float(mixed[0, 0, 0, 0] - (B - 1)) / (0 - (B - 1))  # image 0 = lam * 0 + (1 - lam) * (B - 1)
        assert 0 < lam < 1
        for i in range(B):  # x_i = lam x_i + (1 - lam) x_(B-1-i), everywhere
            assert torch.allclose(mixed[i], lam * imgs[i] + (1 - lam) * imgs[B - 1 - i], atol=1e-5)
        assert torch.allclose(y.sum(1), torch.ones(B))
        smooth = torch.full((B, C), 0.1 / C).scatter_(1, labels[:, None], 0.9 + 0.1 / C)  # smoothed one-hots
        assert torch.allclose(y, lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-6)


def test_cutmix_weights_labels_by_the_pasted_area():
    B, C, H = 4, 4, 16
    imgs = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, H, H)
    labels = torch.tensor([0, 1, 2, 3])
    recipe = FinetuneRecipe(mixup=0.0, cutmix=1.0, smoothing=0.0)
    areas = []
    for seed in range(20):
        mixed, y = mix_batch(imgs, labels, C, recipe, np.random.default_rng(seed))
        pasted = (mixed[0, 0] == B - 1).float().mean().item()  # share of image 0 that now shows image B-1
        assert torch.allclose(y.sum(1), torch.ones(B))
        assert y[0, 0].item() == pytest.approx(1 - pasted) and y[0, 3].item() == pytest.approx(pasted)
        assert torch.equal(mixed[1, 0] == 2, mixed[0, 0] == 3)  # one box, the same for every pair
        areas.append(pasted)
    assert min(areas) < 0.2 and max(areas) > 0.3  # lam really varies from batch to batch


def test_switch_between_mixup_and_cutmix():
    imgs = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 8, 8)
    recipe = FinetuneRecipe(mixup=0.8, cutmix=1.0, switch_prob=0.5)
    kinds = []
    for seed in range(200):
        mixed, _ = mix_batch(imgs, torch.arange(4), 4, recipe, np.random.default_rng(seed))
        kinds.append(bool(torch.isin(mixed[0], torch.tensor([0.0, 3.0])).all()))  # cutmix keeps pixel values
    assert 0.4 < np.mean(kinds) < 0.6


def test_finetune_lr_schedules_match_the_official_formulas():
    steps, epochs, peak = 10, 20, 1e-3
    # MAE util/lr_sched.py at 5 warm-up epochs of 100, run for 20 epochs (warm-up 1 epoch), min_lr 1e-6
    mae_recipe = FinetuneRecipe(epochs=100, warmup_epochs=5, min_lr=1e-6)

    def mae_official(e):  # adjust_learning_rate(epoch = it / steps + epoch)
        if e < 1:
            return peak * e / 1
        return 1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * (e - 1) / (epochs - 1)))

    for it in (0, 3, 10, 57, 199):
        assert finetune_lr(it, steps, epochs, peak, mae_recipe, 0.0, 1e-6) == pytest.approx(mae_official(it / steps))
    # SimMIM: timm CosineLRScheduler(t_initial=200, warmup_t=40 (20 of 100 epochs -> 4 of 20), warmup_lr_init=w,
    # lr_min=m, t_in_epochs=False), step_update(it) after optimizer step it: step it runs on f(it - 1)
    w, m = 2.5e-7, 2.5e-7
    simmim_recipe = FinetuneRecipe(epochs=100, warmup_epochs=20, schedule="timm")

    def timm_f(t):
        if t < 40:
            return w + t * (peak - w) / 40
        return m + 0.5 * (peak - m) * (1 + math.cos(math.pi * t / 200))

    for it, t in ((0, 0), (1, 0), (2, 1), (40, 39), (41, 40), (120, 119), (199, 198)):
        assert finetune_lr(it, steps, epochs, peak, simmim_recipe, w, m) == pytest.approx(timm_f(t))
    assert finetune_lr(41, steps, epochs, peak, simmim_recipe, w, m) < peak  # the cosine counts the warm-up


def test_method_recipes():
    cfg = mae.Config(model="vit_large")
    large = finetune_recipe(mae.FINETUNE, cfg)
    assert (large.epochs, large.warmup_epochs, large.blr, large.layer_decay, large.drop_path) == (50, 5, 1e-3, 0.75, 0.2)
    assert (large.mixup, large.cutmix, large.erasing, large.rand_augment, large.smoothing) == (0.8, 1.0, 0.25, 9, 0.1)
    base = finetune_recipe(mae.FINETUNE, mae.Config())
    assert (base.epochs, base.warmup_epochs, base.blr, base.clip_grad) == (100, 5, 5e-4, None)
    sim = finetune_recipe(simmim.FINETUNE, simmim.Config())
    assert (sim.clip_grad, sim.schedule, sim.warmup_epochs, sim.min_lr, sim.scale_floor) == (5.0, "timm", 20, 2.5e-7, True)
    small = finetune_recipe(mae.FINETUNE, mae.Config(img_size=32, model="vit_large"))  # small images: small recipe
    assert small == FinetuneRecipe(**mae.FINETUNE["small"]) and small.mixup == 0


def test_finetune_step_goes_through_the_grad_scaler():
    """fp16 fine-tuning needs a GradScaler: an overflowing scale skips the step and halves, a finite one steps."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # loss x 2^127 overflows fp32: inf gradients
    before = model.weight.detach().clone()
    x, y = torch.randn(8, 4) * 10, torch.eye(3)[torch.arange(8) % 3]
    finetune_step(model, opt, scaler, x, y, None, torch.autocast("cpu", enabled=False))
    assert torch.equal(model.weight, before) and scaler.get_scale() == 2.0 ** 126
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    finetune_step(model, opt, scaler, x, y, 1.0, torch.autocast("cpu", enabled=False))
    assert not torch.equal(model.weight, before) and scaler.get_scale() == 2.0 ** 8


def test_image_grid(tmp_path):
    rows = [torch.rand(3, 3, 8, 8), torch.zeros(3, 3, 8, 8)]
    save_image_grid(rows, tmp_path / "g.png", "caption", labels=["a", "b"])
    img = Image.open(tmp_path / "g.png")
    assert img.size[0] > 3 * 8 * 12 and img.size[1] > 2 * 8 * 12  # upscaled x12 for 8 px tiles


def test_cli_finetune_learns_and_reports_the_baseline(tmp_path):
    """--finetune-epochs with --finetune-baseline: both fine-tunes run, their training loss falls (a zero lr would
    leave it at log(12): the head starts at ~0), and results.json holds both top-1s and the recipe."""
    out = tmp_path / "run"
    proc = run_script("mae.py", *TINY, "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
                      "--out", out, "--epochs", "1", "--subset", "128", "--finetune-epochs", "3",
                      "--finetune-baseline")
    tuned = json.loads((out / "results.json").read_text())["finetune"]
    assert tuned["epochs"] == 3 and tuned["recipe"]["crop_scale"] == [0.5, 1.0]  # 16 px: the small-image recipe
    # its own batch (64, not the pre-training 16): 128 images make 2 steps an epoch, at lr 4e-3 x 64 / 256
    assert tuned["recipe"]["batch_size"] == 64 and "fine-tune (pretrained): 3 epochs of 2 steps, lr 0.001," in proc.stdout
    for name in ("pretrained", "random_init"):
        assert 0.0 <= tuned[name] <= 100.0
    for name in ("pretrained", "random-init"):
        losses = [float(x) for x in re.findall(rf"fine-tune {name} epoch \d: loss ([\d.]+)", proc.stdout)]
        assert len(losses) == 3 and losses[0] > losses[1] > losses[2] and losses[0] - losses[2] > 1e-3, losses
    assert f"(random init: {tuned['random_init']})" in proc.stdout
