"""Vision Transformer building blocks shared by every method.

Parameter names follow timm (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.{i}.norm1`, `.attn.qkv`,
`.attn.proj`, `.norm2`, `.mlp.fc1`, `.mlp.fc2`, `norm`; BEiT-style `attn.q_bias`, `attn.v_bias`, `gamma_1`,
`gamma_2`, `rel_pos_bias.relative_position_bias_table`) so an encoder's state dict loads into
`timm.models.vision_transformer.VisionTransformer` or `timm.models.beit.Beit` of the same size.

Modules here keep PyTorch's default initialisation: each method applies the init of its official code (BEiT and
SimMIM share theirs: `init_beit_style`).
Shapes: B batch, N patch tokens, D width, H heads, p patch size.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# name -> (width D, depth, heads, default patch size). The paper sizes ("vit_huge" uses patch 14 as in MAE), plus
# two that are not paper models: "vit_micro" (ViT-Tiny's width at half its depth) for the CPU demo, and "vit_nano"
# for tests and smoke runs.
VIT_SIZES = {
    "vit_nano": (64, 2, 2, 16),
    "vit_micro": (192, 6, 3, 16),
    "vit_tiny": (192, 12, 3, 16),
    "vit_small": (384, 12, 6, 16),
    "vit_base": (768, 12, 12, 16),
    "vit_large": (1024, 24, 16, 16),
    "vit_huge": (1280, 32, 16, 14),
}
LN_EPS = 1e-6  # every official method builds its norms with partial(nn.LayerNorm, eps=1e-6)


def layer_norm(dim):
    return nn.LayerNorm(dim, eps=LN_EPS)


# ---------------------------------------------------------------------------------------------------------------- #
#                                                position encodings                                                 #
# ---------------------------------------------------------------------------------------------------------------- #
def sincos_pos_embed_2d(dim, grid_h, grid_w, cls_token=False):
    """Fixed 2D sin-cos position embedding, channel layout exactly as the official MAE (`util/pos_embed.py`).

    For the token at row i, column j (flattened index i*grid_w + j), with w_k = 10000^(-k/(D/4)), k < D/4:
      [0, D/4) sin(j w)  [D/4, D/2) cos(j w)  [D/2, 3D/4) sin(i w)  [3D/4, D) cos(i w).
    The first half encodes the *column* (the official variable is called `emb_h`, but meshgrid puts w first).
    Returns [N, D] float32, or [1 + N, D] with a zero row for the cls token. Computed in float64 like numpy does.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # [D/4]
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")  # [h, w] each
    cols = cols.reshape(-1, 1) * omega  # [N, 1] * [D/4] -> [N, D/4]
    rows = rows.reshape(-1, 1) * omega  # [N, D/4]
    emb = torch.cat([cols.sin(), cols.cos(), rows.sin(), rows.cos()], dim=1)  # [N, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)  # [1 + N, D]
    return emb.float()


def relative_position_index(grid_h, grid_w):
    """BEiT/SimMIM index into the relative position bias table, [1 + N, 1 + N] (cls first).

    Patch pair (a, b) with dr = row_a - row_b, dc = col_a - col_b uses entry (dr + h - 1) * (2w - 1) + (dc + w - 1);
    the last three entries of the table are cls->token (row 0), token->cls (column 0) and cls->cls ([0, 0]).
    """
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")  # [h, w] each
    coords = torch.stack([rows.flatten(), cols.flatten()])  # [2, N]
    rel = coords[:, :, None] - coords[:, None, :]  # [2, N, N], entry (a, b) = coord_a - coord_b
    index_pp = (rel[0] + grid_h - 1) * (2 * grid_w - 1) + (rel[1] + grid_w - 1)  # [N, N]
    num_pair_entries = (2 * grid_h - 1) * (2 * grid_w - 1)
    n = grid_h * grid_w
    index = torch.empty(n + 1, n + 1, dtype=torch.long)
    index[1:, 1:] = index_pp
    index[0, :] = num_pair_entries  # cls attends to a token
    index[:, 0] = num_pair_entries + 1  # a token attends to cls
    index[0, 0] = num_pair_entries + 2  # cls attends to cls
    return index


