"""Officially released pre-training checkpoints load into our encoders (finetune.py).

The files themselves cannot be downloaded here: each synthetic checkpoint has the key names, shapes and nesting of
the official file (tests/data/official_keys/<layout>.json, dumped from the official model classes at a tiny size:
image 64 px, patch 16, width 64, depth 2, 2 heads) and random values, so a test can tell where every value lands.
"""
import json
from pathlib import Path

import pytest
import torch

from common import UserError
from common.vit import VisionTransformer, vit_kwargs
from convmae import ConvViT
from finetune import (describe, geometric_offsets, integer_offsets, interpolate_pos_embed,
                                  interpolate_rel_pos_table, recognise, to_encoder_state, unwrap)

KEYS = Path(__file__).parent / "data" / "official_keys"
LAYOUTS = ("mae", "simmim", "beit", "beit2", "convmae", "sit")


def official_file(layout, seed=0):
    """The checkpoint as the official script saves it: its model state dict(s) nested as in the fixture, random
    values of the fixture's shapes, beside what else the scripts save (an epoch, the args)."""
    gen = torch.Generator().manual_seed(seed)
    spec = json.loads((KEYS / f"{layout}.json").read_text())
    ckpt = {top: {name: torch.randn(shape, generator=gen) for name, shape in sd.items()}
            for top, sd in spec.items() if top != "_meta"}
    return {**ckpt, "epoch": 3, "args": None}


def fixture_keys(layout, top="model"):
    return list(json.loads((KEYS / f"{layout}.json").read_text())[top])


def vit(img_size=64, **kw):
    return VisionTransformer(img_size, **kw, **vit_kwargs("vit_nano"))


def beit_vit(img_size=64):
    """The BEiT/SimMIM encoder as our pre-training builds it: q/v biases, layer scale, one shared rel-pos table."""
    return vit(img_size, qv_bias=True, init_values=0.1, pos_embed=None, rel_pos_bias=True)


def per_block_target(img_size=64):
    """The state dict of a BEiT-style fine-tuning encoder with one rel-pos table per block (timm Beit names)."""
    target = beit_vit(img_size).state_dict()
    shared = target.pop("rel_pos_bias.relative_position_bias_table")  # [(2h-1)(2w-1)+3, heads]
    return {**target, **{f"blocks.{i}.attn.relative_position_bias_table": torch.zeros_like(shared) for i in range(2)}}


def target_for(layout, img_size=64):
    """Our fine-tuning encoder for each layout, as a state dict (names and shapes)."""
    if layout in ("mae", "sit"):
        return vit(img_size, pos_embed="learned").state_dict()  # official fine-tuning learns MAE's table too
    if layout == "convmae":
        return ConvViT(img_size, 16, "vit_nano").state_dict()
    return per_block_target(img_size)


def starting(keys, *prefixes):
    return {k for k in keys if k.startswith(prefixes)}


# what each official file holds that fine-tuning drops, in the file's names
EXPECTED_DROPPED = {
    "mae": lambda keys: starting(keys, "mask_token", "decoder_"),
    "simmim": lambda keys: {"encoder.mask_token", "encoder.rel_pos_bias.relative_position_index", "decoder.0.weight",
                            "decoder.0.bias"},
    "beit": lambda keys: {"mask_token", "lm_head.weight", "lm_head.bias", "rel_pos_bias.relative_position_index"},
    "beit2": lambda keys: {"mask_token", "lm_head.weight", "lm_head.bias", "rel_pos_bias.relative_position_index"}
    | starting(keys, "cls_pt_layers."),
    "convmae": lambda keys: starting(keys, "mask_token", "decoder_", "stage1_output_decode.", "stage2_output_decode."),
    "sit": lambda keys: starting(keys, "module.head.", "module.head_recons."),
}
EXPECTED_DROP_COUNT = {"mae": 18 + 2, "simmim": 4, "beit": 4, "beit2": 4 + 30, "convmae": 20 + 4, "sit": 19 + 8}
# (name in the official file, name in our encoder) pairs whose values must be equal after loading
PLACED = {
    "mae": [("blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.weight"), ("pos_embed", "pos_embed"),
            ("cls_token", "cls_token")],
    "simmim": [("encoder.blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.weight"),
               ("encoder.blocks.0.attn.q_bias", "blocks.0.attn.q_bias"),
               ("encoder.blocks.1.gamma_2", "blocks.1.gamma_2"),
               ("encoder.patch_embed.proj.weight", "patch_embed.proj.weight"), ("encoder.norm.bias", "norm.bias")],
    "beit": [("blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.weight"), ("blocks.0.attn.v_bias", "blocks.0.attn.v_bias"),
             ("cls_token", "cls_token")],
    "beit2": [("blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.weight"), ("blocks.1.gamma_1", "blocks.1.gamma_1")],
    "convmae": [("blocks3.0.attn.qkv.weight", "blocks.0.attn.qkv.weight"),
                ("blocks1.0.attn.weight", "patch_embed.blocks1.0.attn.weight"),
                ("blocks2.0.mlp.fc2.weight", "patch_embed.blocks2.0.mlp.fc2.weight"),
                ("patch_embed1.proj.weight", "patch_embed.patch_embed1.proj.weight"),
                ("patch_embed4.weight", "patch_embed.patch_embed4.weight"), ("pos_embed", "pos_embed")],
    "sit": [("module.backbone.blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.weight"),
            ("module.backbone.pos_embed", "pos_embed"), ("module.backbone.norm.weight", "norm.weight")],
}


