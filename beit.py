"""BEiT: BERT Pre-Training of Image Transformers (Bao, Dong, Piao, Wei, 2021), arXiv:2106.08254.

Two stages from one command. Stage 1 trains a visual tokenizer, a discrete VAE in the spirit of DALL-E's, that maps
a smaller view of the same crop to one discrete id per ViT patch. Stage 2 is BEiT: hide about 40 % of the patches in
rectangular blocks (75 of 196 at 224 px), replace their embeddings by a learned mask token, run the ViT on all tokens,
and predict the tokenizer's id at every hidden position with a linear head over the vocabulary; the loss is the
cross-entropy on the hidden positions only (paper §2). The encoder is the BEiT ViT that SimMIM uses too: no absolute
position embedding, one relative position bias shared by all blocks, layer scale, q and v biases; `encoder.pth` loads
into timm's `Beit`. After pre-training the head is discarded and the encoder is fine-tuned or probed.
Token grid = patch grid: the tokenizer downsamples by `--dvae-stride` (8 at ImageNet scale), so its view is
(img_size / patch_size) x stride pixels a side: 112 px for a 224 / 16 model (the official `--second_input_size 112`).
BEiT v2 builds on this file: beit2.py.

Run:     python beit.py                                    # offline demo: tokenizer + pre-training + evaluation
         python beit.py --stage tokenizer --out runs/tok    # stage 1 only: runs/tok/tokenizer.pth
         python beit.py --tokenizer runs/tok/tokenizer.pth  # reuse a tokenizer (trained there if it does not exist)
         python beit.py --data imagenet --data-path /data/imagenet --model vit_base
         torchrun --nproc_per_node 16 beit.py --data imagenet --data-path /data/imagenet   # official: 16 x 128
Deviations from the official code:
  - the tokenizer is ours: the official DiscreteVAE layout with DALL-E's objective (DALL-E's weights are offline)
  - masks are drawn as officially, from a Random seeded by (seed, rank, step) (official: the workers' global state)
  - the loss gathers a fixed number of slots per image (official: boolean indexing): static shapes, no host sync
  - the mask token lives beside the encoder so that `encoder.pth` loads into timm with strict=True
  - the lr is given per 256 images and scaled linearly (official: an absolute lr for batch 2048)
  - the resident (small-data) path resizes the tokenizer view with bicubic grid_sample, not lanczos
  - the fine-tune keeps the shared relative position table (official: copies it into every block)
  - the demo/small/medium presets are ours (see PRESETS)
Results: docs/RESULTS.md#beit
"""
import math
import random
import time
import typing
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from common import UserError
from common.data import (IMAGENET_MEAN, IMAGENET_STD, build_train_data, color_jitter, crop_resize_flip, eval_transform,
                         imagenet_stats, mix_seed, preview_images, run_dataset, sample_resized_crops, seeded_rng)
from common.evaluation import (codebook_stats, denormalize, monitors, report, save_codebook_usage, save_image_grid,
                               token_colours)
from common.training import (Preempted, Run, TrainConfig, atomic_save, barrier, cli, load_file, param_groups,
                             parse_config, progress, scaled_lr, set_grad_sync, set_lr, state_dict_fits)
from common.vit import (VisionTransformer, count_params, init_beit_style, set_grad_checkpointing, trunc_normal_sigma,
                        vit_kwargs)


# ---------------------------------------------------------------------------------------------------------------- #
#                                                     masking                                                        #
# ---------------------------------------------------------------------------------------------------------------- #
MAX_ATTEMPTS = 64  # block attempts per image in a batched draw (MaskingGenerator.batched)


class MaskingGenerator:
    """Blockwise masking (paper §2.5, Algorithm 1; official `MaskingGenerator` in beit/masking_generator.py).

    Until `num_masking_patches` are hidden: draw a block with target area s ~ U(min_num_patches, budget left) and
    aspect r log-uniform in [min_aspect, 1/min_aspect], sides h = round(sqrt(s r)), w = round(sqrt(s / r)) (strictly
    smaller than the grid), a uniform position; it is accepted when it hides 1 to `budget left` new patches. 10
    failed draws in a row end the image, so the count is <= num_masking_patches and varies per image (unlike SimMIM's
    and BEiT v2's exact counts). `draw` makes the official draws, call for call, on a `random.Random`: seeded alike, it
    gives the official masks bit for bit (the reference of the tests, and the fixed masks of the pictures). Training
    draws the same law for the whole batch on the device (`batched`). Masks are [B, N] bool, row-major, True = masked.
    official: one mask per image in the data workers from the global `random` (never seeded: random.seed is commented
    out); we: a step's masks from the generator of (seed, rank, step), so resume is exact.
    """

    def __init__(self, grid, num_masking_patches, min_num_patches=4, max_num_patches=None, min_aspect=0.3,
                 max_aspect=None):
        self.height, self.width = (grid, grid) if isinstance(grid, int) else grid
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def place_block(self, mask, max_mask_patches, rng, boxes=None):
        """Up to 10 draws of one block; the first that hides 1..max_mask_patches new patches is applied to `mask`
        ([h, w] numpy, in place). Returns the number of new patches (0: all 10 failed)."""
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)  # inclusive bounds, as random.randint
                left = rng.randint(0, self.width - w)
                block = mask[top: top + h, left: left + w]  # [h, w] view
                delta = h * w - int(block.sum())  # patches this block would newly hide
                if 0 < delta <= max_mask_patches:
                    block[...] = 1
                    if boxes is not None:
                        boxes.append((top, left, h, w, target_area, aspect_ratio))
                    return delta
        return 0

    def draw(self, rng, boxes=None):
        """One image's mask, [h, w] int numpy (1 = masked). `boxes` collects the accepted blocks (tests)."""
        mask = np.zeros((self.height, self.width), dtype=np.int64)
        count = 0
        while count < self.num_masking_patches:
            max_mask_patches = min(self.num_masking_patches - count, self.max_num_patches)
            delta = self.place_block(mask, max_mask_patches, rng, boxes)
            if delta == 0:
                break
            count += delta
        return mask

    def __call__(self, batch_size, rng, device=None):
        """The official draw for `batch_size` images in a row from the Random `rng`, on the host: [B, N] bool."""
        masks = np.stack([self.draw(rng) for _ in range(batch_size)])  # [B, h, w]
        return torch.from_numpy(masks).flatten(1).bool().to(device, non_blocking=True)  # [B, N]

    def batched(self, batch_size, generator, attempts=MAX_ATTEMPTS):
        """The law of `draw` for a whole batch on the generator's device, without a host sync: every image makes its
        block attempts in lock-step, `attempts` of them, each one draw of (target area, aspect, top, left) per image
        from `generator`; an image stops attempting once it has its budget or 10 attempts in a row failed, as `draw`
        does. Returns [B, N] bool, True = masked.
        official: a Python loop per image in the data workers; we: tensor ops over the batch, so the masks of a step
        cost the host nothing. An image still attempting after `attempts` keeps what it has (docs/FIDELITY.md: the
        official loop needs ~11 attempts on 14 x 14, at most ~40)."""
        B, H, W, dev = batch_size, self.height, self.width, generator.device
        u = torch.rand(4, attempts, B, device=dev, generator=generator)  # area, aspect, top, left of every attempt
        rows = torch.arange(H, device=dev).view(1, H)
        cols = torch.arange(W, device=dev).view(1, W)
        mask = torch.zeros(B, H, W, dtype=torch.bool, device=dev)
        count = torch.zeros(B, dtype=torch.long, device=dev)  # patches masked so far
        fails = torch.zeros(B, dtype=torch.long, device=dev)  # failed attempts in a row
        active = torch.ones(B, dtype=torch.bool, device=dev)
        low, high = self.log_aspect_ratio
        for t in range(attempts):
            budget = (self.num_masking_patches - count).clamp(max=self.max_num_patches)  # [B] max_mask_patches
            area = self.min_num_patches + (budget - self.min_num_patches) * u[0, t]  # random.uniform(a, b)
            aspect = torch.exp(low + (high - low) * u[1, t])
            h = torch.sqrt(area * aspect).round().long()  # [B]
            w = torch.sqrt(area / aspect).round().long()
            top = (u[2, t] * (H - h + 1)).floor().long()  # random.randint(0, H - h), bounds included
            left = (u[3, t] * (W - w + 1)).floor().long()
            block = (((rows >= top[:, None]) & (rows < (top + h)[:, None]))[:, :, None]
                     & ((cols >= left[:, None]) & (cols < (left + w)[:, None]))[:, None, :])  # [B, H, W]
            delta = h * w - (mask & block).sum(dim=(1, 2))  # [B] patches this block would newly hide
            accept = active & (h < H) & (w < W) & (delta > 0) & (delta <= budget)
            mask |= block & accept.view(B, 1, 1)
            count += torch.where(accept, delta, 0)
            fails = torch.where(accept, 0, fails + 1)
            active &= (fails < 10) & (count < self.num_masking_patches)
        return mask.flatten(1)  # [B, N], row-major


