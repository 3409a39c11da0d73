"""common/: ViT pieces, schedule, optimizer groups, config parsing, synthetic data, image decoding."""
import math
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common import UserError
from common.data import (SYNTHETIC_CLASSES, build_dataset, epoch_order, render_synthetic, scan_folder, to_rgb)
from common.training import TrainConfig, cosine_lr, field_help, param_groups, parse_config
from common.vit import (Attention, VisionTransformer, explicit_attention, relative_position_index,
                        sincos_pos_embed_2d)


# ------------------------------------------------------------------------------------------------ position encodings
def test_sincos_matches_formula():
    dim, gh, gw = 16, 3, 5
    emb = sincos_pos_embed_2d(dim, gh, gw, cls_token=True)
    assert emb.shape == (1 + gh * gw, dim)
    assert torch.all(emb[0] == 0)  # cls row
    for i in range(gh):
        for j in range(gw):
            row = emb[1 + i * gw + j]
            for k in range(dim // 4):
                w = 10000 ** (-k / (dim / 4))
                expected = [math.sin(j * w), math.cos(j * w), math.sin(i * w), math.cos(i * w)]
                got = [row[k], row[dim // 4 + k], row[dim // 2 + k], row[3 * dim // 4 + k]]
                assert all(abs(float(g) - e) < 1e-6 for g, e in zip(got, expected)), (i, j, k)


def test_relative_position_index_by_hand():
    # 2 x 2 grid: tokens (0,0) (0,1) (1,0) (1,1); index = (dr + 1) * 3 + (dc + 1); 9 pair entries, then 9, 10, 11
    idx = relative_position_index(2, 2)
    expected_pairs = torch.tensor([[4, 3, 1, 0],
                                   [5, 4, 2, 1],
                                   [7, 6, 4, 3],
                                   [8, 7, 5, 4]])
    assert torch.equal(idx[1:, 1:], expected_pairs)
    assert torch.all(idx[0, 1:] == 9) and torch.all(idx[1:, 0] == 10) and idx[0, 0] == 11


# ---------------------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("causal", [False, True])
def test_explicit_attention_equals_sdpa(causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 7, 8).unbind(0)
    bias = None if causal else torch.randn(4, 7, 7)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal)
    assert torch.allclose(explicit_attention(q, k, v, bias, causal), ref, atol=1e-5)


def test_qv_bias_has_no_k_bias_and_matches_manual():
    torch.manual_seed(0)
    attn = Attention(8, 2, qv_bias=True)
    assert attn.qkv.bias is None and attn.q_bias.shape == (8,) and attn.v_bias.shape == (8,)
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(2, 5, 8)
    qkv = x @ attn.qkv.weight.T + torch.cat([attn.q_bias, torch.zeros(8), attn.v_bias])
    q, k, v = qkv.view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    out = attn.proj((torch.softmax(q @ k.transpose(-2, -1) / 2, -1) @ v).transpose(1, 2).reshape(2, 5, 8))
    assert torch.allclose(attn(x), out, atol=1e-5)


def test_encoder_token_shapes_and_rel_bias():
    enc = VisionTransformer(img_size=(16, 24), patch_size=4, embed_dim=32, depth=2, num_heads=4, pos_embed=None,
                            rel_pos_bias=True)
    tokens = enc.forward_features(torch.randn(3, 3, 16, 24))
    assert tokens.shape == (3, 1 + 4 * 6, 32)
    assert enc.rel_pos_bias().shape == (4, 25, 25)
    with pytest.raises(ValueError):
        VisionTransformer(img_size=30, patch_size=4, embed_dim=32, depth=1, num_heads=4)


# -------------------------------------------------------------------------------------------- schedule and optimizer
def test_cosine_lr_warmup_then_cosine():
    assert cosine_lr(0, 1.0, 0.1, 2, 10) == 0.0
    assert cosine_lr(1, 1.0, 0.1, 2, 10) == pytest.approx(0.5)
    assert cosine_lr(2, 1.0, 0.1, 2, 10) == pytest.approx(1.0)
    assert cosine_lr(6, 1.0, 0.1, 2, 10) == pytest.approx(0.55)  # half-way down the cosine
    assert cosine_lr(10, 1.0, 0.1, 2, 10) == pytest.approx(0.1)


def test_param_groups_decay_rules():
    enc = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    decay, plain = param_groups(enc, 0.05)
    names = {id(p): n for n, p in enc.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in plain["params"]}
    assert "pos_embed" not in decayed | undecayed  # frozen sin-cos table: not optimised at all
    assert "cls_token" in decayed  # 3-D, decayed as in the official MAE
    assert all(n.endswith(".bias") or "norm" in n for n in undecayed)
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight"} <= decayed
    _, plain2 = param_groups(enc, 0.05, no_decay=("cls_token",))
    assert "cls_token" in {names[id(p)] for p in plain2["params"]}


# ------------------------------------------------------------------------------------------------------------ config
def test_config_presets_cli_and_help():
    presets = {"demo": {"epochs": 3, "batch_size": 8}}
    cfg, applied = parse_config(TrainConfig, presets, ["--batch-size", "4", "--model", "vit_nano"])
    assert (cfg.epochs, cfg.batch_size, cfg.patch_size) == (3, 4, 16)  # preset, command line, model default
    assert applied == {"epochs": 3, "workers": min(8, os.cpu_count())}  # workers: no more than cores
    cfg, _ = parse_config(TrainConfig, presets, ["--data", "imagenet", "--model", "vit_huge"])
    assert (cfg.epochs, cfg.patch_size) == (800, 14)  # imagenet: no preset, class defaults
    assert "pre-training epochs" in field_help(TrainConfig)["epochs"]
    for bad in (["--epochs", "0"], ["--batch-size", "-1"], ["--model", "vit_gigantic"], ["--data", "nope"],
                ["--img-size", "30", "--patch-size", "4"], ["--amp", "fp8"]):
        with pytest.raises(UserError):
            parse_config(TrainConfig, presets, bad)


# ------------------------------------------------------------------------------------------------------------- data
def test_synthetic_deterministic_any_size_balanced():
    a, la = render_synthetic(17, 32, 0)
    b, lb = render_synthetic(17, 32, 0)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3) and np.array_equal(a, b) and la == lb
    assert not np.array_equal(a, render_synthetic(17, 32, 1)[0])  # another split, another image
    assert render_synthetic(3, 57, 0)[0].shape == (57, 57, 3)
    assert len(SYNTHETIC_CLASSES) >= 10
    ds = build_dataset("synthetic", "val", img_size=32)
    labels = [ds.load(i)[1] for i in range(120)]
    assert np.bincount(labels).tolist() == [10] * len(SYNTHETIC_CLASSES)


def test_synthetic_not_separable_by_mean_colour():
    """A nearest-class-mean classifier on mean RGB must stay near chance: classes differ in shape only."""
    n_cls = len(SYNTHETIC_CLASSES)
    def feats(seed, n):
        xs, ys = zip(*(render_synthetic(i, 32, seed) for i in range(n)))
        return np.stack(xs).reshape(n, -1, 3).mean(1), np.array(ys)
    xtr, ytr = feats(0, 1200)
    xva, yva = feats(1, 600)
    centres = np.stack([xtr[ytr == c].mean(0) for c in range(n_cls)])
    pred = np.argmin(((xva[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert (pred == yva).mean() < 2.0 / n_cls


def test_synthetic_is_fast():
    t = time.perf_counter()
    for i in range(300):
        render_synthetic(i, 32, 0)
    assert 300 / (time.perf_counter() - t) > 800  # img/s on one core (measured ~2400 on the dev machine)


def test_epoch_order_partitions_and_reshuffles():
    parts = [epoch_order(10, seed=1, epoch=0, rank=r, world=3) for r in range(3)]
    assert all(len(p) == 3 for p in parts)
    assert len(set(torch.cat(parts).tolist())) == 9
    assert torch.equal(parts[0], epoch_order(10, 1, 0, 0, 3))  # deterministic
    assert not torch.equal(epoch_order(100, 1, 0, 0, 1), epoch_order(100, 1, 1, 0, 1))  # new order every epoch


@pytest.mark.parametrize("mode", ["I;16", "P", "PA", "CMYK", "RGBA", "LA", "L", "1", "F"])
def test_to_rgb_all_modes(mode):
    if mode == "I;16":
        img = Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16))
    elif mode == "F":
        img = Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8))
    else:
        img = Image.new("RGBA", (8, 8), (200, 100, 50, 128)).convert(mode)
    out = to_rgb(img)
    arr = np.asarray(out)
    assert out.mode == "RGB" and arr.shape == (8, 8, 3)
    if mode == "I;16":  # scaled to 8 bits, not clipped to white
        assert arr[7, 7, 0] == round(63000 / 257) and arr[0, 1, 0] == round(1000 / 257)


def test_scan_folder_labelled_and_flat(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "lab" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "lab" / cls / f"{i}.png")
    ds = scan_folder(tmp_path / "lab")
    assert len(ds) == 6 and ds.num_classes == 2 and sorted(set(ds.labels)) == [0, 1]
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.jpg")
    flat = scan_folder(tmp_path / "flat")
    assert len(flat) == 1 and flat.num_classes == 0 and flat.labels == [-1]


def test_eval_transform_crops_only_images_larger_than_the_input():
    """ImageNet protocol (resize to 1/0.875, centre crop) for large images; images stored at or below the input size
    (synthetic, rendered at it; Fashion-MNIST 28 -> 32 px) are only resized, nothing is cut off."""
    from types import SimpleNamespace
    from common.data import IMAGENET_MEAN, IMAGENET_STD, build_eval_loader, eval_transform
    framed = np.zeros((28, 28, 3), dtype=np.uint8)
    framed[:1], framed[-1:], framed[:, :1], framed[:, -1:] = 255, 255, 255, 255  # a white frame, black inside
    whole = eval_transform(32, 28)(Image.fromarray(framed))  # [3, 32, 32]
    cut = eval_transform(32)(Image.fromarray(framed).resize((56, 56), Image.NEAREST))  # 56 -> 37 -> centre 32
    assert whole.shape == cut.shape == (3, 32, 32)
    assert whole[:, 0].mean() > 2 and whole[:, -1].mean() > 2 and whole[:, :, 0].mean() > 2  # white, normalised
    assert cut[:, 0].mean() < -1.5 and cut[:, :, 0].mean() < -1.5  # black
    cfg = SimpleNamespace(data="synthetic", data_path="", img_size=28, subset=16, batch_size=16, workers=0)
    loader = build_eval_loader(cfg, "val", SimpleNamespace(device=torch.device("cpu")))
    assert type(loader.dataset).__name__ == "TensorImages"  # the images as rendered, normalised without PIL
    x, y = next(iter(loader))
    ds = build_dataset("synthetic", "val", img_size=28, subset=16)
    images, labels = ds.as_uint8()  # [16, 3, 28, 28], as rendered
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(x, (images / 255 - mean) / std, atol=1e-5) and torch.equal(y, labels)
