"""common/: ViT pieces, schedule, optimizer groups, config parsing, synthetic data, image decoding."""
import dataclasses
import json
import math
import random
import re
import signal
import subprocess
import sys
import typing
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common import UserError
from common.data import (SYNTHETIC_CLASSES, ArrayDataset, ResidentData, build_dataset, build_eval_loader,
                         build_train_data, default_workers, epoch_order, mix_seed, render_synthetic, scan_folder,
                         seeded_rng, stratified_indices, to_rgb)
from common.training import (Dist, NonFiniteError, NonFiniteGuard, Run, TrainConfig, build_parser, cosine_lr,
                             field_help, param_groups, parse_config, resolve_amp, reuse_freed_host_memory, scaled_lr,
                             set_lr, use_fast_cuda_math)
from common.vit import (VIT_SIZES, Attention, DropPath, PatchEmbed, RelativePositionBias, VisionTransformer,
                        drop_path_rates, explicit_attention, init_beit_style, relative_position_index,
                        set_grad_checkpointing, sincos_pos_embed_2d, vit_kwargs)
from conftest import ROOT, assert_encoder_matches_timm_beit


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


def test_relative_position_index_and_bias_on_a_non_square_grid():
    """A 2 x 3 grid against the formula pair by pair (a square grid cannot tell h from w), and the bias the module
    hands to attention: bias[head, a, b] = table[index[a, b], head], read entry by entry."""
    gh, gw, heads = 2, 3, 3
    idx = relative_position_index(gh, gw)
    coords = [(r, c) for r in range(gh) for c in range(gw)]  # row-major, as the patch embedding orders tokens
    for a, (ra, ca) in enumerate(coords):
        for b, (rb, cb) in enumerate(coords):
            assert idx[1 + a, 1 + b] == (ra - rb + gh - 1) * (2 * gw - 1) + (ca - cb + gw - 1), (a, b)
    pairs = (2 * gh - 1) * (2 * gw - 1)  # 15
    assert torch.all(idx[0, 1:] == pairs) and torch.all(idx[1:, 0] == pairs + 1) and idx[0, 0] == pairs + 2
    rpb = RelativePositionBias((gh, gw), heads)
    table = rpb.relative_position_bias_table
    assert table.shape == (pairs + 3, heads) and not table.any()  # zero-initialised, as the official code
    with torch.no_grad():
        table.copy_(torch.randn(pairs + 3, heads, generator=torch.Generator().manual_seed(0)))
    bias = rpb()
    assert bias.shape == (heads, 7, 7)
    for h in range(heads):
        for a in range(7):
            for b in range(7):
                assert bias[h, a, b] == table[idx[a, b], h], (h, a, b)


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


def test_causal_attention_sees_only_the_past():
    """iGPT's causal mask, on the fp32 (SDPA) and the bf16 CPU (explicit) paths: token i's output does not move when
    later tokens change, and does when an earlier one does."""
    torch.manual_seed(0)
    attn = Attention(8, 2, causal=True)
    x = torch.randn(2, 6, 8)
    later, earlier = x.clone(), x.clone()
    later[:, 4:] += 1.0
    earlier[:, 1] += 1.0
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out, out_later, out_earlier = attn(x), attn(later), attn(earlier)
        assert torch.equal(out[:, :4], out_later[:, :4]) and not torch.allclose(out[:, 4:], out_later[:, 4:])
        assert torch.equal(out[:, :1], out_earlier[:, :1]) and not torch.allclose(out[:, 2:], out_earlier[:, 2:])