def mask_generator(cfg, kind=MaskingGenerator):
    """The official generator (`kind`) for this run's grid: 75 of 196 patches with blocks >= 16 at 14 x 14, the same
    fractions of other grids (rounded; at least 1) unless given."""
    grid = (cfg.img_size // cfg.patch_size, cfg.img_size // cfg.patch_size)
    n = grid[0] * grid[1]
    num = cfg.num_mask_patches or max(1, round(n * 75 / 196))
    min_block = cfg.min_mask_patches_per_block or max(1, round(n * 16 / 196))
    return kind(grid, num, min_block, cfg.max_mask_patches_per_block or None, cfg.min_aspect)


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      model                                                         #
# ---------------------------------------------------------------------------------------------------------------- #
class BEiT(nn.Module):
    """The BEiT pre-training model (official `VisionTransformerForMaskedImageModeling`): the BEiT ViT, a learned mask
    token and a linear head to the vocabulary, plus the frozen tokenizer that gives the targets (held here so that a
    step -- as training and bench.py run it -- includes its forward; its weights travel in checkpoint.pth)."""

    def __init__(self, tokenizer, img_size=224, patch_size=16, model="vit_base", vocab_size=8192, drop_path=0.1,
                 layer_scale=0.1):
        super().__init__()
        # encoder: the official pre-training ViT (--rel_pos_bias on = one shared table, --abs_pos_emb off, layer scale,
        # q and v biases, LayerNorm eps 1e-6), SimMIM's too; timm Beit names, exported as encoder.pth
        self.encoder = VisionTransformer(img_size, qv_bias=True, init_values=layer_scale, drop_path_rate=drop_path,
                                         pos_embed=None, rel_pos_bias=True, **vit_kwargs(model, patch_size))
        dim = self.encoder.embed_dim
        self.grid_size = self.encoder.patch_embed.grid_size
        # official: `mask_token` inside the ViT; here beside it so that the encoder's state dict is exactly timm's
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.lm_head = nn.Linear(dim, vocab_size)  # predicts the visual token of a masked patch
        self.initialize_weights()
        if tokenizer.vocab_size != vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} codes, the head {vocab_size}")
        self.tokenizer = tokenizer.requires_grad_(False).eval()

    def initialize_weights(self):
        """Official init: the encoder as SimMIM's (`init_beit_style`: cls token, trunc-normal 0.02 at +-1 sigma on
        every Linear / Conv2d, zero biases, LayerNorm 1/0, then the 1/sqrt(2 l) rescale of attn.proj and mlp.fc2),
        the mask token and the head's weight trunc-normal at +-1 sigma too, its bias 0."""
        init_beit_style(self.encoder)
        trunc_normal_sigma(self.mask_token)
        trunc_normal_sigma(self.lm_head.weight)
        nn.init.zeros_(self.lm_head.bias)

    def train(self, mode=True):
        super().train(mode)
        self.tokenizer.eval()  # always: it only gives targets
        return self

    def forward_encoder(self, imgs, mask):
        """Patch embeddings, the masked ones replaced by the mask token, cls prepended, all tokens through the blocks.
        imgs [B, 3, H, W] normalised, mask [B, N] bool -> normalised patch tokens [B, N, D] (cls dropped)."""
        x = self.encoder.embed(imgs)  # [B, N, D]; no absolute position (pos_embed=None)
        w = mask.unsqueeze(-1).to(x.dtype)  # [B, N, 1]
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w  # official blend: before the cls token and the blocks
        x = self.encoder.prepend_cls(x)  # [B, 1+N, D]
        x = self.encoder.norm(self.encoder.run_blocks(x))  # the shared relative position bias is added in every block
        return x[:, 1:]

    def forward(self, imgs, tok_view, mask, slots):
        """imgs [B, 3, H, W] normalised, tok_view [B, 3, h s, w s] in [0, 1], mask [B, N] bool (at most `slots` True
        per image) -> (loss, masked-token accuracy). The loss is the cross-entropy between the head's logits and the
        tokenizer's ids at the masked positions only, averaged over all masked positions of the batch (official
        nn.CrossEntropyLoss on `lm_head(x[bool_masked_pos])`).
        official: boolean indexing, a [total masked, V] matrix whose size varies per batch; we: the first `slots`
        positions of each image with masked ones first (row-major, as x[bool] orders them), padding ignored: the same
        loss, static shapes, no host sync."""
        with torch.no_grad():
            ids = self.tokenizer.get_codebook_indices(tok_view)  # [B, N]
        x = self.forward_encoder(imgs, mask)  # [B, N, D]
        order, valid = masked_positions(mask, slots)  # [B, K] each
        x = x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, N, D] -> [B, K, D]
        logits = self.lm_head(x).float()  # [B, K, V]
        labels = ids.gather(1, order).masked_fill(~valid, -100)  # [B, K], -100 = padding (ignored)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        accuracy = ((logits.argmax(-1) == labels) & valid).sum() / valid.sum()  # official mlm_acc
        return loss, accuracy.detach()


def masked_positions(mask, slots):
    """mask [B, N] bool -> (order [B, K], valid [B, K]): the indices of the masked positions in row-major order,
    then unmasked ones as padding, K = slots (>= any image's count)."""
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :slots]  # masked (0) first, in order
    return order, mask.gather(1, order)


def build_model(cfg, tokenizer=None):
    """The pre-training model. Without a tokenizer (bench.py, the random-init baseline of the monitors) a fresh dVAE
    is built, in a fork of the generators so that the encoder's init does not depend on it."""
    if tokenizer is None:
        with seeded_rng(mix_seed(cfg.seed, 1_000_003)):
            tokenizer = new_dvae(cfg)
    model = BEiT(tokenizer, cfg.img_size, cfg.patch_size, cfg.model, tokenizer.vocab_size, cfg.drop_path,
                 layer_scale(cfg))
    return set_grad_checkpointing(model, cfg.grad_checkpointing)


def pretraining_step(model, batch, masks, generator):
    """One forward as main() runs it: this step's masks (the generator `masks`, drawn from `generator`), tokens,
    loss and accuracy. `model` may be wrapped (DDP / torch.compile)."""
    imgs, tok_view = batch
    mask = masks.batched(imgs.shape[0], generator)  # [B, N], on the generator's device (= the images')
    return model(imgs, tok_view, mask, masks.num_masking_patches)


def training_loss(model, batch, cfg, generator):
    """The loss of one pre-training step, as bench.py times it."""
    return pretraining_step(model, batch, mask_generator(cfg), generator)[0]


