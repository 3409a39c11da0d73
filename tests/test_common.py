"""common/: ViT pieces, schedule, optimizer groups, config parsing, synthetic data, image decoding."""
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common import UserError
from common.data import (SYNTHETIC_CLASSES, ArrayDataset, build_dataset, epoch_order, render_synthetic, scan_folder,
                         seeded_rng, stratified_indices, to_rgb)
from common.training import (Dist, Run, TrainConfig, build_parser, cosine_lr, field_help, param_groups, parse_config,
                             resolve_amp, reuse_freed_host_memory, scaled_lr, use_fast_cuda_math)
from common.vit import (Attention, PatchEmbed, VisionTransformer, explicit_attention, relative_position_index,
                        sincos_pos_embed_2d)
from conftest import ROOT


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



def test_patch_embedding_under_autocast_is_the_convolution_as_a_matmul():
    """Under autocast the patch embedding runs as one matmul over flattened patches (issue #16): the same tokens
    and weight gradient as the convolution in bf16, on a non-square grid; fp32 runs the convolution itself."""
    torch.manual_seed(0)
    embed = PatchEmbed((8, 12), 4, 3, 16)  # a 2 x 3 grid
    imgs = torch.randn(2, 3, 8, 12)

    def tokens_and_grad(fn):
        embed.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = fn(imgs)
        (tokens.float() * torch.linspace(-1, 1, tokens.numel()).view_as(tokens)).sum().backward()
        return tokens.float(), embed.proj.weight.grad.clone()

    tokens, grad = tokens_and_grad(embed)  # the matmul
    conv_tokens, conv_grad = tokens_and_grad(lambda x: embed.proj(x).flatten(2).transpose(1, 2))
    assert tokens.shape == (2, 6, 16)
    torch.testing.assert_close(tokens, conv_tokens, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad, conv_grad, rtol=2e-2, atol=2e-2)
    assert torch.equal(embed(imgs), embed.proj(imgs).flatten(2).transpose(1, 2))  # fp32: the convolution, bitwise

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
    biases = {n for n in names.values() if n.endswith(".bias")}
    assert biases and biases <= undecayed and not biases & decayed  # every bias, and only there
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight"} <= decayed
    _, plain2 = param_groups(enc, 0.05, no_decay=("cls_token",))
    assert "cls_token" in {names[id(p)] for p in plain2["params"]}


# ------------------------------------------------------------------------------------------------------------ config
def test_config_presets_cli_and_help():
    presets = {"demo": {"epochs": 3, "warmup_epochs": 1, "batch_size": 8}}
    cfg, applied = parse_config(TrainConfig, presets, ["--batch-size", "4", "--model", "vit_nano"])
    assert (cfg.epochs, cfg.batch_size, cfg.patch_size) == (3, 4, 16)  # preset, command line, model default
    assert applied == {"epochs": 3, "warmup_epochs": 1, "workers": min(8, os.cpu_count())}  # workers: <= cores
    cfg, _ = parse_config(TrainConfig, presets, ["--data", "imagenet", "--model", "vit_huge"])
    assert (cfg.epochs, cfg.patch_size) == (800, 14)  # imagenet: no preset, class defaults
    assert "pre-training epochs" in field_help(TrainConfig)["epochs"]
    for bad in (["--epochs", "0"], ["--batch-size", "-1"], ["--model", "vit_gigantic"], ["--data", "nope"],
                ["--img-size", "30", "--patch-size", "4"], ["--amp", "fp8"]):
        with pytest.raises(UserError):
            parse_config(TrainConfig, presets, bad)


def test_warmup_as_long_as_the_run_is_an_error():
    presets = {"small": {"epochs": 2000, "warmup_epochs": 200}}
    with pytest.raises(UserError, match="--warmup-epochs 200 is not shorter than --epochs 100"):
        parse_config(TrainConfig, presets, ["--data", "cifar10", "--epochs", "100"])
    with pytest.raises(UserError, match="not shorter"):
        parse_config(TrainConfig, presets, ["--epochs", "5", "--warmup-epochs", "5"])
    cfg, _ = parse_config(TrainConfig, presets, ["--data", "cifar10", "--epochs", "100", "--warmup-epochs", "10"])
    assert (cfg.epochs, cfg.warmup_epochs) == (100, 10)


