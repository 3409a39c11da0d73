"""Fine-tune or linear-probe a pre-trained encoder: the encoder.pth a method file here wrote, or a checkpoint an
official repository released (MAE, SimMIM, BEiT, BEiT v2, ConvMAE, SiT), as the official main_finetune.py and
main_linprobe.py do.

--init names the file; the method and the model size are read from it (our encoder.pth: the config.json beside it;
an official file: its keys), and they choose the recipe: the method file's FINETUNE table for the input size and
model (layer-wise lr decay, drop path, RandAugment, random erasing, mixup / cutmix, label smoothing, warm-up then
cosine, mean pooling or the cls token as the official fine-tuning does). Every recipe value is also a flag.
--linear-probe runs MAE's linear probe instead: the encoder frozen, its cls token through BatchNorm (no affine) and
a linear layer, trained with LARS.

Run:     python finetune.py --init runs/mae/encoder.pth                    # the data and size it was pre-trained on
         python finetune.py --init runs/mae/encoder.pth --data imagenet --data-path /data/imagenet
         torchrun --nproc_per_node 8 finetune.py --init mae_pretrain_vit_base.pth --data imagenet --data-path ...
         python finetune.py --init runs/mae/encoder.pth --linear-probe
         python finetune.py --resume auto --out runs/finetune-...           # continue an interrupted run
Outputs (--out): config.json, log.jsonl (validation top-1 / top-5 every epoch), checkpoint.pth (every epoch, for
--resume), last.pth and best.pth (the classifier after the last and the best epoch), model.pth (the final
classifier with timm's names: strict into timm's VisionTransformer or Beit), results.json.
Deviations from the official code: the lr is set every step (DeiT, SiT's fine-tuning: every epoch); no repeated
augmentation and no model EMA (DeiT); the validation transform is the ImageNet protocol's for large images and a
plain resize for images no larger than the input.
Results: docs/RESULTS.md#fine-tuning
"""
import argparse
import importlib
import json
import math
import time
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F

from common import UserError
from common.data import DATASETS, LoaderData, build_eval_loader, finetune_transform, mix_seed, run_dataset
from common.evaluation import shard
from common.training import (Run, TrainConfig, cli, cosine_lr, given_settings, load_file, progress, resolve_config,
                             set_grad_sync, set_lr)
from common.vit import VIT_SIZES, count_params, layer_norm, sincos_pos_embed_2d
from convmae import CONVMAE_SIZES

METHODS = ("mae", "simmim", "beit", "beit2", "sit", "convmae")  # the methods whose encoders fine-tune here


# ---------------------------------------------------------------------------------------------------------------- #
#                                          the encoder to start from                                                 #
# ---------------------------------------------------------------------------------------------------------------- #
@dataclass
class Source:
    """What --init holds: the method, its pre-training config (the fields its encoder is built from), its state dict
    and its layout (LAYOUTS: "ours" or the official code base that wrote it)."""
    path: str
    method: str
    pretrain: dict
    state: dict
    layout: str


