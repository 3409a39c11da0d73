"""common/evaluation.py: kNN, linear probe, image grids; and the pieces of finetune.py's fine-tuning (layer-wise lr
decay, the classifier, mixup / cutmix, the schedules, the step, validation)."""
import dataclasses
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import finetune
import mae
import simmim
from common import evaluation
from common.evaluation import (codebook_stats, codebook_usage_bars, evaluate, extract_features, gather_rows,
                               initial_encoder, knn_accuracy, linear_probe, save_image_grid, shard)
from finetune import (Classifier, FinetuneRecipe, finetune_lr, finetune_recipe, finetune_step, layer_decay_groups,
                      layer_id, mix_batch, soft_target_cross_entropy, validate)
from common.data import mix_seed
from common.training import Dist
from common.vit import VisionTransformer, drop_path_rates
from conftest import TINY, run_script

CPU = torch.device("cpu")


def fake_run(cfg=None, rank=0, world=1):
    """What evaluation reads from a Run, on one CPU process in this one (fp32)."""
    logs = []
    return SimpleNamespace(cfg=cfg, dist=Dist(rank, world, 0, CPU), device=CPU, is_main=rank == 0, amp_dtype=None,
                           autocast=lambda: torch.autocast("cpu", enabled=False), log=logs.append, logs=logs,
                           mean_over_ranks=lambda v: v)


def synthetic_cfg(**kw):
    return SimpleNamespace(**{**dict(data="synthetic", data_path="", img_size=16, subset=24, batch_size=8, workers=0, skip_bad_images=False,
                                     seed=0), **kw})


def tiny_encoder(**kw):
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, **kw)


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
    # one neighbour of class 1 at cosine 0.98 against two of class 0 at 0.92 (a third class far off): class 1 wins
    # iff exp(0.98 / T) > 2 exp(0.92 / T), i.e. T < 0.06 / ln 2 = 0.087. The default T = 0.07 says 1; T = 0.1, T = 1
    # and an unweighted majority say 0. Lengths differ wildly: only the directions (cosines) may count.
    a, b = math.acos(0.98), math.acos(0.92)
    train = torch.tensor([[math.cos(a), math.sin(a)], [math.cos(b), math.sin(b)], [math.cos(b), -math.sin(b)],
                          [-1.0, 0.0]]) * torch.tensor([[0.2], [3.0], [5.0], [1.0]])
    labels, test = torch.tensor([1, 0, 0, 2]), torch.tensor([[4.0, 0.0]])
    assert knn_accuracy(train, labels, test, torch.tensor([1]), 3, k=3) == 100.0
    assert knn_accuracy(train, labels, test, torch.tensor([0]), 3, k=3, temperature=0.1) == 100.0
    assert knn_accuracy(train, labels, test, torch.tensor([0]), 3, k=3, temperature=1.0) == 100.0
    assert knn_accuracy(train, labels, test, torch.tensor([1]), 3) == 100.0  # k = 20 > 4 points: all of them vote


def reference_knn(train_x, train_y, test_x, test_y, k=20, temperature=0.07):
    """The weighted kNN, one query at a time in plain Python: cosine similarities, the k largest, exp(s / T) votes."""
    correct = 0
    for x, y in zip(test_x.tolist(), test_y.tolist()):
        sims = [(sum(a * b for a, b in zip(x, t)) / math.hypot(*x) / math.hypot(*t), label)
                for t, label in zip(train_x.tolist(), train_y.tolist())]
        votes = {}
        for sim, label in sorted(sims, reverse=True)[:k]:
            votes[label] = votes.get(label, 0.0) + math.exp(sim / temperature)
        correct += max(votes, key=votes.get) == y
    return 100.0 * correct / len(test_y)