def test_vit_sizes_are_the_papers():
    """Width, depth, heads, patch of the paper models (ViT: B/L/H, H at patch 14 as in MAE; DeiT: Ti/S)."""
    assert {k: v for k, v in VIT_SIZES.items() if k not in ("vit_nano", "vit_micro")} == {
        "vit_tiny": (192, 12, 3, 16), "vit_small": (384, 12, 6, 16), "vit_base": (768, 12, 12, 16),
        "vit_large": (1024, 24, 16, 16), "vit_huge": (1280, 32, 16, 14)}
    assert vit_kwargs("vit_huge") == dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14)
    assert vit_kwargs("vit_base", patch_size=8)["patch_size"] == 8


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

    assert embed.num_patches == 6 and embed.grid_size == (2, 3)
    for size in ((8, 10), (10, 12)):  # one side not a multiple of the patch: refused
        with pytest.raises(ValueError, match="not divisible"):
            PatchEmbed(size, 4, 3, 16)
    tokens, grad = tokens_and_grad(embed)  # the matmul
    conv_tokens, conv_grad = tokens_and_grad(lambda x: embed.proj(x).flatten(2).transpose(1, 2))
    assert tokens.shape == (2, 6, 16)
    torch.testing.assert_close(tokens, conv_tokens, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad, conv_grad, rtol=2e-2, atol=2e-2)
    assert torch.equal(embed(imgs), embed.proj(imgs).flatten(2).transpose(1, 2))  # fp32: the convolution, bitwise


def test_encoder_matches_timm_vit():
    """The MAE-style encoder (learned position table here, so that cls and patch positions can be told apart) loads
    into timm's VisionTransformer with strict=True and gives the same features, on a non-square grid; every
    parameter gets a random value first, so that a mixed-up zero-initialised one shows. Norms use eps 1e-6."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=(16, 24), patch_size=4, embed_dim=32, depth=2, num_heads=2, pos_embed="learned")
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0, 0.3)
    ref = timm.models.vision_transformer.VisionTransformer(img_size=(16, 24), patch_size=4, embed_dim=32, depth=2,
                                                           num_heads=2, num_classes=0)
    ref.load_state_dict(enc.state_dict(), strict=True)
    enc.eval(), ref.eval()
    imgs = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        assert torch.allclose(enc.forward_features(imgs), ref.forward_features(imgs), atol=1e-5)
    norms = [m for m in enc.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 5 and all(m.eps == 1e-6 for m in norms)
    sincos = VisionTransformer(img_size=(16, 24), patch_size=4, embed_dim=32, depth=1, num_heads=2)
    assert not sincos.pos_embed.requires_grad  # the fixed table, with its zero cls row
    assert torch.equal(sincos.pos_embed[0], sincos_pos_embed_2d(32, 4, 6, cls_token=True))


def test_beit_style_encoder_matches_timm_beit():
    """q/v biases, layer scale and the shared relative position bias wired as timm's Beit (conftest's check)."""
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, qv_bias=True,
                            init_values=0.1, pos_embed=None, rel_pos_bias=True)
    assert_encoder_matches_timm_beit(enc)


def test_drop_path_drops_whole_samples_and_rescales_the_rest():
    """Stochastic depth: in training, each sample's branch is dropped whole with probability p and the kept ones
    are divided by 1 - p (the expectation stays); identity in eval. The rate grows linearly over the blocks."""
    x = torch.rand(4000, 3, 5) + 1.0
    dp = DropPath(0.25)
    assert torch.equal(dp.eval()(x), x)
    torch.manual_seed(0)
    y = dp.train()(x)
    nonzero = (y != 0).flatten(1)
    kept = nonzero.all(1)
    assert torch.all(kept | ~nonzero.any(1))  # every sample whole: all kept or all dropped
    assert torch.allclose(y[kept], x[kept] / 0.75)
    assert abs((~kept).float().mean().item() - 0.25) < 0.03  # the drop rate is p (1000 of 4000 expected)
    assert torch.equal(DropPath(0.0).train()(x), x)
    assert drop_path_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3]) and drop_path_rates(0.3, 1) == [0.0]
    enc = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.2)
    assert [b.drop_path.drop_prob for b in enc.blocks] == pytest.approx([0.0, 0.1, 0.2])
    enc.set_drop_path(0.4)
    assert [b.drop_path.drop_prob for b in enc.blocks] == pytest.approx([0.0, 0.2, 0.4])


def saved_storage_bytes(forward):
    """(forward(), bytes of the distinct storages autograd saved for backward during it)."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(saved.values())


