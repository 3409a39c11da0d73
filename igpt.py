"""iGPT: Generative Pretraining from Pixels (Chen, Radford, Child, Wu, Jun, Luan, Sutskever, 2020), ICML 2020.

Treat an image as a sequence of pixels and train a GPT-2-style transformer on it. Each pixel is replaced by the
index of its nearest colour in a k-means palette (k = 512 "9-bit" colours fitted on RGB values in [-1, 1]), the
n_px x n_px tokens are read in raster order, and the decoder-only transformer predicts every token from the ones
before it (the input is shifted right by a learned start token), with the plain next-token cross-entropy in nats per
token. `--objective bert` instead zeroes the embedding of 15 % of the tokens, drops the causal mask and predicts the
hidden tokens. Nothing is masked in the image itself: the "masked image model" here is the causal mask (or the BERT
mask) over pixels. Representations are read out of *every* layer, mean-pooled over positions after a normalisation,
and probed linearly: the best layer sits in the middle of the network (paper §4.2, Fig. 3), not at the end.

Run:     python igpt.py                                   # offline demo: palette + training + completions + probe
         python igpt.py --data fashion-mnist --data-path /usr/share/datasets/fashion-mnist   # the small preset
         python igpt.py --data imagenet --data-path /data/imagenet --model igpt_s       # 224 crops -> 32 x 32 tokens
         python igpt.py --data imagenet ... --palette kmeans_centers.npy                # the official palette
         torchrun --nproc_per_node 8 igpt.py --data imagenet --data-path /data/imagenet --model igpt_m

Deviations from the official code:
  - the palette is k-means++ then Lloyd in torch, on at most 1 M pixels of --palette-images images (paper: unpublished)
  - images are resized with antialiased bilinear
  - the ImageNet crop (shorter side 256-384, random 224) is approximated by a square RandomResizedCrop of area 0.34-0.77
  - q/k/v are one fused matrix (same function)
  - BERT masks come from a generator seeded by (seed, rank, step), and the evaluation's BERT mask is seeded
  - the probe is common/'s SGD linear probe on BatchNorm-ed features (paper: L-BFGS logistic regression)
  - the best layer is picked on the val split it is reported on
  - fine-tuning runs a fixed number of epochs with random flips (paper: early stopping)
  - sampling draws by inverse CDF with a KV cache (official: no cache)
  - the default lr (blr 1e-3 at batch 128) is not from Appendix A, which we could not read
  - the demo/small presets are ours
Results: docs/RESULTS.md#igpt
"""
import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset

from common import UserError
from common.data import (IMAGENET_MEAN, IMAGENET_STD, build_eval_loader, build_train_data, eval_transform,
                         preview_images, run_dataset, seeded_rng)
from common.evaluation import (STOP_MONITORS, eval_image_caps, gather_rows, knn_accuracy, linear_probe,
                               save_image_grid, shard, stop_action, stop_agreed, stop_hook, stop_requested,
                               write_results)
from common.training import (Run, TrainConfig, barrier, cli, cosine_lr, load_file, param_groups, parse_config,
                             progress, scaled_lr, set_grad_sync, set_lr)
from common.vit import VIT_SIZES, count_params, run_block, set_grad_checkpointing


# ---------------------------------------------------------------------------------------------------------------- #
#                                          colour palette and tokenisation                                           #
# ---------------------------------------------------------------------------------------------------------------- #
def to_unit_range(imgs, res):
    """ImageNet-normalised images [B, 3, H, W] -> RGB in [-1, 1] at the model resolution [B, 3, res, res].
    Resized with antialiased bilinear (as PIL's resize in the Hugging Face image processor); paper: "downsample"."""
    # [0, 1], channel by channel with the constants as Python numbers (no constant tensor copied to the device)
    x = torch.cat([imgs[:, c:c + 1].float() * s + m for c, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD))],
                  dim=1)  # [B, 3, H, W]
    if x.shape[-2:] != (res, res):
        x = F.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
    return (x * 2 - 1).clamp(-1, 1)  # official: RGB / 127.5 - 1


def quantize(x, palette):
    """Nearest palette colour of every pixel (official `color_quantize`: argmin of the squared distance).
    x: [B, 3, H, W] in [-1, 1], palette [K, 3] -> tokens [B, H*W] in raster order (row-major: pixel (i, j) is
    token i*W + j). Always fp32: under bf16 autocast the distances would tie and pick wrong colours."""
    B, C, H, W = x.shape
    with torch.autocast(x.device.type, enabled=False):
        px = x.float().permute(0, 2, 3, 1).reshape(B, H * W, C)  # [B, 3, H, W] -> [B, H*W, 3]
        pal = palette.float()
        # |p - c|^2 = |p|^2 - 2 p.c + |c|^2; |p|^2 is the same for every c, so it does not change the argmin
        dist = pal.square().sum(-1) - 2 * px @ pal.T  # [B, H*W, K]
        return dist.argmin(-1)  # [B, H*W]


def dequantize(tokens, palette, res):
    """tokens [B, res*res] -> RGB in [0, 1], [B, 3, res, res] (for viewing; official: rint(127.5 (c + 1)))."""
    B = tokens.shape[0]
    rgb = palette.float()[tokens]  # [B, N, 3]
    return ((rgb.view(B, res, res, 3).permute(0, 3, 1, 2) + 1) / 2).clamp(0, 1)


