"""ConvMAE: Masked Convolution Meets Masked Autoencoders (Gao, Ma, Li, Liu, Wang, Dai, Qiao, 2022), arXiv:2205.03892.

MAE with a hybrid convolution-transformer encoder. Two convolutional stages at 1/4 and 1/8 of the input resolution
(blocks with a 5 x 5 depthwise convolution as token mixer) feed a ViT stage at 1/16. The mask is drawn on the
stage-3 grid (one 16 x 16-pixel patch per token, 75 % hidden, MAE's argsort of uniform noise) and upsampled to the
conv grids as 4 x 4 and 2 x 2 blocks; the conv stages run densely but multiply the input of every depthwise
convolution by the mask ("masked convolution", paper §3.2), and every downsampling is non-overlapping and aligned
with the mask blocks, so nothing from a hidden patch reaches a visible one. The ViT stage runs on the visible tokens
only. Stage-1 and stage-2 features are brought to the stage-3 grid by strided convolutions, gathered at the
visible tokens and added to the ViT's output before its final norm (multi-scale fusion, §3.2). The decoder, target
and loss are MAE's: 8 blocks of width 512 over encoded + mask tokens, per-patch normalised pixels, MSE on the hidden
patches. For fine-tuning and probing the conv stages run unmasked and all stage-3 tokens are averaged.

Sizes: `--model` names the ViT of stage 3; the conv stages have widths D/3 and D/2 and 2 blocks each, and the ViT
stage depth - 1 blocks (vit_base -> ConvMAE-B [256, 384, 768] x [2, 2, 11], the only official size; the others are
ours). `--patch-size` is the total stride p of the three stages, p/4 x 2 x 2 (16 = the official 4 x 2 x 2; 8 or 4
for 28-32 px images: stage 1 at half or full resolution). The image size must be divisible by p.

Run:     python convmae.py                                   # offline demo on the built-in synthetic set
         python convmae.py --data cifar10 --data-path ./data  # the small-data preset (ConvViT-T, stride 4 at 32 px)
         python convmae.py --data imagenet --data-path /data/imagenet --model vit_base   # ConvMAE-B
         torchrun --nproc_per_node 8 convmae.py --data imagenet --data-path /data/imagenet --accum-iter 3
Deviations from the official code:
  - masks are drawn from a generator seeded by (seed, rank, step) instead of the global RNG (exact resume)
  - the conv stages run on channels-last memory (faster oneDNN kernels; last bits of fp32 differ)
  - any input size divisible by p and any p divisible by 4 (official: 224 and 16 only)
  - `unpatchify` works (official: broken)
  - the encoder's state dict has the names listed in ConvViT (official_names() maps them)
  - evaluation reads the pooled token from position 0 (ConvMAE has no cls token)
  - fine-tuning reports the last epoch (official: the best on val)
  - the demo/small/medium presets are not the paper's recipe (see PRESETS)
Results: docs/RESULTS.md#convmae
"""
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from common import UserError
from common.data import build_train_data, preview_images
from common.evaluation import denormalize, monitors, report, save_image_grid
from common.training import (Run, TrainConfig, cli, cosine_lr, param_groups, parse_config, scaled_lr, set_grad_sync,
                             set_lr)
from common.vit import (Block, DropPath, count_params, drop_path_rates, layer_norm, run_block, set_grad_checkpointing,
                        sincos_pos_embed_2d)


# ---------------------------------------------------------------------------------------------------------------- #
#                                                     masking                                                        #
# ---------------------------------------------------------------------------------------------------------------- #
def random_masking(batch_size, num_patches, mask_ratio, noise=None, device=None):
    """MAE's per-sample random masking on the stage-3 grid (official `random_masking`: it needs x only for its
    batch size and device, and gathers nothing). The int(N * (1 - ratio)) patches with the smallest noise stay
    visible; `noise` [B, N] reproduces a given masking exactly.
    Returns ids_keep [B, N_vis] (visible patches, in shuffled order), mask [B, N] (1 = masked), ids_restore [B, N]."""
    n_keep = int(num_patches * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch_size, num_patches, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)  # [B, N]: ascending noise, the first n_keep are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, N]: position of each patch in the shuffled order
    ids_keep = ids_shuffle[:, :n_keep]  # [B, N_vis]
    mask = torch.ones(batch_size, num_patches, device=noise.device)
    mask[:, :n_keep] = 0  # in shuffled order: kept first
    mask = torch.gather(mask, 1, ids_restore)  # [B, N] back in patch order, 1 = masked
    return ids_keep, mask, ids_restore