def test_help_shows_the_bare_run_defaults_and_the_presets_once():
    import mae
    text = build_parser(mae.Config, "MAE", mae.PRESETS).format_help()
    flat = " ".join(text.split())
    assert "pre-training epochs [default: 3; imagenet: 800]" in flat  # the demo preset's value, then the class's
    assert "small (cifar10, cifar100, mnist, fashion-mnist): --patch-size 2 --model vit_tiny" in flat
    assert "medium (stl10):" in flat and "imagenet (imagenet, folder): the defaults" in flat
    options = re.findall(r"^\s+(--[\w-]+)", text.split("Defaults above")[0], re.M)  # the options, not the epilog
    assert len(options) == len(set(options)) and "--data-path" in options and "--data_path" not in text


def test_accum_iter_of_a_preset_is_split_over_the_processes(tmp_path, monkeypatch):
    """A preset's --accum-iter reaches its global batch on one process; under torchrun with W processes each takes
    accum / W steps, so the global batch and the lr stay the preset's. A value given by the user is kept."""
    import common.training as training
    monkeypatch.setattr(training, "setup_distributed", lambda device: Dist(0, 8, 0, torch.device("cpu")))
    presets = {"small": {"batch_size": 512, "accum_iter": 8}}
    cfg, applied = parse_config(TrainConfig, presets, ["--data", "cifar10", "--out", str(tmp_path / "a")])
    run = Run(cfg, "test", applied)
    assert (cfg.accum_iter, run.global_batch) == (1, 4096) and scaled_lr(cfg, run.global_batch) == pytest.approx(
        cfg.blr * 4096 / 256)
    cfg, applied = parse_config(TrainConfig, presets, ["--data", "cifar10", "--accum-iter", "8",
                                                       "--out", str(tmp_path / "b")])
    run = Run(cfg, "test", applied)
    assert (cfg.accum_iter, run.global_batch) == (8, 512 * 8 * 8)  # the user's own value is per process