def test_knn_equals_a_brute_force_reference_in_chunks():
    """Overlapping classes (the vote matters, accuracy well below 100 %): the same top-1 as the plain reference, for
    a chunk that splits the queries unevenly as for one chunk."""
    xtr, ytr = clustered(30, 4, 8, 2.5, 0)
    xva, yva = clustered(25, 4, 8, 2.5, 1)
    ref = reference_knn(xtr, ytr, xva, yva)
    assert 30 < ref < 95
    assert knn_accuracy(xtr, ytr, xva, yva, 4) == pytest.approx(ref)
    assert knn_accuracy(xtr, ytr, xva, yva, 4, chunk=7) == pytest.approx(ref)
    assert knn_accuracy(xtr, ytr, xva, yva, 4, k=5, temperature=0.5) == pytest.approx(
        reference_knn(xtr, ytr, xva, yva, k=5, temperature=0.5))


def reference_linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs, batch_size, blr, seed):
    """MAE's linear probe as its docstring states it, written out: BatchNorm1d(affine=False, eps=1e-6) + Linear
    (weights N(0, 0.01) from the seeded generator, bias 0), SGD momentum 0.9 without weight decay at lr = blr x
    batch / 256, per-step warm-up over the first 10 % of the epochs then a half cosine to 0, a fresh permutation of
    the training features every epoch; predictions in eval mode."""
    g = torch.Generator().manual_seed(seed)
    dim = train_x.shape[1]
    bn = torch.nn.BatchNorm1d(dim, affine=False, eps=1e-6)
    linear = torch.nn.Linear(dim, num_classes)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(num_classes, dim, generator=g) * 0.01)
        linear.bias.zero_()
    lr = blr * batch_size / 256
    opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9)
    steps, warm = len(train_x) // batch_size, epochs / 10
    for epoch in range(epochs):
        order = torch.randperm(len(train_x), generator=g)
        for i in range(steps):
            e = epoch + i / steps
            step_lr = lr * e / warm if e < warm else lr * 0.5 * (1.0 + math.cos(math.pi * (e - warm) / (epochs - warm)))
            opt.param_groups[0]["lr"] = step_lr
            idx = order[i * batch_size: (i + 1) * batch_size]
            loss = torch.nn.functional.cross_entropy(linear(bn(train_x[idx])), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    bn.eval()
    with torch.no_grad():
        return 100.0 * (linear(bn(test_x)).argmax(1) == test_y).float().mean().item()


def test_linear_probe_equals_the_written_out_recipe():
    """On overlapping classes, where the decision boundary (and so the top-1 over 1000 points) moves with any
    change to the recipe: the same top-1 as the reference; another seed gives another head and another top-1."""
    xtr, ytr = clustered(50, 4, 16, 5.0, 0)
    xtr = xtr * 3 + 5  # far from zero mean / unit spread: the BatchNorm matters
    xva, yva = clustered(250, 4, 16, 5.0, 1)
    xva = xva * 3 + 5
    got = linear_probe(xtr, ytr, xva, yva, 4, epochs=10, batch_size=32, blr=0.1, seed=3)
    ref = reference_linear_probe(xtr, ytr, xva, yva, 4, epochs=10, batch_size=32, blr=0.1, seed=3)
    assert 60 < ref < 95 and got == pytest.approx(ref)
    other = linear_probe(xtr, ytr, xva, yva, 4, epochs=10, batch_size=32, blr=0.1, seed=4)
    assert other == pytest.approx(reference_linear_probe(xtr, ytr, xva, yva, 4, epochs=10, batch_size=32, blr=0.1,
                                                         seed=4)) and other != pytest.approx(got)


def test_knn_uses_k_20_by_default():
    # one training point of class 1 right next to the query, 19 of class 0 a little further: the nearest neighbour
    # alone (k = 1) says 1, the weighted vote of 20 says 0 (19 x exp(0.9 / 0.07) > exp(1 / 0.07))
    test = torch.tensor([[1.0, 0.0]])
    near = torch.tensor([[1.0, 0.0]])
    far = torch.tensor([[math.cos(a), math.sin(a)] for a in np.linspace(0.44, 0.46, 19)])  # cos ~ 0.9
    train, labels = torch.cat([near, far]), torch.tensor([1] + [0] * 19)
    assert knn_accuracy(train, labels, test, torch.tensor([1]), 2, k=1) == 100.0
    assert knn_accuracy(train, labels, test, torch.tensor([0]), 2) == 100.0  # the default k


def test_extract_features_are_the_eval_mode_cls_and_mean_patch_tokens():
    """cls token and mean of the patch tokens of forward_features, in eval mode (drop path 0.5 would make a
    training-mode pass random), labels in order; the encoder's mode is put back."""
    torch.manual_seed(0)
    enc = tiny_encoder(drop_path_rate=0.5)
    imgs, labels = torch.randn(10, 3, 16, 16), torch.arange(10) % 3
    cls_f, mean_f, y = extract_features(enc.train(), DataLoader(TensorDataset(imgs, labels), batch_size=4), fake_run())
    assert enc.training
    with torch.no_grad():
        tokens = enc.eval().forward_features(imgs)  # [10, 17, 32]
    assert torch.allclose(cls_f, tokens[:, 0], atol=1e-5) and torch.allclose(mean_f, tokens[:, 1:].mean(1), atol=1e-5)
    assert torch.equal(y, labels)


def test_shard_and_gather_rows_cover_the_split_in_rank_order(monkeypatch):
    """Each rank's contiguous chunk (ceil(n / world) rows, the last one shorter), and the gather that undoes it:
    every rank's rows in rank order, the padding trimmed. The other rank is played by a fake all_gather."""
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=3)
    chunks = [[int(x) for (b,) in shard(loader, r, 3) for x in b] for r in range(3)]
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for mine, theirs in ((torch.arange(8.0).view(4, 2), torch.arange(100.0, 106.0).view(3, 2)),
                         (torch.arange(6.0).view(3, 2), torch.arange(100.0, 108.0).view(4, 2))):
        def all_gather(out, t, theirs=theirs):  # this process is rank 0, the fake rank 1 pads with zeros
            other = torch.tensor([len(theirs)]) if t.shape == (1,) else torch.cat(
                [theirs, theirs.new_zeros(len(t) - len(theirs), 2)])
            out[0].copy_(t), out[1].copy_(other)

        monkeypatch.setattr(evaluation.torch_dist, "all_gather", all_gather)
        assert torch.equal(gather_rows(mine, 2), torch.cat([mine, theirs]))