@torch.no_grad()
def kmeans(points, k, iters=50, seed=0, chunk=1 << 18):
    """Batched Lloyd's k-means in torch, k-means++ initialisation (as scikit-learn's default).
    points [P, 3] float -> centres [k, 3], sorted by luminance so that token ids run from dark to light.
    Deterministic for a given seed; stops early when no assignment changes."""
    g = torch.Generator(device=points.device).manual_seed(seed)
    P = points.shape[0]
    if P < k:
        raise UserError(f"the palette needs at least {k} pixels, got {P} (lower --palette-size)")
    # k-means++: each new centre is drawn with probability proportional to the squared distance to the nearest one
    centres = points[torch.randint(P, (1,), generator=g, device=points.device)]  # [1, 3]
    nearest = (points - centres[0]).square().sum(-1)  # [P]
    for _ in range(1, k):
        i = torch.multinomial(nearest + 1e-12, 1, generator=g)  # [1]
        centres = torch.cat([centres, points[i]])
        nearest = torch.minimum(nearest, (points - points[i]).square().sum(-1))
    assign = torch.full((P,), -1, dtype=torch.long, device=points.device)
    for _ in range(iters):
        c2 = centres.square().sum(-1)  # [k]
        new = torch.cat([(c2 - 2 * p @ centres.T).argmin(-1) for p in points.split(chunk)])  # [P]: nearest centre
        if torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centres).index_add_(0, assign, points)  # [k, 3]
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)  # [k, 1]
        empty = counts.squeeze(1) == 0
        centres = torch.where(empty.unsqueeze(1), centres, sums / counts.clamp(min=1))
        if empty.any():  # an empty cluster restarts at a random point (rare with k-means++ initialisation)
            centres[empty] = points[torch.randint(P, (int(empty.sum()),), generator=g, device=points.device)]
    luminance = centres @ torch.tensor([0.299, 0.587, 0.114], device=centres.device)
    return centres[luminance.argsort()]


def fit_palette(cfg, run):
    """k-means palette on pixels of --palette-images training images (seeded choice), at the model resolution,
    with the evaluation transform (no augmentation). Every rank computes it; rank 0's is broadcast."""
    t = time.perf_counter()
    ds = run_dataset(cfg, "pretrain", eval_transform(cfg.img_size))
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(len(ds), generator=g)[: cfg.palette_images].tolist()
    pixels = []
    for start in range(0, len(idx), 256):
        imgs = torch.stack([ds[i][0] for i in idx[start: start + 256]])  # [b, 3, H, W], normalised
        x = to_unit_range(imgs, cfg.res)  # [b, 3, res, res] in [-1, 1]
        pixels.append(x.permute(0, 2, 3, 1).reshape(-1, 3))  # [b*res*res, 3]
    pixels = torch.cat(pixels)
    if len(pixels) > cfg.palette_pixels:
        pixels = pixels[torch.randperm(len(pixels), generator=g)[: cfg.palette_pixels]]
    palette = kmeans(pixels.to(run.device), cfg.palette_size, seed=cfg.seed)
    if run.dist.world_size > 1:
        torch_dist.broadcast(palette, 0)
    run.log(f"palette: k-means with k={cfg.palette_size} on {len(pixels)} pixels of {len(idx)} images "
            f"in {time.perf_counter() - t:.1f}s")
    return palette


def load_palette(path):
    """A palette file: torch ([K, 3] tensor, e.g. a run's palette.pt) or numpy (.npy, e.g. OpenAI's
    kmeans_centers.npy, [512, 3])."""
    if str(path).endswith(".npy"):
        try:
            palette = torch.from_numpy(np.load(path)).float()
        except FileNotFoundError:
            raise UserError(f"palette {path} does not exist") from None
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read palette {path}: {e}") from None
    else:
        palette = load_file(path, "palette")
    if not isinstance(palette, torch.Tensor) or palette.ndim != 2 or palette.shape[1] != 3 or len(palette) < 2:
        raise UserError(f"palette {path} is not a [K, 3] tensor of RGB colours")
    if not torch.isfinite(palette).all() or palette.abs().max() > 1.001:
        raise UserError(f"palette {path} has colours outside [-1, 1] (expected RGB / 127.5 - 1)")
    return palette.float()


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      model                                                         #
# ---------------------------------------------------------------------------------------------------------------- #
# name -> (width D, depth, heads). The paper's released sizes (Table/README: S 76 M, M 455 M, L 1362 M parameters, the
# exact trainable counts of these shapes truncated to millions: iGPT-S has 76,571,648, as the official model;
# tests/test_igpt.py. XL is unreleased and its head count unpublished, so it is not here), plus four of ours:
# "igpt_nano" for tests, "igpt_micro" and "igpt_tiny" for CPU runs (Fashion-MNIST, the demo), "igpt_mini" for small
# data on a GPU. A ViT name (vit_base, ...) gives a decoder of that width, depth and head count, so that
# `bench.py --model vit_base` compares methods at equal size.
IGPT_SIZES = {
    "igpt_nano": (32, 2, 2),
    "igpt_micro": (64, 4, 4),
    "igpt_tiny": (128, 4, 4),
    "igpt_mini": (256, 8, 8),
    "igpt_s": (512, 24, 8),
    "igpt_m": (1024, 36, 8),
    "igpt_l": (1536, 48, 16),
}


def model_dims(model):
    if model in IGPT_SIZES:
        return IGPT_SIZES[model]
    if model in VIT_SIZES:
        return VIT_SIZES[model][:3]
    raise UserError(f"unknown model {model!r}; choose from {', '.join(IGPT_SIZES)} (or a ViT size: "
                    f"{', '.join(VIT_SIZES)})")


class QuickGELU(nn.Module):
    """Official `gelu2`: x * sigmoid(1.702 x) (the exact `gelu` is defined in model.py but unused)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention without biases, causal for the AR objective, with an optional KV cache.

    official: separate q/k/v projections of shape [H, D/H, D] applied by einsum; we: one [3D, D] matrix (q, k, v
    blocks, heads in order inside each: the same numbers, the layout of GPT-2's `c_attn`). Not common/'s Attention:
    that one always has an output bias (the official model has none) and no cache; the kernel is the same SDPA."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.c_attn = nn.Linear(dim, 3 * dim, bias=False)
        self.c_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, causal=True, cache=None, start=0):
        """x [B, T, D] at positions start..start+T-1. cache: a dict holding this layer's keys/values
        ([B, H, n_ctx, D/H], allocated on first use); with it, T > 1 is only allowed from start = 0 (prefill)."""
        B, T, D = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.num_heads, D // self.num_heads)  # [B, T, 3D] -> [B, T, 3, H, D/H]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, D/H]
        if cache is not None:
            if "k" not in cache:
                cache["k"] = k.new_zeros(B, self.num_heads, cache["n_ctx"], D // self.num_heads)
                cache["v"] = torch.zeros_like(cache["k"])
            cache["k"][:, :, start: start + T] = k
            cache["v"][:, :, start: start + T] = v
            k, v = cache["k"][:, :, : start + T], cache["v"][:, :, : start + T]  # [B, H, start+T, D/H]
            causal = causal and T > 1  # one new query may see every cached key
        # SDPA everywhere, also for bf16 on the CPU where common/vit.py spells attention out: at iGPT's long causal
        # sequences the fused kernel is the faster one, forward + backward
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [B, H, T, D/H]
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))  # heads merged in (head, channel) order: [B, T, D]


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim, bias=False)
        self.act = QuickGELU()
        self.c_proj = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


def rms_norm(dim):
    """Official `norm`: x * rsqrt(mean(x^2) + 1e-5) * g: no mean subtraction, no bias (its docstring's "mean = 0"
    is wrong). torch's RMSNorm computes exactly this."""
    return nn.RMSNorm(dim, eps=1e-5)