def upsample_mask(mask, factor):
    """[B, h, w] stage-3 mask -> [B, 1, h*f, w*f]: each patch becomes an f x f block (nearest neighbour; the official
    repeat/reshape/permute chain computes the same)."""
    return mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2).unsqueeze(1)


def gather_tokens(x, ids):
    """[B, N, D] tokens, [B, n] indices -> [B, n, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      model                                                         #
# ---------------------------------------------------------------------------------------------------------------- #
# stage-3 ViT size -> (widths of stages 1, 2, 3), (blocks of stages 1, 2, 3), heads of stage 3.
# vit_base is the official ConvMAE-B (models_convmae.py); the others follow its pattern (widths D/3, D/2, D; 2 + 2
# conv blocks; one ViT block fewer than the ViT), except vit_nano (tests). There is no official L/H.
CONVMAE_SIZES = {
    "vit_nano": ((16, 32, 64), (1, 1, 1), 2),
    "vit_micro": ((64, 96, 192), (2, 2, 5), 3),
    "vit_tiny": ((64, 96, 192), (2, 2, 11), 3),
    "vit_small": ((128, 192, 384), (2, 2, 11), 6),
    "vit_base": ((256, 384, 768), (2, 2, 11), 12),
}


def channels_last_norm(norm, x):
    """A LayerNorm over the channels of an NCHW map (per position): [B, C, H, W] -> [B, C, H, W]."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class StageEmbed(nn.Module):
    """Downsampling between stages (official `PatchEmbed`): non-overlapping conv k = s = stride, LayerNorm over
    channels, GELU. NCHW in and out. official: nn.LayerNorm with its default eps 1e-5, kept."""

    def __init__(self, in_chans, dim, stride):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=stride, stride=stride)
        self.norm = nn.LayerNorm(dim)  # eps 1e-5, as the official
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(channels_last_norm(self.norm, self.proj(x)))  # [B, C, H, W] -> [B, dim, H/s, W/s]