class RelativePositionBias(nn.Module):
    """A learned bias per (relative offset, head), added to the attention logits; one table shared by all blocks
    in SimMIM's pre-training ViT (`USE_SHARED_RPB`). Zero-initialised as in the official code."""

    def __init__(self, grid_size, num_heads):
        super().__init__()
        grid_h, grid_w = grid_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid_h - 1) * (2 * grid_w - 1) + 3, num_heads))
        # non-persistent like timm's, so the state dict has only the table
        self.register_buffer("relative_position_index", relative_position_index(grid_h, grid_w), persistent=False)

    def forward(self):
        return gather_bias(self.relative_position_bias_table, self.relative_position_index)


def gather_bias(table, index):
    """A relative position bias table [entries, H] read at index [1+N, 1+N] -> the attention bias [H, 1+N, 1+N]."""
    n = index.shape[0]
    bias = table[index.flatten()]  # [(1+N)^2, H]
    return bias.view(n, n, -1).permute(2, 0, 1).contiguous()  # [H, 1+N, 1+N]


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      layers                                                       #
# ---------------------------------------------------------------------------------------------------------------- #
class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D-dim tokens, row-major order (row outer, column inner)."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else img_size
        if img_h % patch_size or img_w % patch_size:
            raise ValueError(f"image size {img_h}x{img_w} is not divisible by the patch size {patch_size}")
        self.img_size = (img_h, img_w)
        self.patch_size = patch_size
        self.grid_size = (img_h // patch_size, img_w // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs):
        if tuple(imgs.shape[-2:]) != self.img_size:
            raise ValueError(f"input is {tuple(imgs.shape[-2:])}, the model was built for {self.img_size}")
        if torch.is_autocast_enabled(imgs.device.type):
            return self.forward_as_matmul(imgs)
        x = self.proj(imgs)  # [B, C, H, W] -> [B, D, H/p, W/p]
        return x.flatten(2).transpose(1, 2)  # -> [B, N, D]

    def forward_as_matmul(self, imgs):
        """The same projection as one matmul over the flattened patches, used under autocast: its backward is one
        [D, B*N] x [B*N, C*p*p] matmul for the weight gradient, cheaper than the bf16 strided convolution's backward
        (docs/PERFORMANCE.md). fp32 keeps the convolution, which the official code runs (the matmul sums each patch
        in another order, so the embeddings are close but not bitwise the same)."""
        B, C, H, W = imgs.shape
        p, (h, w) = self.patch_size, self.grid_size
        x = imgs.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5)  # [B, h, w, C, p, p]
        x = x.reshape(B, h * w, C * p * p)  # [B, N, C*p*p], each patch in the conv weight's (c, i, j) order
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)  # [D, C, p, p] -> [D, C*p*p]; -> [B, N, D]


class Attention(nn.Module):
    """Multi-head self-attention on `F.scaled_dot_product_attention`.

    qkv_bias: an ordinary bias on q, k and v (timm/MAE). qv_bias: BEiT/SimMIM style, learned q and v biases and
    none on k (the k bias would cancel in the softmax anyway). attn_bias: an additive [H, N, N] bias (relative
    position). causal: autoregressive mask (iGPT).
    """

    def __init__(self, dim, num_heads, qkv_bias=True, qv_bias=False, causal=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias and not qv_bias)
        if qv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = None  # a block's own table (own_rel_pos_bias), else the one handed in

    def own_rel_pos_bias(self, table, index):
        """Take `table` [entries, H] as this block's own relative position bias (timm Beit's per-block names)."""
        self.relative_position_bias_table = nn.Parameter(table)
        self.register_buffer("relative_position_index", index, persistent=False)

    def forward(self, x, attn_bias=None):
        B, N, D = x.shape
        if self.relative_position_bias_table is not None:
            attn_bias = gather_bias(self.relative_position_bias_table, self.relative_position_index)  # [H, N, N]
        bias = self.qkv.bias
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])  # [3D], k gets no bias
        qkv = F.linear(x, self.qkv.weight, bias)  # [B, N, 3D]
        q, k, v = qkv.view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # 3 x [B, H, N, D/H]
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)  # SDPA wants the mask in the query dtype (bf16 under autocast)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            x = explicit_attention(q, k, v, attn_bias, self.causal)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, is_causal=self.causal)  # [B, H, N, D/H]
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # [B, H, N, D/H] -> [B, N, D]