class Block(nn.Module):
    """Pre-norm GPT-2 block: h += attn(ln_1 h); h += mlp(ln_2 h). No dropout anywhere (paper, official code)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.ln_1 = rms_norm(dim)
        self.attn = Attention(dim, num_heads)
        self.ln_2 = rms_norm(dim)
        self.mlp = Mlp(dim)

    def forward(self, h, causal=True, cache=None, start=0):
        h = h + self.attn(self.ln_1(h), causal, cache, start)
        return h + self.mlp(self.ln_2(h))


class ImageGPT(nn.Module):
    """The official `model()` as a module. Names follow the TF variables (wte, wpe, sos, h.{i}.ln_1, .attn.c_attn
    (= q/k/v_proj), .attn.c_proj, .ln_2, .mlp.c_fc, .mlp.c_proj, ln_f, wtet). The palette is a buffer, so a
    checkpoint carries the colours its tokens mean."""

    def __init__(self, n_px=32, model="igpt_s", vocab_size=512, objective="ar", bert_mask_prob=0.15):
        super().__init__()
        dim, depth, heads = model_dims(model)
        self.n_px, self.n_ctx, self.vocab_size, self.embed_dim = n_px, n_px * n_px, vocab_size, dim
        self.objective, self.bert_mask_prob = objective, bert_mask_prob
        self.register_buffer("palette", torch.zeros(vocab_size, 3))  # [K, 3] RGB in [-1, 1], set from k-means
        self.wte = nn.Embedding(vocab_size, dim)
        self.wpe = nn.Parameter(torch.zeros(self.n_ctx, dim))  # learned, one row per pixel position
        self.sos = nn.Parameter(torch.zeros(dim)) if objective == "ar" else None  # BERT has no start token
        self.h = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.ln_f = rms_norm(dim)
        self.wtet = nn.Linear(dim, vocab_size, bias=False)  # output matrix, untied from wte
        self.wclf = None  # Linear(D, classes, bias=False), added for fine-tuning (official `clf/wclf`)
        self.grad_checkpointing = False  # the blocks under activation checkpointing (set_grad_checkpointing)
        self.initialize_weights()

    def initialize_weights(self):
        """Official initialisers: wte N(0, .02), wpe N(0, .01), sos N(0, .02), wtet 0 ("zero-initialize all
        projections producing logits"), q/k/v N(0, 1/sqrt(D)), attention c_proj N(0, 1/sqrt(D x depth)), MLP
        N(0, .02), norm gains 1."""
        dim, depth = self.embed_dim, len(self.h)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe, std=0.01)
        if self.sos is not None:
            nn.init.normal_(self.sos, std=0.02)
        nn.init.zeros_(self.wtet.weight)
        for block in self.h:
            nn.init.normal_(block.attn.c_attn.weight, std=dim ** -0.5)
            nn.init.normal_(block.attn.c_proj.weight, std=(dim * depth) ** -0.5)
            nn.init.normal_(block.mlp.c_fc.weight, std=0.02)
            nn.init.normal_(block.mlp.c_proj.weight, std=0.02)
            for norm in (block.ln_1, block.ln_2):
                nn.init.ones_(norm.weight)
        nn.init.ones_(self.ln_f.weight)

    # ---- tokens ------------------------------------------------------------------------------------------------
    def tokenize(self, imgs):
        """ImageNet-normalised images [B, 3, H, W] -> tokens [B, n_px^2] (resize, [-1, 1], nearest colour)."""
        return quantize(to_unit_range(imgs, self.n_px), self.palette)

    def bert_mask(self, noise):
        """noise [B, N] uniform -> mask [B, N] bool, 1 = hidden (official M is the opposite: 1 = kept)."""
        return noise < self.bert_mask_prob

    # ---- network -----------------------------------------------------------------------------------------------
    def embed(self, x, start=0, end=None, mask=None):
        """Input of the first block at positions start..end-1, [B, end-start, D].
        AR: position t gets the token x_{t-1} (the start token at t = 0), so it predicts x_t from x_{<t}; x_{N-1}
        is never an input (official: concat(sos, wte[X][:, :-1]) + wpe). BERT: wte[x] with hidden tokens zeroed."""
        end = x.shape[1] if end is None else end
        if self.objective == "bert":
            h = self.wte(x[:, start:end])  # [B, T, D]
            if mask is not None:
                h = h * (~mask[:, start:end]).unsqueeze(-1).to(h.dtype)  # zero content embedding, no [MASK] token
        else:
            h = self.wte(x[:, max(start - 1, 0): end - 1])  # tokens x_{start-1} .. x_{end-2}
            if start == 0:
                h = torch.cat([self.sos.to(h.dtype).expand(x.shape[0], 1, -1), h], dim=1)  # [B, T, D]
        return h + self.wpe[start:end]

    def forward_features(self, x, mask=None, hidden=None, cache=None, start=0, end=None):
        """tokens [B, N] -> last residual stream [B, T, D] (before ln_f). `hidden`, a list, receives the input of
        the blocks and the output of each ([B, T, D] x (depth + 1)): the representations the probe reads."""
        h = self.embed(x, start, end, mask)
        causal = self.objective == "ar"
        if hidden is not None:
            hidden.append(h)
        for i, block in enumerate(self.h):
            h = run_block(block, h, causal, None if cache is None else cache[i], start,
                          grad_checkpointing=self.grad_checkpointing)
            if hidden is not None:
                hidden.append(h)
        return h

    def logits(self, x, mask=None, hidden=None):
        """tokens [B, N] -> logits [B, N, K]; position i predicts token i."""
        return self.wtet(self.ln_f(self.forward_features(x, mask, hidden)))

    def forward_loss(self, x, logits, mask=None):
        """AR: mean cross-entropy over batch and positions (nats per token). BERT: per image, the mean over its
        hidden tokens, then the mean over the batch (official)."""
        ce = F.cross_entropy(logits.float().flatten(0, 1), x.flatten(), reduction="none").view_as(x)  # [B, N]
        if mask is None:
            return ce.mean()
        m = mask.float()
        return ((ce * m).sum(1) / m.sum(1).clamp(min=1)).mean()

    def forward(self, imgs, noise=None):
        """Pre-training step: images -> tokens -> loss. noise [B, N] uniform draws the BERT mask (ignored for AR).
        Returns loss, logits [B, N, K], mask [B, N] (None for AR)."""
        x = self.tokenize(imgs)
        mask = self.bert_mask(noise) if self.objective == "bert" else None
        logits = self.logits(x, mask)
        return self.forward_loss(x, logits, mask), logits, mask

    def new_cache(self):
        return [{"n_ctx": self.n_ctx} for _ in self.h]


def param_count_formula(dim, depth, vocab_size, n_ctx, objective="ar"):
    """Trainable parameters: per block 12 D^2 (q, k, v, proj: 4 D^2; MLP: 8 D^2) + 2 D (two norm gains); plus wte and
    wtet (K D each), wpe (n_ctx D), ln_f (D) and the start token (D, AR only). No biases anywhere."""
    blocks = depth * (12 * dim * dim + 2 * dim)
    return blocks + 2 * vocab_size * dim + n_ctx * dim + dim + (dim if objective == "ar" else 0)


def build_model(cfg, vocab_size=None):
    model = ImageGPT(cfg.res, cfg.model, vocab_size or cfg.palette_size, cfg.objective, cfg.bert_mask_prob)
    return set_grad_checkpointing(model, cfg.grad_checkpointing)


def training_loss(model, imgs, cfg, generator):
    """One pre-training forward as main() and bench.py run it (quantisation included): the BERT mask of this step
    from `generator`, then the loss. `model` may be wrapped (DDP / torch.compile), so sizes come from cfg."""
    noise = None
    if cfg.objective == "bert":
        noise = torch.rand(imgs.shape[0], cfg.res ** 2, device=imgs.device, generator=generator)
    loss, _, _ = model(imgs, noise)
    return loss


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      config                                                        #
# ---------------------------------------------------------------------------------------------------------------- #
@dataclass
class Config(TrainConfig):
    """Defaults = the paper's ImageNet recipe for iGPT-S (§3.4, App. A: batch 128, Adam(0.9, 0.95), no weight decay,
    no dropout, lr warmed up for one epoch then cosine to 0; 1 M iterations x 128 = about 100 ImageNet epochs)."""
    host_memory_gib = (0.82, 2.331)  # GiB (fixed, per image) on a CPU in fp32 at these defaults: bench.py --memory
    lr_batch_div = 128  # lr = blr x global batch / 128: the paper's lr is for batch 128

    model: str = "igpt_s"  # igpt_s (24 x 512), igpt_m (36 x 1024), igpt_l (48 x 1536), igpt_mini/tiny/micro/nano, vit_*
    img_size: int = 224  # images are read and augmented at this size, then resized to --n-px (ImageNet: 224 crops)
    patch_size: int = 1  # unused: iGPT reads one token per pixel (accepted so shared tools can pass it)
    n_px: int = 32  # model resolution: the image becomes n_px x n_px tokens (paper: 32, 48, 64); 0 = --img-size
    palette_size: int = 512  # k of the k-means colour palette = vocabulary size (paper: 512)
    palette: str = ""  # palette file to reuse ([K, 3] in [-1, 1]: palette.pt of a run, or OpenAI's kmeans_centers.npy)
    palette_images: int = 4096  # training images whose pixels feed the k-means
    palette_pixels: int = 1_000_000  # at most this many of their pixels (a seeded random sample)
    objective: str = "ar"  # ar (next pixel, causal) or bert (predict 15 %% of tokens whose embedding is zeroed)
    bert_mask_prob: float = 0.15  # fraction of tokens hidden by --objective bert (paper: 0.15)
    crop_min: float = 0.34  # random square crop, area fraction from crop_min ... (1 = the whole image, flips only)
    crop_max: float = 0.77  # ... to crop_max (paper: shorter side 256-384, random 224 crop = 0.34-0.77)
    n_samples: int = 8  # images in each epoch's completion / sample grid
    finetune_lr: float = 0.0  # fine-tuning lr (0 = the pre-training peak lr; constant, as the paper)
    epochs: int = 100  # pre-training epochs (paper: 1 M iterations at batch 128, about 100 ImageNet epochs)
    batch_size: int = 128  # images per process per step (paper: 128 in all)
    blr: float = 1e-3  # base lr at batch 128 (paper: swept 0.01, 0.003, 0.001, ... per model; App. A)
    warmup_epochs: float = 1  # linear warm-up (paper: one epoch)
    weight_decay: float = 0.0  # the paper uses none

    def check(self):
        model, self.model = self.model, "vit_nano"  # TrainConfig knows only the ViT names; ours are checked below
        try:
            super().check()
        finally:
            self.model = model
        model_dims(self.model)
        if self.objective not in ("ar", "bert"):
            raise UserError(f"unknown --objective {self.objective!r}; choose ar or bert")
        if not 0 < self.bert_mask_prob < 1:
            raise UserError(f"--bert-mask-prob must be in (0, 1), got {self.bert_mask_prob}")
        if self.n_px < 0 or self.n_px > 128:
            raise UserError(f"--n-px {self.n_px}: one token per pixel, so at most 128 (16384 tokens); paper: 32-64")
        if not self.palette and not 2 <= self.palette_size <= 65536:
            raise UserError(f"--palette-size must be in [2, 65536], got {self.palette_size}")
        if not 0 < self.crop_min <= self.crop_max <= 1:
            raise UserError(f"need 0 < --crop-min <= --crop-max <= 1, got {self.crop_min}, {self.crop_max}")
        for name in ("palette_images", "palette_pixels"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("n_samples", "finetune_lr"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        dim, _, heads = model_dims(self.model)
        if dim % heads:
            raise UserError(f"{self.model}: width {dim} is not divisible by {heads} heads")

    @property
    def res(self):
        """Model resolution: n_px, or the image size when n_px is 0."""
        return self.n_px or self.img_size


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      train                                                         #
# ---------------------------------------------------------------------------------------------------------------- #
def main():
    cfg, preset = parse_config(Config, PRESETS, description=__doc__.split("\n\n")[0])
    run = Run(cfg, "igpt", preset)  # devices, processes, --out; resolves cfg.out, cfg.compile, a preset's accum_iter
    resuming = bool(cfg.resume) and (cfg.resume != "auto" or run.ckpt_path.exists())
    palette = None
    if cfg.palette:
        palette = load_palette(cfg.palette)
        cfg.palette_size = len(palette)
    elif not resuming:
        palette = fit_palette(cfg, run)  # a checkpoint brings its own palette
    data = None if cfg.eval_only else build_train_data(cfg, run.dist, crop_scale=(cfg.crop_min, cfg.crop_max),
                                                       crop_ratio=(1.0, 1.0), interpolation="bicubic", log=run.log)
    model = build_model(cfg).to(run.device)
    if palette is not None:
        model.palette.copy_(palette)
    cfg.lr = scaled_lr(cfg, run.global_batch)  # lr = blr x global batch / 128 (the paper's lr is for batch 128)
    # Adam(0.9, 0.95) as the paper; no weight decay by default (AdamW with --weight-decay on matrices otherwise)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95),
                                  fused=True)  # one kernel per step
    start_epoch, start_step = run.start(model, optimizer)
    run.save_file(model.palette.detach().cpu().clone(), "palette.pt")  # reusable: --palette <out>/palette.pt
    dim, depth, heads = model_dims(cfg.model)
    run.log(f"iGPT {cfg.model} ({depth} x {dim}, {heads} heads), {cfg.objective}, {cfg.res} x {cfg.res} = "
            f"{model.n_ctx} tokens, {model.vocab_size} colours: {count_params(model) / 1e6:.2f}M parameters")
    fixed = preview_images(cfg, run.dist, cfg.n_samples) if cfg.n_samples else None  # the same images every epoch
    t0 = time.perf_counter()

    if not cfg.eval_only:
        train_model = run.wrap(model)  # torch.compile and/or DDP
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            run.start_epoch(epoch, start_step, data.steps_per_epoch)
            for step, (imgs, _) in enumerate(data.epoch(epoch, start_step), start_step):
                it = epoch * data.steps_per_epoch + step
                first = it - step % cfg.accum_iter  # the update's first micro-step: its lr is set there, as officially
                lr = set_lr(optimizer, cosine_lr(first / data.steps_per_epoch, cfg.lr, cfg.min_lr, cfg.warmup_epochs,
                                                 cfg.epochs))
                update = (step + 1) % cfg.accum_iter == 0  # the last micro-step of an accumulation updates
                set_grad_sync(train_model, update)
                with run.autocast():
                    loss = training_loss(train_model, imgs, cfg, run.step_generator(it))  # nats per token
                run.scaler.scale(loss / cfg.accum_iter).backward()
                grad_norm = None
                if update:
                    run.scaler.unscale_(optimizer)
                    if cfg.clip_grad:
                        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    run.scaler.step(optimizer)
                    run.scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                run.log_step(epoch, step, loss, lr, grad_norm)  # progress bar, non-finite guard, --log-every line
                if run.should_stop(step):  # at an update: --max-steps reached, or a stop signal
                    run.save_checkpoint(epoch, step + 1)
                    run.exit_if_preempted()  # a stop signal ends the process here; --resume auto continues
                    break
                if run.should_checkpoint(step):  # every --ckpt-every-steps
                    run.save_checkpoint(epoch, step + 1)
            start_step = 0
            if not run.done:  # (--max-steps ends mid-epoch: no epoch summary, but the samples of where it stopped)
                run.log_epoch(epoch)
                run.save_checkpoint(epoch + 1, 0)
            if run.is_main and cfg.n_samples:
                save_samples(model, fixed.to(run.device), run.out / f"samples_e{epoch}.png",
                             f"iGPT {cfg.model} {cfg.objective}, epoch {epoch}, loss {run.last_loss:.3f} nats/token",
                             run.autocast(), seed=cfg.seed)
            if run.done:
                break
            if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
                run.write_log(kind="eval", epoch=epoch, **layer_monitors(model, run))
        run.finish_training(time.perf_counter() - t0)

    report_igpt(model, run)


# ---------------------------------------------------------------------------------------------------------------- #
#                                                     presets                                                        #
# ---------------------------------------------------------------------------------------------------------------- #
# Presets by dataset scale; a flag given on the command line always wins.
PRESETS = {
    # `python igpt.py`: the offline demo. 16 x 16 synthetic images (256 tokens) with a 16-colour palette and a
    # 4 x 128 decoder, 2 epochs over 4000 images: CPU-sized, the probe included; not a research recipe (the lr is
    # raised for the short run).
    "demo": dict(img_size=16, n_px=0, model="igpt_tiny", palette_size=16, palette_images=2000, subset=4000, epochs=2,
                 warmup_epochs=0.2, batch_size=64, blr=3e-3, crop_min=1.0, crop_max=1.0, workers=2,
                 eval_images=2000),
    # CIFAR, (Fashion-)MNIST at their native 32/28 px: our choice (the paper pre-trains on ImageNet only). A 64-colour
    # palette, an 8 x 256 decoder, whole images with flips (teddykoker/image-gpt: 16 colours and an 8 x 16 model for
    # 28 px MNIST, lr 3e-3 at batch 64).
    "small": dict(n_px=0, model="igpt_mini", palette_size=64, epochs=100, batch_size=64, blr=1e-3, crop_min=1.0,
                  crop_max=1.0),
    # STL-10 (96 px): downsampled to 32 x 32 tokens, as the paper's STL-10 probe.
    "medium": dict(n_px=32, model="igpt_mini", palette_size=512, epochs=100, batch_size=64),
    # The paper's recipe (the Config defaults), with activation checkpointing: 128 sequences of 1,024 tokens through
    # 24 layers do not fit an 80 GB GPU with every activation kept (bench.py --memory; docs/PERFORMANCE.md).
    "imagenet": dict(grad_checkpointing=True),
}


# ---------------------------------------------------------------------------------------------------------------- #
#                                                    evaluation                                                      #
# ---------------------------------------------------------------------------------------------------------------- #
def eval_split(cfg, split, run):
    """The labelled split, its first n images (n: common's eval_image_caps, from --eval-images or a --max-steps run's
    cap), this rank's contiguous chunk (common's shard()). None when there is none."""
    loader = build_eval_loader(cfg, split, run.dist)
    if loader is None:
        return None, 0
    num_classes = loader.dataset.num_classes
    n = eval_image_caps(cfg)[0 if split == "train" else 1]
    if n and n < len(loader.dataset):
        loader = DataLoader(Subset(loader.dataset, range(n)), batch_size=loader.batch_size,
                            num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                            worker_init_fn=loader.worker_init_fn)
    return shard(loader, run.dist.rank, run.dist.world_size), num_classes


@torch.no_grad()
def layer_features(model, loader, run, seed=0):
    """Features of every layer l = 0..depth (0 = the embedding): f^l = mean over positions of layer_norm(h^l)
    (paper §3.5: n^l = layer_norm(h^l), f^l = <n^l_i>_i; a norm without gain or bias), and the summed
    cross-entropy of the split (BERT: on a random 15 % mask, seeded, as the official eval draws one at random).
    Returns feats [depth+1, n, D], labels [n], (nats sum, tokens) over all ranks."""
    was_training = model.training
    model.eval()
    g = torch.Generator(device=run.device).manual_seed(seed)
    feats, labels, nats, count = [], [], torch.zeros((), dtype=torch.float64, device=run.device), 0
    for imgs, y in progress(loader, run.is_main, desc="features"):
        if stop_requested(run):  # a stop signal: this rank's features end here (probe_layers then drops them)
            break
        imgs = imgs.to(run.device, non_blocking=True)
        x = model.tokenize(imgs)  # [b, N]
        mask = None
        if model.objective == "bert":
            mask = model.bert_mask(torch.rand(x.shape, device=run.device, generator=g))
        hidden = []
        with run.autocast():
            logits = model.logits(x, mask, hidden)  # [b, N, K]; hidden: (depth + 1) x [b, N, D]
        ce = F.cross_entropy(logits.float().flatten(0, 1), x.flatten(), reduction="none")  # [b*N]
        if mask is not None:
            ce, count = ce[mask.flatten()], count + int(mask.sum())
        else:
            count += x.numel()
        nats += ce.double().sum()
        feats.append(torch.stack([F.layer_norm(h.float(), h.shape[-1:]).mean(1) for h in hidden]))  # [L+1, b, D]
        labels.append(y.to(run.device))
    model.train(was_training)
    depth, dim = len(model.h) + 1, model.embed_dim
    feats = torch.cat(feats, 1) if feats else torch.zeros(depth, 0, dim, device=run.device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=run.device)
    totals = torch.stack([nats, torch.tensor(float(count), dtype=torch.float64, device=run.device)])
    if run.dist.world_size > 1:
        feats = gather_rows(feats.transpose(0, 1).contiguous(), run.dist.world_size).transpose(0, 1)
        labels = gather_rows(labels, run.dist.world_size)
        torch_dist.all_reduce(totals)
    return feats, labels, (float(totals[0]), int(totals[1]))


def probe_layers(model, train_loader, val_loader, num_classes, run):
    """Linear probe and kNN of every layer's features, the best layer by linear-probe accuracy, and the val loss.
    A stop signal ends it at the next batch, chunk or step: it then returns {} (a partial list of layers would
    name a wrong best layer)."""
    if stop_agreed(run):
        return {}
    tr, tr_y, _ = layer_features(model, train_loader, run, seed=run.cfg.seed)
    if stop_agreed(run):
        return {}
    va, va_y, (nats, tokens) = layer_features(model, val_loader, run, seed=run.cfg.seed + 1)
    if stop_agreed(run) or not run.is_main:
        return {}
    stop = stop_hook(run)
    layers = []
    for layer in range(tr.shape[0]):  # rank 0 alone from here (the next stop_agreed tells the others)
        linear = linear_probe(tr[layer], tr_y, va[layer], va_y, num_classes, seed=run.cfg.seed, **stop)
        knn = None if linear is None else knn_accuracy(tr[layer], tr_y, va[layer], va_y, num_classes, **stop)
        if knn is None:  # (None: stopped)
            return {}
        layers.append({"layer": layer, "linear": round(linear, 2), "knn": round(knn, 2)})
    best = max(layers, key=lambda r: (r["linear"], -r["layer"]))
    per_token = nats / max(tokens, 1)
    return {"layers": layers, "best_layer": best["layer"], "depth": tr.shape[0] - 1, "best_linear": best["linear"],
            "best_knn": max(r["knn"] for r in layers), "last_linear": layers[-1]["linear"],
            "val_nats_per_token": round(per_token, 4),
            "val_bits_per_dim": round(per_token / math.log(2) / 3, 4),  # per colour channel, of quantised images
            "val_images": len(va_y), "train_images": len(tr_y)}


def random_init(model, run):
    """The baseline: the same model as initialised before pre-training (built again from the run's seed without
    touching the RNG), with the trained model's palette."""
    with seeded_rng(run.cfg.seed, run.device):
        baseline = build_model(run.cfg, model.vocab_size).to(run.device)
    baseline.palette.copy_(model.palette)
    return baseline