# ---------------------------------------------------------------------------------------------------------------- #
#                                              unwrap and recognise                                                 #
# ---------------------------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("layout", LAYOUTS)
def test_unwrap_finds_the_saved_model_and_recognise_its_layout(layout):
    ckpt = official_file(layout)
    state, where = unwrap(ckpt)
    assert where == ("teacher" if layout == "sit" else "model")
    assert state.keys() == ckpt[where].keys()
    assert recognise(state) == layout


def test_unwrap_prefers_the_teacher_and_reads_nested_and_plain_state_dicts():
    ckpt = official_file("sit")
    state, _ = unwrap(ckpt)
    name = "module.backbone.blocks.0.attn.qkv.weight"
    assert torch.equal(state[name], ckpt["teacher"][name]) and not torch.equal(state[name], ckpt["student"][name])
    plain = vit().state_dict()
    assert unwrap(plain) == (plain, "")
    assert unwrap({"state_dict": {"model": plain}, "epoch": 1})[1] == "state_dict.model"
    assert unwrap({"SiT_model": ckpt["student"]})[0].keys() == ckpt["student"].keys()  # GMML's nesting


def test_unwrap_without_a_model_is_one_line_naming_the_keys():
    with pytest.raises(UserError) as info:
        unwrap({"optimizer": {"state": {}}, "epoch": 3})
    assert "optimizer, epoch" in str(info.value) and "\n" not in str(info.value)


def test_our_own_encoders_and_the_encoder_only_mae_release_are_ours():
    assert recognise(vit().state_dict()) == "ours"
    assert recognise(beit_vit().state_dict()) == "ours"
    assert recognise(ConvViT(64, 16, "vit_nano").state_dict()) == "ours"
    mae = unwrap(official_file("mae"))[0]
    encoder_only = {k: v for k, v in mae.items() if not k.startswith(("mask_token", "decoder_"))}  # mae#8
    assert recognise(encoder_only) == "ours"
    state, dropped = to_encoder_state(encoder_only, "ours", target_for("mae"))
    assert dropped == [] and torch.equal(state["blocks.0.mlp.fc1.weight"], mae["blocks.0.mlp.fc1.weight"])


def test_an_unknown_layout_is_one_line_naming_some_keys_and_their_count():
    state = {f"layer{i}.weight": torch.zeros(2) for i in range(7)}
    with pytest.raises(UserError) as info:
        recognise(state)
    message = str(info.value)
    assert "layer0.weight" in message and "7 keys" in message and "layer6.weight" not in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------------------------- #