# ---------------------------------------------------------------------------------------------------------------- #
#                                        stage 1: the visual tokenizer (dVAE)                                        #
# ---------------------------------------------------------------------------------------------------------------- #
# A tokenizer, as stage 1 trains it and stage 2 uses it (any tokenizer with this interface fits the two stages):
#   kind, vocab_size, stride (input pixels per token side), interpolation (of its view), config (constructor kwargs);
#   get_codebook_indices(view [B, 3, h*s, w*s] in [0, 1]) -> ids [B, h*w]; decode(ids, (h, w)) -> [B, 3, H, W] in
#   [0, 1] (None where a tokenizer cannot show pixels); prepare(view, generator, progress) -> the other inputs of a
#   stage-1 step (a tuple), made before it; forward(view, *those) -> (stage-1 loss, ids, {name: scalar}), tensor work
#   only, so that DDP and torch.compile can wrap it; recon_error(view) -> the error it is judged by, a scalar.
LOGIT_LAPLACE_EPS = 0.1  # DALL-E's map_pixels: x in [0, 1] -> (1 - 2 eps) x + eps, so that logit(x) stays finite
MIN_LOG_SCALE = math.log(1e-3)  # floor of the logit-Laplace scale b: flat image regions would drive it to 0
GAUSS_SIGMA = 0.1  # the fixed standard deviation of the Gaussian reconstruction, in [0, 1] pixels


def map_pixels(x):
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x):
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


class ResBlock(nn.Module):
    """conv3x3 - ReLU - conv3x3 - ReLU - conv1x1, plus the input (official DiscreteVAE `ResBlock`)."""

    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x):
        return x + self.net(x)


class DVAE(nn.Module):
    """Discrete VAE tokenizer: the layout of the official `DiscreteVAE` (beit/modeling_discrete_vae.py, the
    "customized" tokenizer the official code can load) trained with DALL-E's objective (paper §2.1, App. A.2).

    Encoder: log2(stride) x [conv4x4 stride 2 + ReLU, ResBlock], then conv1x1 to `vocab_size` logits per position.
    Codebook: vocab_size x codebook_dim. Decoder: the mirror, ConvTranspose4x4 stride 2 + ReLU + ResBlock, then
    conv1x1 to 6 channels: the logit-Laplace location and log-scale of each colour channel.
    Training (DALL-E): z = Gumbel-softmax(logits, tau) in the forward *and* backward pass (not straight-through,
    unless --dvae-straight-through), decoder input z @ codebook; loss = the negative ELBO per pixel dimension,
        [ sum_dims NLL(x | decoder(z)) + beta sum_positions KL(q(z|x) || uniform) ] / (3 H W),
    tau annealed 1 -> 1/16 and beta 0 -> 6.6 with cosine schedules. Reconstruction NLL (--dvae-recon): "gauss", a
    Gaussian of fixed sigma 0.1 on [0, 1] pixels (= MSE / 0.02 + const, the default) or "laplace", DALL-E's
    logit-Laplace on map_pixels(x) with a predicted scale (floored at 1e-3). Both keep the loss an ELBO in nats, the
    scale in which DALL-E's beta = 6.6 was set (a bare MSE would leave the KL weight without a scale); we default to
    the Gaussian because in short runs the logit-Laplace fits its scale instead of the image (docs/FIDELITY.md#beit).
    Tokens: argmax of the encoder logits, no noise (official `get_codebook_indices`). Inputs: views in [0, 1], mapped
    with DALL-E's map_pixels inside.
    official DiscreteVAE: MSE or smooth-L1 reconstruction, fixed temperature 0.9, KL weight 0, 3 output channels.
    """
    kind = "dvae"
    error_name = "MSE"  # what recon_error measures: squared error of the decoded tokens in [0, 1] pixels
    interpolation = "lanczos"  # of the tokenizer view (official --second_interpolation)

    def __init__(self, vocab_size=8192, stride=8, hidden=256, codebook_dim=512):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, stride=stride, hidden=hidden, codebook_dim=codebook_dim)
        self.vocab_size, self.stride = vocab_size, stride
        layers = int(math.log2(stride))
        enc, dec, c_enc, c_dec = [], [], 3, codebook_dim
        for _ in range(layers):
            enc += [nn.Sequential(nn.Conv2d(c_enc, hidden, 4, stride=2, padding=1), nn.ReLU()), ResBlock(hidden)]
            dec += [nn.Sequential(nn.ConvTranspose2d(c_dec, hidden, 4, stride=2, padding=1), nn.ReLU()),
                    ResBlock(hidden)]
            c_enc = c_dec = hidden
        self.encoder = nn.Sequential(*enc, nn.Conv2d(hidden, vocab_size, 1))
        self.codebook = nn.Embedding(vocab_size, codebook_dim)
        self.decoder = nn.Sequential(*dec, nn.Conv2d(hidden, 6, 1))

    def logits(self, view):
        """view [B, 3, H, W] in [0, 1] -> logits [B, V, H/s, W/s] (fp32)."""
        return self.encoder(map_pixels(view)).float()

    @torch.no_grad()
    def get_codebook_indices(self, view):
        """view [B, 3, H, W] in [0, 1] -> ids [B, (H/s) (W/s)], row-major: argmax of the logits."""
        return self.logits(view).argmax(dim=1).flatten(1)  # [B, V, h, w] -> [B, h, w] -> [B, N]

    def decode_stats(self, z):
        """z [B, codebook_dim, h, w] -> (location, log-scale), each [B, 3, H, W] (fp32)."""
        stats = self.decoder(z).float()
        return stats[:, :3], stats[:, 3:].clamp(min=MIN_LOG_SCALE)

    @torch.no_grad()
    def decode(self, ids, grid):
        """ids [B, N] -> images [B, 3, H, W] in [0, 1]: the codes' embeddings through the decoder; the image is the
        median of the logit-Laplace, unmap_pixels(sigmoid(mu)), as DALL-E shows it."""
        z = self.codebook(ids).transpose(1, 2).reshape(ids.shape[0], -1, *grid)  # [B, N, d] -> [B, d, h, w]
        mu, _ = self.decode_stats(z)
        return unmap_pixels(torch.sigmoid(mu))

    @torch.no_grad()
    def recon_error(self, view):
        """Mean squared error in [0, 1] pixels between the view and the decode of its tokens: what BEiT's targets
        still say about the image."""
        h, w = view.shape[-2] // self.stride, view.shape[-1] // self.stride
        return F.mse_loss(self.decode(self.get_codebook_indices(view), (h, w)), view.float())

    def prepare(self, view, generator, progress):
        """The inputs of the training step at `progress` (fraction of stage 1 done) besides the view, made before it,
        so that the step itself is tensor work only (one compiled graph): the uniforms of its Gumbel noise
        [B, V, H/s, W/s] drawn from `generator`, the temperature tau and the KL weight beta of the schedules (0-d)."""
        cfg = self.schedule  # set by new_dvae from the run's config (dvae_schedule)
        B, _, H, W = view.shape
        noise = torch.rand((B, self.vocab_size, H // self.stride, W // self.stride), device=view.device,
                           generator=generator)
        tau = cosine_anneal(progress, cfg["temp_anneal"], 1.0, cfg["temp_end"])
        beta = cosine_anneal(progress, cfg["kl_warmup"], 0.0, cfg["kl_weight"])
        # as 0-d tensors (filled on the device, no copy): a compiled step takes new values without recompiling
        return noise, torch.full((), tau, device=view.device), torch.full((), beta, device=view.device)

    def forward(self, view, noise, tau, beta):
        """Stage-1 loss with prepare's inputs: (loss, hard ids [B, N], logged scalars)."""
        cfg = self.schedule
        logits = self.logits(view)  # [B, V, h, w]
        B, V, h, w = logits.shape
        exponential = -torch.log(noise.clamp(min=1e-20))  # Exp(1) noise; Gumbel noise is -log of it
        gumbel = -torch.log(exponential.clamp(min=1e-20))
        z_soft = torch.softmax((logits + gumbel) / tau, dim=1)  # [B, V, h, w], relaxed one-hots
        if cfg["straight_through"]:  # forward: the sample's one-hot; backward: the relaxed gradient
            hard = F.one_hot(z_soft.argmax(dim=1), V).permute(0, 3, 1, 2).to(z_soft.dtype)  # [B, V, h, w]
            z_soft = hard + z_soft - z_soft.detach()
        z = torch.einsum("bvhw,vd->bdhw", z_soft, self.codebook.weight.float())  # [B, d, h, w]
        mu, log_b = self.decode_stats(z)
        x = map_pixels(view.float())
        if cfg["recon"] == "laplace":
            y = torch.log(x) - torch.log1p(-x)  # logit of the target, [B, 3, H, W]
            # logit-Laplace NLL of each pixel dimension: log(2 b) + |logit(x) - mu| / b + log(x (1 - x))
            nll = (math.log(2.0) + log_b + (y - mu).abs() * torch.exp(-log_b) + torch.log(x * (1 - x))).mean()
        else:
            sigma = GAUSS_SIGMA
            nll = (0.5 * ((unmap_pixels(torch.sigmoid(mu)) - view.float()) / sigma) ** 2 + math.log(sigma)
                   + 0.5 * math.log(2 * math.pi)).mean()
        log_q = torch.log_softmax(logits, dim=1)  # [B, V, h, w]
        kl = (log_q.exp() * log_q).sum(dim=1).mean() + math.log(V)  # KL(q || uniform) per position, nats
        dims_per_position = 3 * self.stride * self.stride  # the ELBO per pixel dimension
        loss = nll + beta * kl / dims_per_position
        return loss, logits.argmax(dim=1).flatten(1), {"nll": nll.detach(), "kl": kl.detach(), "tau": tau,
                                                       "beta": beta}


def cosine_anneal(progress, span, start, end):
    """start -> end along a half cosine over the first `span` of the run, then end (DALL-E's schedules)."""
    if span <= 0 or progress >= span:
        return end
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress / span))