def layer_monitors(model, run):
    """Per-layer monitors of the model and of the same model at its initialisation (same seed, same palette)."""
    cfg = run.cfg
    train_loader, num_classes = eval_split(cfg, "train", run)
    val_loader, _ = eval_split(cfg, "val", run)
    if train_loader is None or val_loader is None:
        run.log(f"evaluation skipped: {cfg.data} at {cfg.data_path} has no labelled train/ and val/ split")
        return {}
    t = time.perf_counter()
    results = {"pretrained": probe_layers(model, train_loader, val_loader, num_classes, run),
               "random_init": probe_layers(random_init(model, run), train_loader, val_loader, num_classes, run)}
    barrier()
    skipped = [name for name, got in results.items() if not got]
    if run.is_main and skipped:
        results["skipped"] = skipped
        run.log(f"eval stopped by a signal after {time.perf_counter() - t:.0f}s; skipped {', '.join(skipped)}")
    elif run.is_main:
        p, r = results["pretrained"], results["random_init"]
        run.log("per-layer linear probe (kNN): " + ", ".join(f"{x['layer']}: {x['linear']} ({x['knn']})"
                                                             for x in p["layers"]))
        run.log(f"eval ({time.perf_counter() - t:.0f}s, {p['train_images']} train / {p['val_images']} val images): "
                f"val {p['val_nats_per_token']} nats/token ({p['val_bits_per_dim']} bits/dim); best layer "
                f"{p['best_layer']} of {p['depth']}: linear {p['best_linear']}, best kNN {p['best_knn']} (random "
                f"init: best layer {r['best_layer']}: linear {r['best_linear']}, kNN {r['best_knn']}; "
                f"{r['val_nats_per_token']} nats/token)")
    return results