def explicit_attention(q, k, v, attn_bias=None, causal=False):
    """softmax(q k^T / sqrt(d) + bias) v, spelled out: what SDPA computes. Used for bf16 on the CPU, where
    PyTorch's fused CPU kernels run slower than this (forward + backward at ViT sizes: docs/PERFORMANCE.md).
    q, k, v: [B, H, N, d] -> [B, H, N, d]."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, N, N]
    if attn_bias is not None:
        attn = attn + attn_bias
    if causal:
        n = attn.shape[-1]
        attn = attn.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return attn.softmax(dim=-1) @ v


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()  # exact erf GELU, as timm and the official code
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability `drop_prob` (training only)."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(keep)  # [B, 1, 1]
        return x * mask / keep

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """Pre-norm transformer block: x += drop_path(g1 * attn(norm1 x)); x += drop_path(g2 * mlp(norm2 x)).

    init_values: layer scale; when given, g1 and g2 are learned per-channel gains initialised to that value
    (BEiT/SimMIM). Otherwise there is no gain (MAE).
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, qv_bias=False, init_values=None,
                 drop_path=0.0, causal=False):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qv_bias=qv_bias, causal=causal)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        if init_values is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x, attn_bias=None):
        y = self.attn(self.norm1(x), attn_bias)
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)


def run_block(block, *args, grad_checkpointing=False):
    """block(*args). With grad_checkpointing, while the block trains with gradients: under activation checkpointing,
    which keeps only the block's inputs for backward and runs its forward again there (with the RNG state of the
    first run, so drop path drops the same samples): the same loss and gradients for a third more compute, and the
    activations of one block alive at a time instead of all of them."""
    if grad_checkpointing and block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def set_grad_checkpointing(model, enabled):
    """Turn activation checkpointing on or off in every module of `model` that runs a stack of blocks (those with a
    `grad_checkpointing` attribute: encoders, decoders, extra heads); returns `model`."""
    for module in model.modules():
        if hasattr(module, "grad_checkpointing"):
            module.grad_checkpointing = enabled
    return model