def read_init(path):
    """--init -> Source. Our encoder.pth (the config.json beside it names the method and its settings), a
    checkpoint.pth of our pre-training (its encoder part), or an official checkpoint (recognised by its keys)."""
    ckpt = load_official(path)
    if isinstance(ckpt, dict) and "method" in ckpt and "config" in ckpt and "model" in ckpt:  # our checkpoint.pth
        encoder = {k.removeprefix("encoder."): v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
        return Source(str(path), ckpt["method"], ckpt["config"], encoder, "ours")
    state, _ = unwrap(ckpt)
    layout = recognise(state)
    config = Path(path).parent / "config.json"
    if layout == "ours" and config.is_file():
        pretrain = json.loads(config.read_text())
        if "method" not in pretrain:
            raise UserError(f"--init {path}: {config} does not say which method wrote it (a run of an older "
                            f'version: add "method": "<mae, simmim, ...>" to it)')
        return Source(str(path), pretrain["method"], pretrain, state, layout)
    arch = describe(state, layout)
    # an encoder-only file without its config.json: MAE's release has our names and the sin-cos table
    method = arch["method"] or ("mae" if arch["pos_embed"] == "sincos" and not arch["qv_bias"] else None)
    if method is None:
        raise UserError(f"--init {path}: an encoder with no config.json beside it to say which method wrote it")
    pretrain = {"model": arch["model"], "patch_size": arch["patch_size"],
                "img_size": arch["grid"][0] * arch["patch_size"]}
    return Source(str(path), method, pretrain, state, layout)


def load_official(path):
    """torch.load of --init with weights only: tensors and plain data, plus the argparse.Namespace of their `args`
    that the official scripts save beside the weights."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return load_file(path, "--init")
    except UserError as e:
        raise UserError(f"{e}. A checkpoint holding other objects (SimMIM's saves its yacs config): save its weights "
                        f"alone, torch.save(torch.load(PATH, weights_only=False)['model'], 'weights.pth'), and pass "
                        f"that") from None


def build_encoder(source, img_size, random_init=False):
    """(encoder, the keys of --init it does not use). The method's encoder as its pre-training built it, at
    `img_size`, with the weights of --init, or with its
    initialisation (`random_init`: the baseline). BEiT-style encoders get one relative position table per block, each
    a copy of the shared one, as their fine-tuning does; position tables are resized to another input size."""
    if source.method not in METHODS:
        raise UserError(f"--init {source.path} is a {source.method} encoder; finetune.py fine-tunes "
                        f"{', '.join(METHODS)} (iGPT fine-tunes in igpt.py)")
    module = importlib.import_module(source.method)
    names = {f.name for f in fields(module.Config)}
    pcfg = module.Config(**{**{k: v for k, v in source.pretrain.items() if k in names}, "img_size": img_size})
    encoder = module.build_model(pcfg).encoder
    if getattr(encoder, "rel_pos_bias", None) is not None:
        encoder.split_rel_pos_bias()
    dropped = []
    if not random_init:
        state, dropped = to_encoder_state(source.state, source.layout, encoder.state_dict())
        encoder.load_state_dict(state)
    return encoder, dropped


# ---------------------------------------------------------------------------------------------------------------- #
#                                    officially released checkpoints                                                 #
# ---------------------------------------------------------------------------------------------------------------- #
# Load the pre-training checkpoints that the official code bases released into this project's encoders.
#
# Each official repository saves its pre-training model in its own way: nested under "model" or "student"/"teacher",
# with a "module." or "encoder." prefix, under its own names, and together with the pieces that only pre-training uses
# (decoders, mask tokens, LM heads, projection heads). To fine-tune such a file we unwrap it, recognise which code base
# wrote it, read off which encoder it needs, and map its keys onto that encoder's state dict *strictly*: every key of
# the encoder is filled and every key of the file is placed or reported as dropped, so that a wrong file fails loudly
# instead of fine-tuning a half-random network (the official loaders use strict=False).
#
# Layouts (the names, nestings and shapes of each are in tests/data/official_keys/<layout>.json, dumped from the
# official model classes built at a tiny size; "_meta" there says which file, commit and class):
#   ours     this project's encoder.pth (common/evaluation.py report()): timm ViT names, or our ConvViT's
#   mae      facebookresearch/mae   {"model": ...}        MaskedAutoencoderViT: encoder + mask token + decoder_*
#   simmim   microsoft/SimMIM       {"model": ...}        "encoder." ViT with its mask token + decoder.0 (1x1 conv)
#   beit     microsoft/unilm beit   {"model": ...}        ViT with a shared rel-pos table + mask token + lm_head
#   beit2    microsoft/unilm beit2  {"model": ...}        BEiT's + cls_pt_layers (patch aggregation)
#   convmae  Alpha-VL/ConvMAE       {"model": ...}        patch_embed1-4, blocks1-3 + fusion convs + decoder_*
#   sit      Sara-Ahmed/SiT         {"student", "teacher"} "module.backbone." ViT + "module.head" / "module.head_recons"
# The encoder-only MAE release (mae_pretrain_vit_*.pth) already has our names, so it is recognised as "ours".
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
NUM_CLS_ENTRIES = 3  # the last rows of a rel-pos table: cls->token, token->cls, cls->cls (common/vit.py)
# Where a saved checkpoint keeps its model, in order of preference. "teacher" before "student": SiT has no fine-tuning
# code at HEAD, and the DINO code it derives from evaluates the teacher (eval_linear.py --checkpoint_key teacher).
# "model" before "module" as BEiT's fine-tuning (--model_key 'model|module'); "SiT_model" is GMML's (main.py).
CHECKPOINT_KEYS = ("teacher", "model", "module", "state_dict", "SiT_model", "student")


@dataclass(frozen=True)
class Layout:
    """How one code base's file names our encoder's keys: what marks it, what to strip, drop and rename."""
    marker: str  # a name prefix that only this layout's files have (after any "module." is stripped)
    strip: tuple = ()  # prefixes removed from every name that has them
    drop: tuple = ()  # name prefixes (after stripping) of the pieces only pre-training uses
    rename: tuple = ()  # (official prefix, our prefix) pairs


CONVMAE_RENAMES = (*((f"patch_embed{i}.", f"patch_embed.patch_embed{i}.") for i in (1, 2, 3, 4)),
                   ("blocks1.", "patch_embed.blocks1."), ("blocks2.", "patch_embed.blocks2."), ("blocks3.", "blocks."))
LAYOUTS = {  # recognise() tries them in this order: the first whose marker is present wins
    # official: the teacher/student is DDP(FullPipline(backbone, head, head_recons)) (main.py L125-137)
    "sit": Layout("backbone.", strip=("backbone.",), drop=("head.", "head_recons.")),
    # official fine-tuning keeps only "encoder.*" (utils.py load_pretrained): the mask token sits in the encoder
    "simmim": Layout("encoder.mask_token", strip=("encoder.",), drop=("mask_token", "decoder.")),
    # official: the released ConvMAE-B file has no mask token, decoder or fusion convs; a checkpoint-*.pth has them
    "convmae": Layout("patch_embed1.", rename=CONVMAE_RENAMES,
                      drop=("mask_token", "decoder_", "stage1_output_decode.", "stage2_output_decode.")),
    # cls_pt_norm / cls_pt_lm_head exist only with --shared_lm_head False
    "beit2": Layout("cls_pt_layers.", drop=("mask_token", "lm_head.", "cls_pt_layers.", "cls_pt_norm.",
                                            "cls_pt_lm_head.")),
    "beit": Layout("lm_head.", drop=("mask_token", "lm_head.")),
    "mae": Layout("decoder_embed.", drop=("mask_token", "decoder_")),
    "ours": Layout("blocks.0.norm1."),
}


def unwrap(ckpt):
    """A loaded checkpoint -> (flat state dict of tensors, where it was: "model", "teacher", "" for a plain one).

    The official scripts save the model beside the optimizer, epoch and args ({"model": ...}; SiT {"student": ...,
    "teacher": ...}); this finds it by the keys of CHECKPOINT_KEYS, one level after another ("state_dict" of
    "model" -> "state_dict.model")."""
    where = []
    while isinstance(ckpt, dict) and not all(torch.is_tensor(v) for v in ckpt.values()):
        key = next((k for k in CHECKPOINT_KEYS if isinstance(ckpt.get(k), dict)), None)
        if key is None:
            keys = [str(k) for k in ckpt]
            raise UserError(f"no model state dict in this checkpoint: none of {', '.join(CHECKPOINT_KEYS)} among its "
                            f"{len(keys)} top-level keys ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})")
        where.append(key)
        ckpt = ckpt[key]
    if not isinstance(ckpt, dict) or not ckpt:
        raise UserError(f"not a checkpoint of model weights: found {type(ckpt).__name__} "
                        f"{'under ' + '.'.join(where) if where else 'at the top level'}")
    return dict(ckpt), ".".join(where)


def recognise(state_dict):
    """The layout of an unwrapped state dict (a key of LAYOUTS), from the names only its code base saves.

    A state dict that no layout claims raises UserError with one line naming its first keys and their count."""
    names = [name.removeprefix("module.") for name in state_dict]
    for layout, spec in LAYOUTS.items():
        if any(name.startswith(spec.marker) for name in names):
            return layout
    raise UserError(f"cannot tell which code base wrote this checkpoint: none of its {len(names)} keys is an "
                    f"encoder name of {', '.join(LAYOUTS)} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")


def our_name(name, layout):
    """An official key -> the name of our encoder's state dict, or None for a piece that fine-tuning drops: the
    layout's pre-training-only parts and every relative_position_index (a buffer computed from the grid, which the
    official fine-tuning pops too: beit/run_class_finetuning.py L346-349)."""
    spec = LAYOUTS[layout]
    name = name.removeprefix("module.")  # DistributedDataParallel's prefix, in whatever layout
    for prefix in spec.strip:
        name = name.removeprefix(prefix)
    if name.startswith(spec.drop) or name.endswith("relative_position_index"):
        return None
    for old, new in spec.rename:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def describe(state_dict, layout):
    """What our encoder must be to take this state dict: its size preset and the options that change its keys.

    num_heads is not in the weights (qkv is [3D, D] for any head count): it comes from the preset of that width and
    depth (common/vit.py VIT_SIZES; ConvMAE: convmae.py CONVMAE_SIZES). grid is the pre-training patch grid (h, w),
    read from pos_embed or else from the rel-pos table. pos_embed: "sincos" (fixed in MAE/ConvMAE pre-training; in
    our own file: when its values are the sin-cos table), "learned", or None; rel_pos: "shared" (one table for all
    blocks), "per_block", or None. method is None for our own file (its config.json says)."""
    sd = {new: value for name, value in state_dict.items() if (new := our_name(name, layout)) is not None}
    depth = count_indices(sd, "blocks.")
    if "patch_embed.patch_embed1.proj.weight" in sd:  # our ConvViT: three conv stages, then ViT blocks
        dims = tuple(sd[f"patch_embed.patch_embed{i}.proj.weight"].shape[0] for i in (1, 2, 3))
        depths = (count_indices(sd, "patch_embed.blocks1."), count_indices(sd, "patch_embed.blocks2."), depth)
        model = next((m for m, (d, n, _) in CONVMAE_SIZES.items() if (d, n) == (dims, depths)), None)
        embed_dim, patch_size = dims[2], 4 * sd["patch_embed.patch_embed1.proj.weight"].shape[-1]  # strides p/4, 2, 2
        num_heads = CONVMAE_SIZES[model][2] if model else None
    else:
        embed_dim, _, patch_size, _ = sd["patch_embed.proj.weight"].shape  # [D, C, p, p]
        model = next((m for m, (d, n, _, _) in VIT_SIZES.items() if (d, n) == (embed_dim, depth)), None)
        num_heads = VIT_SIZES[model][2] if model else None
    if model is None:
        raise UserError(f"a {layout} checkpoint of width {embed_dim} and depth {depth}: no --model preset has that "
                        f"size, so its number of heads is unknown")
    has_cls = "cls_token" in sd
    pos_embed = sd.get("pos_embed")
    per_block = "blocks.0.attn.relative_position_bias_table"
    table = sd.get(SHARED_TABLE, sd.get(per_block))
    grid = (pos_grid(pos_embed, has_cls) if pos_embed is not None else
            table_grid(table) if table is not None else None)
    if pos_embed is None:
        pos_kind = None
    elif layout in ("mae", "convmae"):
        pos_kind = "sincos"
    elif layout == "ours" and torch.allclose(
            pos_embed[0].float(), sincos_pos_embed_2d(embed_dim, *grid, cls_token=has_cls), atol=1e-6):
        pos_kind = "sincos"
    else:
        pos_kind = "learned"
    return dict(method=None if layout == "ours" else layout, model=model, embed_dim=embed_dim, depth=depth,
                num_heads=num_heads, patch_size=patch_size, grid=grid,
                qv_bias="blocks.0.attn.q_bias" in sd, layer_scale="blocks.0.gamma_1" in sd, pos_embed=pos_kind,
                rel_pos="shared" if SHARED_TABLE in sd else "per_block" if per_block in sd else None)


def to_encoder_state(state_dict, layout, target):
    """An unwrapped official state dict -> (a state dict with exactly `target`'s keys, the dropped keys).

    target: our freshly built fine-tuning encoder's state_dict() (its names and shapes). Steps: strip the layout's
    prefixes, rename to our names, drop the pre-training-only pieces (returned, in the file's names); when target has
    one rel-pos table per block and the file one shared table, copy it to every block as BEiT's fine-tuning does
    (beit/run_class_finetuning.py L337-344); resize pos_embed and rel-pos tables to target's grid
    (interpolate_pos_embed, interpolate_rel_pos_table). Strict: a target key left unfilled, a file key neither placed
    nor dropped, or a shape that still differs raises UserError naming them, in one line."""
    origin, dropped = {}, []
    for name in state_dict:
        new = our_name(name, layout)
        if new is None:
            dropped.append(name)
        else:
            origin[new] = name
    sd = {new: state_dict[name] for new, name in origin.items()}
    per_block = [k for k in target if k.endswith("attn.relative_position_bias_table")]
    if SHARED_TABLE in sd and SHARED_TABLE not in target and per_block:
        shared = sd.pop(SHARED_TABLE)
        for key in per_block:
            sd[key] = shared.clone()
            origin[key] = origin[SHARED_TABLE]
    for key, value in sd.items():
        if key not in target or value.shape == target[key].shape:
            continue
        if key.endswith("relative_position_bias_table"):
            sd[key] = interpolate_rel_pos_table(value, table_grid(value), table_grid(target[key]))
        elif key == "pos_embed":
            has_cls = "cls_token" in target
            sd[key] = interpolate_pos_embed(value, pos_grid(target[key], has_cls), cls_token=has_cls)
    missing = [k for k in target if k not in sd]
    unplaced = [origin[k] for k in sd if k not in target]
    shapes = [f"{origin[k]} {tuple(sd[k].shape)} vs {tuple(target[k].shape)}"
              for k in target if k in sd and sd[k].shape != target[k].shape]
    problems = [f"{len(keys)} {what}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                for what, keys in (("encoder keys not in the file", missing), ("file keys not placed", unplaced),
                                   ("mis-shaped", shapes)) if keys]
    if problems:
        raise UserError(f"the {layout} checkpoint does not fit this encoder: " + "; ".join(problems))
    return {k: sd[k] for k in target}, dropped


# ---------------------------------------------------------------------------------------------------------------- #
#                                       resizing to another patch grid                                              #
# ---------------------------------------------------------------------------------------------------------------- #
def interpolate_pos_embed(pos_embed, new_grid, cls_token=True):
    """[1, 1+N, D] (or [1, N, D] without cls_token) on a square grid -> [1, 1+h*w, D] on new_grid (h, w), as MAE's
    util/pos_embed.py interpolate_pos_embed: the patch rows as a D-channel image resized bicubically
    (align_corners=False), the cls row kept as it is. The same grid returns pos_embed itself."""
    extra = 1 if cls_token else 0
    side = square_side(pos_embed.shape[1] - extra, "pos_embed")
    h, w = new_grid
    if (side, side) == (h, w):
        return pos_embed
    dim = pos_embed.shape[2]
    grid = pos_embed[:, extra:].reshape(1, side, side, dim).permute(0, 3, 1, 2)  # [1, N, D] -> [1, D, side, side]
    grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False)  # -> [1, D, h, w]
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)  # -> [1, h*w, D]
    return torch.cat([pos_embed[:, :extra], grid], dim=1)


def interpolate_rel_pos_table(table, old_grid, new_grid):
    """Relative position bias table [(2h-1)(2w-1)+3, heads] of old_grid (h, w) -> the table of new_grid, as BEiT's
    fine-tuning does (beit/run_class_finetuning.py L351-411, SimMIM's utils.py the same): the old offsets are spread
    on a geometric progression that reaches the new grid's largest offset (near offsets keep a spacing of about 1,
    far ones are stretched), and a bicubic interpolating spline through them (official: scipy interp2d kind='cubic'
    per head, gone from SciPy 1.14) is read at the new integer offsets. We compute that spline -- FITPACK's s=0
    interpolant is the not-a-knot cubic spline -- per axis in torch. The 3 cls entries are kept as they are; the
    same grid returns table itself. official: square grids only; we: each axis on its own."""
    if tuple(old_grid) == tuple(new_grid):
        return table
    heads = table.shape[1]
    (h0, w0), (h1, w1) = old_grid, new_grid
    rows = spline_matrix(geometric_offsets(h0, h1), integer_offsets(h1))  # [2h1-1, 2h0-1]
    cols = spline_matrix(geometric_offsets(w0, w1), integer_offsets(w1))  # [2w1-1, 2w0-1]
    pairs = table[:-NUM_CLS_ENTRIES].double().reshape(2 * h0 - 1, 2 * w0 - 1, heads)  # row offset outer, column inner
    resized = torch.einsum("ir,rch,jc->ijh", rows, pairs, cols)  # [2h1-1, 2w1-1, heads]
    resized = resized.reshape(-1, heads).to(table.dtype)  # -> [(2h1-1)(2w1-1), heads]
    return torch.cat([resized, table[-NUM_CLS_ENTRIES:]], dim=0)


def geometric_offsets(old, new):
    """Where BEiT's fine-tuning puts the 2*old-1 offsets of an old grid side before reading the new one's: 0 and
    +-(1), +-(1 + q), +-(1 + q + q^2), ..., with q found by bisection in [1.01, 1.5] (to 1e-6, the official bounds
    and stopping rule, so the values match) such that the outermost, 1 + q + ... + q^(old-2), is new - 1."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2
        if (1 - q ** (old - 1)) / (1 - q) > new - 1:  # the geometric series 1 + q + ... (old - 1 terms)
            right = q
        else:
            left = q
    distances = [sum(q ** k for k in range(i)) for i in range(1, old)]  # 1, 1 + q, ...
    return torch.tensor([-d for d in reversed(distances)] + [0.0] + distances, dtype=torch.float64)


def integer_offsets(side):
    """The offsets -(side-1) .. side-1 of a grid side, float64."""
    return torch.arange(-(side - 1), side, dtype=torch.float64)


def spline_matrix(x, x_new):
    """The not-a-knot cubic spline through points x (n >= 4, increasing) as a matrix: values at x_new = W @ values
    at x, W [len(x_new), n]. Points outside [x0, x_n-1] take the end value, as FITPACK's evaluation clamps them.
    With second derivatives m (A m = B y): on [x_i, x_i+1], a = (x_i+1 - t) / h_i, b = 1 - a,
    s(t) = a y_i + b y_i+1 + h_i^2 / 6 ((a^3 - a) m_i + (b^3 - b) m_i+1)."""
    n = len(x)
    if n < 4:
        raise UserError(f"a relative position table of {n} offsets per side is too small to resize: cubic "
                        f"interpolation needs a pre-training grid of at least 3 patches per side")
    h = x.diff()  # [n-1]
    A = torch.zeros(n, n, dtype=torch.float64)
    B = torch.zeros(n, n, dtype=torch.float64)
    for i in range(1, n - 1):  # continuous second derivative at the inner points
        A[i, i - 1:i + 2] = torch.stack([h[i - 1], 2 * (h[i - 1] + h[i]), h[i]])
        B[i, i - 1:i + 2] = torch.stack([6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]])
    # not-a-knot: the third derivative is continuous at x1 and x_n-2 (one cubic over the first and last two pieces)
    A[0, :3] = torch.stack([h[1], -(h[0] + h[1]), h[0]])
    A[-1, -3:] = torch.stack([h[-1], -(h[-2] + h[-1]), h[-2]])
    second = torch.linalg.solve(A, B)  # [n, n]: m = second @ y
    t = x_new.clamp(x[0], x[-1])
    i = (torch.searchsorted(x, t, right=True) - 1).clamp(0, n - 2)  # the piece of each new point
    a = (x[i + 1] - t) / h[i]
    b = 1 - a
    eye = torch.eye(n, dtype=torch.float64)
    return (a[:, None] * eye[i] + b[:, None] * eye[i + 1]
            + (h[i] ** 2 / 6)[:, None] * ((a ** 3 - a)[:, None] * second[i] + (b ** 3 - b)[:, None] * second[i + 1]))


# ---------------------------------------------------------------------------------------------------------------- #
#                                                  helpers                                                          #
# ---------------------------------------------------------------------------------------------------------------- #
def count_indices(sd, prefix):
    """How many numbered modules `prefix{i}.` the state dict has (blocks of a stage)."""
    return len({name[len(prefix):].split(".")[0] for name in sd if name.startswith(prefix)})


def square_side(n, what):
    """The side of a square grid of n positions; UserError when n is not a square (the official interpolations
    assume square pre-training grids)."""
    side = math.isqrt(n)
    if side * side != n:
        raise UserError(f"{what} has {n} grid positions, not a square grid")
    return side


def pos_grid(pos_embed, cls_token):
    """The square patch grid (h, w) of a [1, (1+)N, D] position table."""
    side = square_side(pos_embed.shape[1] - (1 if cls_token else 0), "pos_embed")
    return side, side


def table_grid(table):
    """The square patch grid (h, w) of a [(2h-1)(2w-1)+3, heads] relative position table."""
    side = square_side(table.shape[0] - NUM_CLS_ENTRIES, "the relative position table")  # 2h - 1
    return (side + 1) // 2, (side + 1) // 2


# ---------------------------------------------------------------------------------------------------------------- #
#                                                 the classifier                                                     #
# ---------------------------------------------------------------------------------------------------------------- #
class Classifier(nn.Module):
    """Encoder + head for fine-tuning. pool="mean" (MAE/SimMIM default, `global_pool`): mean of the patch tokens
    before the final norm -> a new LayerNorm `fc_norm` -> head; the encoder's final norm is deleted, as the official
    code does, so that the model holds only parameters it uses (DDP requires it). pool="cls": the normalised cls
    token -> head. Takes the encoder as its own (fine-tuning passes a copy)."""

    def __init__(self, encoder, num_classes, pool="mean"):
        super().__init__()
        self.encoder, self.pool = encoder, pool
        self.fc_norm = None
        if pool == "mean":
            del encoder.norm
            encoder.norm = nn.Identity()
            self.fc_norm = layer_norm(encoder.embed_dim)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE: trunc_normal(2e-5) head, zero bias
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs):
        enc = self.encoder
        x = enc.norm(enc.run_blocks(enc.prepend_cls(enc.embed(imgs))))  # [B, 1+N, D] (norm: Identity for "mean")
        x = self.fc_norm(x[:, 1:].mean(dim=1)) if self.pool == "mean" else x[:, 0]  # [B, D]
        return self.head(x)