def finetune_joint(model, run, epochs):
    """Fine-tune a copy with the joint objective L_gen + L_clf (paper §3.6; official `--clf`): the classifier reads
    the mean over positions of ln_f(h) through a bias-free, zero-initialised `wclf`. Adam(0.9, 0.95) at a constant
    lr (paper: no cosine schedule, early stopping on held-out data; we: a fixed number of epochs, random horizontal
    flips). Returns val top-1 (%) and the val generative loss (nats/token)."""
    cfg = run.cfg
    train_loader = build_eval_loader(cfg, "train", run.dist)
    val_loader, num_classes = eval_split(cfg, "val", run)
    if train_loader is None or val_loader is None:
        run.log("fine-tuning skipped: no labelled train/ and val/ split")
        return None
    model = copy.deepcopy(model).float().train()
    model.wclf = nn.Linear(model.embed_dim, num_classes, bias=False).to(run.device)
    nn.init.zeros_(model.wclf.weight)
    world = run.dist.world_size
    sampler = DistributedSampler(train_loader.dataset, world, run.dist.rank, seed=cfg.seed,
                                 drop_last=True) if world > 1 else None
    loader = DataLoader(train_loader.dataset, batch_size=cfg.batch_size, sampler=sampler, shuffle=sampler is None,
                        drop_last=True, num_workers=train_loader.num_workers,
                        generator=torch.Generator().manual_seed(cfg.seed))
    if len(loader) == 0:
        run.log("fine-tuning skipped: fewer labelled images than one batch")
        return None
    lr = cfg.finetune_lr or cfg.lr
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp_dtype == torch.float16)  # fp16: scaled backward
    train_model = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    g = torch.Generator(device=run.device).manual_seed(cfg.seed)

    def joint(net, imgs, y):
        x = model.tokenize(imgs)
        mask = model.bert_mask(torch.rand(x.shape, device=x.device, generator=g)) if model.objective == "bert" else None
        h = net(x, mask)  # [B, N, D] (DDP calls forward = forward_features)
        gen = model.forward_loss(x, model.wtet(model.ln_f(h)), mask)
        clf_logits = model.wclf(model.ln_f(h).mean(1))  # [B, C]
        return gen, F.cross_entropy(clf_logits.float(), y), clf_logits

    model.forward = model.forward_features  # the fine-tuning copy is called on tokens
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for imgs, y in progress(loader, run.is_main, desc=f"fine-tune epoch {epoch}"):
            imgs, y = imgs.to(run.device), y.to(run.device)
            flip = torch.rand(imgs.shape[0], device=run.device, generator=g) < 0.5
            imgs = torch.where(flip.view(-1, 1, 1, 1), imgs.flip(-1), imgs)
            with run.autocast():
                gen, clf, _ = joint(train_model, imgs, y)
            scaler.scale(gen + clf).backward()
            scaler.step(opt)  # (skipped on inf/NaN gradients under fp16)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        run.log(f"fine-tune epoch {epoch}: L_gen {gen.item():.4f}, L_clf {clf.item():.4f}")
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=run.device)  # correct, images, gen loss sum
    with torch.no_grad():
        for imgs, y in val_loader:
            imgs, y = imgs.to(run.device), y.to(run.device)
            with run.autocast():
                gen, _, clf_logits = joint(model, imgs, y)
            counts += torch.tensor([(clf_logits.argmax(1) == y).sum().item(), len(y), gen.item() * len(y)],
                                   dtype=torch.float64, device=run.device)
    if world > 1:
        torch_dist.all_reduce(counts)
    return {"top1": round(100.0 * float(counts[0] / counts[1].clamp(min=1)), 2),
            "val_nats_per_token": round(float(counts[2] / counts[1].clamp(min=1)), 4)}