#                                               describe                                                            #
# ---------------------------------------------------------------------------------------------------------------- #
BEIT_STYLE = dict(qv_bias=True, layer_scale=True, pos_embed=None, rel_pos="shared")
PLAIN = dict(qv_bias=False, layer_scale=False, rel_pos=None)
DESCRIBED = {
    "mae": dict(PLAIN, pos_embed="sincos"), "sit": dict(PLAIN, pos_embed="learned"),
    "convmae": dict(PLAIN, pos_embed="sincos"), "simmim": BEIT_STYLE, "beit": BEIT_STYLE, "beit2": BEIT_STYLE,
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_describe_reads_the_encoder_off_the_weights(layout):
    got = describe(unwrap(official_file(layout))[0], layout)
    depth = 1 if layout == "convmae" else 2  # ConvViT vit_nano: conv stages of 1 block each, then 1 ViT block
    assert got == dict(DESCRIBED[layout], method=layout, model="vit_nano", embed_dim=64, depth=depth, num_heads=2,
                       patch_size=16, grid=(4, 4))


def test_describe_our_own_file_tells_sincos_from_learned_and_shared_from_per_block():
    sincos = vit(96).state_dict()  # pos_embed holds the sin-cos table of a 6x6 grid
    learned = {**sincos, "pos_embed": torch.randn_like(sincos["pos_embed"])}
    assert describe(sincos, "ours")["pos_embed"] == "sincos" and describe(sincos, "ours")["grid"] == (6, 6)
    assert describe(learned, "ours")["pos_embed"] == "learned" and describe(learned, "ours")["method"] is None
    assert describe(per_block_target(96), "ours")["rel_pos"] == "per_block"
    assert describe(per_block_target(96), "ours")["grid"] == (6, 6)


def test_describe_a_size_without_a_preset_is_a_user_error():
    state = {k: v for k, v in vit().state_dict().items() if not k.startswith("blocks.1.")}  # width 64, depth 1
    with pytest.raises(UserError, match="width 64 and depth 1"):
        describe(state, "ours")


# ---------------------------------------------------------------------------------------------------------------- #
#                                            to_encoder_state                                                        #
# ---------------------------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_key_is_placed_or_dropped_and_values_land_where_they_belong(layout):
    state, _ = unwrap(official_file(layout))
    target = target_for(layout)
    out, dropped = to_encoder_state(state, layout, target)
    assert list(out) == list(target)
    assert all(out[k].shape == target[k].shape for k in target)
    assert set(dropped) == EXPECTED_DROPPED[layout](state.keys()) and len(dropped) == EXPECTED_DROP_COUNT[layout]
    for official, ours in PLACED[layout]:
        assert torch.equal(out[ours], state[official]), (official, ours)


@pytest.mark.parametrize("layout", ["mae", "sit", "convmae"])
def test_the_result_loads_strictly_into_the_encoder(layout):
    encoder = ConvViT(64, 16, "vit_nano") if layout == "convmae" else vit(pos_embed="learned")
    out, _ = to_encoder_state(unwrap(official_file(layout))[0], layout, encoder.state_dict())
    encoder.load_state_dict(out, strict=True)
    assert torch.equal(encoder.blocks[-1].attn.qkv.weight, out[f"blocks.{len(encoder.blocks) - 1}.attn.qkv.weight"])


@pytest.mark.parametrize("layout", ["simmim", "beit", "beit2"])
def test_the_shared_rel_pos_table_becomes_every_blocks_table(layout):
    state, _ = unwrap(official_file(layout))
    shared = state[("encoder." if layout == "simmim" else "") + "rel_pos_bias.relative_position_bias_table"]
    out, _ = to_encoder_state(state, layout, per_block_target())
    assert "rel_pos_bias.relative_position_bias_table" not in out
    for i in range(2):
        assert torch.equal(out[f"blocks.{i}.attn.relative_position_bias_table"], shared)
    assert out["blocks.0.attn.relative_position_bias_table"] is not out["blocks.1.attn.relative_position_bias_table"]


@pytest.mark.parametrize("layout", ["simmim", "beit"])
def test_into_our_shared_table_encoder_it_stays_shared_and_loads_strictly(layout):
    state, _ = unwrap(official_file(layout))
    encoder = beit_vit()
    out, _ = to_encoder_state(state, layout, encoder.state_dict())
    encoder.load_state_dict(out, strict=True)
    name = ("encoder." if layout == "simmim" else "") + "rel_pos_bias.relative_position_bias_table"
    assert torch.equal(encoder.rel_pos_bias.relative_position_bias_table, state[name])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_larger_fine_tuning_image_resizes_the_position_tables(layout):
    state, _ = unwrap(official_file(layout))
    out, _ = to_encoder_state(state, layout, target_for(layout, img_size=96))  # grid 4x4 -> 6x6
    if layout in ("simmim", "beit", "beit2"):
        table = out["blocks.1.attn.relative_position_bias_table"]
        assert table.shape == (11 * 11 + 3, 2)
        shared = state[("encoder." if layout == "simmim" else "") + "rel_pos_bias.relative_position_bias_table"]
        assert torch.equal(table[-3:], shared[-3:])
    else:
        extra = 0 if layout == "convmae" else 1
        assert out["pos_embed"].shape == (1, extra + 36, 64)
        official = state["module.backbone.pos_embed" if layout == "sit" else "pos_embed"]
        assert torch.equal(out["pos_embed"][:, :extra], official[:, :extra])


def test_a_file_key_that_cannot_be_placed_is_one_line_naming_it():
    state, _ = unwrap(official_file("mae"))
    state["head.weight"] = torch.zeros(10, 64)  # a fine-tuned classifier's head, not part of the encoder
    with pytest.raises(UserError) as info:
        to_encoder_state(state, "mae", target_for("mae"))
    assert "1 file keys not placed: head.weight" in str(info.value) and "\n" not in str(info.value)


def test_an_encoder_key_the_file_lacks_is_one_line_naming_it():
    state, _ = unwrap(official_file("mae"))  # a plain ViT: no q/v biases, no layer scale, no rel-pos tables
    with pytest.raises(UserError) as info:
        to_encoder_state(state, "mae", per_block_target())
    message = str(info.value)
    assert "encoder keys not in the file: blocks.0.gamma_1" in message and "file keys not placed" in message
    assert "\n" not in message


def test_a_shape_that_still_differs_is_named():
    state, _ = unwrap(official_file("sit"))
    state["module.backbone.norm.weight"] = torch.zeros(65)
    with pytest.raises(UserError, match=r"mis-shaped: module.backbone.norm.weight \(65,\) vs \(64,\)"):
        to_encoder_state(state, "sit", target_for("sit"))


# ---------------------------------------------------------------------------------------------------------------- #
#                                              interpolation                                                        #
# ---------------------------------------------------------------------------------------------------------------- #
def test_pos_embed_on_the_same_grid_is_unchanged_and_on_a_larger_one_keeps_the_cls_row():
    pos = torch.randn(1, 1 + 14 * 14, 32)
    assert interpolate_pos_embed(pos, (14, 14)) is pos
    big = interpolate_pos_embed(pos, (24, 24))
    assert big.shape == (1, 1 + 24 * 24, 32) and torch.equal(big[:, 0], pos[:, 0])


def test_pos_embed_interpolation_keeps_rows_as_rows():
    """Channel 0 holds the row, channel 1 the column of each patch: after resizing, channel 0 must still be constant
    along a row and grow down the columns (a transposed reshape would swap them)."""
    rows, cols = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
    pos = torch.cat([torch.zeros(1, 2), torch.stack([rows.flatten(), cols.flatten()], dim=1)])[None]  # [1, 1+N, 2]
    big = interpolate_pos_embed(pos, (24, 20))[0, 1:].reshape(24, 20, 2)
    assert torch.allclose(big[:, :, 0], big[:, :1, 0].expand(24, 20)) and (big[1:, 0, 0] > big[:-1, 0, 0]).all()
    assert torch.allclose(big[:, :, 1], big[:1, :, 1].expand(24, 20)) and (big[0, 1:, 1] > big[0, :-1, 1]).all()


def test_pos_embed_without_a_cls_row_resizes_every_row():
    """ConvMAE's table has no cls row: its first row is a patch and must be resampled too."""
    rows, cols = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1)[None]  # [1, 36, 2]
    small = interpolate_pos_embed(pos, (4, 4), cls_token=False)
    assert small.shape == (1, 16, 2) and not torch.equal(small[0, 0], pos[0, 0])
    assert torch.allclose(small[0, :, 0].reshape(4, 4), small[0, ::4, 0][:, None].expand(4, 4))