def test_evaluate_probes_the_encoder_and_its_baseline_on_cls_and_mean_features(monkeypatch):
    """evaluate(): kNN and linear probe (spies here, which number their calls) of each encoder on its cls and its
    mean-patch features, fitted on the labelled train split and scored on val, the probe seeded with --seed; the
    pre-trained encoder's numbers under "pretrained", the baseline's under "random_init"."""
    torch.manual_seed(0)
    trained, baseline = tiny_encoder(), tiny_encoder()
    run = fake_run(synthetic_cfg(subset=36, seed=3))
    calls = []

    def spy(kind):
        def probe(*args, **kw):
            calls.append((kind, args, kw))
            return float(len(calls))
        return probe

    monkeypatch.setattr(evaluation, "knn_accuracy", spy("knn"))
    monkeypatch.setattr(evaluation, "linear_probe", spy("linear"))
    results = evaluate(trained, baseline, run)
    assert len(calls) == 8
    train, val = (evaluation.build_eval_loader(run.cfg, split, run.dist) for split in ("train", "val"))
    for name, enc in (("pretrained", trained), ("random_init", baseline)):
        tr_cls, tr_mean, tr_y = extract_features(enc, train, run)
        va_cls, va_mean, va_y = extract_features(enc, val, run)
        assert len(tr_y) == len(va_y) == 36 and tr_y.bincount().tolist() == [3] * 12
        assert set(results[name]) == {"knn_cls", "knn_mean", "linear_cls", "linear_mean"}
        for kind in ("knn", "linear"):
            for pool, tr, va in (("cls", tr_cls, va_cls), ("mean", tr_mean, va_mean)):
                called, (x, y, vx, vy, num_classes), kw = calls[int(results[name][f"{kind}_{pool}"]) - 1]
                assert called == kind and num_classes == 12 and kw == ({"seed": 3} if kind == "linear" else {})
                assert torch.equal(x, tr) and torch.equal(y, tr_y) and torch.equal(vx, va) and torch.equal(vy, va_y)


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