def report_igpt(model, run):
    """End of a run: the model file (palette included) at once, then the per-layer monitors (with the random-init
    baseline) and results.json, then the optional fine-tuning (results.json is rewritten with it)."""
    cfg = run.cfg
    run.save_file(model.state_dict(), "encoder.pth")
    with stop_action(run, STOP_MONITORS):
        run.log(f"wrote {run.out}/encoder.pth; the per-layer monitors next")
        results = {"method": "igpt", "data": cfg.data, "model": cfg.model, "objective": cfg.objective,
                   "n_px": cfg.res, "palette_size": model.vocab_size, "global_step": run.global_step,
                   "final_loss": run.last_loss, "eval": layer_monitors(model, run)}
    write_results(run, results)  # a stop signal during the monitors ends the process here (exit 0)
    if cfg.finetune_epochs:
        results["finetune"] = finetune_joint(model, run, cfg.finetune_epochs)
        run.log(f"fine-tune: {results['finetune']}")
        if cfg.finetune_baseline:  # the same recipe from the random initialisation
            results["finetune_random_init"] = finetune_joint(random_init(model, run), run, cfg.finetune_epochs)
            run.log(f"fine-tune from random init: {results['finetune_random_init']}")
        run.write_json("results.json", results)
        run.log(f"wrote {run.out}/results.json")
    return results