def dvae_schedule(cfg):
    """The stage-1 schedules of the dVAE: Gumbel temperature and KL weight as functions of the stage's progress."""
    return dict(temp_anneal=cfg.dvae_temp_anneal, temp_end=cfg.dvae_temp_end, kl_warmup=cfg.dvae_kl_warmup,
                kl_weight=cfg.dvae_kl_weight, straight_through=cfg.dvae_straight_through, recon=cfg.dvae_recon)


def new_dvae(cfg, config=None):
    """The dVAE of this run: a fresh one with the config's architecture, or one of a saved tokenizer file's `config`;
    either way it trains with this run's stage-1 schedules."""
    dvae = DVAE(**(config or dict(vocab_size=cfg.vocab_size, stride=cfg.dvae_stride, hidden=cfg.dvae_hidden,
                                  codebook_dim=cfg.dvae_codebook_dim)))
    dvae.schedule = dvae_schedule(cfg)
    return dvae


# ---------------------------------------------------------------------------------------------------------------- #
#                                       stage 1: the tokenizer file and its training                                 #
# ---------------------------------------------------------------------------------------------------------------- #
def load_tokenizer(path, kind, new):
    """A tokenizer file -> (tokenizer, its saved record). The record holds kind, config, model, complete (False while
    stage 1 is under way: then also epoch, step, optimizer) and the last epoch's stats; `new(config)` builds the
    tokenizer of a saved config."""
    saved = load_file(path, "tokenizer")
    if not isinstance(saved, dict) or saved.get("kind") != kind or "model" not in saved:
        raise UserError(f"{path} is not a {kind} tokenizer file of this project")
    tokenizer = new(saved["config"])
    state_dict_fits(tokenizer, saved["model"], f"{path} does not fit a {kind} tokenizer")
    tokenizer.load_state_dict(saved["model"])
    return tokenizer, saved


def obtain_tokenizer(cfg, run, kind, new):
    """The tokenizer of this run, in the file --tokenizer (default <out>/tokenizer.pth): loaded when the file holds a
    finished one, else trained there (stage 1, continued from the file's epoch when an earlier stage 1 was
    interrupted). `new(config=None)` builds a fresh tokenizer of `kind`, or one of a saved config. Stage 1 draws from
    a fork of the global generators, so stage 2 starts from the same random state whether it ran or not."""
    path = Path(cfg.tokenizer) if cfg.tokenizer else run.out / "tokenizer.pth"
    if path.is_dir():
        raise UserError(f"--tokenizer {path} is a folder; give the path of a tokenizer file")
    tokenizer, saved = None, None
    if path.is_file():
        tokenizer, saved = load_tokenizer(path, kind, new)
        if saved["complete"]:
            run.log(f"tokenizer: {kind} from {path} ({tokenizer.vocab_size} codes, stride {tokenizer.stride}; "
                    f"last stage-1 epoch: {saved.get('stats', {})})")
            return tokenizer.to(run.device), path
        run.log(f"tokenizer: {path} is an unfinished stage 1 (epoch {saved['epoch']}, step {saved['step']}): "
                f"continuing it")
    elif cfg.eval_only:
        raise UserError(f"--eval-only: the tokenizer {path} does not exist")
    with seeded_rng(mix_seed(cfg.seed, run.dist.rank, 1_000_001), run.device):
        tokenizer = train_tokenizer(cfg, run, tokenizer or new(), path, saved)
    return tokenizer, path


def two_view_transform(img_size, tok_size, interpolation="lanczos", crop_scale=(0.08, 1.0)):
    """The official DataAugmentationForBEiT on a PIL image: ColorJitter(0.4, 0.4, 0.4) -> flip -> one
    RandomResizedCrop box resized twice, the model view bicubic + ImageNet normalisation, the tokenizer view
    `interpolation` (lanczos for the dVAE) in [0, 1]. Returns (model view [3, S, S], tokenizer view [3, T, T])."""
    jitter_flip = T.Compose([T.ColorJitter(0.4, 0.4, 0.4), T.RandomHorizontalFlip()])
    modes = {"lanczos": T.InterpolationMode.LANCZOS, "bicubic": T.InterpolationMode.BICUBIC}
    normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def views(img):
        img = jitter_flip(img)
        top, left, h, w = T.RandomResizedCrop.get_params(img, crop_scale, (3 / 4, 4 / 3))
        model_view = TF.resized_crop(img, top, left, h, w, [img_size, img_size], T.InterpolationMode.BICUBIC)
        tok_view = TF.resized_crop(img, top, left, h, w, [tok_size, tok_size], modes[interpolation])
        return normalize(model_view), TF.to_tensor(tok_view)
    return views


def two_view_augment(img_size, tok_size, crop_scale=(0.08, 1.0)):
    """two_view_transform for a batch on the device (the resident path): (uint8 [B, 3, H, W], generator) ->
    (model view [B, 3, S, S] normalised, tokenizer view [B, 3, T, T] in [0, 1]), one crop box and flip per image.
    official: PIL resizes (bicubic, lanczos); we: bicubic grid_sample for both (common.data.crop_resize_flip)."""
    mean, std = imagenet_stats()

    def augment(images, generator):
        nonlocal mean, std
        mean, std = mean.to(images.device), std.to(images.device)  # copied once, then found there
        B, _, H, W = images.shape
        # ColorJitter(0.4, 0.4, 0.4) before the crop, on the whole image, as officially
        x = color_jitter(images.float() / 255, generator, brightness=0.4, contrast=0.4, saturation=0.4)
        top, left, h, w = sample_resized_crops(B, H, W, crop_scale, (3 / 4, 4 / 3), generator, images.device)
        flip = torch.rand(B, device=images.device, generator=generator) < 0.5
        model_view = crop_resize_flip(x, top, left, h, w, flip, img_size, "bicubic")
        tok_view = crop_resize_flip(x, top, left, h, w, flip, tok_size, "bicubic").clamp(0, 1)
        return (model_view - mean) / std, tok_view
    return augment