def test_rel_pos_table_on_the_same_grid_is_unchanged_and_on_a_larger_one_keeps_the_cls_entries():
    table = torch.randn(27 * 27 + 3, 4)
    assert interpolate_rel_pos_table(table, (14, 14), (14, 14)) is table
    big = interpolate_rel_pos_table(table, (14, 14), (24, 24))
    assert big.shape == (47 * 47 + 3, 4) and torch.equal(big[-3:], table[-3:])


def test_rel_pos_interpolation_is_exact_on_a_cubic_of_the_offsets():
    """A not-a-knot cubic spline reproduces any cubic: a table whose value at the (geometrically placed) old offsets
    is f(row offset, column offset), f cubic in each, must read f at the new integer offsets (non-square too)."""
    def f(r, c):
        return 0.5 + 0.3 * r - 0.02 * r ** 3 + 0.1 * c ** 2 - 0.01 * c ** 3 + 0.05 * r * c

    (h0, w0), (h1, w1) = (5, 6), (6, 7)  # (official: q <= 1.5, so a growth of 4 -> 6 would not reach 5)
    r, c = torch.meshgrid(geometric_offsets(h0, h1), geometric_offsets(w0, w1), indexing="ij")
    table = torch.cat([f(r, c).reshape(-1, 1), torch.ones(3, 1)]).double()
    r, c = torch.meshgrid(integer_offsets(h1), integer_offsets(w1), indexing="ij")
    big = interpolate_rel_pos_table(table, (h0, w0), (h1, w1))[:-3, 0].reshape(2 * h1 - 1, 2 * w1 - 1)
    assert torch.allclose(big[1:-1, 1:-1], f(r, c)[1:-1, 1:-1], atol=1e-12)
    # the outermost new offsets lie up to the bisection's tolerance outside the old ones: clamped, as FITPACK does
    assert torch.allclose(big, f(r, c), atol=1e-4)