# ---------------------------------------------------------------------------------------------------------------- #
#                                                     sampling                                                       #
# ---------------------------------------------------------------------------------------------------------------- #
def draw(logits, generator, temperature=1.0):
    """One token per row from softmax(logits / T) by inverse CDF with a uniform from `generator`: the draw is a
    function of (logits, generator state), so two samplers with the same seed and logits agree. [B, K] -> [B]."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, K]
    u = torch.rand(probs.shape[0], 1, device=probs.device, generator=generator)  # [B, 1]
    return (probs.cumsum(-1) < u).sum(-1).clamp(max=probs.shape[-1] - 1)  # [B]


@torch.no_grad()
def sample(model, prompt, generator, use_cache=True, temperature=1.0):
    """Complete token sequences in raster order. prompt [B, T0] (T0 = 0: unconditional) -> tokens [B, N].
    With the cache each new token costs one position through the network (keys/values of the earlier positions are
    kept per layer); without it, every step reruns the whole prefix (the official `sample`: N full forwards)."""
    B, T0 = prompt.shape
    N = model.n_ctx
    x = torch.zeros(B, N, dtype=torch.long, device=prompt.device)
    x[:, :T0] = prompt
    if use_cache:
        cache = model.new_cache()
        # prefill: positions 0..T0 (inputs: start token, x_0 .. x_{T0-1}); the last one predicts x_{T0}
        logits = model.wtet(model.ln_f(model.forward_features(x, cache=cache, start=0, end=T0 + 1)[:, -1]))
        for t in range(T0, N):
            x[:, t] = draw(logits, generator, temperature)
            if t + 1 < N:  # position t+1 reads x_t
                h = model.forward_features(x, cache=cache, start=t + 1, end=t + 2)  # [B, 1, D]
                logits = model.wtet(model.ln_f(h[:, -1]))
    else:
        for t in range(T0, N):
            x[:, t] = draw(model.logits(x[:, : t + 1])[:, t], generator, temperature)  # x_t itself is not an input
    return x


@torch.no_grad()
def save_samples(model, imgs, path, title, amp, seed=0):
    """AR: original | quantised | top half given | two completions of the bottom half | unconditional samples.
    BERT (no sampling order): original | quantised | tokens hidden (grey) | prediction (argmax) pasted in."""
    was_training = model.training
    model.eval()
    g = torch.Generator(device=imgs.device).manual_seed(seed)
    res, B = model.n_px, imgs.shape[0]
    x = model.tokenize(imgs)  # [B, N]
    original = ((to_unit_range(imgs, res) + 1) / 2).clamp(0, 1)
    quantised = dequantize(x, model.palette, res)
    grey = torch.full_like(quantised, 0.5)
    with amp:
        if model.objective == "ar":
            half = res // 2 * res  # the top res // 2 rows
            done = sample(model, x[:, :half].repeat(2, 1), g)  # [2B, N]
            uncond = sample(model, x[:, :0], g)  # [B, N]
            given = quantised.clone()
            given[:, :, res // 2:] = 0.5
            rows = [original, quantised, given, dequantize(done[:B], model.palette, res),
                    dequantize(done[B:], model.palette, res), dequantize(uncond, model.palette, res)]
            labels = ["original", "quantised", "top half", "completion 1", "completion 2", "samples"]
            note = "completions sample the bottom half given the top; samples start from the start token (T = 1)"
        else:
            mask = model.bert_mask(torch.rand(B, model.n_ctx, device=imgs.device, generator=g))
            pred = model.logits(x, mask).argmax(-1)  # [B, N]
            m = mask.view(B, 1, res, res).float()
            rows = [original, quantised, quantised * (1 - m) + grey * m,
                    dequantize(torch.where(mask, pred, x), model.palette, res)]
            labels = ["original", "quantised", "hidden (grey)", "prediction"]
            note = f"BERT: {model.bert_mask_prob:.0%} of the tokens hidden, argmax prediction pasted in"
    model.train(was_training)
    save_image_grid(rows, path, f"{title}\n{note}", labels=labels)


# ---------------------------------------------------------------------------------------------------------------- #
#                                                  bench.py hooks                                                    #
# ---------------------------------------------------------------------------------------------------------------- #
def tokens_per_image(cfg):
    """Sequence positions per image, for bench.py's tokens/s: one per pixel of the n_px x n_px grid."""
    return cfg.res ** 2


# bench.py compares the methods by ViT name (`--model vit_base`): iGPT's nearest paper size stands in for it, by
# parameters (ViT-B 86 M ~ iGPT-S 76 M, ViT-L 304 M -> iGPT-M 455 M, ViT-H 632 M -> iGPT-L 1362 M); the smaller ViT
# names stay decoders of the ViT's width and depth (tests).
BENCH_SIZES = {"vit_base": "igpt_s", "vit_large": "igpt_m", "vit_huge": "igpt_l"}


def bench_model(vit_name):
    return BENCH_SIZES.get(vit_name, vit_name)


def bench_label(cfg):
    """bench.py's row name: the model, its token grid and the images it reads (e.g. 224-px crops -> 32 x 32)."""
    return f"{cfg.model} {cfg.res}x{cfg.res} tokens of {cfg.img_size}px"


if __name__ == "__main__":
    cli(main)