def tokenizer_view_size(cfg, stride):
    """The rule that makes the token grid the patch grid: (img_size / patch_size) x the tokenizer's stride."""
    return cfg.img_size // cfg.patch_size * stride


def build_two_view_data(cfg, run, tok_size, interpolation, batch_size=None):
    """Pre-training batches of (model view, tokenizer view) on either data path."""
    cfg = replace(cfg, batch_size=batch_size or cfg.batch_size)
    return build_train_data(cfg, run.dist, crop_scale=(0.08, 1.0), interpolation="bicubic", log=run.log,
                            transform=two_view_transform(cfg.img_size, tok_size, interpolation),
                            augment=two_view_augment(cfg.img_size, tok_size))


def fixed_views(cfg, run, size, n):
    """n images of the val (or pre-training) split at `size` px in [0, 1]: the same ones every epoch."""
    transform = T.Compose([eval_transform(size).transforms[0], T.ToTensor()])
    ds = run_dataset(cfg, "val", transform, size)
    if ds is None:  # an unlabelled folder has no val split
        ds = run_dataset(cfg, "pretrain", transform, size)
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))]).to(run.device)


def train_tokenizer(cfg, run, tokenizer, path, saved=None):
    """Stage 1: fit the tokenizer on the pre-training images (its view of BEiT's two-view augmentation), AdamW
    (0.9, 0.999) with a cosine lr over the stage (DALL-E: cosine over its first 1.2 M of 3 M updates). Every epoch:
    log.jsonl gets the loss terms, the reconstruction error of the tokens on fixed images, the codebook perplexity and
    the fraction of codes used over the epoch's tokens (collapse onto a few codes is the known failure), and
    tokenizer_e<epoch>.png shows images beside their decoded tokens; `path` is written (atomically) with the state
    to continue from, and marked complete after the last epoch. Resumable at any step like stage 2. `saved`: the
    record of an unfinished stage 1 to continue."""
    tokenizer, kind = tokenizer.to(run.device), tokenizer.kind
    tok_size = tokenizer_view_size(cfg, tokenizer.stride)
    data = build_two_view_data(cfg, run, tok_size, tokenizer.interpolation, cfg.tokenizer_batch_size)
    optimizer = torch.optim.AdamW(param_groups(tokenizer, cfg.tokenizer_weight_decay), lr=cfg.tokenizer_lr,
                                  betas=(0.9, 0.999), fused=True)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp_dtype == torch.float16)  # fp16: scaled backward
    start_epoch, start_step = 0, 0
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        start_epoch, start_step = saved["epoch"], saved["step"]
    if run.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        run.write_json("config.json", asdict(cfg))  # (rewritten by stage 2)
        run.log_file = open(run.out / "log.jsonl", "a")
    train_model = run.wrap(tokenizer)  # torch.compile and/or DDP, as stage 2
    views = fixed_views(cfg, run, tok_size, 256)  # reconstruction error and pictures
    total = cfg.tokenizer_epochs * data.steps_per_epoch
    grid = (cfg.img_size // cfg.patch_size,) * 2
    run.log(f"stage 1: {kind} tokenizer, {count_params(tokenizer) / 1e6:.2f}M parameters, {tokenizer.vocab_size} "
            f"codes, {tok_size} px view -> {grid[0]} x {grid[1]} tokens, {cfg.tokenizer_epochs} epochs of "
            f"{data.steps_per_epoch} steps (batch {cfg.tokenizer_batch_size} per process) into {path}")

    def save(epoch, step, complete, stats):
        record = {"kind": kind, "config": tokenizer.config, "model": tokenizer.state_dict(), "complete": complete,
                  "epoch": epoch, "step": step, "stats": stats,
                  "trained_on": {"data": cfg.data, "img_size": cfg.img_size, "patch_size": cfg.patch_size}}
        if not complete:
            record["optimizer"] = optimizer.state_dict()
        if run.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save(record, path)

    def capped(steps):  # --max-steps caps stage 1 too (then stage 2 runs at most as many steps on this tokenizer)
        return 0 < cfg.max_steps <= steps

    stats = {}
    for epoch in range(start_epoch, cfg.tokenizer_epochs):
        tokenizer.train()
        counts = torch.zeros(tokenizer.vocab_size, device=run.device)
        names = None  # the tokenizer's tensor loss terms (dVAE: nll, kl)
        bar = progress(total=data.steps_per_epoch, initial=start_step, desc=f"tokenizer epoch {epoch}",
                       is_main=run.is_main)
        t0, steps, stopped = time.perf_counter(), 0, False
        for step, ((_, view), _) in enumerate(data.epoch(epoch, start_step), start_step):
            it = epoch * data.steps_per_epoch + step
            stopped = capped(it)  # --max-steps: stop before this step; a later run continues
            if stopped:
                break
            lr = set_lr(optimizer, cfg.tokenizer_min_lr + (cfg.tokenizer_lr - cfg.tokenizer_min_lr) * 0.5 * (
                1 + math.cos(math.pi * it / total)))
            with run.autocast():
                inputs = tokenizer.prepare(view, run.step_generator(it), it / total)  # eagerly, before the step
                loss, ids, terms = train_model(view, *inputs)
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # (skipped on inf/NaN gradients under fp16)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            counts.index_add_(0, ids.flatten(), torch.ones_like(ids.flatten(), dtype=counts.dtype))  # (no sync)
            if names is None:
                names = [k for k, v in terms.items() if torch.is_tensor(v)]
                sums = torch.zeros(1 + len(names), device=run.device)  # loss and those, summed over the epoch
            sums += torch.stack([loss.detach(), *(terms[k] for k in names)])
            steps += 1
            bar.update(1)
            run.guard.update(it, loss)
            run.global_step = it + 1  # (for the stop-signal agreement between ranks; stage 2 counts from 0)
            if run.global_step % cfg.log_every == 0:
                run.guard.check()
                line = dict(step=it, loss=loss.item(), **{k: round(float(v), 6) for k, v in terms.items()}, lr=lr)
                run.write_log(kind="tokenizer_step", **line)
                if bar.disable:
                    run.log(f"tokenizer step {it} (epoch {epoch}, {step + 1}/{data.steps_per_epoch}): " +
                            ", ".join(f"{k} {v:.4g}" for k, v in line.items() if k != "step"))
            if run.stop_requested():
                save(epoch, step + 1, False, stats)
                run.log(f"stopped by signal in stage 1 after tokenizer step {it}; {path} saved. Continue with "
                        f"{run.resume_hint()}")
                barrier()
                raise Preempted()
        bar.close()
        if stopped:
            save(epoch, step, False, stats)
            run.log(f"stage 1 stopped after {it} steps (--max-steps); " + (
                f"run again to continue {path}" if cfg.stage == "tokenizer" else
                "pre-training goes on with this unfinished tokenizer (a smoke run)"))
            break
        start_step = 0
        run.guard.check()
        if names is None:  # (an epoch resumed at its end: no step ran)
            names, sums = [], torch.zeros(1, device=run.device)
        if run.dist.world_size > 1:
            torch_dist.all_reduce(counts)
            torch_dist.all_reduce(sums)
            sums /= run.dist.world_size
        perplexity, used = codebook_stats(counts)
        tokenizer.eval()
        with run.autocast():
            recon = tokenizer.recon_error(views).item()
        loss, *means = (sums / max(steps, 1)).tolist()
        stats = dict(epoch=epoch, loss=round(loss, 5), **{k: round(v, 5) for k, v in zip(names, means)},
                     recon_error=round(recon, 6), perplexity=round(perplexity, 2), codes_used=round(used, 4),
                     seconds=round(time.perf_counter() - t0, 1))
        run.write_log(kind="tokenizer_epoch", **stats)
        terms_text = ", ".join(f"{k} {v:.4f}" for k, v in zip(names, means))
        run.log(f"tokenizer epoch {epoch}: loss {loss:.4f} ({terms_text}), {tokenizer.error_name} {recon:.5f}, "
                f"perplexity {perplexity:.1f}, {used:.1%} of {tokenizer.vocab_size} codes used, {stats['seconds']}s")
        if run.is_main:
            summary = (f"{kind} tokenizer epoch {epoch}: {tokenizer.error_name} {recon:.4f}, perplexity "
                       f"{perplexity:.0f}, {used:.0%} of {tokenizer.vocab_size} codes used")
            save_tokenizer_grid(tokenizer, views[:8], run.out / f"tokenizer_e{epoch}.png", summary, run.autocast())
            save_codebook_usage(counts, run.out / f"codebook_e{epoch}.png", summary)
        save(epoch + 1, 0, epoch + 1 == cfg.tokenizer_epochs, stats)
    run.write_log(kind="tokenizer_done", global_step=run.global_step, world_size=run.dist.world_size,
                  replicas_identical=run.replicas_identical(tokenizer))
    barrier()
    if run.log_file is not None:
        run.log_file.close()
        run.log_file = None
    run.global_step = 0
    return tokenizer.eval()


def save_tokenizer_grid(tokenizer, views, path, title, amp):
    """Rows: the tokenizer's view | its tokens decoded | the token map (one colour per id)."""
    grid = (views.shape[-2] // tokenizer.stride, views.shape[-1] // tokenizer.stride)
    with amp:
        ids = tokenizer.get_codebook_indices(views)
        decoded = tokenizer.decode(ids, grid)
    colours = token_colours(ids, tokenizer.vocab_size, grid, views.shape[-2:])
    if decoded is None:  # a tokenizer whose tokens decode to no pixels
        save_image_grid([views, colours], path, f"{title}\ntokens = the nearest codes (no pixels to decode)",
                        labels=["image", "token ids"])
    else:
        save_image_grid([views, decoded.float(), colours], path, f"{title}\ntokens = argmax of the encoder logits, "
                        f"decoded through the codebook", labels=["image", "decoded tokens", "token ids"])


def show_tokens(tokenizer, ids, grid, size):
    """Tokens as images [B, 3, H, W]: decoded through the tokenizer where it decodes to pixels (the dVAE), else each id
    as a fixed colour, which shows where two token maps agree."""
    img = tokenizer.decode(ids, grid)
    if img is None:
        return token_colours(ids, tokenizer.vocab_size, grid, size)
    return F.interpolate(img.float(), size=size, mode="bilinear", antialias=True).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------------------- #
#                                                  lr schedule                                                       #
# ---------------------------------------------------------------------------------------------------------------- #
def beit_lr(it, steps_per_epoch, cfg):
    """lr of iteration `it`, as the official `utils.cosine_scheduler`: warm-up = np.linspace(0, lr, W) over
    W = warmup_epochs x steps per epoch iterations (so it reaches lr at iteration W - 1), then
    min_lr + (lr - min_lr) / 2 (1 + cos(pi j / (T - W))) for j = it - W of the T - W remaining iterations."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if it < warmup:
        return cfg.lr * it / max(warmup - 1, 1)
    remaining = cfg.epochs * steps_per_epoch - warmup
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * (it - warmup) / remaining))


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      config                                                        #
# ---------------------------------------------------------------------------------------------------------------- #
@dataclass
class BEiTConfig(TrainConfig):
    """The two stages whatever the tokenizer (beit2.py's Config extends this too). Defaults = the official ImageNet-1K
    recipe of BEiT-B (README + run_beit_pretraining.py: 800 epochs, 16 GPUs x 128 = batch 2048, lr 1.5e-3, warm-up 10
    epochs from 0, cosine to 1e-5, wd 0.05, clip 3.0, drop path 0.1)."""
    # --- stage 2: BEiT pre-training
    batch_size: int = 128  # images per process per step (official: 128 per GPU on 16 GPUs)
    blr: float = 1.875e-4  # base lr per 256 images (official: lr 1.5e-3 at batch 2048, not scaled; we scale it)
    min_lr: float = 1e-5  # floor of the cosine (official --min_lr)
    warmup_epochs: float = 10  # linear warm-up from 0 (official utils.cosine_scheduler)
    clip_grad: typing.Optional[float] = 3.0  # clip the global gradient norm (official README: --clip_grad 3.0)
    drop_path: float = 0.1  # stochastic depth of the last block, linear from 0
    layer_scale: typing.Optional[float] = None  # initial layer-scale gains (default 0.1, vit_large/huge 1e-5; 0 = off)
    num_mask_patches: int = 0  # patches hidden per image at most (0 = 75/196 of the grid: 75 at 14 x 14)
    min_mask_patches_per_block: int = 0  # smallest block target area (0 = 16/196 of the grid: 16 at 14 x 14)
    max_mask_patches_per_block: int = 0  # largest block target area (0 = --num-mask-patches)
    min_aspect: float = 0.3  # block aspect ratio drawn log-uniformly in [min, 1/min]
    # --- stage 1: the tokenizer
    stage: str = "all"  # all (tokenizer when needed, then pre-training) or tokenizer (stage 1 only)
    tokenizer: str = ""  # tokenizer file (default <out>/tokenizer.pth); trained there unless it holds a finished one
    vocab_size: int = 8192  # visual vocabulary of a new tokenizer (a tokenizer file brings its own)
    tokenizer_epochs: int = 100  # stage-1 epochs (DALL-E: 3 M updates at batch 512)
    tokenizer_batch_size: int = 32  # stage-1 images per process per step (DALL-E: 512 in all = 32 on 16 processes)
    tokenizer_lr: float = 1e-4  # stage-1 peak lr, absolute (DALL-E 1e-4), cosine over stage 1 to --tokenizer-min-lr
    tokenizer_min_lr: float = 1.25e-6  # stage-1 final lr (DALL-E)
    tokenizer_weight_decay: float = 1e-4  # stage-1 AdamW weight decay (DALL-E)

    def check(self):
        super().check()
        n = (self.img_size // self.patch_size) ** 2
        if self.stage not in ("all", "tokenizer"):
            raise UserError(f"unknown --stage {self.stage!r}; choose all or tokenizer")
        if not 0 <= self.num_mask_patches <= n:
            raise UserError(f"--num-mask-patches {self.num_mask_patches} is not in [0, {n}] (the patch grid)")
        for name in ("min_mask_patches_per_block", "max_mask_patches_per_block", "tokenizer_min_lr",
                     "tokenizer_weight_decay"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not 0 < self.min_aspect <= 1:
            raise UserError(f"--min-aspect must be in (0, 1], got {self.min_aspect}")
        if self.vocab_size < 2:
            raise UserError(f"--vocab-size must be at least 2, got {self.vocab_size}")
        for name in ("tokenizer_epochs", "tokenizer_batch_size", "tokenizer_lr"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.layer_scale is not None and self.layer_scale < 0:
            raise UserError(f"--layer-scale must not be negative, got {self.layer_scale}")
        if not 0 <= self.drop_path < 1:
            raise UserError(f"--drop-path must be in [0, 1), got {self.drop_path}")
        masks = mask_generator(self)
        if masks.min_num_patches > masks.num_masking_patches:
            raise UserError(f"--min-mask-patches-per-block {masks.min_num_patches} exceeds --num-mask-patches "
                            f"{masks.num_masking_patches}")


@dataclass
class Config(BEiTConfig):
    """BEiT with its tokenizer: the dVAE trained with DALL-E's objective (paper App. A.2) on the official
    DiscreteVAE layout."""
    host_memory_gib = (1.9, 0.206)  # GiB (fixed, per image) on a CPU in fp32 at these defaults: bench.py --memory
    dvae_stride: int = 8  # input pixels per token side, a power of 2 (DALL-E and the official tokenizer: 8)
    dvae_hidden: int = 256  # conv width (official DiscreteVAE "customized": 256)
    dvae_codebook_dim: int = 512  # width of a code's embedding (official: 512)
    dvae_kl_weight: float = 6.6  # beta of KL(q(z|x) || uniform) in the ELBO (DALL-E: 6.6, for codebook usage)
    dvae_kl_warmup: float = 0.0017  # fraction of stage 1 over which beta rises from 0 (DALL-E: 5 k of 3 M updates)
    dvae_temp_anneal: float = 0.05  # fraction of stage 1 over which the Gumbel temperature falls (DALL-E: 150 k of 3 M)
    dvae_temp_end: float = 1 / 16  # final Gumbel-softmax temperature (from 1; DALL-E: 1/16)
    dvae_recon: str = "gauss"  # reconstruction NLL: gauss (sigma 0.1 on [0, 1] pixels) or laplace (DALL-E's)
    dvae_straight_through: bool = False  # decode the sample's one-hot, relaxed gradient (DALL-E: relaxed both ways)

    def check(self):
        super().check()
        if self.dvae_recon not in ("gauss", "laplace"):
            raise UserError(f"unknown --dvae-recon {self.dvae_recon!r}; choose gauss or laplace")
        if self.dvae_kl_weight < 0:
            raise UserError(f"--dvae-kl-weight must not be negative, got {self.dvae_kl_weight}")
        if self.dvae_stride < 2 or self.dvae_stride & (self.dvae_stride - 1):
            raise UserError(f"--dvae-stride must be a power of 2 (one 2x downsampling a layer), got {self.dvae_stride}")
        for name in ("dvae_hidden", "dvae_codebook_dim", "dvae_temp_end"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not (0 <= self.dvae_kl_warmup <= 1 and 0 <= self.dvae_temp_anneal <= 1):
            raise UserError("--dvae-kl-warmup and --dvae-temp-anneal are fractions of stage 1, in [0, 1]")


def layer_scale(cfg):
    """Official --layer_scale_init_value: 0.1 for base, 1e-5 for large (for fp16 stability); 0 disables the gains
    (official: `init_values > 0`)."""
    value = cfg.layer_scale
    if value is None:
        value = 1e-5 if cfg.model in ("vit_large", "vit_huge") else 0.1
    return value or None


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      train                                                         #
# ---------------------------------------------------------------------------------------------------------------- #
def main():
    cfg, preset = parse_config(Config, PRESETS, description=__doc__.split("\n\n")[0])
    run = Run(cfg, "beit", preset)  # devices, processes, --out; resolves cfg.out, cfg.compile, a preset's accum_iter
    # stage 1: the dVAE, trained into its file unless that already holds a finished one
    tokenizer, tokenizer_path = obtain_tokenizer(cfg, run, "dvae", partial(new_dvae, cfg))
    if cfg.stage == "tokenizer":
        if load_file(tokenizer_path, "tokenizer")["complete"]:
            run.log(f"stage 1 done: {tokenizer_path}")
        return
    cfg.vocab_size, cfg.dvae_stride = tokenizer.vocab_size, tokenizer.stride  # a tokenizer file brings its own
    cfg.tokenizer = str(tokenizer_path)
    # stage 2: BEiT
    tok_size = tokenizer_view_size(cfg, tokenizer.stride)
    data = None if cfg.eval_only else build_two_view_data(cfg, run, tok_size, tokenizer.interpolation)
    with seeded_rng(cfg.seed + run.dist.rank, run.device):  # as Run seeded it: the monitors rebuild this init
        model = build_model(cfg, tokenizer).to(run.device)
    cfg.lr = scaled_lr(cfg, run.global_batch)  # lr = blr x global batch / 256 (official: 1.5e-3 at batch 2048)
    # AdamW(0.9, 0.999), wd 0.05 except 1-D parameters, biases and the official `no_weight_decay` (cls token; there
    # is no pos_embed); the mask token and the relative position table *are* decayed, as officially
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, no_decay=("encoder.cls_token",)), lr=cfg.lr,
                                  betas=(0.9, 0.999), fused=True)
    start_epoch, start_step = run.start(model, optimizer)
    masks = mask_generator(cfg)
    run.log(f"BEiT {cfg.model}/{cfg.patch_size} at {cfg.img_size}px: {count_params(model) / 1e6:.2f}M trainable "
            f"parameters ({count_params(model.encoder) / 1e6:.2f}M encoder), {tokenizer.vocab_size} visual tokens from "
            f"{tokenizer_path} on the {tok_size}px view; at most {masks.num_masking_patches} of {masks.num_patches} "
            f"patches masked, blocks >= {masks.min_num_patches}")
    fixed = preview_images(cfg, run.dist).to(run.device)  # the same 8 images in every grid
    fixed_tok = fixed_views(cfg, run, tok_size, len(fixed))
    t0, mlm_acc = time.perf_counter(), None

    if not cfg.eval_only:
        train_model = run.wrap(model)  # torch.compile and/or DDP
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            run.start_epoch(epoch, start_step, data.steps_per_epoch)
            accuracy = torch.zeros((), device=run.device)
            for step, (batch, _) in enumerate(data.epoch(epoch, start_step), start_step):
                it = epoch * data.steps_per_epoch + step
                first = it - step % cfg.accum_iter  # the update's first micro-step: its lr is set there, as officially
                lr = set_lr(optimizer, beit_lr(first, data.steps_per_epoch, cfg))
                update = (step + 1) % cfg.accum_iter == 0  # the last micro-step of an accumulation updates
                set_grad_sync(train_model, update)
                with run.autocast():
                    loss, acc = pretraining_step(train_model, batch, masks, run.step_generator(it))  # (seed, step)
                run.scaler.scale(loss / cfg.accum_iter).backward()
                grad_norm = None
                if update:
                    run.scaler.unscale_(optimizer)
                    if cfg.clip_grad:
                        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    run.scaler.step(optimizer)
                    run.scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                accuracy += acc
                run.log_step(epoch, step, loss, lr, grad_norm)  # progress bar, non-finite guard, --log-every line
                if run.should_stop(step):  # at an update: --max-steps reached, or a stop signal
                    run.save_checkpoint(epoch, step + 1)
                    run.exit_if_preempted()  # a stop signal ends the process here; --resume auto continues
                    break
                if run.should_checkpoint(step):  # every --ckpt-every-steps
                    run.save_checkpoint(epoch, step + 1)
            start_step = 0
            mlm_acc = run.mean_over_ranks(accuracy / max(run.epoch_steps, 1)).item()
            if not run.done:  # (--max-steps ends mid-epoch: no epoch summary, but the grid of where it stopped)
                run.log_epoch(epoch, mlm_acc=round(mlm_acc, 5))
                run.log(f"epoch {epoch}: masked-token accuracy {mlm_acc:.2%}")
                run.save_checkpoint(epoch + 1, 0)
            if run.is_main:
                save_reconstruction(model, fixed, fixed_tok, masks, run.out / f"recon_e{epoch}.png",
                                    f"BEiT {cfg.model} epoch {epoch}, <= {masks.num_masking_patches}/"
                                    f"{masks.num_patches} patches masked in blocks", run.autocast())
            if run.done:
                break
            if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
                run.write_log(kind="eval", epoch=epoch, **monitors(model.encoder, build_model, run))
        run.finish_training(time.perf_counter() - t0)

    tokenizer = {"path": str(tokenizer_path), **load_file(tokenizer_path, "tokenizer").get("stats", {})}
    # encoder.pth, the monitors, results.json (with the last epoch's accuracy: None with --eval-only), fine-tuning
    report("beit", model.encoder, build_model, run, extra={"mlm_acc": mlm_acc, "tokenizer": tokenizer})


# ---------------------------------------------------------------------------------------------------------------- #
#                                            presets and fine-tuning recipes                                         #
# ---------------------------------------------------------------------------------------------------------------- #
# Presets by dataset scale; a flag given on the command line always wins. Each keeps the ImageNet structure: about
# 38 % of the patches hidden in blocks of >= 8 % of the grid, a tokenizer whose token grid is the patch grid.
PRESETS = {
    # `python beit.py`: the offline demo, a CPU-sized model and schedule (not a research recipe). 32 px, patch 4: an
    # 8 x 8 grid, 24 patches hidden in blocks of >= 5; the tokenizer downsamples 4x (two layers), so its view is the
    # 32 px crop itself, with 512 codes. 3000 images of each split (all 65 tokens pass the encoder, and the tokenizer
    # runs too, so a step costs several MAE steps). Stage 1 runs 8 epochs at batch 64 with DALL-E's schedules
    # stretched over it (with much fewer steps its codebook collapses onto a few codes); stage 2 the encoder of the
    # MAE/SimMIM demos, with the lr raised for the short run.
    "demo": dict(img_size=32, patch_size=4, model="vit_micro", batch_size=128, epochs=2, warmup_epochs=0.5, blr=2e-3,
                 workers=2, subset=3000, vocab_size=512, dvae_stride=4, dvae_hidden=32, dvae_codebook_dim=64,
                 tokenizer_epochs=8, tokenizer_batch_size=64, tokenizer_lr=2e-3, tokenizer_min_lr=1e-4,
                 dvae_kl_warmup=0.2, dvae_temp_anneal=0.5),
    # CIFAR-10/100, (Fashion-)MNIST at their native 32/28 px: our choice, no published BEiT recipe at this scale.
    # Patch 2 gives SimMIM's and MAE's 16 x 16 grid (97 hidden, blocks >= 20), ViT-T, the official schedule and
    # global batch 2048 (512 x 4 accumulation steps); a 2x tokenizer (one layer, 2 x 2 pixels per token, on the 32 px
    # crop) with 1024 codes, 100 epochs at batch 128, DALL-E's schedules stretched as in the demo.
    "small": dict(patch_size=2, model="vit_tiny", batch_size=512, accum_iter=4, vocab_size=1024, dvae_stride=2,
                  dvae_hidden=128, dvae_codebook_dim=128, tokenizer_batch_size=128, tokenizer_lr=1e-3,
                  tokenizer_min_lr=1e-5, dvae_kl_warmup=0.05, dvae_temp_anneal=0.3),
    # STL-10 (96 px): our choice too. Patch 8: a 12 x 12 grid (55 hidden); a 4x tokenizer on the 48 px view (half the
    # model view, as 112 of 224) with 8192 codes; ViT-S, global batch 2048 (256 x 8).
    "medium": dict(img_size=96, patch_size=8, model="vit_small", batch_size=256, accum_iter=8, dvae_stride=4,
                   dvae_hidden=128, dvae_codebook_dim=256, tokenizer_batch_size=128, tokenizer_lr=1e-3,
                   tokenizer_min_lr=1e-5, dvae_kl_warmup=0.05, dvae_temp_anneal=0.3),
    "imagenet": {},
}

# finetune.py's recipes (and --finetune-epochs'): one per data scale, picked by the input size
# (finetune.finetune_scale); the fields are its FinetuneRecipe's.
FINETUNE = {
    # official get_started_for_image_classification.md, BEiT-B from a self-supervised checkpoint: 8 x 128 = 1024
    # images, lr 4e-3 (absolute; we scale it: 1e-3 per 256), 100 epochs, 20 of warm-up from 0, cosine to 1e-6
    # (utils.cosine_scheduler: the warm-up ends one step earlier than MAE's, the same curve otherwise), layer decay
    # 0.65, drop path 0.1, wd 0.05, no clipping, rand-m9-mstd0.5-inc1, erasing 0.25, mixup 0.8, cutmix 1.0,
    # smoothing 0.1, mean pooling. official: head init trunc_normal(0.02) x 0.001 and the shared relative position
    # table copied into every block (finetune.py does the same); we: the same std (2e-5).
    "imagenet": dict(epochs=100, warmup_epochs=20, blr=1e-3, min_lr=1e-6, layer_decay=0.65, drop_path=0.1,
                     crop_scale=(0.08, 1.0), rand_augment=9, erasing=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1),
    # BEiT-L: 64 x 2 x 8 = 1024, lr 1e-3 (2.5e-4 per 256), 50 epochs, 5 of warm-up, layer decay 0.75, drop path 0.2
    "vit_large": dict(epochs=50, warmup_epochs=5, blr=2.5e-4, layer_decay=0.75, drop_path=0.2),
    # STL-10 and other 65-128 px images: our choice; the ImageNet recipe with a milder crop.
    "medium": dict(epochs=100, warmup_epochs=20, blr=1e-3, min_lr=1e-6, layer_decay=0.65, drop_path=0.1,
                   crop_scale=(0.2, 1.0), rand_augment=9, erasing=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1),
    # 28-64 px images and short budgets: ours, the small-image recipe of MAE and SimMIM (10 % warm-up, crop 0.5-1,
    # flip, no RandAugment / erasing / mixup / cutmix) with BEiT's lr and layer decay 0.75.
    "small": dict(epochs=50, warmup_epochs=5, blr=1e-3, min_lr=1e-6, layer_decay=0.75, drop_path=0.1,
                  crop_scale=(0.5, 1.0), rand_augment=0, erasing=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1),
}


# ---------------------------------------------------------------------------------------------------------------- #
#                                                  visualisation                                                     #
# ---------------------------------------------------------------------------------------------------------------- #
@torch.no_grad()
def save_reconstruction(model, imgs, tok_views, masks, path, title, amp):
    """Rows: original | masked blocks (drawn by `masks`) | the tokenizer's tokens shown (the targets) | the predicted
    tokens at the masked positions (target tokens elsewhere) shown. The same masks every epoch (seed 0)."""
    was_training = model.training
    model.eval()
    mask = masks(imgs.shape[0], random.Random(0), imgs.device)  # [B, N]
    tokenizer = model.tokenizer
    with amp:
        ids = tokenizer.get_codebook_indices(tok_views)  # [B, N]
        pred = model.lm_head(model.forward_encoder(imgs, mask)).argmax(-1)  # [B, N], every position
        mixed = torch.where(mask, pred, ids)
        size = imgs.shape[-2:]
        target_img, pred_img = (show_tokens(tokenizer, t, model.grid_size, size) for t in (ids, mixed))
    model.train(was_training)
    acc = (pred == ids)[mask].float().mean().item()
    p = model.encoder.patch_embed.patch_size
    m = mask.view(-1, 1, *model.grid_size).float().repeat_interleave(p, 2).repeat_interleave(p, 3)  # [B, 1, H, W]
    rows = [denormalize(imgs), denormalize(imgs) * (1 - m) + 0.5 * m, target_img, pred_img]
    shown = ("decodes through the tokenizer's decoder" if tokenizer.decode(ids[:1], model.grid_size) is not None
             else "one colour per token id (the tokenizer decodes no pixels)")
    note = f"masked-token accuracy on these images {acc:.1%}; {shown}"
    save_image_grid(rows, path, f"{title}\n{note}", labels=["original", "masked", "target tokens", "predicted"])


# ---------------------------------------------------------------------------------------------------------------- #
#                                                  bench.py hooks                                                    #
# ---------------------------------------------------------------------------------------------------------------- #
def bench_label(cfg):
    """bench.py's row name: the method, the encoder and the input size."""
    return f"BEiT {cfg.model}/{cfg.patch_size} {cfg.img_size}px"


def bench_batch(imgs, cfg):
    """bench.py's hook: random images -> (model view, tokenizer view in [0, 1] at the dVAE's stride)."""
    size = tokenizer_view_size(cfg, cfg.dvae_stride)
    return imgs, torch.rand(imgs.shape[0], 3, size, size, device=imgs.device)


if __name__ == "__main__":
    cli(main)