def test_classifier_cls_pool_reads_the_normalised_cls_token():
    torch.manual_seed(0)
    enc = tiny_encoder()
    imgs = torch.randn(2, 3, 16, 16)
    tokens = enc.forward_features(imgs)
    clf = Classifier(enc, 3, pool="cls")
    clf.head.weight.data.normal_()
    assert torch.allclose(clf(imgs), clf.head(tokens[:, 0]), atol=1e-6)


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
        ref = np.random.default_rng(seed)  # the box by hand: side sqrt(1 - lam) x H around a uniform pixel, clipped
        side, (cy, cx) = int(H * math.sqrt(1 - ref.beta(1.0, 1.0))), (ref.integers(H), ref.integers(H))
        box = (min(cy + side // 2, H) - max(cy - side // 2, 0)) * (min(cx + side // 2, H) - max(cx - side // 2, 0))
        assert pasted == box / H ** 2
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


def test_soft_target_cross_entropy_and_the_clip_on_unscaled_gradients():
    """The loss is timm's SoftTargetCrossEntropy (cross-entropy with probability targets, batch mean). With a
    GradScaler at 2^8 and clip_grad, the clip acts on the unscaled gradients: one plain SGD step (lr 1) moves the
    weights by exactly the clip norm; the gradients are cleared after the step."""
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 4), torch.softmax(torch.randn(5, 4), 1)
    assert soft_target_cross_entropy(logits, targets).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-6)
    assert soft_target_cross_entropy(logits, torch.eye(4)[[0, 1, 2, 3, 0]]).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3, 0])).item(), rel=1e-6)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4) * 10, torch.eye(3)[torch.arange(8) % 3]
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        expected_loss = soft_target_cross_entropy(model(x), y).item()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = finetune_step(model, opt, torch.amp.GradScaler("cpu", init_scale=2.0 ** 8), x, y, 1e-3,
                         torch.autocast("cpu", enabled=False))
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm().item()
    assert moved == pytest.approx(1e-3, rel=1e-3)  # the unclipped gradient norm is ~10
    assert all(p.grad is None for p in model.parameters())


class SignRule(torch.nn.Module):
    """Predicts class 1 where the first pixel is positive; in training mode (dropout-like) it says the opposite."""

    def forward(self, x):
        score = x.flatten(1)[:, :1]
        logits = torch.cat([-score, score], 1)
        return -logits if self.training else logits


def test_validate_is_top1_over_the_whole_val_split_in_eval_mode(monkeypatch):
    imgs = torch.tensor([1.0, -2.0, 3.0, 4.0, -5.0, 6.0, -7.0]).view(7, 1, 1, 1)
    labels = torch.tensor([1, 0, 0, 1, 1, 1, 0])  # predictions 1 0 1 1 0 1 0: 5 of 7 right
    loader = DataLoader(TensorDataset(imgs, labels), batch_size=3)
    model = SignRule().train()
    assert validate(model, loader, fake_run()) == (round(100 * 5 / 7, 2), 100.0) and model.training
    assert validate(model, loader, fake_run())[0] == 71.43  # (top-5 of 2 classes: every image)
    # rank 1 of 2 counts its chunk (images 4..6: 2 of 3 right); the fake all_reduce adds rank 0's (3 of 4)
    reduced = []

    def all_reduce(t):
        reduced.append(t.tolist())
        t.add_(torch.tensor([3.0, 4.0, 4.0], dtype=t.dtype))

    monkeypatch.setattr(finetune.torch_dist, "all_reduce", all_reduce)
    assert validate(model.train(), loader, fake_run(rank=1, world=2))[0] == 71.43 and reduced == [[2.0, 3.0, 3.0]]