def test_grad_checkpointing_gives_the_same_loss_and_gradients_and_saves_less():
    """Activation checkpointing per block is a no-op for the numbers: the same loss and gradients (drop path
    replays the samples it dropped in the first run) while far fewer bytes wait for backward; off in eval and
    without gradients. BEiT-style encoder: relative position bias handed to every block, layer scale, drop path."""
    imgs = torch.randn(4, 3, 32, 32)

    def run(checkpointing, seed=1):
        torch.manual_seed(0)
        enc = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, qv_bias=True,
                                init_values=0.1, drop_path_rate=0.5, pos_embed="learned", rel_pos_bias=True)
        set_grad_checkpointing(enc, checkpointing)
        torch.manual_seed(seed)
        loss, saved = saved_storage_bytes(lambda: enc.forward_features(imgs).square().mean())
        loss.backward()
        return loss, {n: p.grad for n, p in enc.named_parameters() if p.grad is not None}, saved, enc

    loss, grads, saved, enc = run(False)
    loss_ckpt, grads_ckpt, saved_ckpt, enc_ckpt = run(True)
    assert enc_ckpt.grad_checkpointing and not enc.grad_checkpointing
    assert run(False, seed=2)[0] != loss  # drop path draws differ by seed: the replay above is what matches
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads.keys() and len(grads) == len(list(enc.parameters()))  # every parameter
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-6, msg=name)
    assert saved_ckpt < saved / 3  # the blocks keep only their inputs
    enc_ckpt.eval()
    assert saved_storage_bytes(lambda: enc_ckpt.forward_features(imgs))[1] == \
        saved_storage_bytes(lambda: enc.eval().forward_features(imgs))[1]  # eval: nothing is checkpointed


# N(0, s) truncated at +-s has the standard deviation s x sqrt(1 - 2 phi(1) / (2 Phi(1) - 1)) = 0.5396 s
TRUNC_1_SIGMA = math.sqrt(1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / math.erf(1 / math.sqrt(2)))


def test_init_beit_style_is_the_official_pretraining_init():
    """BEiT/SimMIM's init: cls token, every Linear/Conv2d weight ~ N(0, 0.02) truncated at +-0.02, biases 0, norms
    1/0; then attn.proj and mlp.fc2 of block l = 1..L divided by sqrt(2 l). q/v biases, layer scale and the relative
    position table keep their construction values. Spreads are checked against the truncated normal's."""
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=3, num_heads=2, qv_bias=True,
                            init_values=0.1, pos_embed=None, rel_pos_bias=True)
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.fill_(7.0), m.bias.fill_(7.0)  # so that the init has to write them
    init_beit_style(enc)
    std = 0.02
    weights = {n: p for n, p in enc.named_parameters() if n.endswith("weight") and p.ndim >= 2}
    assert len(weights) == 1 + 3 * 4  # the patch embedding, then qkv, proj, fc1, fc2 of each block
    for name, w in weights.items():
        layer = int(name.split(".")[1]) + 1 if name.startswith("blocks.") else None
        s = std / math.sqrt(2 * layer) if name.endswith(("attn.proj.weight", "mlp.fc2.weight")) else std
        assert w.abs().max() <= s * (1 + 1e-6), name
        assert w.std().item() == pytest.approx(TRUNC_1_SIGMA * s, rel=0.06), name
    cls = enc.cls_token
    assert cls.abs().max() <= std and cls.std() > 0.2 * std  # drawn too (64 values)
    for name, p in enc.named_parameters():
        if name.endswith("bias") and "norm" not in name:
            assert not p.any(), name  # Linear/Conv2d biases, and the q/v biases (attn.q_bias, attn.v_bias)
        elif "norm" in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
        elif "gamma" in name:
            assert torch.all(p == 0.1), name
    assert not enc.rel_pos_bias.relative_position_bias_table.any()