def layer_id(name, depth):
    """MAE `util/lr_decay.py`: cls/pos/patch embedding -> 0, blocks.k -> k + 1, everything else (final norms,
    head, the shared relative position bias) -> depth + 1."""
    name = name.removeprefix("encoder.")
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model, weight_decay, layer_decay, no_decay=("encoder.cls_token", "encoder.pos_embed")):
    """AdamW groups with lr_scale = layer_decay^(depth + 1 - layer id); no weight decay on 1-D parameters and on
    cls/pos (timm's `no_weight_decay`)."""
    depth = len(model.encoder.blocks)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth)
        wd = 0.0 if p.ndim == 1 or name in no_decay else weight_decay
        group = groups.setdefault((lid, wd), {"params": [], "weight_decay": wd,
                                              "lr_scale": layer_decay ** (depth + 1 - lid)})
        group["params"].append(p)
    return list(groups.values())


@dataclass
class FinetuneRecipe:
    """One fine-tuning recipe. The defaults are MAE's ImageNet ViT-B recipe (FINETUNE.md); each method file holds
    its own values per data scale (its FINETUNE table) and `finetune_recipe` picks one. --finetune-epochs N runs N
    epochs with the warm-up keeping its share of the recipe's `epochs`."""
    epochs: int = 100  # the recipe's length (ViT-B 100, L/H 50)
    warmup_epochs: float = 5  # linear warm-up, in epochs of `epochs`
    blr: float = 5e-4  # lr = blr x global batch / lr_batch_div
    lr_batch_div: int = 256
    batch_size: typing.Optional[int] = None  # images per process per fine-tune step (None: the pre-training batch)
    min_lr: float = 1e-6  # floor of the cosine
    warmup_lr: float = 0.0  # first lr of the warm-up
    scale_floor: bool = False  # min_lr and warmup_lr scale with the batch like the lr (SimMIM)
    schedule: str = "mae"  # "mae": warm-up, then cosine over the rest, lr set before each step; "timm": SimMIM's
    #                        timm CosineLRScheduler: the cosine spans every step *including* the warm-up, and the lr
    #                        is updated after each optimizer step (so step i runs on the lr of step i - 1)
    layer_decay: float = 0.65
    drop_path: float = 0.1
    weight_decay: float = 0.05
    clip_grad: typing.Optional[float] = None  # global gradient-norm clip (SimMIM 5.0)
    crop_scale: tuple = (0.08, 1.0)  # RandomResizedCrop area range (timm default)
    rand_augment: int = 9  # RandAugment magnitude with 2 ops (0 = off)
    erasing: float = 0.25  # RandomErasing probability
    mixup: float = 0.8  # Beta(alpha, alpha) of mixup (0 = off)
    cutmix: float = 1.0  # Beta(alpha, alpha) of cutmix (0 = off)
    switch_prob: float = 0.5  # with both on: the chance a batch takes cutmix
    smoothing: float = 0.1  # label smoothing of the (mixed) soft targets