def test_rel_pos_interpolation_equals_scipys_interpolating_spline():
    """The official code calls scipy's interp2d(kind='cubic'): FITPACK's s=0 spline, what RectBivariateSpline(s=0)
    fits. Its values for a seeded 6 x 6 -> 10 x 10 table were computed with scipy once and stored (scipy is not a
    dependency): ours give the same."""
    reference = json.loads((KEYS.parent / "rel_pos_spline_6_to_10.json").read_text())["heads"]
    table = torch.randn(11 * 11 + 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    big = interpolate_rel_pos_table(table, (6, 6), (10, 10))
    assert big.shape == (19 * 19 + 3, 2) and torch.equal(big[-3:], table[-3:])
    for head in range(2):
        assert torch.allclose(big[:-3, head], torch.tensor(reference[head], dtype=torch.float64), atol=1e-10)


def test_geometric_offsets_reach_the_new_grids_largest_offset():
    offsets = geometric_offsets(14, 24)
    assert len(offsets) == 27 and offsets[13] == 0 and offsets[14] == 1
    assert abs(offsets[-1] - 23) < 1e-3 and torch.equal(offsets, -offsets.flip(0))


def test_a_too_small_pre_training_grid_cannot_be_resized():
    with pytest.raises(UserError, match="at least 3 patches per side"):
        interpolate_rel_pos_table(torch.zeros(3 * 3 + 3, 2), (2, 2), (4, 4))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_finetune_reads_an_official_file_and_builds_its_encoder_at_another_size(layout, tmp_path):
    """finetune.py's own path: an official file saved with torch.save (its `args` an argparse.Namespace, as the
    official scripts save them) -> read_init recognises it -> build_encoder gives the method's encoder at 64 px with
    the file's weights, and at 96 px with the position tables resized (6 x 6 patches instead of 4 x 4)."""
    import argparse
    from finetune import build_encoder, read_init
    ckpt = official_file(layout)
    ckpt["args"] = argparse.Namespace(model="tiny")
    torch.save(ckpt, tmp_path / "official.pth")
    source = read_init(str(tmp_path / "official.pth"))
    assert (source.method, source.layout, source.pretrain["img_size"]) == (layout, layout, 64)
    encoder, dropped = build_encoder(source, 64)
    expected, _ = to_encoder_state(unwrap(ckpt)[0], layout, encoder.state_dict())
    assert dropped and all(torch.equal(encoder.state_dict()[k], v) for k, v in expected.items())
    if layout in ("simmim", "beit", "beit2"):  # BEiT-style: one table per block for fine-tuning
        assert all(b.attn.relative_position_bias_table is not None for b in encoder.blocks)
    bigger, _ = build_encoder(source, 96)
    for key, value in bigger.state_dict().items():
        if key.endswith("pos_embed") or key.endswith("relative_position_bias_table"):
            assert value.shape != encoder.state_dict()[key].shape
    assert torch.isfinite(bigger.forward_features(torch.randn(1, 3, 96, 96))).all()