class ConvMlp(nn.Module):
    """The conv blocks' MLP (official `CMlp`): 1x1 conv C -> 4C, GELU, 1x1 conv 4C -> C."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvBlock(nn.Module):
    """Stage-1/2 block (official `CBlock`, paper Fig. 1): a transformer block with a 5x5 depthwise convolution in
    the place of attention, on NCHW maps.
        x = x + conv2(dwconv5x5(visible * conv1(LN(x))))     visible [B, 1, H, W]: 1 = visible (masked convolution)
        x = x + mlp(LN(x))
    The multiply zeroes the depthwise conv's input at hidden positions, the only operation here that mixes positions,
    so visible outputs never see hidden pixels (paper §3.2). official: LayerNorm eps 1e-5 (its
    `norm_layer` argument is ignored) and unused num_heads/qkv_bias arguments; we keep the eps, drop the arguments."""

    def __init__(self, dim, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # eps 1e-5, as the official
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)  # official name; the depthwise token mixer
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x, visible=None):
        y = self.conv1(channels_last_norm(self.norm1, x))  # [B, C, H, W]
        if visible is not None:
            y = y * visible  # hidden positions -> 0 before the only spatial mixing
        x = x + self.drop_path(self.conv2(self.attn(y)))
        return x + self.drop_path(self.mlp(channels_last_norm(self.norm2, x)))


class ConvStem(nn.Module):
    """Stages 1 and 2 and the stage-3 embedding: everything before the ViT blocks, i.e. the ViT's patch embedding
    (a hybrid ViT's CNN). [B, 3, H, W] -> stage-3 tokens [B, N, D] (row-major), plus the stage-1 and stage-2 maps
    [B, C1, H/(p/4), W/(p/4)] and [B, C2, H/(p/2), W/(p/2)] for the multi-scale fusion."""

    def __init__(self, img_size, patch_size, dims, depths, in_chans=3):
        super().__init__()
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else img_size
        if patch_size % 4 or img_h % patch_size or img_w % patch_size:
            raise ValueError(f"the total stride {patch_size} must be a multiple of 4 that divides the image size "
                             f"{img_h}x{img_w}")
        self.img_size, self.patch_size = (img_h, img_w), patch_size
        self.grid_size = (img_h // patch_size, img_w // patch_size)  # the stage-3 token grid (h, w)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_embed1 = StageEmbed(in_chans, dims[0], patch_size // 4)  # official: 4 (224 -> 56)
        self.blocks1 = nn.ModuleList(ConvBlock(dims[0]) for _ in range(depths[0]))
        self.patch_embed2 = StageEmbed(dims[0], dims[1], 2)  # 56 -> 28
        self.blocks2 = nn.ModuleList(ConvBlock(dims[1]) for _ in range(depths[1]))
        self.patch_embed3 = StageEmbed(dims[1], dims[2], 2)  # 28 -> 14
        self.patch_embed4 = nn.Linear(dims[2], dims[2])  # a linear layer on the stage-3 tokens (official name)
        self.grad_checkpointing = False  # the conv blocks under activation checkpointing (set_grad_checkpointing)

    def forward(self, imgs, mask=None):
        """mask: [B, h, w] on the stage-3 grid, 1 = masked, or None (fine-tuning: everything visible)."""
        if tuple(imgs.shape[-2:]) != self.img_size:
            raise ValueError(f"input is {tuple(imgs.shape[-2:])}, the model was built for {self.img_size}")
        visible1 = visible2 = None
        if mask is not None:
            visible1 = upsample_mask(1 - mask, 4)  # [B, 1, 4h, 4w]: a hidden patch is a 4 x 4 block at stage 1
            visible2 = upsample_mask(1 - mask, 2)  # [B, 1, 2h, 2w]: and a 2 x 2 block at stage 2
        # channels-last memory (NCHW shape, NHWC layout): the LayerNorm permutes become free views and oneDNN's
        # convolutions, the depthwise weight gradient most of all, run faster than on NCHW memory; the official
        # code runs NCHW: the same function, summed in another order (last bits of fp32 differ)
        imgs = imgs.contiguous(memory_format=torch.channels_last)
        x = self.patch_embed1(imgs)  # [B, 3, H, W] -> [B, C1, 4h, 4w]
        for block in self.blocks1:
            x = run_block(block, x, visible1, grad_checkpointing=self.grad_checkpointing)
        stage1 = x
        x = self.patch_embed2(x)  # -> [B, C2, 2h, 2w]
        for block in self.blocks2:
            x = run_block(block, x, visible2, grad_checkpointing=self.grad_checkpointing)
        stage2 = x
        x = self.patch_embed3(x)  # -> [B, D, h, w]
        x = self.patch_embed4(x.flatten(2).transpose(1, 2))  # [B, D, h, w] -> [B, N, D]
        return x, stage1, stage2


class ConvViT(nn.Module):
    """The ConvMAE encoder, as fine-tuned (official `models_convvit.ConvViT`): conv stem, fixed sin-cos position
    embedding (no cls token), ViT blocks from common/, final norm. Exported as encoder.pth.

    common/evaluation.py reads token 0 as the cls token and tokens 1: as the patches. ConvMAE has no cls token, so
    prepend_cls() reserves position 0 and run_blocks() fills it with the mean of the block outputs, which never takes
    part in attention: forward_features()[:, 0] = norm(mean of tokens) (the official linear probe's --global_pool
    feature, with the encoder's norm in place of a fresh LayerNorm), and the fine-tuning Classifier's mean over
    tokens 1: pools all N tokens, as the official global_pool.

    encoder.pth (the fine-tuning backbone, as the official release: no fusion convs, no decoder):
      patch_embed.patch_embed{1,2,3}.{proj,norm}   conv k = s = p/4, 2, 2, then LayerNorm (eps 1e-5) and GELU
      patch_embed.blocks{1,2}.{i}.*                conv blocks: norm1, conv1, attn (the 5x5 dw conv), conv2, norm2,
                                                   mlp.fc1, mlp.fc2
      patch_embed.patch_embed4                     Linear D -> D on the stage-3 tokens
      pos_embed [1, N, D] (no cls token), blocks.{i}.* (timm ViT block names), norm
    `official_names()` renames it to Alpha-VL/ConvMAE's (drop the `patch_embed.` prefix, `blocks.` -> `blocks3.`),
    which loads into its `models_convvit.convvit_base_patch16` with only the head missing. The conv stages live under
    `patch_embed` (as the CNN of timm's hybrid ViTs) so that layer-wise lr decay gives them the embedding's layer, as
    the official `util/lr_decay.py` does."""

    def __init__(self, img_size=224, patch_size=16, model="vit_base", drop_path_rate=0.0, in_chans=3):
        super().__init__()
        dims, depths, heads = CONVMAE_SIZES[model]
        self.embed_dim, self.num_heads = dims[2], heads
        self.patch_embed = ConvStem(img_size, patch_size, dims, depths[:2], in_chans)
        table = sincos_pos_embed_2d(dims[2], *self.patch_embed.grid_size)  # [N, D], no cls row
        self.pos_embed = nn.Parameter(table.unsqueeze(0), requires_grad=False)  # [1, N, D], fixed in pre-training
        self.blocks = nn.ModuleList(Block(dims[2], heads) for _ in range(depths[2]))  # LN eps 1e-6, qkv bias
        self.norm = layer_norm(dims[2])
        self.set_drop_path(drop_path_rate)
        self.grad_checkpointing = False  # the ViT blocks under activation checkpointing (set_grad_checkpointing)

    def conv_blocks(self):
        return [*self.patch_embed.blocks1, *self.patch_embed.blocks2]

    def embed(self, imgs):
        """Unmasked conv stages + position: [B, 3, H, W] -> [B, N, D]."""
        return self.patch_embed(imgs)[0] + self.pos_embed

    def prepend_cls(self, x):
        """[B, N, D] -> [B, 1+N, D]: a placeholder at position 0 (no cls token; see the class docstring)."""
        return torch.cat([x.new_zeros(x.shape[0], 1, x.shape[2]), x], dim=1)

    def run_blocks(self, x):
        """ViT blocks on tokens 1: of [B, 1+N, D]; position 0 becomes their mean (before the final norm)."""
        x = x[:, 1:]
        for block in self.blocks:
            x = run_block(block, x, grad_checkpointing=self.grad_checkpointing)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)

    def forward_features(self, imgs):
        """All patches, no masking: [B, 3, H, W] -> normalised [B, 1+N, D] (position 0: the pooled token)."""
        return self.norm(self.run_blocks(self.prepend_cls(self.embed(imgs))))

    def set_drop_path(self, rate):
        """Stochastic depth linspace(0, rate, all blocks), conv blocks first (official ConvViT: over 2 + 2 + 11)."""
        blocks = self.conv_blocks() + list(self.blocks)
        for r, block in zip(drop_path_rates(rate, len(blocks)), blocks):
            block.drop_path.drop_prob = r


def official_names(state_dict):
    """Our encoder's state dict -> Alpha-VL/ConvMAE's names (`patch_embed.patch_embed1.proj.weight` ->
    `patch_embed1.proj.weight`, `blocks.3.attn.qkv.weight` -> `blocks3.3.attn.qkv.weight`); pre-training models'
    `encoder.` prefix is dropped first, other keys (decoder, fusion convs) keep their names, which are the official."""
    out = {}
    for name, value in state_dict.items():
        name = name.removeprefix("encoder.").removeprefix("patch_embed.")
        out["blocks3." + name.removeprefix("blocks.") if name.startswith("blocks.") else name] = value
    return out


class ConvMAE(nn.Module):
    def __init__(self, img_size=224, patch_size=16, model="vit_base", decoder_dim=512, decoder_depth=8,
                 decoder_heads=16, norm_pix_loss=True):
        super().__init__()
        self.encoder = ConvViT(img_size, patch_size, model)
        dims = CONVMAE_SIZES[model][0]
        self.patch_size = patch_size
        self.grid_size = self.encoder.patch_embed.grid_size
        self.num_patches = self.encoder.patch_embed.num_patches
        # multi-scale fusion (pre-training only, like the decoder): stage-1/2 maps -> the stage-3 grid by
        # non-overlapping strided convs (stage 1 is 4x finer than stage 3, stage 2 2x)
        self.stage1_output_decode = nn.Conv2d(dims[0], dims[2], 4, stride=4)
        self.stage2_output_decode = nn.Conv2d(dims[1], dims[2], 2, stride=2)
        # decoder: MAE's, without a cls token
        self.decoder_embed = nn.Linear(dims[2], decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        table = sincos_pos_embed_2d(decoder_dim, *self.grid_size)
        self.decoder_pos_embed = nn.Parameter(table.unsqueeze(0), requires_grad=False)  # [1, N, D_dec], fixed
        # official: mlp_ratio[0] (= 4) for the decoder blocks
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads) for _ in range(decoder_depth))
        self.decoder_norm = layer_norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size ** 2 * 3)  # pixels of one p x p patch
        self.grad_checkpointing = False  # the decoder blocks under activation checkpointing (set_grad_checkpointing)
        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """Masked conv stages on the whole image, then the ViT on the visible tokens, then the fusion (official
        `forward_encoder`). Returns latent [B, N_vis, D], mask [B, N] (1 = masked), ids_restore [B, N]."""
        enc, B = self.encoder, imgs.shape[0]
        ids_keep, mask, ids_restore = random_masking(B, self.num_patches, mask_ratio, noise, imgs.device)
        x, stage1, stage2 = enc.patch_embed(imgs, mask.view(B, *self.grid_size))  # [B, N, D], two NCHW maps
        x = x + enc.pos_embed  # position added before masking
        s1 = self.stage1_output_decode(stage1).flatten(2).transpose(1, 2)  # [B, C1, 4h, 4w] -> [B, N, D]
        s2 = self.stage2_output_decode(stage2).flatten(2).transpose(1, 2)  # [B, C2, 2h, 2w] -> [B, N, D]
        x, s1, s2 = (gather_tokens(t, ids_keep) for t in (x, s1, s2))  # [B, N_vis, D] each, the same tokens
        for block in enc.blocks:
            x = run_block(block, x, grad_checkpointing=enc.grad_checkpointing)
        x = enc.norm(x + s1 + s2)  # fusion *before* the final norm, as the official
        return x, mask, ids_restore

    def forward_decoder(self, latent, ids_restore):
        """A mask token at every hidden position, unshuffle, add position, decode, predict patch pixels.
        latent [B, N_vis, D] -> pred [B, N, p*p*3]."""
        x = self.decoder_embed(latent)  # [B, N_vis, D_dec]
        B, n_vis, D = x.shape
        mask_tokens = self.mask_token.expand(B, ids_restore.shape[1] - n_vis, -1)  # [B, N - N_vis, D_dec]
        x = torch.cat([x, mask_tokens], dim=1)  # [B, N, D_dec] in shuffled order
        x = gather_tokens(x, ids_restore) + self.decoder_pos_embed  # [B, N, D_dec] in patch order
        for block in self.decoder_blocks:
            x = run_block(block, x, grad_checkpointing=self.grad_checkpointing)
        return self.decoder_pred(self.decoder_norm(x))  # [B, N, p*p*3]

    def forward_loss(self, imgs, pred, mask):
        """MAE's loss: per-patch MSE averaged over the masked patches only; target = the normalised image's
        patches, per-patch normalised with --norm-pix-loss (unbiased variance + 1e-6, as the official code)."""
        target = self.patchify(imgs)  # [B, N, p*p*3]
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)  # [B, N] per-patch MSE (fp32: the target is fp32)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def patchify(self, imgs):
        """[B, 3, H, W] -> [B, N, p*p*3]; p = the total stride, patches row-major, values in (row, column, channel)
        order with the channel fastest, as the official `patchify`. official: p = 16 and square images only."""
        B, C = imgs.shape[:2]
        p, (h, w) = self.patch_size, self.grid_size
        x = imgs.reshape(B, C, h, p, w, p)  # [B, 3, h, p, w, p]
        x = torch.einsum("bchpwq->bhwpqc", x)  # [B, h, w, p, p, 3]
        return x.reshape(B, h * w, p * p * C)  # [B, N, p*p*3]

    def unpatchify(self, x):
        """[B, N, p*p*3] -> [B, 3, H, W], the inverse of patchify. official: broken (`self.patch_embed` does not
        exist)."""
        B = x.shape[0]
        p, (h, w) = self.patch_size, self.grid_size
        x = x.reshape(B, h, w, p, p, 3)  # [B, h, w, p, p, 3]
        x = torch.einsum("bhwpqc->bchpwq", x)  # [B, 3, h, p, w, p]
        return x.reshape(B, 3, h * p, w * p)

    def initialize_weights(self):
        """Official `initialize_weights`: the stage-3 embedding conv as a Linear with xavier_uniform, mask token
        N(0, 0.02), every Linear (patch_embed4, ViT and decoder blocks, decoder embed/pred) xavier_uniform with zero
        bias, every LayerNorm 1/0. All other convolutions (stage 1/2 embeddings, the conv blocks, the fusion convs)
        keep PyTorch's default init. The sin-cos tables were filled at construction."""
        w = self.encoder.patch_embed.patch_embed3.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # [D, C2, 2, 2] viewed as [D, 4 C2]
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)  # the fused qkv as one [3D, D] matrix, as the official code
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def build_model(cfg):
    model = ConvMAE(cfg.img_size, cfg.patch_size, cfg.model, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads,
                    cfg.norm_pix_loss)
    return set_grad_checkpointing(model, cfg.grad_checkpointing)


def training_loss(model, imgs, cfg, generator):
    """One pre-training forward as main() and bench.py run it: this step's masks from `generator`, then the loss.
    `model` may be wrapped (DDP / torch.compile), so sizes come from cfg."""
    noise = torch.rand(imgs.shape[0], (cfg.img_size // cfg.patch_size) ** 2, device=imgs.device, generator=generator)
    loss, _, _ = model(imgs, cfg.mask_ratio, noise)
    return loss


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      config                                                        #
# ---------------------------------------------------------------------------------------------------------------- #
@dataclass
class Config(TrainConfig):
    """Defaults = the official ImageNet recipe (PRETRAIN.md: 1600 epochs, 128 per GPU on 3 x 8 GPUs, blr 1.5e-4,
    warm-up 40, norm-pix loss); the engine, optimizer and augmentation are MAE's, unchanged."""
    host_memory_gib = (2.56, 0.204)  # GiB (fixed, per image) on a CPU in fp32 at these defaults: bench.py --memory
    model: str = "vit_base"  # by stage-3 ViT: vit_base (ConvMAE-B, official), vit_small, vit_tiny, vit_micro, vit_nano
    patch_size: int = 16  # total stride p of the three stages, p/4 x 2 x 2 (official: 16 = 4 x 2 x 2)
    epochs: int = 1600  # pre-training epochs
    batch_size: int = 128  # images per process per step (official: 128 per GPU)
    mask_ratio: float = 0.75  # fraction of stage-3 patches hidden from the encoder
    norm_pix_loss: bool = True  # target = each patch normalised by its own mean/std (official: on)
    decoder_dim: int = 512  # decoder width (official: 512)
    decoder_depth: int = 8  # decoder blocks (official: 8)
    decoder_heads: int = 16  # decoder attention heads (official: 16)

    def check(self):
        if self.model in ("vit_large", "vit_huge"):
            raise UserError(f"ConvMAE has no {self.model} size (the official code has only Base); choose from "
                            f"{', '.join(CONVMAE_SIZES)}")
        if self.patch_size and self.patch_size % 4:
            raise UserError(f"--patch-size {self.patch_size} must be a multiple of 4: it is the total stride of the "
                            f"three stages, p/4 x 2 x 2")
        if self.patch_size and self.img_size % self.patch_size:
            raise UserError(f"--img-size {self.img_size} is not divisible by {self.patch_size}, the total stride of "
                            f"the three stages (--patch-size)")
        super().check()
        if not 0 < self.mask_ratio < 1:
            raise UserError(f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        n = (self.img_size // self.patch_size) ** 2
        if int(n * (1 - self.mask_ratio)) < 1:
            raise UserError(f"--mask-ratio {self.mask_ratio} leaves no visible patch out of {n}")
        if self.decoder_dim % 4 or self.decoder_dim % self.decoder_heads:
            raise UserError("--decoder-dim must be divisible by 4 and by --decoder-heads")


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      train                                                         #
# ---------------------------------------------------------------------------------------------------------------- #
def main():
    cfg, preset = parse_config(Config, PRESETS, description=__doc__.split("\n\n")[0])
    run = Run(cfg, "convmae", preset)  # devices, processes, --out; resolves cfg.out, cfg.compile, a preset's accum_iter
    data = None if cfg.eval_only else build_train_data(cfg, run.dist, crop_scale=(0.2, 1.0), interpolation="bicubic",
                                                       log=run.log)
    model = build_model(cfg).to(run.device)
    cfg.lr = scaled_lr(cfg, run.global_batch)  # lr = blr x global batch / 256 (the official linear scaling rule)
    # MAE's optimizer, unchanged (official: the same engine): AdamW(0.9, 0.95), wd 0.05 except biases and norms
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), fused=True)
    start_epoch, start_step = run.start(model, optimizer)
    h, w = model.grid_size
    run.log(f"ConvMAE {cfg.model} at {cfg.img_size}px, strides {cfg.patch_size // 4} x 2 x 2, stage 3 on {h}x{w} "
            f"tokens: {count_params(model) / 1e6:.2f}M trainable parameters ({count_params(model.encoder) / 1e6:.2f}M "
            f"encoder)")
    fixed = preview_images(cfg, run.dist)  # the same 8 images in every reconstruction grid
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
                    loss = training_loss(train_model, imgs, cfg, run.step_generator(it))  # masks from (seed, step)
                run.scaler.scale(loss / cfg.accum_iter).backward()
                grad_norm = None
                if update:
                    run.scaler.unscale_(optimizer)
                    if cfg.clip_grad:  # (no clipping by default, as the official: skip the norm too)
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
            if not run.done:  # (--max-steps ends mid-epoch: no epoch summary, but the grid of where it stopped)
                run.log_epoch(epoch)
                run.save_checkpoint(epoch + 1, 0)
            if run.is_main:
                save_reconstruction(model, fixed.to(run.device), cfg.mask_ratio, run.out / f"recon_e{epoch}.png",
                                    f"ConvMAE {cfg.model} epoch {epoch}, mask ratio {cfg.mask_ratio}", run.autocast())
            if run.done:
                break
            if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
                run.write_log(kind="eval", epoch=epoch, **monitors(model.encoder, build_model, run))
        run.finish_training(time.perf_counter() - t0)

    report("convmae", model.encoder, build_model, run)  # monitors, encoder.pth, results.json, fine-tune


# ---------------------------------------------------------------------------------------------------------------- #
#                                          presets and fine-tune recipes                                             #
# ---------------------------------------------------------------------------------------------------------------- #
# Presets by dataset scale; a flag given on the command line always wins.
PRESETS = {
    # `python convmae.py`: the offline demo, CPU-sized for a run of minutes, evaluation included; not a research
    # recipe. 32 px with stride 8 = 2 x 2 x 2: stage 1 at 16 x 16, stage 3 a 4 x 4 grid (4 of 16 patches visible; a
    # hidden patch is a 4 x 4 block at stage 1 and 2 x 2 at stage 2, as at 224 px). The conv stages run densely on
    # every position, so stride 4 (stage 1 at full resolution) costs 4x as much.
    "demo": dict(img_size=32, patch_size=8, model="vit_micro", decoder_dim=128, decoder_depth=2, decoder_heads=4,
                 epochs=3, warmup_epochs=0.5, batch_size=128, blr=1.5e-3, workers=2),
    # CIFAR-10/100, (Fashion-)MNIST at 32/28 px: MAE's small recipe (IcarusWizard/MAE: ViT-T, a 4 x 192 decoder,
    # global batch 4096, blr 1.5e-4, 2000 epochs, pixel targets) with stride 4 (stage 1 at full resolution; stage 3
    # at 8 x 8 or 7 x 7): our choice, there is no published ConvMAE recipe at this scale.
    "small": dict(patch_size=4, model="vit_tiny", decoder_dim=192, decoder_depth=4, decoder_heads=3, batch_size=512,
                  accum_iter=8, blr=1.5e-4, epochs=2000, warmup_epochs=200, norm_pix_loss=False),
    # STL-10 (96 px): stride 8, stage 1 at 48 x 48, stage 3 at 12 x 12; our choice as well.
    "medium": dict(img_size=96, patch_size=8, model="vit_small", decoder_dim=256, decoder_depth=4, decoder_heads=8,
                   batch_size=256, accum_iter=4, epochs=800, warmup_epochs=40),
    "imagenet": {},
}

# Fine-tune recipes of finetune.py (and --finetune-epochs), one per data scale (finetune.finetune_scale); fields: its
# FinetuneRecipe's.
# The conv stages run unmasked and all N tokens are averaged (global pool).
FINETUNE = {
    # ConvMAE FINETUNE.md, ConvMAE-B: 100 epochs, 5 warm-up, blr 5e-4 (batch 1024), layer decay 0.65, drop path 0.1,
    # wd 0.05, reprob 0.25, mixup 0.8, cutmix 1.0, and MAE's pipeline for the rest (RandAugment m9, label smoothing
    # 0.1, cosine to 1e-6): MAE-B's recipe. official: the best epoch on val is kept; we: the last epoch.
    "imagenet": dict(epochs=100, warmup_epochs=5, blr=5e-4, min_lr=1e-6, layer_decay=0.65, drop_path=0.1,
                     crop_scale=(0.08, 1.0), rand_augment=9, erasing=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1),
    # 65-128 px and 28-64 px images: our choice (no published ConvMAE recipe), the values mae.py uses there.
    "medium": dict(epochs=100, warmup_epochs=5, blr=5e-4, layer_decay=0.65, drop_path=0.1, crop_scale=(0.2, 1.0),
                   rand_augment=9, erasing=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1),
    "small": dict(epochs=50, warmup_epochs=5, blr=1e-3, layer_decay=0.75, drop_path=0.1, crop_scale=(0.5, 1.0),
                  rand_augment=0, erasing=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1),
}


# ---------------------------------------------------------------------------------------------------------------- #
#                                                  visualisation                                                     #
# ---------------------------------------------------------------------------------------------------------------- #
@torch.no_grad()
def save_reconstruction(model, imgs, mask_ratio, path, title, amp):
    """Rows: original | masked input | reconstruction | reconstruction pasted into the visible patches.
    With --norm-pix-loss the predicted patches are shown un-normalised with the mean/std of the *true* patch (the
    usual MAE visualisation)."""
    was_training = model.training
    model.eval()
    noise = torch.rand(imgs.shape[0], model.num_patches, generator=torch.Generator().manual_seed(0)).to(imgs.device)
    with amp:
        _, pred, mask = model(imgs, mask_ratio, noise)  # pred [B, N, p*p*3], mask [B, N]
    model.train(was_training)
    pred = pred.float()
    if model.norm_pix_loss:
        target = model.patchify(imgs)
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    mask_px = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, model.patch_size ** 2 * 3))  # [B, 3, H, W]
    recon = model.unpatchify(pred)
    rows = [denormalize(imgs), denormalize(imgs) * (1 - mask_px) + 0.5 * mask_px, denormalize(recon),
            denormalize(imgs * (1 - mask_px) + recon * mask_px)]
    note = ("norm-pix target: patches un-normalised with the true patch mean/std" if model.norm_pix_loss
            else "pixel target (ImageNet-normalised), shown as predicted")
    save_image_grid(rows, path, f"{title}\n{note}", labels=["original", "masked", "reconstruction", "pasted"])


if __name__ == "__main__":
    cli(main)