def finetune_scale(img_size):
    """Which recipe fits the images: by input size, not by dataset name, so a folder of 32-px images gets the
    small-image recipe and not ImageNet's."""
    return "small" if img_size <= 64 else "medium" if img_size <= 128 else "imagenet"


def recipe_values(table, img_size, model):
    """The values a method's FINETUNE table gives images of `img_size` and a `model`: table[scale], then table[model]
    (size-specific values, e.g. ViT-L's 50 epochs) when the run is at ImageNet scale."""
    scale = finetune_scale(img_size)
    return {**table.get(scale, {}), **(table.get(model, {}) if scale == "imagenet" else {})}


def finetune_recipe(table, cfg):
    """The recipe of a method's FINETUNE table for this run (its image size and model)."""
    return FinetuneRecipe(**recipe_values(table, cfg.img_size, cfg.model))


def finetune_lr(it, steps_per_epoch, epochs, lr, recipe, warmup_lr, min_lr):
    """lr of fine-tuning iteration `it` (0-based, over all epochs) for a run of `epochs` epochs.
    "mae" (MAE `util/lr_sched.py`, set before the step): warm-up from warmup_lr, then the half cosine over the
    remaining epochs to min_lr. "timm" (SimMIM: timm CosineLRScheduler(t_initial=all steps, warmup_t, warmup_lr_init,
    lr_min), `step_update(it)` *after* optimizer step it): f(t) = warm-up line for t < warmup steps, else the half
    cosine over t / all steps; step it runs on f(it - 1), step 0 on f(0) = warmup_lr."""
    warmup = recipe.warmup_epochs * epochs / recipe.epochs  # the recipe's share of warm-up
    if recipe.schedule == "mae":
        epoch = it / steps_per_epoch
        if epoch < warmup:
            return warmup_lr + (lr - warmup_lr) * epoch / warmup
        return cosine_lr(epoch, lr, min_lr, warmup, epochs)
    t, warmup_t = max(it - 1, 0), warmup * steps_per_epoch
    if t < warmup_t:
        return warmup_lr + (lr - warmup_lr) * t / warmup_t
    return cosine_lr(t, lr, min_lr, 0, epochs * steps_per_epoch)