def test_amp_auto_needs_native_bf16_on_cuda(monkeypatch):
    """V100/T4 report bf16 support through emulation (slow): auto must ask for native support and pick fp16 there."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_amp("auto", cuda) == torch.float16  # emulated only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_amp("auto", cuda) == torch.bfloat16  # native (Ampere and newer)
    assert resolve_amp("fp32", cuda) is None and resolve_amp("fp16", cuda) == torch.float16


def test_tf32_and_cudnn_benchmark_on_cuda_only(monkeypatch):
    for flag in ("allow_tf32", "benchmark"):
        monkeypatch.setattr(torch.backends.cudnn, flag, False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    use_fast_cuda_math(torch.device("cpu"))
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
    use_fast_cuda_math(torch.device("cuda"))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark


REALLOCATION_FAULTS = """
import resource, sys, torch
from common.training import reuse_freed_host_memory
applied = sys.argv[1] == "reuse" and reuse_freed_host_memory(torch.device("cpu"))
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 << 20)  # 64 MiB, every page written
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(int(applied), *faults)
"""


def reallocation_faults(mode):
    """Minor page faults of each of 12 rounds of allocating and freeing a 64 MiB tensor, in a fresh interpreter: the
    pytest process's heap is fragmented by the tests before (a freed 64 MiB block next to live small ones is a few
    bytes short of the next aligned request, so the heap grows for rounds on end before it settles)."""
    out = subprocess.run([sys.executable, "-c", REALLOCATION_FAULTS, mode], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return bool(int(out[0])), list(map(int, out[1:]))


def test_freed_host_memory_is_reused_without_page_faults():
    """After reuse_freed_host_memory, a 64 MiB tensor allocated again and again reuses the freed pages: no fresh
    page faults once the heap has grown to hold it. glibc's default maps it anew and faults in all 16,384 of its
    4 KiB pages every round."""
    applied, faults = reallocation_faults("reuse")
    assert applied, "Linux with glibc, as here and on CI"
    assert sum(faults[6:]) < 1000, faults  # the heap has settled after the first rounds
    _, default = reallocation_faults("default")
    assert min(default[6:]) > 16000, default
    assert not reuse_freed_host_memory(torch.device("meta"))  # host memory only matters to CPU runs


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
    if mode in ("P", "PA", "RGBA", "CMYK"):  # colour stays colour: the palette's / the channels' RGB values
        expected = np.asarray(img.convert("RGBA" if mode in ("P", "PA") else "RGB"))[..., :3]
        assert np.array_equal(arr, expected) and len(set(arr[0, 0])) == 3
    if mode in ("L", "LA", "1"):  # gray stays gray: three equal channels of the gray value
        gray = np.asarray(img.convert("L"))
        assert all(np.array_equal(arr[..., c], gray) for c in range(3))
    if mode == "I;16":  # scaled to 8 bits, not clipped to white
        assert arr[7, 7, 0] == round(63000 / 257) and arr[0, 1, 0] == round(1000 / 257)


def test_subset_is_seeded_random_and_keeps_classes_in_proportion(tmp_path):
    labels = np.repeat([0, 1, 2], [60, 30, 10])  # class-sorted, as a folder scan returns them
    idx = stratified_indices(labels, 20, seed=0)
    assert np.bincount(labels[idx]).tolist() == [12, 6, 2]  # 60 : 30 : 10
    assert len(set(idx)) == 20 and not np.array_equal(idx, np.arange(20))  # not the first 20 (all class 0)
    assert np.array_equal(idx, stratified_indices(labels, 20, seed=0))
    assert not np.array_equal(idx, stratified_indices(labels, 20, seed=1))
    assert np.bincount(labels[stratified_indices(labels, 7, 0)]).tolist() == [4, 2, 1]  # remainders: 4.2, 2.1, 0.7
    for cls, n in (("a", 6), ("b", 6), ("c", 3)):  # a class-sorted folder through build_dataset
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "train" / cls / f"{i}.png")
    ds = build_dataset("folder", "pretrain", str(tmp_path), subset=5, seed=3)
    assert len(ds) == 5 and sorted(ds.labels) == [0, 0, 1, 1, 2]
    arr = ArrayDataset(np.zeros((100, 4, 4), np.uint8), labels, 3)
    syn = build_dataset("synthetic", "pretrain", img_size=8, subset=24)
    assert np.bincount(syn.labels).tolist() == [2] * 12 and len(syn.as_uint8()[0]) == 24
    assert len(arr) == 100


def test_seeded_rng_restores_state_and_never_reseeds_cuda(monkeypatch):
    """Code that draws from the global generators (transforms, probe heads, the baseline's init) runs seeded and
    leaves the training's stream as it was; torch.manual_seed inside a CPU-only fork would reseed every CUDA device."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    calls.clear()
    with seeded_rng(11):
        a = torch.rand(2)
    with seeded_rng(11):
        assert torch.equal(torch.rand(2), a)  # the same draws from the same seed
    assert torch.equal(torch.rand(3), expected)  # the outer stream untouched
    ds = build_dataset("synthetic", "pretrain", img_size=8, subset=4)
    from common.data import pretrain_transform
    ds.transform = pretrain_transform(8, (0.2, 1.0))
    assert torch.equal(ds[(2, 0)][0], ds[(2, 0)][0])  # (index, epoch) keys: seeded per image
    assert calls == []


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
    """ImageNet protocol (resize to 1/0.875, centre crop) for large images; images at or below the input size
    (synthetic, rendered at it; Fashion-MNIST 28 -> 32 px; a folder of small images) are only resized, nothing is
    cut off: decided per image."""
    from types import SimpleNamespace
    from common.data import IMAGENET_MEAN, IMAGENET_STD, build_eval_loader, eval_transform
    framed = np.zeros((28, 28, 3), dtype=np.uint8)
    framed[:1], framed[-1:], framed[:, :1], framed[:, -1:] = 255, 255, 255, 255  # a white frame, black inside
    whole = eval_transform(32)(Image.fromarray(framed))  # [3, 32, 32]: 28 <= 32, resized only
    cut = eval_transform(32)(Image.fromarray(framed).resize((56, 56), Image.NEAREST))  # 56 -> 37 -> centre 32
    assert whole.shape == cut.shape == (3, 32, 32)
    assert whole[:, 0].mean() > 2 and whole[:, -1].mean() > 2 and whole[:, :, 0].mean() > 2  # white, normalised
    assert cut[:, 0].mean() < -1.5 and cut[:, :, 0].mean() < -1.5  # black
    cfg = SimpleNamespace(data="synthetic", data_path="", img_size=28, subset=16, batch_size=16, workers=0, seed=0)
    loader = build_eval_loader(cfg, "val", SimpleNamespace(device=torch.device("cpu")))
    assert type(loader.dataset).__name__ == "TensorImages"  # the images as rendered, normalised without PIL
    x, y = next(iter(loader))
    ds = build_dataset("synthetic", "val", img_size=28, subset=16, seed=0)
    images, labels = ds.as_uint8()  # [16, 3, 28, 28], as rendered
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(x, (images / 255 - mean) / std, atol=1e-5) and torch.equal(y, labels)