def test_codebook_stats_and_usage_bars_by_hand():
    assert codebook_stats(torch.tensor([2, 2, 0, 0])) == pytest.approx((2.0, 0.5))  # two codes used evenly
    assert codebook_stats(torch.tensor([5, 0, 0, 0, 0])) == pytest.approx((1.0, 0.2))
    assert codebook_stats(torch.tensor([1, 1, 1, 1])) == pytest.approx((4.0, 1.0))
    p = torch.tensor([3 / 4, 1 / 4], dtype=torch.float64)
    assert codebook_stats(torch.tensor([0, 3, 1]))[0] == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    # counts 0, 7, 1, 2 at height 4: sorted 7, 2, 1, 0; heights log(1 + count) / log(8) x 4, rounded up:
    # 4, ceil(2.11) = 3, ceil(1.33) = 2, 0
    bars = codebook_usage_bars(torch.tensor([0, 7, 1, 2]), height=4)
    assert bars.tolist() == [[1, 0, 0, 0],
                             [1, 1, 0, 0],
                             [1, 1, 1, 0],
                             [1, 1, 1, 0]]  # top row first


def test_initial_encoder_is_the_runs_init_and_leaves_the_random_stream_alone():
    """The baseline of the monitors is the encoder as Run's seeding (torch.manual_seed(--seed) on rank 0) built it."""
    def build(cfg):
        return SimpleNamespace(encoder=tiny_encoder(pos_embed="learned"))

    run = fake_run(SimpleNamespace(seed=7))
    torch.manual_seed(7)
    expected = build(run.cfg).encoder.state_dict()
    torch.manual_seed(1)
    draw = torch.rand(3)
    torch.manual_seed(1)
    got = initial_encoder(build, run).state_dict()
    assert torch.equal(torch.rand(3), draw)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_finetune_in_process_follows_the_recipe(monkeypatch, tmp_path, capsys):
    """finetune.py's main() on synthetic data in this process, with spies on its pieces: the lr of every step is
    finetune_lr's for the run's batch (floors scaled by batch / 256 with scale_floor), each group at its layer-decay
    scale; the encoder of encoder.pth is tuned (drop path as the recipe says, the sin-cos table trainable);
    mixup/cutmix draw from a generator of (seed, rank, step); each epoch's logged loss is the mean of its steps; the
    top-1 returned is the tuned model's on the val split."""
    recipe = dict(epochs=2, warmup_epochs=0.5, blr=5e-2, min_lr=1e-4, warmup_lr=1e-5, scale_floor=True,
                  layer_decay=0.5, drop_path=0.2, crop_scale=(0.5, 1.0), rand_augment=0, erasing=0.0, mixup=0.0,
                  cutmix=0.0, smoothing=0.1, batch_size=8)
    pretrain = mae.Config(model="vit_nano", img_size=16, patch_size=4)
    torch.manual_seed(0)
    torch.save(mae.build_model(pretrain).encoder.state_dict(), tmp_path / "encoder.pth")
    (tmp_path / "config.json").write_text(json.dumps({"method": "mae", **vars(pretrain)}))
    lrs, losses, models, rngs = [], [], [], []
    set_lr, step, classifier, mix = finetune.set_lr, finetune.finetune_step, finetune.Classifier, mix_batch

    def spy_set_lr(opt, lr):
        set_lr(opt, lr)
        lrs.append((lr, [(g["lr"], g["lr_scale"]) for g in opt.param_groups]))
        return lr

    def spy_step(*args):
        losses.append(step(*args).item())
        return torch.tensor(losses[-1])

    def spy_classifier(*args, **kw):
        models.append(classifier(*args, **kw))
        return models[-1]

    def spy_mix(imgs, labels, num_classes, recipe, rng):
        rngs.append(rng.bit_generator.state)
        return mix(imgs, labels, num_classes, recipe, rng)

    preset, flags = finetune.recipe_preset, {f.name for f in dataclasses.fields(finetune.Config)}

    def with_recipe(*args):  # the method's table, replaced by `recipe`
        given, values = preset(*args)
        return {**given, **{k: v for k, v in recipe.items() if k in flags}}, {**values, **recipe}

    monkeypatch.setattr(finetune, "recipe_preset", with_recipe)
    monkeypatch.setattr(finetune, "set_lr", spy_set_lr)
    monkeypatch.setattr(finetune, "finetune_step", spy_step)
    monkeypatch.setattr(finetune, "Classifier", spy_classifier)
    monkeypatch.setattr(finetune, "mix_batch", spy_mix)
    enc = torch.load(tmp_path / "encoder.pth", weights_only=True)
    results = finetune.main(["--init", str(tmp_path / "encoder.pth"), "--data", "synthetic", "--subset", "32",
                             "--workers", "0", "--amp", "fp32", "--log-every", "1", "--out", str(tmp_path / "ft")])
    lr, floor = 5e-2 * 8 / 256, 8 / 256  # 32 labelled images, batch 8: 4 steps an epoch
    rec = FinetuneRecipe(**recipe)
    assert [x for x, _ in lrs] == pytest.approx([finetune_lr(it, 4, 2, lr, rec, 1e-5 * floor, 1e-4 * floor)
                                                 for it in range(8)])
    assert rngs == [np.random.default_rng(mix_seed(0, 0, it)).bit_generator.state for it in range(8)]  # per step
    for x, groups in lrs:
        assert {s for _, s in groups} == {0.5 ** k for k in range(4)}  # layers 0..3 of a 2-block encoder
        assert all(g == pytest.approx(x * s) for g, s in groups)
    (model,) = models
    assert [b.drop_path.drop_prob for b in model.encoder.blocks] == pytest.approx(drop_path_rates(0.2, 2))
    assert model.encoder.pos_embed.requires_grad and not torch.equal(model.encoder.pos_embed, enc["pos_embed"])
    out = capsys.readouterr().out
    epoch_losses = [float(x) for x in re.findall(r"fine-tune pretrained epoch \d: loss ([\d.]+)", out)]
    assert epoch_losses == pytest.approx([np.mean(losses[:4]), np.mean(losses[4:])], abs=1e-4)
    cfg = synthetic_cfg(subset=32)
    val = evaluation.build_eval_loader(cfg, "val", SimpleNamespace(device=CPU))
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in val)
    assert results["top1"] == round(100 * correct / 32, 2)


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
    for name, label in (("pretrained", "pretrained"), ("random_init", "random-init")):
        assert 0.0 <= tuned[name] <= 100.0
        # a count over the 128 val images in %, the value the log reports (the in-process test above checks it is
        # the tuned model's top-1 on the val split)
        assert tuned[name] in {round(100 * k / 128, 2) for k in range(129)}
        assert f"fine-tune {label}: top-1 {tuned[name]}\n" in proc.stdout
    for name in ("pretrained", "random-init"):
        losses = [float(x) for x in re.findall(rf"fine-tune {name} epoch \d: loss ([\d.]+)", proc.stdout)]
        assert len(losses) == 3 and losses[0] > losses[1] > losses[2] and losses[0] - losses[2] > 1e-3, losses
    assert f"(random init: {tuned['random_init']})" in proc.stdout


@pytest.mark.parametrize("present", ["train", "val"])
def test_evaluation_needs_both_labelled_splits(monkeypatch, present):
    """A labelled train/ without val/ (or the reverse): the monitors are skipped with one line, not run on half."""
    import common.evaluation as evaluation
    lines = []
    loader = DataLoader(TensorDataset(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)), batch_size=2)
    monkeypatch.setattr(evaluation, "build_eval_loader", lambda cfg, split, dist: loader if split == present else None)
    run = SimpleNamespace(cfg=SimpleNamespace(data="folder", data_path="/x"), dist=None, log=lines.append)
    assert evaluate(None, None, run) == {} and lines == ["evaluation skipped: folder at /x has no labelled train/ and "
                                                        "val/ split"]