def mix_batch(imgs, labels, num_classes, recipe, rng):
    """timm's Mixup in "batch" mode with label smoothing: one lambda for the batch, image i mixed with image
    B-1-i (the batch flipped). With both on, cutmix is chosen with p = switch_prob. Mixup: x = lam x + (1-lam) x',
    lam ~ Beta(mixup, mixup). Cutmix: lam ~ Beta(cutmix, cutmix), a box of side sqrt(1-lam) x H (x W) centred at a
    uniform pixel and clipped to the image is pasted from x', and lam becomes the area left (timm `correct_lam`).
    Targets: smoothed one-hots (1 - s + s/C on the label, s/C elsewhere) mixed with the same lam, so each row sums
    to 1. `rng`: a numpy Generator (seeded per step). Returns (images, soft targets [B, C])."""
    off = recipe.smoothing / num_classes
    y = torch.full((len(labels), num_classes), off, device=imgs.device)
    y.scatter_(1, labels.unsqueeze(1), 1.0 - recipe.smoothing + off)  # [B, C] smoothed one-hot
    if not (recipe.mixup or recipe.cutmix):
        return imgs, y
    use_cutmix = recipe.cutmix > 0 and (recipe.mixup == 0 or rng.random() < recipe.switch_prob)
    if use_cutmix:
        lam = rng.beta(recipe.cutmix, recipe.cutmix)
        H, W = imgs.shape[-2:]
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = rng.integers(H), rng.integers(W)
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        imgs = imgs.clone()
        imgs[:, :, y0:y1, x0:x1] = imgs.flip(0)[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        lam = rng.beta(recipe.mixup, recipe.mixup)
        imgs = imgs * lam + imgs.flip(0) * (1 - lam)
    return imgs, y * lam + y.flip(0) * (1 - lam)


def soft_target_cross_entropy(logits, targets):
    """timm's SoftTargetCrossEntropy: -sum_c target_c log softmax(logits)_c, averaged over the batch."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def finetune_step(model, optimizer, scaler, imgs, targets, clip_grad, autocast, accum_iter=1, update=True):
    """One fine-tuning micro-step: forward under autocast, scaled backward (a GradScaler, enabled for fp16) of the loss
    / accum_iter; at an update (the last micro-step of an accumulation) the optional clip on the unscaled gradients,
    the step (skipped by the scaler on inf/NaN) and zero_grad. Returns the loss."""
    with autocast:
        loss = soft_target_cross_entropy(model(imgs), targets)
    scaler.scale(loss / accum_iter).backward()
    if update:
        if clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return loss


class LinearProbe(Classifier):
    """MAE's linear probe: the frozen encoder's normalised cls token -> BatchNorm without affine (eps 1e-6) -> linear
    layer (trunc_normal std 0.01, as main_linprobe.py)."""

    def __init__(self, encoder, num_classes):
        super().__init__(encoder, num_classes, pool="cls")
        encoder.requires_grad_(False)
        linear = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(encoder.embed_dim, affine=False, eps=1e-6), linear)


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as MAE's util/lars.py: weight decay and the trust ratio only on >= 2-D parameters,
    then SGD momentum. For each such p: g = grad + wd p, g *= eta |p| / |g| (1 where either norm is 0)."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    one = torch.ones_like(p_norm)
                    g = g * torch.where((p_norm > 0) & (g_norm > 0), group["trust_coefficient"] * p_norm / g_norm, one)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(g)
                p.add_(state["mu"], alpha=-group["lr"])


def timm_names(model):
    """The classifier's state dict with timm's names: the encoder's keys without `encoder.`; the head and fc_norm as
    they are. Strict into timm's VisionTransformer (global_pool "avg" for mean pooling, "token" for cls) or Beit."""
    return {k.removeprefix("encoder."): v for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------- #
#                                                    config                                                          #
# ---------------------------------------------------------------------------------------------------------------- #
# main_linprobe.py: 90 epochs, 10 of warm-up, blr 0.1 (lr = blr x batch / 256), LARS without weight decay, batch
# 16384 (512 x 32 GPUs), RandomResizedCrop + flip only. Smaller images and batches: our choice, a milder crop and
# ImageNet's absolute lr (6.4) at batch 256, blr 6.4: LARS moves a weight by about lr x 0.001 of its norm per step,
# so blr 0.1 at a small batch barely trains the head in a short run (docs/RESULTS.md#fine-tuning).
LINEAR_PROBE = {
    "imagenet": dict(epochs=90, warmup_epochs=10, blr=0.1, batch_size=512, weight_decay=0.0, min_lr=0.0),
    "medium": dict(epochs=90, warmup_epochs=10, blr=6.4, batch_size=256, weight_decay=0.0, min_lr=0.0,
                   crop_scale=(0.2, 1.0)),
    "small": dict(epochs=20, warmup_epochs=2, blr=6.4, batch_size=256, weight_decay=0.0, min_lr=0.0,
                  crop_scale=(0.5, 1.0)),
}
PLAIN = dict(rand_augment=0, erasing=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, drop_path=0.0, layer_decay=1.0)


@dataclass
class Config(TrainConfig):
    init: str = ""  # the pre-trained encoder: a method's <out>/encoder.pth (or checkpoint.pth), or an official file
    linear_probe: bool = False  # MAE's linear probe: frozen encoder, BatchNorm + linear layer on the cls token, LARS
    random_init: bool = False  # the baseline: --init's architecture and recipe, its weights as initialised, not loaded
    pool: str = "mean"  # "mean" (patch tokens, then a LayerNorm) or "cls" (the normalised cls token)
    recipe: str = ""  # the FINETUNE table of this method instead of --init's (one recipe for several encoders)
    layer_decay: float = 0.65  # layer-wise lr decay: block k of L trains at lr x layer_decay^(L + 1 - k)
    drop_path: float = 0.1  # stochastic depth, linear over the blocks up to this rate
    rand_augment: int = 9  # RandAugment magnitude, 2 ops per image (0 = off)
    erasing: float = 0.25  # random erasing probability
    mixup: float = 0.8  # mixup Beta(alpha, alpha) (0 = off)
    cutmix: float = 1.0  # cutmix Beta(alpha, alpha) (0 = off)
    smoothing: float = 0.1  # label smoothing
    epochs: int = 100  # fine-tuning epochs
    warmup_epochs: float = 5  # linear warm-up, in epochs
    blr: float = 5e-4  # base learning rate: lr = blr x global batch / 256 (SiT's recipe: / 512)
    min_lr: float = 1e-6  # floor of the cosine
    lr_batch_div: int = 256  # the global batch blr is quoted for
    # pre-training flags
    hidden = ("finetune_epochs", "finetune_baseline", "eval_every", "eval_images", "resident", "decode")

    def check(self):
        super().check()
        if self.pool not in ("mean", "cls"):
            raise UserError(f"--pool {self.pool!r}: choose mean or cls")


def recipe_preset(source, data, img_size, linear_probe, recipe=""):
    """The flags the recipe sets for this encoder and data: the FINETUNE table of the encoder's method (or of
    `recipe`; LINEAR_PROBE for the linear probe) for the input size and model, as Config fields; the model and
    patch size of the encoder; its image size unless the dataset has its own."""
    size = img_size or DATASETS[data].native_size or source.pretrain["img_size"]
    model = source.pretrain["model"]
    method = recipe or source.method
    if linear_probe:
        values = {**PLAIN, **LINEAR_PROBE[finetune_scale(size)]}
    else:
        table = importlib.import_module(method).FINETUNE if method in METHODS else {}
        values = recipe_values(table, size, model)
    names = {f.name for f in fields(Config)}
    preset = {k: v for k, v in values.items() if k in names and v is not None}
    preset.update(model=model, patch_size=source.pretrain["patch_size"])
    if not DATASETS[data].native_size:
        preset["img_size"] = source.pretrain["img_size"]
    return preset, values


def parse(argv=None):
    """Command line -> (config, the preset applied, recipe, source). The recipe's values are a preset that flags
    override; the data is the pre-training's unless --data says."""
    given = given_settings(Config, argv, __doc__.split("\n\n")[0])
    if not given.get("init"):
        raise UserError("--init is required: the encoder.pth of a pre-training run, or an official checkpoint")
    if given.get("recipe") and given["recipe"] not in METHODS:
        raise UserError(f"--recipe {given['recipe']!r}: choose from {', '.join(METHODS)}")
    source = read_init(given["init"])
    given.setdefault("data", source.pretrain.get("data", Config.data))
    if "data_path" not in given and given["data"] == source.pretrain.get("data"):
        given["data_path"] = source.pretrain.get("data_path", "")
    preset, values = recipe_preset(source, given["data"], given.get("img_size"), given.get("linear_probe", False),
                                   given.get("recipe", ""))
    cfg, applied = resolve_config(Config, given, {DATASETS[given["data"]].scale: preset})
    recipe_fields = {f.name for f in fields(FinetuneRecipe)}
    recipe = FinetuneRecipe(**{**{k: v for k, v in values.items() if k in recipe_fields},
                               **{k: getattr(cfg, k) for k in recipe_fields if hasattr(cfg, k)}})
    return cfg, applied, recipe, source


# ---------------------------------------------------------------------------------------------------------------- #
#                                                     train                                                          #
# ---------------------------------------------------------------------------------------------------------------- #
@torch.no_grad()
def validate(model, loader, run):
    """Top-1 and top-5 (%) on the val split, sharded over the processes; the model's mode is put back."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, device=run.device, dtype=torch.float64)  # [top-1 hits, top-5 hits, images]
    for imgs, y in progress(shard(loader, run.dist.rank, run.dist.world_size), run.is_main, desc="validate"):
        with run.autocast():
            logits = model(imgs.to(run.device, non_blocking=True))
        y = y.to(run.device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # [B, 5]
        hits = top == y[:, None]  # [B, 5]
        counts += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(y), device=run.device)])
    if run.dist.world_size > 1:
        torch_dist.all_reduce(counts)
    model.train(was_training)
    top1, top5, n = counts.tolist()
    return round(100 * top1 / max(n, 1), 2), round(100 * top5 / max(n, 1), 2)


def build_optimizer(model, cfg, recipe):
    """AdamW(0.9, 0.999) with layer-wise lr decay (the fine-tuning of every method here); LARS on the head alone for
    the linear probe."""
    if cfg.linear_probe:
        return LARS(model.head.parameters(), lr=cfg.lr, weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(layer_decay_groups(model, recipe.weight_decay, recipe.layer_decay), lr=cfg.lr,
                             betas=(0.9, 0.999), fused=True)


def main(argv=None):
    cfg, preset, recipe, source = parse(argv)
    run = Run(cfg, "finetune", preset)
    transform = finetune_transform(cfg.img_size, recipe.crop_scale, recipe.rand_augment, recipe.erasing)
    train_set = run_dataset(cfg, "train", transform)
    val_loader = build_eval_loader(cfg, "val", run.dist)
    if train_set is None or val_loader is None:
        raise UserError(f"--data {cfg.data}: fine-tuning needs a labelled train split and a val split")
    data = LoaderData(train_set, cfg.batch_size, cfg.seed, run.dist.rank, run.dist.world_size, cfg.workers,
                      run.device)
    if data.steps_per_epoch == 0:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} training images"
                        + (f" split over {run.dist.world_size} processes" if run.dist.world_size > 1 else ""))
    encoder, dropped = build_encoder(source, cfg.img_size, cfg.random_init)
    if dropped:  # decoders, mask tokens, heads: what only pre-training used
        run.log(f"--init: {len(dropped)} keys not used by the encoder: " + ", ".join(dropped[:8])
                + (", ..." if len(dropped) > 8 else ""))
    encoder.set_drop_path(recipe.drop_path)
    num_classes = train_set.num_classes
    model = (LinearProbe(encoder, num_classes) if cfg.linear_probe else
             Classifier(encoder.requires_grad_(True), num_classes, cfg.pool)).to(run.device)
    cfg.lr = cfg.lr if cfg.lr is not None else cfg.blr * run.global_batch / cfg.lr_batch_div
    floor = run.global_batch / recipe.lr_batch_div if recipe.scale_floor else 1.0  # SimMIM scales the floors too
    optimizer = build_optimizer(model, cfg, recipe)
    start_epoch, start_step = run.start(model, optimizer)
    mode, name = "linear probe" if cfg.linear_probe else "fine-tune", "random-init" if cfg.random_init else "pretrained"
    run.log(f"{mode} ({name}): {cfg.epochs} epochs of {data.steps_per_epoch} steps, lr {cfg.lr:.3g}, from "
            f"{source.path}{' (its architecture, randomly initialised)' if cfg.random_init else ''} ({source.method} "
            f"{source.pretrain['model']}, {source.layout} layout), {count_params(model):,} trainable "
            f"parameters, {num_classes} classes, recipe " + ", ".join(f"{k}={v}" for k, v in asdict(recipe).items()))
    best = best_so_far(run.out)
    t0 = time.perf_counter()

    if not cfg.eval_only:
        train_model = run.wrap(model)
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            run.start_epoch(epoch, start_step, data.steps_per_epoch)
            for step, (imgs, y) in enumerate(data.epoch(epoch, start_step), start_step):
                it = epoch * data.steps_per_epoch + step
                first = it - step % cfg.accum_iter  # the update's first micro-step: its lr is set there
                lr = set_lr(optimizer, finetune_lr(first, data.steps_per_epoch, cfg.epochs, cfg.lr, recipe,
                                                   recipe.warmup_lr * floor, recipe.min_lr * floor))
                # mixup / cutmix and smoothed targets, drawn from (seed, rank, step): the same after a resume
                imgs, targets = mix_batch(imgs, y, num_classes, recipe,
                                          np.random.default_rng(mix_seed(cfg.seed, run.dist.rank, it)))
                update = (step + 1) % cfg.accum_iter == 0  # the last micro-step of an accumulation updates
                set_grad_sync(train_model, update)
                loss = finetune_step(train_model, optimizer, run.scaler, imgs, targets, recipe.clip_grad,
                                     run.autocast(), cfg.accum_iter, update)
                run.log_step(epoch, step, loss, lr)
                if run.should_stop(step):  # at an update: --max-steps reached, or a stop signal
                    run.save_checkpoint(epoch, step + 1)
                    run.exit_if_preempted()
                    break
                if run.should_checkpoint(step):
                    run.save_checkpoint(epoch, step + 1)
            start_step = 0
            top1, top5 = validate(model, val_loader, run)
            if not run.done:  # (--max-steps ends mid-epoch: no epoch summary, but its validation)
                run.log_epoch(epoch, top1=top1, top5=top5)
                run.save_checkpoint(epoch + 1, 0)
            else:
                run.write_log(kind="eval", epoch=epoch, top1=top1, top5=top5)
            run.log(f"{mode} {name} epoch {epoch}: loss {run.last_loss:.4f}, val top-1 {top1}, top-5 {top5}"
                    + (" (best)" if top1 > best["top1"] else ""))
            run.bar_extra = {"val_top1": str(top1), "val_top5": str(top5)}  # the next epoch's progress bar shows them
            record = {"model": model.state_dict(), "epoch": epoch, "top1": top1, "top5": top5}
            run.save_file(record, "last.pth")
            if top1 > best["top1"]:
                best = {"epoch": epoch, "top1": top1, "top5": top5}
                run.save_file(record, "best.pth")
            if run.done:
                break
        run.finish_training(time.perf_counter() - t0, mode)

    if cfg.eval_only or start_epoch == cfg.epochs:  # nothing trained here: validate what was loaded
        top1, top5 = validate(model, val_loader, run)
    run.save_file(timm_names(model), "model.pth")
    results = {"init": source.path, "random_init": cfg.random_init, "method": source.method, "model": cfg.model,
               "mode": "linear probe" if cfg.linear_probe else "fine-tune", "top1": top1, "top5": top5,
               "best": best, "global_step": run.global_step, "recipe": asdict(recipe)}
    run.write_json("results.json", results)
    run.log(f"{mode} {name}: top-1 {top1}")
    run.log(f"top-5 {top5}; best top-1 {best['top1']} after epoch {best['epoch']}; wrote {run.out}/model.pth and "
            f"results.json")
    return results


def after_pretraining(run):
    """A method file's --finetune-epochs N (and --finetune-baseline): this program on the encoder.pth the run just
    wrote, into <out>/finetune (and <out>/finetune-random-init), N epochs of the method's recipe for its data with the
    warm-up keeping its share, the run's data, size, seed, precision and processes. Returns results.json's entry."""
    cfg = run.cfg
    train_set = run_dataset(cfg, "train")
    if train_set is None or run_dataset(cfg, "val") is None:
        run.log("fine-tuning skipped: no labelled train/ and val/ split")
        return None
    recipe = finetune_recipe(importlib.import_module(run.method).FINETUNE, cfg)
    labelled = len(train_set) // run.dist.world_size
    batch = recipe.batch_size or cfg.batch_size
    if batch > labelled:  # (a handful of images)
        batch = max(1, min(cfg.batch_size, labelled))
    argv = ["--init", run.out / "encoder.pth", "--epochs", cfg.finetune_epochs, "--batch-size", batch,
            "--warmup-epochs", recipe.warmup_epochs * cfg.finetune_epochs / recipe.epochs, "--data", cfg.data,
            "--data-path", cfg.data_path, "--img-size", cfg.img_size, "--subset", cfg.subset, "--seed", cfg.seed,
            "--workers", cfg.workers, "--amp", cfg.amp, "--log-every", cfg.log_every, "--resume", "auto",
            "--compile" if cfg.compile else "--no-compile"] + (["--device", cfg.device] if cfg.device else [])
    tuned = {"epochs": cfg.finetune_epochs}
    for name, extra in (("pretrained", []), ("random_init", ["--random-init"]))[:1 + cfg.finetune_baseline]:
        out = run.out / ("finetune" if name == "pretrained" else "finetune-random-init")
        results = main([str(a) for a in argv + ["--out", out] + extra])
        tuned.update({name: results["top1"], "recipe": results["recipe"]})
    run.log(f"fine-tune top-1 after {cfg.finetune_epochs} epochs: {tuned['pretrained']}"
            + (f" (random init: {tuned['random_init']})" if "random_init" in tuned else ""))
    return tuned


def best_so_far(out):
    """The best epoch of this run so far (its best.pth, after a resume), or none yet."""
    path = Path(out) / "best.pth"
    if path.is_file():
        saved = load_file(path)
        return {k: saved[k] for k in ("epoch", "top1", "top5")}
    return {"epoch": None, "top1": -math.inf, "top5": -math.inf}


if __name__ == "__main__":
    cli(main)