# -------------------------------------------------------------------------------------------- schedule and optimizer
def test_cosine_lr_warmup_then_cosine():
    assert cosine_lr(0, 1.0, 0.1, 2, 10) == 0.0
    assert cosine_lr(1, 1.0, 0.1, 2, 10) == pytest.approx(0.5)
    assert cosine_lr(2, 1.0, 0.1, 2, 10) == pytest.approx(1.0)
    assert cosine_lr(6, 1.0, 0.1, 2, 10) == pytest.approx(0.55)  # half-way down the cosine
    assert cosine_lr(10, 1.0, 0.1, 2, 10) == pytest.approx(0.1)
    assert cosine_lr(0.5, 1.0, 0.1, 2, 10) == pytest.approx(0.25)  # fractional epochs: per-iteration warm-up
    assert cosine_lr(4, 1.0, 0.1, 2, 10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine_lr(12, 1.0, 0.1, 2, 10) == pytest.approx(0.1)  # past the end: stays at the floor


def test_set_lr_applies_each_groups_layer_scale_and_scaled_lr_its_divisor():
    import simmim
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr_scale": 0.25},
                           {"params": [torch.zeros(1, requires_grad=True)]}], lr=1.0)
    assert set_lr(opt, 0.4) == 0.4
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.4])
    cfg = simmim.Config(blr=1e-3)
    assert scaled_lr(cfg, 2048) == pytest.approx(1e-3 * 2048 / 512)  # SimMIM scales by global batch / 512
    assert scaled_lr(TrainConfig(blr=1e-3), 2048) == pytest.approx(1e-3 * 2048 / 256)
    assert scaled_lr(TrainConfig(blr=1e-3, lr=0.7), 2048) == 0.7  # --lr wins


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
    assert {"norm.weight", "blocks.0.norm1.weight", "blocks.0.norm2.weight"} <= undecayed  # 1-D: norms
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert len(decay["params"]) + len(plain["params"]) == sum(p.requires_grad for p in enc.parameters())
    _, plain2 = param_groups(enc, 0.05, no_decay=("cls_token",))
    assert "cls_token" in {names[id(p)] for p in plain2["params"]}
    beit_style = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, qv_bias=True,
                                   init_values=0.1, pos_embed=None, rel_pos_bias=True)
    names = {id(p): n for n, p in beit_style.named_parameters()}
    decay, plain = param_groups(beit_style, 0.05)
    undecayed = {names[id(p)] for p in plain["params"]}
    assert {"blocks.0.gamma_1", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias"} <= undecayed  # 1-D: layer scale
    assert "rel_pos_bias.relative_position_bias_table" in {names[id(p)] for p in decay["params"]}  # 2-D: decayed


# ------------------------------------------------------------------------------------------------------------ config
@pytest.fixture
def process_state():
    """Run installs SIGTERM/SIGINT handlers and seeds the global generators: both are put back after the test."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    random.setstate(states[0]), np.random.set_state(states[1]), torch.set_rng_state(states[2])


@pytest.mark.parametrize("under_torchrun", [False, True])
def test_a_signal_forwarded_by_torchrun_is_not_a_second_signal(under_torchrun, monkeypatch, process_state):
    """Ctrl-C under torchrun reaches a worker twice within milliseconds (from the terminal and forwarded by torchrun):
    there that is one stop, so the worker still saves; a repeat after the window, or any repeat outside torchrun,
    exits at once (the default action re-delivered)."""
    from common.training import StopSignal
    if under_torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    delivered = []
    monkeypatch.setattr("common.training.os.kill", lambda pid, sig: delivered.append(sig))
    clock = iter([100.0, 100.01, 103.0])
    monkeypatch.setattr("common.training.time.monotonic", lambda: next(clock))
    stop = StopSignal(log=lambda line: None)
    stop.handle(signal.SIGINT, None)  # t = 100: the stop
    assert stop.requested and delivered == []
    stop.handle(signal.SIGINT, None)  # t = 100.01: torchrun's forward (outside torchrun: a real second Ctrl-C)
    assert delivered == ([] if under_torchrun else [signal.SIGINT])
    if under_torchrun:
        stop.handle(signal.SIGINT, None)  # t = 103: the user's second Ctrl-C
        assert delivered == [signal.SIGINT]


def test_config_presets_cli_and_help():
    presets = {"demo": {"epochs": 3, "warmup_epochs": 1, "batch_size": 8}}
    cfg, applied = parse_config(TrainConfig, presets, ["--batch-size", "4", "--model", "vit_nano"])
    assert (cfg.epochs, cfg.batch_size, cfg.patch_size) == (3, 4, 16)  # preset, command line, model default
    assert applied == {"epochs": 3, "warmup_epochs": 1}
    assert cfg.workers == default_workers()  # this process's share of its cores
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


@pytest.mark.parametrize("method", ["mae", "simmim", "beit", "beit2", "sit", "convmae", "igpt"])
def test_model_choices_are_exactly_those_help_lists(method):
    """--model accepts a name exactly when --help lists it (`vit_*`: every ViT size; `igpt_mini/tiny`: igpt_mini and
    igpt_tiny)."""
    import importlib
    module = importlib.import_module(method)
    text = " ".join(build_parser(module.Config, method, module.PRESETS).format_help().split())
    line = text.split("--model STR ")[1].split(" [default:")[0]
    listed = set()
    for family, names in re.findall(r"\b(vit|igpt)_([\w*]+(?:/\w+)*)", line):
        listed |= set(VIT_SIZES) if names == "*" else {f"{family}_{n}" for n in names.split("/")}
    candidates = set(VIT_SIZES) | {f"igpt_{n}" for n in ("nano", "micro", "tiny", "mini", "s", "m", "l")}
    accepted = set()
    for name in candidates:
        try:
            parse_config(module.Config, module.PRESETS, ["--model", name])
            accepted.add(name)
        except UserError:
            pass
    assert listed == accepted and "vit_base" in accepted


def test_memory_advice_names_the_need_and_a_batch_that_fits(monkeypatch, tmp_path, capsys):
    """A CPU run at the ImageNet recipe whose measured need (fixed + per image x batch) exceeds the free host memory
    says so in one line before the first step, with the largest --batch-size that fits and divides the images per
    update, and the --accum-iter that keeps them; --help's preset table states the need."""
    import common.training as training
    from common.training import memory_advice, presets_epilog

    @dataclasses.dataclass
    class Cfg(TrainConfig):
        host_memory_gib: typing.ClassVar = (2.0, 0.25)
        batch_size: int = 128
    GiB = 2 ** 30
    line = memory_advice(Cfg(), 1, 20 * GiB)  # needs 2 + 0.25 x 128 = 34 GiB
    assert line.startswith("memory: this run needs about 34 GiB") and "20 GiB are available" in line
    assert line.endswith("--batch-size 64 --accum-iter 2 fits and keeps the global batch")  # 2 + 16 <= 20 < 2 + 18
    assert memory_advice(Cfg(), 2, 20 * GiB).endswith("--batch-size 32 --accum-iter 4 fits and keeps the global batch")
    assert memory_advice(Cfg(accum_iter=3, batch_size=96), 1, 20 * GiB).endswith("--batch-size 72 --accum-iter 4 "
                                                                                 "fits and keeps the global batch")
    assert "even one image per step does not fit" in memory_advice(Cfg(), 1, 2 * GiB)
    assert memory_advice(Cfg(), 1, 34.5 * GiB) is None  # fits
    assert memory_advice(Cfg(model="vit_small"), 1, 20 * GiB) is None  # not the size that was measured
    assert memory_advice(Cfg(), 1, None) is None and memory_advice(TrainConfig(), 1, 0) is None  # nothing to say
    epilog = presets_epilog({"imagenet": {"batch_size": 64}}, Cfg)
    assert "needs ~18 GiB of host memory per process on a CPU in fp32 (2 + 0.25 GiB/image x batch 64)" in epilog
    monkeypatch.setattr(training, "available_host_memory", lambda: 20 * GiB)
    Run(Cfg(out=str(tmp_path / "o")), "test")
    assert capsys.readouterr().out.startswith("memory: this run needs about 34 GiB")
    for method in ("mae", "simmim", "beit", "beit2", "sit", "convmae", "igpt"):  # every file states its recipe's need
        cls = __import__(method).Config
        fixed, per_image = cls.host_memory_gib
        assert 0.5 < fixed < 8 and 0 < per_image < 4


def test_the_last_step_of_a_run_is_known_for_its_log_line():
    """is_last_step: the last micro-step of the last epoch, or the --max-steps'th step: both always logged."""
    run = SimpleNamespace(cfg=SimpleNamespace(epochs=3, max_steps=0), steps_per_epoch=4, global_step=5)
    assert [Run.is_last_step(run, e, s) for e, s in ((2, 3), (2, 2), (1, 3), (3, 3))] == [True, False, False, False]
    run.cfg.max_steps = 5
    assert Run.is_last_step(run, 1, 0) and not Run.is_last_step(SimpleNamespace(**{**vars(run), "global_step": 4}), 1, 0)


def test_the_stop_signal_is_agreed_only_on_logging_steps_under_ddp(monkeypatch):
    """Under DDP the ranks agree on a stop (one all_reduce) every --log-every steps only; between those, no rank
    stops, whatever its own flag says; one process reads its flag directly."""
    import common.training as training
    reduced = []
    monkeypatch.setattr(training.torch_dist, "all_reduce", lambda t, op: reduced.append(t.item()))
    run = SimpleNamespace(dist=SimpleNamespace(world_size=2), cfg=SimpleNamespace(log_every=4), global_step=6,
                          stop=SimpleNamespace(requested=True), device=torch.device("cpu"))
    assert Run.stop_requested(run) is False and reduced == []
    run.global_step = 8
    assert Run.stop_requested(run) is True and reduced == [1.0]
    run.dist.world_size, run.global_step = 1, 6
    assert Run.stop_requested(run) is True


def test_speed_in_the_logs_never_rounds_to_zero():
    from common.training import speed
    assert [speed(v) for v in (1234.4, 12.6, 3.14, 0.4, 0.05)] == ["1234 img/s", "13 img/s", "3.1 img/s",
                                                                  "2.5 s/img", "20.0 s/img"]


def test_accum_iter_of_a_preset_is_split_over_the_processes(tmp_path, monkeypatch, process_state):
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


def test_tf32_and_cudnn_benchmark_on_cuda_only():
    """The flags are set and put back by hand: torch.backends.cuda.matmul is an object whose attributes exist only
    through __getattr__/__setattr__, and monkeypatch's undo may try to delattr them (an AttributeError at teardown,
    depending on what ran before)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark)
    try:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = False, False, False
        use_fast_cuda_math(torch.device("cpu"))
        assert not matmul.allow_tf32 and not cudnn.allow_tf32 and not cudnn.benchmark
        use_fast_cuda_math(torch.device("cuda"))
        assert matmul.allow_tf32 and cudnn.allow_tf32 and cudnn.benchmark
    finally:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = saved
    assert (matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark) == saved


def test_run_bookkeeping_logs_stops_and_checkpoints_at_updates_then_resumes(tmp_path, process_state):
    """Run's bookkeeping around a loop, in this process: 5 micro-steps an epoch with --accum-iter 2 (updates after
    micro-steps 1, 3 and the epoch's last, 4), --log-every 2, --ckpt-every-steps 3, --max-steps 7; the logged step
    and epoch losses; a checkpoint at an epoch end names the next epoch; --resume auto restores the step, the
    weights, the optimizer and the random state; non-finite weights are never saved."""
    args = ["--out", str(tmp_path / "run"), "--accum-iter", "2", "--log-every", "2", "--ckpt-every-steps", "3",
            "--max-steps", "7", "--epochs", "3", "--warmup-epochs", "1", "--seed", "5", "--lr", "0.1"]
    cfg, applied = parse_config(TrainConfig, {}, args)
    run = Run(cfg, "test", applied)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(5).get_state())  # rank 0 seeded with --seed
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    assert run.start(model, opt) == (0, 0)
    seen = []
    for epoch in range(2):
        run.start_epoch(epoch, 0, 5)
        for step in range(5):
            run.log_step(epoch, step, torch.tensor(float(10 * epoch + step)), lr=0.1)
            seen.append((run.global_step, run.at_update(step), run.should_checkpoint(step), run.should_stop(step)))
        run.log_epoch(epoch)
    assert [g for g, *_ in seen] == list(range(1, 11))
    assert [u for _, u, _, _ in seen] == [False, True, False, True, True] * 2
    assert [c for _, _, c, _ in seen] == [False] * 8 + [True, False]  # global step 9; 3 and 6 are not updates
    assert [s for *_, s in seen] == [False] * 6 + [True, False, True, True]  # at updates from global step 7 on
    assert run.done and not run.preempted
    run.cfg.max_steps = 0  # no --max-steps: never done
    assert not run.should_stop(4) and not run.done
    log = [json.loads(line) for line in (run.out / "log.jsonl").read_text().splitlines()]
    # every 2nd step, and the first and the --max-steps'th (a short run shows its first and last loss)
    assert [(r["step"], r["loss"]) for r in log if r["kind"] == "step"] == [(0, 0.0), (1, 1.0), (3, 3.0), (5, 10.0),
                                                                           (6, 11.0), (7, 12.0), (9, 14.0)]
    assert [(r["epoch"], r["loss"]) for r in log if r["kind"] == "epoch"] == [(0, 2.0), (1, 12.0)]  # epoch means
    model(torch.ones(4, 3)).sum().backward()
    opt.step()  # optimizer state to save
    run.save_checkpoint(1, 5)  # after the last step of epoch 1: training goes on at epoch 2, step 0
    ckpt = torch.load(run.ckpt_path, weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["global_step"]) == (2, 0, 10)
    torch.rand(7), random.random(), np.random.rand()  # training draws (drop path, ...): the state moved on
    run.save_checkpoint(1, 3)
    ckpt = torch.load(run.ckpt_path, weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["global_step"]) == (1, 3, 10)
    expected = torch.rand(4), random.random(), np.random.rand()  # what the run would have drawn next
    run.log_file.close()
    cfg, applied = parse_config(TrainConfig, {}, args + ["--resume", "auto"])
    resumed = Run(cfg, "test", applied)
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    assert resumed.start(model2, opt2) == (1, 3) and resumed.global_step == 10
    got = torch.rand(4), random.random(), np.random.rand()
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert all(torch.equal(opt.state[a]["exp_avg_sq"], opt2.state[b]["exp_avg_sq"])
               for a, b in zip(model.parameters(), model2.parameters()))
    good = resumed.ckpt_path.read_bytes()
    with torch.no_grad():
        model2.weight[0, 0] = float("nan")  # a diverged model is never written, even with a finite last loss
    with pytest.raises(NonFiniteError):
        resumed.save_checkpoint(1, 4)
    assert resumed.ckpt_path.read_bytes() == good
    resumed.log_file.close()


def test_mean_over_ranks_sums_then_divides_by_the_process_count(monkeypatch):
    """Under DDP the logged loss is the all-reduced SUM over the ranks divided by their number (gloo has no AVG),
    on a copy; one process returns the value itself. The other rank is played by a fake all_reduce."""
    import common.training as training
    ops = []

    def all_reduce(t, op=training.torch_dist.ReduceOp.SUM):  # rank 1 holds 5.0
        ops.append(op)
        t.add_(5.0)

    monkeypatch.setattr(training.torch_dist, "all_reduce", all_reduce)
    x = torch.tensor(1.0)
    assert Run.mean_over_ranks(SimpleNamespace(dist=Dist(0, 2, 0, torch.device("cpu"))), x).item() == 3.0
    assert x.item() == 1.0 and ops == [training.torch_dist.ReduceOp.SUM]
    assert Run.mean_over_ranks(SimpleNamespace(dist=Dist(0, 1, 0, torch.device("cpu"))), x) is x


def test_non_finite_guard_names_the_first_bad_step():
    guard = NonFiniteGuard(torch.device("cpu"))
    guard.update(0, torch.tensor(1.0))
    guard.check()
    guard.update(1, torch.tensor(2.0), torch.tensor(float("inf")))  # a finite loss, an infinite gradient norm
    guard.update(2, torch.tensor(float("nan")))
    with pytest.raises(NonFiniteError) as e:
        guard.check()
    assert e.value.args == (1,)


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


def test_synthetic_is_fast(monkeypatch):
    """What keeps the synthetic data fast, checked by count (its speed is bench.py's to measure, not a test's): each
    image is rendered once (one call of the vectorised renderer), both for the eval loader (the monitors read it
    twice) and for the resident training data (read every epoch), never again per pass."""
    import common.data as data
    calls = []
    render = data.render_synthetic

    def counted(i, size, seed):
        calls.append((i, size, seed))
        return render(i, size, seed)

    monkeypatch.setattr(data, "render_synthetic", counted)
    cfg = SimpleNamespace(data="synthetic", data_path="", img_size=16, subset=24, batch_size=8, workers=0, seed=0, skip_bad_images=False,
                          resident=True, decode="workers")
    dist = Dist(0, 1, 0, torch.device("cpu"))
    loader = build_eval_loader(cfg, "val", dist)
    first, second = (torch.cat([x for x, _ in loader]) for _ in range(2))
    assert torch.equal(first, second) and first.shape == (24, 3, 16, 16)
    assert sorted(calls) == sorted((int(i), 16, 1) for i in build_dataset("synthetic", "val", img_size=16,
                                                                             subset=24).ids)  # val: seed 1, once each
    calls.clear()
    train = build_train_data(cfg, dist, (0.2, 1.0), log=lambda msg: None)
    assert isinstance(train, ResidentData)
    for epoch in range(2):
        assert len(list(train.epoch(epoch))) == 3
    assert len(calls) == 24 and len(set(calls)) == 24 and {seed for *_, seed in calls} == {0}


def test_epoch_order_partitions_and_reshuffles():
    parts = [epoch_order(10, seed=1, epoch=0, rank=r, world=3) for r in range(3)]
    assert all(len(p) == 3 for p in parts)
    assert len(set(torch.cat(parts).tolist())) == 9
    assert torch.equal(parts[0], epoch_order(10, 1, 0, 0, 3))  # deterministic
    assert not torch.equal(epoch_order(100, 1, 0, 0, 1), epoch_order(100, 1, 1, 0, 1))  # new order every epoch


def test_epoch_order_deals_one_seeded_permutation_like_distributed_sampler():
    """The permutation of (seed, epoch), cut to a multiple of the world size, rank r taking positions r, r + world,
    ...; mix_seed's formula (checkpoints and resumed runs depend on it) keeps argument order and count apart."""
    full = epoch_order(10, seed=1, epoch=0, rank=0, world=1)
    assert torch.equal(full, torch.randperm(10, generator=torch.Generator().manual_seed(mix_seed(1, 0))))
    for r in range(3):
        assert torch.equal(epoch_order(10, 1, 0, r, 3), full[:9][r::3])
    assert torch.equal(epoch_order(10, 1, 0, 1, 3, shuffle=False), torch.tensor([1, 4, 7]))
    assert mix_seed(1, 2) == (1 + 1) * 1_000_003 + 2 + 1
    assert len({mix_seed(*v) for v in [(0,), (0, 0), (1, 0), (0, 1), (0, 0, 0), (2, 0), (0, 2)]}) == 7


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
    cfg = SimpleNamespace(data="synthetic", data_path="", img_size=28, subset=16, batch_size=16, workers=0, seed=0, skip_bad_images=False)
    loader = build_eval_loader(cfg, "val", SimpleNamespace(device=torch.device("cpu")))
    assert type(loader.dataset).__name__ == "TensorImages"  # the images as rendered, normalised without PIL
    x, y = next(iter(loader))
    ds = build_dataset("synthetic", "val", img_size=28, subset=16, seed=0)
    images, labels = ds.as_uint8()  # [16, 3, 28, 28], as rendered
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(x, (images / 255 - mean) / std, atol=1e-5) and torch.equal(y, labels)


def test_split_rel_pos_bias_gives_every_block_a_copy_under_timm_beit_names():
    """BEiT's fine-tuning: the shared relative position table becomes one per block, each a copy: the same features
    before any training, timm Beit's per-block names (strict), and the tables then train apart."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    enc = VisionTransformer(32, 8, 64, 2, 2, qv_bias=True, init_values=0.1, pos_embed=None, rel_pos_bias=True)
    enc.rel_pos_bias.relative_position_bias_table.data.normal_()
    imgs = torch.randn(2, 3, 32, 32)
    before = enc.forward_features(imgs)
    shared = enc.rel_pos_bias.relative_position_bias_table.detach().clone()
    enc.split_rel_pos_bias()
    assert enc.rel_pos_bias is None and torch.allclose(enc.forward_features(imgs), before, atol=1e-6)
    tables = [b.attn.relative_position_bias_table for b in enc.blocks]
    assert all(torch.equal(t, shared) for t in tables) and tables[0] is not tables[1]
    with torch.no_grad():
        tables[1].add_(1.0)  # block 1's own table: block 0's output is unchanged, the features change
    assert torch.equal(tables[0], shared) and not torch.allclose(enc.forward_features(imgs), before)
    ref = timm.models.beit.Beit(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0,
                                use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1, global_pool="token")
    ref.load_state_dict(enc.state_dict(), strict=True)
    assert torch.allclose(ref.eval().forward_features(imgs), enc.eval().forward_features(imgs), atol=1e-5)