# ---------------------------------------------------------------------------------------------------------------- #
#                                                     encoder                                                       #
# ---------------------------------------------------------------------------------------------------------------- #
class VisionTransformer(nn.Module):
    """The ViT encoder every method pre-trains (no classification head).

    pos_embed: "sincos" (fixed 2D sin-cos table with a zero cls row, MAE), "learned", or None (SimMIM/BEiT
    pre-training uses only the relative position bias). rel_pos_bias: one shared RelativePositionBias.
    The steps are separate methods so that a method can insert its masking between them:
      embed(imgs) -> [B, N, D]  ->  prepend_cls -> [B, 1+N', D]  ->  run_blocks -> [B, 1+N', D]  ->  norm
    """

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 qkv_bias=True, qv_bias=False, init_values=None, drop_path_rate=0.0, pos_embed="sincos",
                 rel_pos_bias=False, causal=False, in_chans=3):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid_h, grid_w = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if pos_embed == "sincos":  # fixed: stored as a frozen parameter so it travels in the state dict (timm name)
            table = sincos_pos_embed_2d(embed_dim, grid_h, grid_w, cls_token=True)
            self.pos_embed = nn.Parameter(table.unsqueeze(0), requires_grad=False)  # [1, 1+N, D]
        elif pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid_h * grid_w, embed_dim))
        elif pos_embed is None:
            self.pos_embed = None
        else:
            raise ValueError(f"unknown pos_embed {pos_embed!r}")
        self.rel_pos_bias = RelativePositionBias((grid_h, grid_w), num_heads) if rel_pos_bias else None
        rates = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qv_bias, init_values, rates[i], causal)
            for i in range(depth))
        self.norm = layer_norm(embed_dim)
        self.grad_checkpointing = False  # run_blocks under activation checkpointing (set_grad_checkpointing)

    def embed(self, imgs):
        """[B, C, H, W] -> patch tokens with absolute position added, [B, N, D] (no cls yet)."""
        x = self.patch_embed(imgs)
        if self.pos_embed is not None:
            x = x + self.pos_embed[:, 1:]
        return x

    def prepend_cls(self, x):
        """[B, N', D] -> [B, 1+N', D]; the cls position embedding (zero for sin-cos) is added to the cls token."""
        cls = self.cls_token if self.pos_embed is None else self.cls_token + self.pos_embed[:, :1]
        return torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)

    def run_blocks(self, x):
        """Transformer blocks on [B, 1+N', D] tokens (before the final norm). The shared relative position bias
        is computed once and handed to every block; it needs the full token set, so it is unused when tokens
        have been dropped (which no method with a relative bias does)."""
        attn_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None  # [H, 1+N, 1+N]
        for block in self.blocks:
            x = run_block(block, x, attn_bias, grad_checkpointing=self.grad_checkpointing)
        return x

    def forward_features(self, imgs):
        """All patches, no masking: [B, C, H, W] -> normalised tokens [B, 1+N, D] (cls first), as timm's
        `forward_features`."""
        return self.norm(self.run_blocks(self.prepend_cls(self.embed(imgs))))

    def split_rel_pos_bias(self):
        """BEiT's fine-tuning (and SimMIM's): the shared relative position bias becomes one table per block, each
        starting as a copy of the shared one; returns self."""
        shared = self.rel_pos_bias
        for block in self.blocks:
            block.attn.own_rel_pos_bias(shared.relative_position_bias_table.detach().clone(),
                                        shared.relative_position_index)
        self.rel_pos_bias = None
        return self

    def set_drop_path(self, rate):
        """Stochastic depth linspace(0, rate, depth) over the blocks (fine-tuning sets it after pre-training)."""
        for r, block in zip(drop_path_rates(rate, len(self.blocks)), self.blocks):
            block.drop_path.drop_prob = r


def trunc_normal_sigma(tensor, std=0.02):
    """N(0, std) truncated at +-1 std, the pre-training init of the BEiT-style ViT. official (BEiT
    `modeling_pretrain.trunc_normal_`, SimMIM `VisionTransformerForSimMIM._trunc_normal_`): timm's trunc_normal_ with
    a=-std, b=std, which the base ViT's init calls too, so every pre-training init is truncated at +-1 sigma (the
    resulting standard deviation is 0.54 std). Fine-tuning models use timm's +-2 (absolute), i.e. no truncation."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-std, b=std)


def init_beit_style(encoder, std=0.02):
    """The pre-training init that BEiT and SimMIM share (official `VisionTransformer.__init__` of both, in this
    order): the cls token, then every Linear and Conv2d (weights trunc_normal_sigma(std), biases 0) and LayerNorm
    (1 / 0), then `fix_init_weight`: attn.proj and mlp.fc2 of block l = 1..L divided by sqrt(2 l), which keeps the
    residual stream's variance from growing with depth. q/v biases (0), layer-scale gains and the shared relative
    position table (0) keep their construction values. A method initialises its own extra pieces (mask token,
    heads) after this."""
    trunc_normal_sigma(encoder.cls_token, std)
    for m in encoder.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_sigma(m.weight, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    rescale_residual_branches(encoder.blocks)


@torch.no_grad()
def rescale_residual_branches(blocks, first=1):
    """BEiT's `fix_init_weight`: attn.proj and mlp.fc2 of block l = first, first + 1, ... divided by sqrt(2 l)."""
    for layer, block in enumerate(blocks, start=first):
        block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
        block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))


def drop_path_rates(rate, depth):
    """Stochastic depth grows linearly with depth: linspace(0, rate, depth) (plain floats: works on meta too)."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


def vit_kwargs(model, patch_size=None):
    """Size preset -> VisionTransformer keyword arguments (D, depth, heads, patch size)."""
    if model not in VIT_SIZES:
        raise KeyError(model)
    dim, depth, heads, default_patch = VIT_SIZES[model]
    return dict(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch_size or default_patch)


def count_params(module, trainable=True):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)

