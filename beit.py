"""BEiT: BERT Pre-Training of Image Transformers (Bao, Dong, Piao, Wei, 2021), arXiv:2106.08254.

Two stages from one command. Stage 1 trains a visual tokenizer: a discrete VAE in the spirit of DALL-E's (the
official code downloads DALL-E's, whose links are dead) that maps the tokenizer view of an image -- a smaller view of
the same crop -- to one discrete id per ViT patch. Stage 2 is BEiT: hide about 40 % of the patches in rectangular
blocks (75 of 196 at 224 px), replace their embeddings by a learned mask token, run the ViT on all tokens, and
predict the tokenizer's id at every hidden position with a linear head over the vocabulary; the loss is the
cross-entropy on the hidden positions only (paper §2). The encoder is the BEiT ViT that SimMIM uses too: no absolute
position embedding, one relative position bias shared by all blocks, layer scale, q and v biases; `encoder.pth` loads
into timm's `Beit`. After pre-training the head is discarded and the encoder is fine-tuned or probed.

Token grid = patch grid: the tokenizer downsamples by `--dvae-stride` (8, DALL-E's, at ImageNet scale), so its view
is (img_size / patch_size) x stride pixels a side: 14 x 8 = 112 px for a 224 / 16 model (the official
`--second_input_size 112`), 8 x 4 = 32 px for the demo's 32 px / patch 4.

BEiT v2 (Peng, Dong, Bao, Ye, Wei, 2022, arXiv:2208.06366), `--tokenizer vqkd --teacher T`: stage 1 trains VQ-KD,
a ViT encoder whose patch features are quantized (nearest of 8192 unit-norm 32-d codes by cosine, EMA codebook,
k-means init, commitment loss) and decoded by a 1-block ViT into the features of a frozen teacher T (an encoder.pth of
any method file here, or a timm model on disk: the paper's is CLIP ViT-B/16); loss 1 - cos per token. Stage 2 is
BEiT with those ids as targets, exactly 75 of 196 patches masked, and patch aggregation: 2 extra blocks read the last
cls token with the patch states of block 9 (of 12) and predict the masked ids too, through the shared norm and head;
loss = CE(main) + CE(aggregation). The branch is dropped for evaluation and export.

Run:     python beit.py                                    # offline demo: tokenizer + pre-training + evaluation
         python beit.py --stage tokenizer --out runs/tok    # stage 1 only: runs/tok/tokenizer.pth
         python beit.py --tokenizer runs/tok/tokenizer.pth  # reuse a tokenizer (trained there if it does not exist)
         python beit.py --data imagenet --data-path /data/imagenet --model vit_base
         torchrun --nproc_per_node 16 beit.py --data imagenet --data-path /data/imagenet   # official: 16 x 128
         python mae.py --out runs/mae && python beit.py --tokenizer vqkd --teacher runs/mae/encoder.pth   # BEiT v2
         python beit.py --data imagenet ... --tokenizer vqkd --teacher vit_base_patch16_clip_224.openai     # paper's

Results (2-core AMD EPYC with AVX512-BF16, bf16 autocast, torch 2.14.1, 1 thread, shared with other jobs at load
~4-5 so wall times are long; README.md):
  python beit.py  (synthetic 32 px, 3000 images per split, ViT-micro/4, tokenizer 8 epochs of 47 steps, BEiT 2 epochs;
  8 min 08 s wall at that load, 2.9 CPU-min)
    stage 1: 20 % of the 512 codes used, perplexity 17, decode MSE 0.064 (the mean image's: 0.105). With the earlier
    2 epochs at batch 128 (47 steps) the codebook collapsed: 9.6 % of the codes, perplexity 3.6, MSE 0.105.
    stage 2: loss 4.34 -> 2.38, masked-token accuracy 36 %; kNN 8.6 / 7.9, linear 11.9 / 8.4 (random init 11.1 / 9.2,
    11.8 / 7.6; chance 8.3): two CPU-minutes do not beat the random encoder on the monitors.
  Fashion-MNIST, all 60,000 / 10,000 images at 28 px, command (7) in README.md (stage 1: one epoch, 468 steps; BEiT:
    one epoch; the whole run, evaluation included, 18.1 CPU-min by /usr/bin/time): tokenizer 89.6 % of 512 codes,
    perplexity 117, MSE 0.019; BEiT loss 4.29, accuracy 13.7 % (hard targets: 117 codes in use);
    kNN 64.3 / 68.4, linear 71.1 / 72.8 against random init 54.9 / 53.4, 59.5 / 52.6.
  Against microsoft/unilm beit/ (beit_base_patch16_224_8k_vocab, its weights copied in, same images, masks and ids,
    fp32): the same loss (9.0334949, |difference| 0), logits within 6e-7; the generator gives the official masks bit
    for bit when seeded alike. BEiT-B: 91,965,776 trainable parameters; a step is 49.3 GFLOP/img forward (13.2 of
    them the tokenizer's) and 121.2 GFLOP/img forward + backward (FlopCounterMode, bench.py's count).
  python mae.py --out runs/mae && python beit.py --tokenizer vqkd --teacher runs/mae/encoder.pth  (BEiT v2 demo;
    AVX512-BF16 EPYC, bf16, 1 thread, load ~4: 6 min 15 s wall, 3.7 CPU-min, after the teacher's 3.2): VQ-KD 1 - cos
    0.053 but its codebook collapsed (3.5 % of 512 codes in epoch 1, perplexity 15.7); loss (CE main + CE aggregation)
    4.52, accuracy 34.8 %; kNN 10.8 / 8.5, linear 10.3 / 8.4 (random init 11.1 / 9.2, 11.8 / 7.6).
  BEiT v2 on Fashion-MNIST, command (9) in README.md (teacher: the MAE encoder of README row (1); 6000 images, 28 px;
    5.7 CPU-min): VQ-KD 1 - cos 0.453, codebook collapsed to 1.4 % of 512 codes (perplexity 6.7); loss 3.10, accuracy
    42.3 %; kNN 40.5 / 49.6, linear 44.0 / 50.0 (random init 47.3 / 47.3, 52.1 / 43.0).
  BEiT v2 against microsoft/unilm beit2/ (768a3c87; VQ-KD-B/1-layer decoder and BEiT v2-B, the official weights copied
    into ours, the same 4 images and teacher features, fp32): k-means init + one EMA step give codebooks within
    4.5e-7; on the next batch the same 784 of 784 codes and the same VQ-KD loss (1.0230917 both: cosine 0.9988062,
    commitment 0.0242854), codebooks within 1.2e-7 after the update, encoder gradients within 8.7e-7 (relative);
    the v2 loss 18.1312370 both (main 9.0669975 + aggregation 9.0642405), logits within 7.8e-7; 94,655,008 and
    106,143,056 trainable parameters both.
Deviations from the official code: the tokenizer is ours (the DiscreteVAE layout of the official repository's
`modeling_discrete_vae.py`, trained with DALL-E's objective, see DVAE); masks are drawn per image with Python's
`random` as the official generator, from a generator seeded by (seed, rank, step) instead of the data workers' global
state; the masked-position head gathers a fixed number of slots per image (padding ignored) instead of boolean
indexing, so shapes are static and there is no host sync; the mask token lives beside the encoder so that
`encoder.pth` loads into timm with strict=True; the lr is given per 256 images and scaled linearly; the resident
(small-data) path resizes the tokenizer view with bicubic grid_sample, not lanczos; the fine-tune keeps the shared
relative position table (official: copies it into every block); demo/small/medium presets are ours (see PRESETS).
BEiT v2 deviations (each also where it happens): k-means init synchronised across ranks (official: per rank, never
synchronised); the codebook is a buffer and its statistics use bincount / index_add, no usage EMA; the teacher is any
encoder of this repository or timm model (official: CLIP or DINO, built in); the missing masked patches of v2's
generator come from the step's Random (official: NumPy's global generator); stage 1 uses the two-view augmentation
(colour jitter included) and stage 1's AdamW (0.9, 0.999) with a cosine from --tokenizer-lr without warm-up (official
VQ-KD: crop + flip only, (0.9, 0.99), 10 warm-up epochs; give --tokenizer-lr / --tokenizer-min-lr for its 2e-4 at
batch 512 / 1e-5); stage 2 crops with scale (0.08, 1) (official v2: 0.2); the VQ-KD encoder's size is --model's
unless --vqkd-model (official: ViT-B for every BEiT size).
"""
import json
import math
import random
import time
import typing
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from common import UserError
from common.data import (IMAGENET_MEAN, IMAGENET_STD, build_dataset, build_train_data, color_jitter,
                         crop_resize_flip, eval_transform, mix_seed, preview_images, sample_resized_crops, seeded_rng)
from common.evaluation import denormalize, monitors, report, save_image_grid
from common.training import (Preempted, Run, TrainConfig, atomic_save, barrier, cli, load_file, param_groups,
                             parse_config, progress, set_grad_sync, set_lr)
from common.vit import (VIT_SIZES, Block, VisionTransformer, count_params, drop_path_rates, init_beit_style,
                        rescale_residual_branches, trunc_normal_sigma, vit_kwargs)


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      config                                                        #
# ---------------------------------------------------------------------------------------------------------------- #
@dataclass
class Config(TrainConfig):
    """Defaults = the official ImageNet-1K recipe of BEiT-B (README + run_beit_pretraining.py: 800 epochs, 16 GPUs x
    128 = batch 2048, lr 1.5e-3, warm-up 10 epochs from 0, cosine to 1e-5, wd 0.05, clip 3.0, drop path 0.1) and, for
    the tokenizer, DALL-E's dVAE objective (paper App. A.2) on the official DiscreteVAE layout."""
    # --- stage 2: BEiT pre-training
    batch_size: int = 128  # images per process per step (official: 128 per GPU on 16 GPUs)
    blr: float = 1.875e-4  # base lr per 256 images (official: lr 1.5e-3 at batch 2048, not scaled; we scale it)
    min_lr: float = 1e-5  # floor of the cosine (official --min_lr)
    warmup_epochs: float = 10  # linear warm-up from 0 (official utils.cosine_scheduler)
    clip_grad: typing.Optional[float] = 3.0  # clip the global gradient norm (official README: --clip_grad 3.0)
    drop_path: float = 0.1  # stochastic depth of the last block, linear from 0
    layer_scale: typing.Optional[float] = None  # initial layer-scale gains (default 0.1; 1e-5 for vit_large/huge; 0 = off)
    num_mask_patches: int = 0  # patches hidden per image at most (0 = 75/196 of the grid: 75 at 14 x 14)
    min_mask_patches_per_block: int = 0  # smallest block target area (0 = 16/196 of the grid: 16 at 14 x 14)
    max_mask_patches_per_block: int = 0  # largest block target area (0 = --num-mask-patches)
    min_aspect: float = 0.3  # block aspect ratio drawn log-uniformly in [min, 1/min]
    # --- the tokenizer and stage 1
    stage: str = "all"  # all (tokenizer when needed, then pre-training) or tokenizer (stage 1 only)
    tokenizer: str = "dvae"  # a kind (dvae: trained into <out>/tokenizer.pth) or a tokenizer file (trained there if absent)
    vocab_size: int = 8192  # visual vocabulary of a new tokenizer (a tokenizer file brings its own)
    tokenizer_epochs: int = 100  # stage-1 epochs (DALL-E: 3 M updates at batch 512)
    tokenizer_batch_size: int = 32  # stage-1 images per process per step (DALL-E: 512 in all = 32 on 16 processes)
    tokenizer_lr: float = 1e-4  # stage-1 peak lr, absolute (DALL-E 1e-4), cosine over stage 1 to --tokenizer-min-lr
    tokenizer_min_lr: float = 1.25e-6  # stage-1 final lr (DALL-E)
    tokenizer_weight_decay: float = 1e-4  # stage-1 AdamW weight decay (DALL-E)
    dvae_stride: int = 8  # input pixels per token side, a power of 2 (DALL-E and the official tokenizer: 8)
    dvae_hidden: int = 256  # conv width (official DiscreteVAE "customized": 256)
    dvae_codebook_dim: int = 512  # width of a code's embedding (official: 512)
    dvae_kl_weight: float = 6.6  # beta of KL(q(z|x) || uniform) in the ELBO (DALL-E: 6.6, for codebook usage)
    dvae_kl_warmup: float = 0.0017  # fraction of stage 1 over which beta rises from 0 (DALL-E: 5 k of 3 M updates)
    dvae_temp_anneal: float = 0.05  # fraction of stage 1 over which the Gumbel temperature falls (DALL-E: 150 k of 3 M)
    dvae_temp_end: float = 1 / 16  # final Gumbel-softmax temperature (from 1; DALL-E: 1/16)
    dvae_recon: str = "gauss"  # reconstruction NLL: gauss (sigma 0.1 in [0, 1] pixels) or laplace (DALL-E's logit-Laplace)
    dvae_straight_through: bool = False  # decode the sample's one-hot, relaxed gradient (DALL-E: relaxed both ways)
    # --- BEiT v2 (--tokenizer vqkd): the VQ-KD tokenizer distilled from --teacher, patch aggregation in stage 2
    teacher: str = ""  # VQ-KD's teacher: an encoder.pth of this repository (config.json beside it) or a timm name
    vqkd_model: str = ""  # VQ-KD encoder and decoder width ("" = --model; official: vit_base for every BEiT size)
    vqkd_codebook_dim: int = 32  # width of VQ-KD's unit-norm code space (official: 32)
    vqkd_decoder_depth: int = 1  # VQ-KD decoder blocks (official models: 1 or 3)
    vqkd_decay: float = 0.99  # EMA decay of VQ-KD's codebook (official: 0.99)
    early_layers: int = 0  # patch aggregation reads the patch states after block N (0 = depth - 3 >= 1: 9 of 12)
    head_layers: int = 2  # blocks of the patch-aggregation branch (official: 2)

    def check(self):
        super().check()
        n = (self.img_size // self.patch_size) ** 2
        if self.dvae_recon not in ("gauss", "laplace"):
            raise UserError(f"unknown --dvae-recon {self.dvae_recon!r}; choose gauss or laplace")
        if self.stage not in ("all", "tokenizer"):
            raise UserError(f"unknown --stage {self.stage!r}; choose all or tokenizer")
        if not 0 <= self.num_mask_patches <= n:
            raise UserError(f"--num-mask-patches {self.num_mask_patches} is not in [0, {n}] (the patch grid)")
        for name in ("min_mask_patches_per_block", "max_mask_patches_per_block", "tokenizer_min_lr",
                     "tokenizer_weight_decay", "dvae_kl_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not 0 < self.min_aspect <= 1:
            raise UserError(f"--min-aspect must be in (0, 1], got {self.min_aspect}")
        if self.vocab_size < 2:
            raise UserError(f"--vocab-size must be at least 2, got {self.vocab_size}")
        if self.dvae_stride < 2 or self.dvae_stride & (self.dvae_stride - 1):
            raise UserError(f"--dvae-stride must be a power of 2 (one 2x downsampling per layer), got {self.dvae_stride}")
        for name in ("tokenizer_epochs", "tokenizer_batch_size", "tokenizer_lr", "dvae_hidden", "dvae_codebook_dim",
                     "dvae_temp_end"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not (0 <= self.dvae_kl_warmup <= 1 and 0 <= self.dvae_temp_anneal <= 1):
            raise UserError("--dvae-kl-warmup and --dvae-temp-anneal are fractions of stage 1, in [0, 1]")
        if self.layer_scale is not None and self.layer_scale < 0:
            raise UserError(f"--layer-scale must not be negative, got {self.layer_scale}")
        if not 0 <= self.drop_path < 1:
            raise UserError(f"--drop-path must be in [0, 1), got {self.drop_path}")
        masks = mask_generator(self)
        if masks.min_num_patches > masks.num_masking_patches:
            raise UserError(f"--min-mask-patches-per-block {masks.min_num_patches} exceeds --num-mask-patches "
                            f"{masks.num_masking_patches}")
        self.check_v2()

    def check_v2(self):
        """The BEiT v2 fields."""
        if self.vqkd_model and self.vqkd_model not in VIT_SIZES:
            raise UserError(f"unknown --vqkd-model {self.vqkd_model!r}; choose from {', '.join(VIT_SIZES)}")
        for name in ("vqkd_codebook_dim", "vqkd_decoder_depth", "head_layers"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 < self.vqkd_decay < 1:
            raise UserError(f"--vqkd-decay must be in (0, 1), got {self.vqkd_decay}")
        depth = VIT_SIZES[self.model][1]
        if not 0 <= self.early_layers <= depth:
            raise UserError(f"--early-layers {self.early_layers} is not in [1, {depth}] (the blocks of {self.model}; "
                            f"0 = {max(1, depth - 3)})")
        if self.teacher and not Path(self.teacher).is_file() and ("/" in self.teacher or self.teacher.endswith(".pth")):
            raise UserError(f"--teacher {self.teacher} does not exist")


# Presets by dataset scale; a flag given on the command line always wins. Each keeps the ImageNet structure: about
# 38 % of the patches hidden in blocks of >= 8 % of the grid, a tokenizer whose token grid is the patch grid.
PRESETS = {
    # `python beit.py`: the offline demo, a CPU-sized model and schedule (not a research recipe). 32 px, patch 4: an
    # 8 x 8 grid, 24 patches hidden in blocks of >= 5; the tokenizer downsamples 4x (two layers), so its view is the
    # 32 px crop itself, with 512 codes. 3000 images of each split (a BEiT step costs ~4x a MAE step: all 65 tokens
    # pass the encoder, and the tokenizer runs too). Stage 1 runs 8 epochs at batch 64 (375 steps) with DALL-E's
    # schedules stretched over it: its codebook collapses with fewer steps (47 steps: 10 % of the codes used,
    # perplexity 4; 375 steps: 26 %, perplexity 13); stage 2 the encoder of the MAE/SimMIM demos, with the lr raised
    # for the short run (1e-3 at batch 128).
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

# --finetune-epochs: one recipe per data scale, picked by the input size (evaluation.finetune_scale); the fields are
# FinetuneRecipe's in common/evaluation.py.
FINETUNE = {
    # official get_started_for_image_classification.md, BEiT-B from a self-supervised checkpoint: 8 x 128 = 1024
    # images, lr 4e-3 (absolute; we scale it: 1e-3 per 256), 100 epochs, 20 of warm-up from 0, cosine to 1e-6
    # (utils.cosine_scheduler: the warm-up ends one step earlier than MAE's, the same curve otherwise), layer decay
    # 0.65, drop path 0.1, wd 0.05, no clipping, rand-m9-mstd0.5-inc1, erasing 0.25, mixup 0.8, cutmix 1.0,
    # smoothing 0.1, mean pooling. official: head init trunc_normal(0.02) x 0.001 and the shared relative position
    # table copied into every block; we: the same std (2e-5) and the shared table kept.
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


def layer_scale(cfg):
    """Official --layer_scale_init_value: 0.1 for base, 1e-5 for large (for fp16 stability); 0 disables the gains
    (official: `init_values > 0`)."""
    value = cfg.layer_scale
    if value is None:
        value = 1e-5 if cfg.model in ("vit_large", "vit_huge") else 0.1
    return value or None


# ---------------------------------------------------------------------------------------------------------------- #
#                                                     masking                                                        #
# ---------------------------------------------------------------------------------------------------------------- #
class MaskingGenerator:
    """Blockwise masking (paper §2.5, Algorithm 1; official `MaskingGenerator` in beit/masking_generator.py).

    Until `num_masking_patches` are hidden: draw a block with target area s ~ U(min_num_patches, budget left) and
    aspect r log-uniform in [min_aspect, 1/min_aspect], sides h = round(sqrt(s r)), w = round(sqrt(s / r)) (strictly
    smaller than the grid), a uniform position; it is accepted when it hides 1 to `budget left` new patches. 10
    failed draws in a row end the image, so the count is <= num_masking_patches and varies per image (unlike SimMIM's
    and BEiT v2's exact counts). The draws are the official ones, call for call, on a `random.Random`: seeded alike,
    it gives the official masks bit for bit. Returns [B, N] bool masks, row-major, True = masked.
    official: one mask per image in the data workers from the global `random` (never seeded: random.seed is commented
    out); we: the images of a step drawn in a row from a Random seeded by (seed, rank, step), so resume is exact.
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
        masks = np.stack([self.draw(rng) for _ in range(batch_size)])  # [B, h, w]
        return torch.from_numpy(masks).flatten(1).bool().to(device, non_blocking=True)  # [B, N]


def mask_generator(cfg):
    """The official generator for this run's grid: 75 of 196 patches with blocks >= 16 at 14 x 14, the same fractions
    of other grids (rounded; at least 1) unless given."""
    grid = (cfg.img_size // cfg.patch_size, cfg.img_size // cfg.patch_size)
    n = grid[0] * grid[1]
    num = cfg.num_mask_patches or max(1, round(n * 75 / 196))
    min_block = cfg.min_mask_patches_per_block or max(1, round(n * 16 / 196))
    generator = ExactMaskingGenerator if is_v2(cfg) else MaskingGenerator  # BEiT v2: exactly `num` per image
    return generator(grid, num, min_block, cfg.max_mask_patches_per_block or None, cfg.min_aspect)


def step_rng(generator):
    """The Random that draws this step's masks, seeded from the torch generator's seed (Run.step_generator: (seed,
    rank, step)); reading the seed needs no device sync."""
    return random.Random(generator.initial_seed())


# ---------------------------------------------------------------------------------------------------------------- #
#                                        stage 1: the visual tokenizer (dVAE)                                        #
# ---------------------------------------------------------------------------------------------------------------- #
# A tokenizer, as stage 2 (and BEiT v2's VQ-KD) uses it:
#   kind, vocab_size, stride (input pixels per token side), interpolation (of its view), config (constructor kwargs);
#   get_codebook_indices(view [B, 3, h*s, w*s] in [0, 1]) -> ids [B, h*w]; decode(ids, (h, w)) -> [B, 3, H, W] in
#   [0, 1] (None where a tokenizer cannot show pixels); forward(view, generator, progress) -> (stage-1 loss, ids,
#   {name: scalar}) so that DDP can wrap it; recon_error(view) -> the error it is judged by, a scalar.
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
    the Gaussian because in our short CPU runs the logit-Laplace fit its scale instead of the image (hard-token
    reconstructions no better than the mean image, a few codes), while the Gaussian used 2x the codes and cut the
    reconstruction error by a third in the same steps. Tokens: argmax of the encoder logits, no noise (official
    `get_codebook_indices`). Inputs: views in [0, 1], mapped with DALL-E's map_pixels inside.
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

    def forward(self, view, generator, progress):
        """Stage-1 loss at `progress` (fraction of stage 1 done): (loss, hard ids [B, N], logged scalars)."""
        cfg = self.schedule  # set by train_tokenizer from the run's config (dvae_schedule)
        tau = cosine_anneal(progress, cfg["temp_anneal"], 1.0, cfg["temp_end"])
        beta = cosine_anneal(progress, cfg["kl_warmup"], 0.0, cfg["kl_weight"])
        logits = self.logits(view)  # [B, V, h, w]
        B, V, h, w = logits.shape
        u = torch.rand(logits.shape, device=logits.device, generator=generator)
        exponential = -torch.log(u.clamp(min=1e-20))  # Exp(1) noise; Gumbel noise is -log of it
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


TOKENIZERS = {"dvae": DVAE}  # kind -> class; BEiT v2 adds "vqkd"


def new_tokenizer(cfg, kind="dvae"):
    """A freshly initialised tokenizer of `kind` with this config's architecture."""
    if kind == "vqkd":
        return new_vqkd(cfg)  # BEiT v2, below: it needs the teacher
    return TOKENIZERS[kind](cfg.vocab_size, cfg.dvae_stride, cfg.dvae_hidden, cfg.dvae_codebook_dim)


def dvae_schedule(cfg):
    """The stage-1 schedules of the dVAE: Gumbel temperature and KL weight as functions of the stage's progress."""
    return dict(temp_anneal=cfg.dvae_temp_anneal, temp_end=cfg.dvae_temp_end, kl_warmup=cfg.dvae_kl_warmup,
                kl_weight=cfg.dvae_kl_weight, straight_through=cfg.dvae_straight_through, recon=cfg.dvae_recon)


def resolve_tokenizer(cfg, out):
    """--tokenizer -> (kind, path): a kind means <out>/tokenizer.pth; KIND:PATH or a PATH means that file (its kind
    is read from it when it exists, else the default kind dvae is trained there)."""
    value = cfg.tokenizer
    if value in TOKENIZERS:
        return value, Path(out) / "tokenizer.pth"
    kind, _, path = value.partition(":")
    if path and kind in TOKENIZERS:
        return kind, Path(path)
    path = Path(value)
    if path.is_file():
        saved = load_file(path, "tokenizer")
        kind = saved.get("kind") if isinstance(saved, dict) else None
        if kind not in TOKENIZERS:
            raise UserError(f"{path} is not a tokenizer file of this project (kinds: {', '.join(TOKENIZERS)})")
        return kind, path
    if path.is_dir():
        raise UserError(f"--tokenizer {path} is a folder; give a file path or a kind ({', '.join(TOKENIZERS)})")
    return "dvae", path


def load_tokenizer(path, kind):
    """A tokenizer file -> (tokenizer, its saved record). The record holds kind, config, model, complete (False while
    stage 1 is under way: then also epoch, step, optimizer) and the last epoch's stats."""
    saved = load_file(path, "tokenizer")
    if not isinstance(saved, dict) or saved.get("kind") != kind or "model" not in saved:
        raise UserError(f"{path} is not a {kind} tokenizer file of this project")
    tokenizer = TOKENIZERS[kind](**saved["config"])
    try:
        tokenizer.load_state_dict(saved["model"])
    except RuntimeError as e:
        raise UserError(f"{path} does not fit a {kind} tokenizer: {str(e).splitlines()[0]}") from None
    return tokenizer, saved


def obtain_tokenizer(cfg, run):
    """The tokenizer of this run: loaded from its file when that holds a finished one, else trained there (stage 1,
    continued from the file's epoch when an earlier stage 1 was interrupted). Stage 1 draws from a fork of the global
    generators, so stage 2 starts from the same random state whether it ran or not."""
    kind, path = resolve_tokenizer(cfg, run.out)
    saved = None
    if path.is_file():
        tokenizer, saved = load_tokenizer(path, kind)
        if saved["complete"]:
            run.log(f"tokenizer: {kind} from {path} ({tokenizer.vocab_size} codes, stride {tokenizer.stride}; "
                    f"last stage-1 epoch: {saved.get('stats', {})})")
            return tokenizer.to(run.device), path
        run.log(f"tokenizer: {path} is an unfinished stage 1 (epoch {saved['epoch']}, step {saved['step']}): "
                f"continuing it")
    elif cfg.eval_only:
        raise UserError(f"--eval-only: the tokenizer {path} does not exist")
    with seeded_rng(mix_seed(cfg.seed, run.dist.rank, 1_000_001), run.device):
        tokenizer = train_tokenizer(cfg, run, kind, path, *((tokenizer, saved) if saved else ()))
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
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def augment(images, generator):
        B, _, H, W = images.shape
        # ColorJitter(0.4, 0.4, 0.4) before the crop, on the whole image, as officially
        x = color_jitter(images.float() / 255, generator, brightness=0.4, contrast=0.4, saturation=0.4)
        top, left, h, w = sample_resized_crops(B, H, W, crop_scale, (3 / 4, 4 / 3), generator, images.device)
        flip = torch.rand(B, device=images.device, generator=generator) < 0.5
        model_view = crop_resize_flip(x, top, left, h, w, flip, img_size, "bicubic")
        tok_view = crop_resize_flip(x, top, left, h, w, flip, tok_size, "bicubic").clamp(0, 1)
        return (model_view - mean.to(x.device)) / std.to(x.device), tok_view
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
    ds = build_dataset(cfg.data, "val", cfg.data_path, size, cfg.subset, transform, cfg.seed)
    if ds is None:
        ds = build_dataset(cfg.data, "pretrain", cfg.data_path, size, cfg.subset, transform, cfg.seed)
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))]).to(run.device)


def token_colours(ids, vocab_size, grid, size):
    """Each id as a fixed pseudo-random colour, upsampled to the image: the token map beside a decode."""
    palette = torch.rand(vocab_size, 3, generator=torch.Generator().manual_seed(0)).to(ids.device)
    img = palette[ids].transpose(1, 2).reshape(ids.shape[0], 3, *grid)  # [B, N, 3] -> [B, 3, h, w]
    return F.interpolate(img, size=size, mode="nearest")


def codebook_stats(counts):
    """counts [V] of the ids used -> (perplexity = exp(entropy of their frequencies), fraction of codes used)."""
    p = counts.double() / counts.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return entropy.exp().item(), (counts > 0).double().mean().item()


def train_tokenizer(cfg, run, kind, path, tokenizer=None, saved=None):
    """Stage 1: fit the tokenizer on the pre-training images (its view of BEiT's two-view augmentation), AdamW
    (0.9, 0.999) with a cosine lr over the stage (DALL-E: cosine over its first 1.2 M of 3 M updates). Every epoch:
    log.jsonl gets the loss terms, the reconstruction error of the tokens on fixed images, the codebook perplexity and
    the fraction of codes used over the epoch's tokens (collapse onto a few codes is the known failure), and
    tokenizer_e<epoch>.png shows images beside their decoded tokens; `path` is written (atomically) with the state
    to continue from, and marked complete after the last epoch. Resumable at any step like stage 2."""
    tokenizer = (new_tokenizer(cfg, kind) if tokenizer is None else tokenizer).to(run.device)
    tokenizer.schedule = dvae_schedule(cfg)
    tok_size = tokenizer_view_size(cfg, tokenizer.stride)
    data = build_two_view_data(cfg, run, tok_size, tokenizer.interpolation, cfg.tokenizer_batch_size)
    optimizer = torch.optim.AdamW(param_groups(tokenizer, cfg.tokenizer_weight_decay), lr=cfg.tokenizer_lr,
                                  betas=(0.9, 0.999), fused=True)
    start_epoch, start_step = 0, 0
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        start_epoch, start_step = saved["epoch"], saved["step"]
    if run.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        run.write_json("config.json", asdict(cfg))  # (rewritten by stage 2)
        run.log_file = open(run.out / "log.jsonl", "a")
    train_model = DDP(tokenizer) if run.dist.world_size > 1 else tokenizer
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

    def capped(steps):  # --max-steps caps stage 1 only when stage 1 is all this run does
        return cfg.stage == "tokenizer" and 0 < cfg.max_steps <= steps

    stats = {}
    for epoch in range(start_epoch, cfg.tokenizer_epochs):
        tokenizer.train()
        counts = torch.zeros(tokenizer.vocab_size, device=run.device)
        names = None  # the tokenizer's tensor loss terms (dVAE: nll, kl; VQ-KD: rec, commit)
        bar = progress(total=data.steps_per_epoch, initial=start_step, desc=f"tokenizer epoch {epoch}",
                       is_main=run.is_main)
        t0, steps, stopped = time.perf_counter(), 0, False
        for step, ((_, view), _) in enumerate(data.epoch(epoch, start_step), start_step):
            it = epoch * data.steps_per_epoch + step
            stopped = capped(it)  # --stage tokenizer --max-steps: stop before this step; a later run continues
            if stopped:
                break
            lr = set_lr(optimizer, cfg.tokenizer_min_lr + (cfg.tokenizer_lr - cfg.tokenizer_min_lr) * 0.5 * (
                1 + math.cos(math.pi * it / total)))
            with run.autocast():
                loss, ids, terms = train_model(view, run.step_generator(it), it / total)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            counts += torch.bincount(ids.flatten(), minlength=tokenizer.vocab_size)
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
                    run.log(f"tokenizer epoch {epoch} step {step + 1}/{data.steps_per_epoch}: " +
                            ", ".join(f"{k} {v:.4g}" for k, v in line.items() if k != "step"))
            if run.stop_requested():
                save(epoch, step + 1, False, stats)
                run.log(f"stopped by signal in stage 1; {path} saved. Continue with --resume auto --out {run.out}")
                barrier()
                raise Preempted()
        bar.close()
        if stopped:
            save(epoch, step, False, stats)
            run.log(f"stage 1 stopped after {it} steps (--max-steps); run again to continue {path}")
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


@torch.no_grad()
def save_tokenizer_grid(tokenizer, views, path, title, amp):
    """Rows: the tokenizer's view | its tokens decoded | the token map (one colour per id)."""
    grid = (views.shape[-2] // tokenizer.stride, views.shape[-1] // tokenizer.stride)
    with amp:
        ids = tokenizer.get_codebook_indices(views)
        decoded = tokenizer.decode(ids, grid)
    if decoded is None:  # VQ-KD: its tokens decode to teacher features, not pixels
        rows = [views, token_colours(ids, tokenizer.vocab_size, grid, views.shape[-2:])]
        save_image_grid(rows, path, f"{title}\ntokens = the nearest codes (no pixels to decode)",
                        labels=["image", "token ids"])
        return
    rows = [views, decoded.float(), token_colours(ids, tokenizer.vocab_size, grid, views.shape[-2:])]
    save_image_grid(rows, path, f"{title}\ntokens = argmax of the encoder logits, decoded through the codebook",
                    labels=["image", "decoded tokens", "token ids"])


def codebook_usage_bars(counts, height=120):
    """counts [V] -> [height, V] in {0, 1}: one bar per code, codes sorted from most to least used, bar height
    proportional to log(1 + count), at least one pixel for a code used once, none for an unused one."""
    counts = counts.double().sort(descending=True).values.cpu()  # [V]
    heights = (torch.log1p(counts) / torch.log1p(counts[0]).clamp(min=1e-12) * height).ceil()  # [V]
    rows = torch.arange(height, 0, -1).view(height, 1)  # [height, 1]: the bar top each pixel row needs
    return (heights.view(1, -1) >= rows).float()  # [height, V], 1 where a bar covers the pixel


def save_codebook_usage(counts, path, title):
    """The epoch's codebook usage as a picture (codebook_usage_bars): collapse shows as a few tall bars and a long
    empty tail."""
    bars = codebook_usage_bars(counts)
    img = (1 - bars * torch.tensor([0.8, 0.6, 0.2]).view(3, 1, 1)).unsqueeze(0)  # [1, 3, height, V], dark bars
    save_image_grid([img], path, f"{title}\ncodes sorted by use, bar height ~ log(1 + count)", scale=1)


# ---------------------------------------------------------------------------------------------------------------- #
#                          BEiT v2, stage 1: the VQ-KD tokenizer distilled from a teacher                            #
# ---------------------------------------------------------------------------------------------------------------- #
# BEiT v2 (Peng, Dong, Bao, Ye, Wei, 2022, arXiv:2208.06366) keeps BEiT's stage 2 and replaces the pixel-level dVAE
# by a *semantic* tokenizer: VQ-KD (official beit2/modeling_vqkd.py, norm_ema_quantizer.py) encodes the image with a
# ViT, quantizes every patch to the nearest of `vocab_size` unit-norm codes and trains a small decoder to reconstruct,
# from the codes alone, a frozen teacher's features of the image (knowledge distillation, paper §2.2). Its codes are
# BEiT v2's targets; it decodes teacher features, not pixels (unilm#854), so there is no picture to show of them.
def l2norm(x):
    return F.normalize(x, p=2, dim=-1)


def sample_vectors(samples, num, generator):
    """`num` rows of samples [M, d]: a random subset when there are enough, else drawn with replacement (official)."""
    M = samples.shape[0]
    if M >= num:
        idx = torch.randperm(M, device=samples.device, generator=generator)[:num]
    else:
        idx = torch.randint(0, M, (num,), device=samples.device, generator=generator)
    return samples[idx]


def kmeans_cosine(samples, num_clusters, generator, iters=10):
    """Spherical k-means (official `kmeans(..., use_cosine_sim=True)`): samples [M, d] unit rows -> means [K, d]
    unit rows. Start from K random samples; each of `iters` rounds assigns every sample to the mean of highest
    cosine and moves each mean to the l2-normalised average of its samples; an empty cluster keeps its mean."""
    means = sample_vectors(samples, num_clusters, generator)  # [K, d]
    for _ in range(iters):
        buckets = (samples @ means.t()).argmax(dim=-1)  # [M]: the most similar mean
        bins = torch.bincount(buckets, minlength=num_clusters)  # [K]
        sums = torch.zeros_like(means).index_add_(0, buckets, samples)  # [K, d]
        new_means = l2norm(sums / bins.clamp(min=1).unsqueeze(1).to(sums.dtype))
        means = torch.where((bins == 0).unsqueeze(1), means, new_means)
    return means


def distributed():
    return torch_dist.is_available() and torch_dist.is_initialized()


class NormEMAQuantizer(nn.Module):
    """The official `NormEMAVectorQuantizer` (n_embed = vocab_size, embedding_dim = code dim, beta 1, decay 0.99):
    vector quantization on the unit sphere with an EMA codebook.

    z -> l2norm(z); the nearest code by ||z||^2 + ||e||^2 - 2 z.e, which for unit vectors is 2 - 2 cos(z, e): the
    code of highest cosine. Loss = beta MSE(sg(z_q), z), the commitment term only: the codebook gets no gradient
    (no codebook loss term, unilm#1290); instead, in training, each code moves by an EMA of the l2-normalised mean
    of the vectors assigned to it in the batch (counts and sums all-reduced over the ranks),
        e <- l2norm(decay e + (1 - decay) l2norm(mean)),
    and a code nobody picked keeps its value. The output is straight-through: z + sg(z_q - z), the value of z_q with
    the gradient of z. The codebook is a buffer: not a parameter, so no optimizer or weight decay touches it
    (official: an nn.Parameter with requires_grad=False). It starts empty and is initialised on the first training
    batch by 10 rounds of spherical k-means (official --quantize_kmeans_init).
    official: each rank runs k-means on its own batch and the ranks keep different codebooks; we: every rank runs
    it on the batches of all ranks (all-gathered) and takes rank 0's result, so the ranks agree from the start.
    official: the assignment statistics through a [M, V] one-hot matrix; we: bincount and index_add (the same sums).
    official: also an EMA of code usage (`cluster_size`), only for logging; we: the usage is counted by stage 1."""

    def __init__(self, vocab_size, dim, beta=1.0, decay=0.99):
        super().__init__()
        self.vocab_size, self.dim, self.beta, self.decay = vocab_size, dim, beta, decay
        self.register_buffer("codebook", torch.zeros(vocab_size, dim))  # [V, d], unit rows once initialised
        self.register_buffer("initted", torch.zeros((), dtype=torch.bool))

    def nearest(self, flat):
        """flat [M, d] unit rows -> ids [M] of the nearest codes (the official distance, term for term)."""
        e = self.codebook
        d = flat.pow(2).sum(dim=1, keepdim=True) + e.pow(2).sum(dim=1) - 2 * flat @ e.t()  # [M, V]
        return d.argmin(dim=1)

    @torch.no_grad()
    def kmeans_init(self, flat, generator):
        """The codebook from k-means on the first batch: flat [M, d] of this rank, gathered from every rank."""
        if distributed():
            parts = [torch.empty_like(flat) for _ in range(torch_dist.get_world_size())]
            torch_dist.all_gather(parts, flat.contiguous())
            flat = torch.cat(parts)  # [world M, d], rank-major
        self.codebook.copy_(kmeans_cosine(flat, self.vocab_size, generator))
        if distributed():
            torch_dist.broadcast(self.codebook, 0)
        self.initted.fill_(True)

    @torch.no_grad()
    def ema_update(self, flat, ids):
        """One EMA step of the codebook towards the l2-normalised mean of the vectors assigned to each code."""
        bins = torch.bincount(ids, minlength=self.vocab_size).to(flat.dtype)  # [V]
        sums = torch.zeros_like(self.codebook).index_add_(0, ids, flat)  # [V, d]
        if distributed():
            torch_dist.all_reduce(bins)
            torch_dist.all_reduce(sums)
        mean = l2norm(sums / bins.clamp(min=1).unsqueeze(1))  # [V, d]; an unused code's is 0 (l2norm of 0)
        # so an unused code becomes l2norm(decay e) = e: unchanged (official: the same, plus a torch.where that
        # puts e itself in place of its mean -- the same result)
        self.codebook.copy_(l2norm(self.decay * self.codebook + (1 - self.decay) * mean))

    def forward(self, z, generator=None):
        """z [B, N, d] (fp32) -> (z_q [B, N, d] straight-through, commitment loss, ids [B, N])."""
        z = l2norm(z)
        flat = z.reshape(-1, self.dim)  # [B N, d]
        if self.training and not self.initted:  # (official: also in eval; an untrained tokenizer is not used there)
            self.kmeans_init(flat.detach(), generator)
        ids = self.nearest(flat.detach())  # [B N]
        z_q = self.codebook[ids].view_as(z)  # the codes before this step's update, as officially
        if self.training:
            self.ema_update(flat.detach(), ids)
        loss = self.beta * F.mse_loss(z_q, z)  # commitment: pulls z to its code (z_q is a buffer: no gradient)
        z_q = z + (z_q - z).detach()  # straight-through estimator
        return z_q, loss, ids.view(z.shape[:-1])


def vqkd_vit(img_size, patch_size, in_chans, model, depth=None):
    """A ViT of the VQ-KD encoder / decoder (official modeling_finetune.VisionTransformer as the vqkd_* models build
    it): learned absolute position embedding, q and v biases, no layer scale, no relative position bias, and the
    mean-pooling config's `fc_norm` on the patch tokens -- here the encoder's final `norm`, the same per-token
    LayerNorm. Official init: trunc_normal(0.02) (timm's, truncated at +-2 absolute: in effect untruncated) on the
    position table, the cls token and every Linear weight, zero biases, LayerNorm 1 / 0, the patch projection left
    at PyTorch's default, then attn.proj and mlp.fc2 of block l divided by sqrt(2 l)."""
    kw = vit_kwargs(model, patch_size)
    if depth is not None:
        kw["depth"] = depth
    vit = VisionTransformer(img_size, qv_bias=True, pos_embed="learned", in_chans=in_chans, **kw)
    nn.init.trunc_normal_(vit.pos_embed, std=0.02)
    nn.init.trunc_normal_(vit.cls_token, std=0.02)
    for m in vit.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:  # (qkv has none: q and v biases, zero)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    rescale_residual_branches(vit.blocks)
    return vit


def task_layer(dim, out_dim):
    """Linear - Tanh - Linear (official encode_task_layer / decode_task_layer), trunc_normal(0.02), zero biases."""
    layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, out_dim))
    for m in (layer[0], layer[2]):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    return layer


def patch_tokens(vit, x):
    """[B, C, H, W] -> the final-normed patch tokens [B, N, D] (cls dropped; official return_patch_tokens=True)."""
    return vit.forward_features(x)[:, 1:]


class VQKD(nn.Module):
    """The VQ-KD tokenizer (official `VQKD`, vqkd_encoder_base_decoder_{1,3}x768x12_*). view [B, 3, H, W] in [0, 1]:

      encoder: the view mapped to [-1, 1] -> ViT (patch `stride`) -> normed patch tokens [B, N, D]
               -> Linear-Tanh-Linear to the `codebook_dim`-d code space, in fp32 (autocast off, as officially)
      quantizer: NormEMAQuantizer -> unit codes [B, N, d] and ids [B, N]
      decoder: the codes as a [B, d, h, w] map -> ViT with patch size 1 on the code grid (`decoder_depth` blocks of
               the encoder's width) -> Linear-Tanh-Linear to the teacher's width `target_dim`
      loss = mean over the B N tokens of 1 - cos(reconstruction, teacher feature) + the commitment loss.

    The teacher (see Teacher) is needed only to train: it is not a submodule, so tokenizer.pth holds VQ-KD alone, and
    it is loaded from `teacher` (kept in the config for that) when a training forward first needs it.
    official: `pre_process` multiplies by 255 only when the batch's max is <= 1 (a host sync); we: views are always
    in [0, 1]. official teacher input: the [-1, 1] view mapped back to [0, 1] and clamped; we: the [0, 1] view."""
    kind = "vqkd"
    error_name = "1 - cos"  # what recon_error measures: of the decoder's output and the teacher's features
    interpolation = "bicubic"  # of its view (official --second_interpolation bicubic, --second_input_size 224)

    def __init__(self, vocab_size=8192, stride=16, img_size=224, model="vit_base", codebook_dim=32, decoder_depth=1,
                 target_dim=512, decay=0.99, teacher=""):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, stride=stride, img_size=img_size, model=model,
                           codebook_dim=codebook_dim, decoder_depth=decoder_depth, target_dim=target_dim, decay=decay,
                           teacher=teacher)
        self.vocab_size, self.stride = vocab_size, stride
        self.encoder = vqkd_vit(img_size, stride, 3, model)
        self.grid = self.encoder.patch_embed.grid_size
        dim = self.encoder.embed_dim
        self.encode_task_layer = task_layer(dim, codebook_dim)
        self.quantize = NormEMAQuantizer(vocab_size, codebook_dim, beta=1.0, decay=decay)
        self.decoder = vqkd_vit(self.grid, 1, codebook_dim, model, depth=decoder_depth)
        self.decode_task_layer = task_layer(dim, target_dim)
        self.teacher = None  # (set through use_teacher: a plain attribute, not a submodule)

    def use_teacher(self, teacher):
        """Attach the frozen teacher; its patch grid must be the tokenizer's (= BEiT's) and its width target_dim."""
        if teacher.grid != tuple(self.grid):
            raise UserError(f"the teacher's patch grid {teacher.grid[0]} x {teacher.grid[1]} ({teacher.name}) is not "
                            f"the tokenizer's and BEiT's {self.grid[0]} x {self.grid[1]}: choose --img-size / "
                            f"--patch-size (or another teacher) so that they agree")
        if teacher.dim != self.config["target_dim"]:
            raise UserError(f"the teacher {teacher.name} gives {teacher.dim}-d features, this tokenizer was built for "
                            f"{self.config['target_dim']}")
        object.__setattr__(self, "teacher", teacher)  # not registered: out of state_dict, parameters() and DDP
        return self

    def targets(self, view):
        """The teacher's features of the view, [B, N, target_dim] fp32, without gradients, in eval mode."""
        if self.teacher is None:
            if not self.config["teacher"]:
                raise UserError("training a vqkd tokenizer needs --teacher (an encoder.pth or a timm model name)")
            self.use_teacher(load_teacher(self.config["teacher"]))
        self.teacher.to(view.device).eval()
        with torch.no_grad():
            return self.teacher(view).float()

    def encode(self, view, generator=None):
        """view [B, 3, H, W] in [0, 1] -> (codes [B, N, d] straight-through, commitment loss, ids [B, N])."""
        x = patch_tokens(self.encoder, view * 2 - 1)  # [B, N, D]; official pre_process: [0, 1] -> [-1, 1]
        with torch.autocast(view.device.type, enabled=False):
            z = self.encode_task_layer(x.float())  # [B, N, d] in fp32
            return self.quantize(z, generator)

    def decode_features(self, z_q):
        """codes [B, N, d] -> reconstructed teacher features [B, N, target_dim]."""
        B, N, d = z_q.shape
        x = z_q.transpose(1, 2).reshape(B, d, *self.grid).contiguous()  # [B, N, d] -> [B, d, h, w], row-major
        return self.decode_task_layer(patch_tokens(self.decoder, x))

    @torch.no_grad()
    def get_codebook_indices(self, view):
        """view [B, 3, H, W] in [0, 1] -> ids [B, N], row-major: BEiT v2's targets."""
        return self.encode(view)[2]

    def decode(self, ids, grid):
        """None: VQ-KD reconstructs teacher features, not pixels (the interface's "cannot show pixels")."""
        return None

    def forward(self, view, generator, progress):
        """Stage-1 loss (official VQKD.forward): (loss, ids [B, N], logged scalars). `progress` is unused (no
        schedule: official VQ-KD anneals nothing)."""
        target = self.targets(view)  # [B, N, C]
        z_q, commit, ids = self.encode(view, generator)
        rec = self.decode_features(z_q).float()  # [B, N, C]
        rec_loss = cosine_loss(rec, target)
        return rec_loss + commit, ids, {"rec": rec_loss.detach(), "commit": commit.detach()}

    @torch.no_grad()
    def recon_error(self, view):
        """1 - cos between the teacher's features and their reconstruction from the tokens, over all tokens."""
        return cosine_loss(self.decode_features(self.quantize.codebook[self.get_codebook_indices(view)]).float(),
                           self.targets(view))


def cosine_loss(rec, target):
    """Official calculate_rec_loss 'cosine': mean over tokens of 1 - cos(rec, target); [B, N, C] each -> scalar."""
    return (1 - (l2norm(rec) * l2norm(target)).sum(dim=-1)).mean()


TOKENIZERS["vqkd"] = VQKD


def tokenizer_kind(cfg):
    """The kind --tokenizer names without reading a file: a kind, KIND:PATH, else dvae (main writes KIND:PATH back
    into the config once the tokenizer is known, so that stage 2 knows whether it is BEiT v2)."""
    kind, _, path = cfg.tokenizer.partition(":")
    if cfg.tokenizer in TOKENIZERS:
        return cfg.tokenizer
    return kind if path and kind in TOKENIZERS else "dvae"


def is_v2(cfg):
    return tokenizer_kind(cfg) == "vqkd"


def new_vqkd(cfg, with_teacher=True):
    """A fresh VQ-KD for this run: its view is the model's (stride = patch size, so the token grid is the patch
    grid), its decoder head as wide as the teacher's features. Without the teacher (the stage-2 model's random-init
    baseline and bench.py only need the vocabulary and the encoder) the head takes the encoder's width."""
    teacher = load_teacher(cfg.teacher) if with_teacher else None
    if with_teacher and teacher is None:
        raise UserError("--tokenizer vqkd trains the tokenizer from a teacher: give --teacher (an encoder.pth of this "
                        "repository or a timm model name whose weights are on disk)")
    model = cfg.vqkd_model or cfg.model
    tokenizer = VQKD(cfg.vocab_size, cfg.patch_size, cfg.img_size, model, cfg.vqkd_codebook_dim,
                     cfg.vqkd_decoder_depth, teacher.dim if teacher else VIT_SIZES[model][0], cfg.vqkd_decay,
                     cfg.teacher)
    return tokenizer.use_teacher(teacher) if teacher else tokenizer


# ------------------------------------------------------------------------------------------- the teacher (VQ-KD)
class Teacher(nn.Module):
    """A frozen image encoder whose final-normed patch tokens VQ-KD learns to reconstruct: view [B, 3, H, W] in
    [0, 1] -> normalised with the teacher's own mean / std, resized to its input size when that differs (the patch
    grids must agree) -> forward_features -> patch tokens (prefix tokens dropped) -> the projection `proj` if any
    (CLIP: `ln_post` is timm's final norm, `visual.proj` its head) -> [B, N, C]."""

    def __init__(self, model, name, mean, std, img_size, grid, dim, prefix_tokens=1, proj=None):
        super().__init__()
        self.model, self.proj = model.requires_grad_(False).eval(), proj
        self.name, self.img_size, self.grid, self.dim = name, tuple(img_size), tuple(grid), dim
        self.prefix_tokens = prefix_tokens
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):
        return super().train(False)  # always eval (dropout, drop path off)

    def forward(self, view):
        x = (view.float() - self.mean) / self.std
        if tuple(x.shape[-2:]) != self.img_size:
            x = F.interpolate(x, size=self.img_size, mode="bicubic", align_corners=False)
        x = self.model.forward_features(x)[:, self.prefix_tokens:]  # [B, N, D], final norm applied
        return self.proj(x) if self.proj is not None else x


def load_teacher(spec):
    """--teacher -> Teacher (or None when not given): an encoder.pth written by a method file of this repository
    (its config.json beside it gives size and resolution; the keys give the variant: position table, relative
    position bias, layer scale, q/v biases), or a timm model name whose weights are on disk."""
    if not spec:
        return None
    path = Path(spec)
    if path.is_file():
        return repository_teacher(path)
    if path.exists() or "/" in spec or spec.endswith(".pth"):
        raise UserError(f"--teacher {spec} is not an encoder.pth file")
    return timm_teacher(spec)


def repository_teacher(path):
    config_path = path.parent / "config.json"
    if not config_path.is_file():
        raise UserError(f"--teacher {path}: no config.json beside it to say its architecture")
    run_cfg = json.loads(config_path.read_text())
    state = load_file(path, "teacher")
    if not isinstance(state, dict) or "patch_embed.proj.weight" not in state or "blocks.0.norm1.weight" not in state:
        raise UserError(f"--teacher {path} is not a ViT encoder.pth of this repository (ConvMAE and iGPT encoders "
                        f"are not ViTs)")
    model, img_size = run_cfg.get("model"), run_cfg.get("img_size")
    if model not in VIT_SIZES or not img_size:
        raise UserError(f"--teacher {path}: its config.json names no known --model / --img-size")
    vit = VisionTransformer(img_size, qv_bias="blocks.0.attn.q_bias" in state,
                            qkv_bias="blocks.0.attn.qkv.bias" in state,
                            init_values=1.0 if "blocks.0.gamma_1" in state else None,
                            pos_embed="learned" if "pos_embed" in state else None,
                            rel_pos_bias="rel_pos_bias.relative_position_bias_table" in state,
                            **vit_kwargs(model, run_cfg.get("patch_size") or None))
    try:
        vit.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"--teacher {path} does not fit its config.json: {str(e).splitlines()[0]}") from None
    return Teacher(vit, str(path), IMAGENET_MEAN, IMAGENET_STD, vit.patch_embed.img_size, vit.patch_embed.grid_size,
                   vit.embed_dim)


def timm_weights_on_disk(name):
    """The file of a timm model's pretrained weights if it is already on disk (its pretrained_cfg `file`, or the
    Hugging Face cache), else None: no download at run time."""
    import timm
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.file and Path(cfg.file).is_file():
        return cfg.file
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return found
    return None


def timm_teacher(name):
    """A timm model as the teacher, from weights already on disk. Targets: forward_features (the final norm on
    every token) without the prefix tokens; for CLIP image towers (timm's head = CLIP's `visual.proj`, the paper's
    teacher vit_base_patch16_clip_224.openai) projected through it, as the official `encode_image(...) @ proj`."""
    import timm
    if not timm.is_model(name):
        raise UserError(f"--teacher {name} is neither a file nor a timm model name")
    weights = timm_weights_on_disk(name)
    if weights is None:
        raise UserError(f"--teacher {name}: its timm weights are not on disk (no download at run time); run "
                        f"timm.create_model({name!r}, pretrained=True) once where there is a network")
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=weights))
    clip = "clip" in name
    proj = model.head if clip else None
    dim = model.head.out_features if clip else model.num_features
    pc = model.pretrained_cfg
    return Teacher(model, name, pc["mean"], pc["std"], tuple(model.patch_embed.img_size), model.patch_embed.grid_size,
                   dim, model.num_prefix_tokens, proj)


def show_tokens(tokenizer, ids, grid, size):
    """Tokens as images [B, 3, H, W]: decoded through the tokenizer where it decodes to pixels (dVAE), else (VQ-KD)
    each id as a fixed colour, which shows where two token maps agree."""
    img = tokenizer.decode(ids, grid)
    if img is None:
        return token_colours(ids, tokenizer.vocab_size, grid, size)
    return F.interpolate(img.float(), size=size, mode="bilinear", antialias=True).clamp(0, 1)


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
    """The pre-training model. Without a tokenizer (bench.py, the random-init baseline of the monitors) a fresh one
    of the configured kind is built, in a fork of the generators so that the encoder's init does not depend on it."""
    if is_v2(cfg):
        return build_beit2(cfg, tokenizer)  # BEiT v2 (--tokenizer vqkd)
    if tokenizer is None:
        with seeded_rng(mix_seed(cfg.seed, 1_000_003)):
            tokenizer = new_tokenizer(cfg)
    return BEiT(tokenizer, cfg.img_size, cfg.patch_size, cfg.model, tokenizer.vocab_size, cfg.drop_path,
                layer_scale(cfg))


def pretraining_step(model, batch, cfg, generator):
    """One BEiT forward as main() runs it: this step's masks from `generator`, tokens, loss and accuracy.
    `model` may be wrapped (DDP / torch.compile), so sizes come from cfg."""
    imgs, tok_view = batch
    masks = mask_generator(cfg)
    mask = masks(imgs.shape[0], step_rng(generator), imgs.device)  # [B, N]
    return model(imgs, tok_view, mask, masks.num_masking_patches)


def training_loss(model, batch, cfg, generator):
    """bench.py's hook: the loss of pretraining_step."""
    return pretraining_step(model, batch, cfg, generator)[0]


def bench_variants(cfg):
    """bench.py's hook: one row for BEiT (the dVAE tokenizer), one for BEiT v2 (VQ-KD; the teacher is not in the
    stage-2 step, so none is needed)."""
    return [cfg, replace(cfg, tokenizer="vqkd")]


def bench_label(cfg):
    """bench.py's row name: which BEiT, the encoder and the input size."""
    return f"{'BEiT v2' if is_v2(cfg) else 'BEiT'} {cfg.model}/{cfg.patch_size} {cfg.img_size}px"


def bench_batch(imgs, cfg):
    """bench.py's hook: random images -> (model view, tokenizer view in [0, 1] at the configured stride)."""
    size = tokenizer_view_size(cfg, cfg.patch_size if is_v2(cfg) else cfg.dvae_stride)  # VQ-KD: the model's view
    return imgs, torch.rand(imgs.shape[0], 3, size, size, device=imgs.device)


# ---------------------------------------------------------------------------------------------------------------- #
#                                 BEiT v2, stage 2: exact-count masks, patch aggregation                             #
# ---------------------------------------------------------------------------------------------------------------- #
class ExactMaskingGenerator(MaskingGenerator):
    """BEiT v2's copy of the blockwise generator (beit2/masking_generator.py): the same blocks, then exactly
    `num_masking_patches` per image: when the 10 failed draws end an image early, random unmasked patches are added
    until the count is reached (75 of 196 at 224 px). (Its other branch, unmasking an excess, cannot run: no block
    adds more than the budget left.) official: the extra patches from NumPy's global generator (np.random.choice);
    we: from the step's Random, rng.sample."""

    def draw(self, rng, boxes=None):
        mask = super().draw(rng, boxes)  # [h, w], at most num_masking_patches
        missing = self.num_masking_patches - int(mask.sum())
        if missing > 0:
            free = np.flatnonzero(mask == 0)  # row-major indices of unmasked patches
            mask.flat[rng.sample(free.tolist(), missing)] = 1
        return mask


class BEiTv2(BEiT):
    """The BEiT v2 pre-training model (official `VisionTransformerForMaskedImageModelingCLS`, shared_lm_head True):
    BEiT's model (the same encoder, mask token and head; VQ-KD ids as targets) plus the patch-aggregation branch
    (paper §2.3): `head_layers` extra blocks on [the last block's cls token (before the final norm), the patch states
    after block `early_layers`], through the *shared* final norm and LM head. The shallow patch states cannot
    predict the masked tokens alone, so the cls token has to carry the image's global information to them.
    loss = CE(main branch) + CE(aggregation branch), each over the masked positions. The branch serves only the
    pre-training: evaluation and encoder.pth use `encoder` alone (official: discarded for fine-tuning)."""

    def __init__(self, tokenizer, img_size=224, patch_size=16, model="vit_base", vocab_size=8192, drop_path=0.1,
                 layer_scale=0.1, early_layers=None, head_layers=2):
        super().__init__(tokenizer, img_size, patch_size, model, vocab_size, drop_path, layer_scale)
        depth, dim, heads = len(self.encoder.blocks), self.encoder.embed_dim, self.encoder.num_heads
        self.early_layers = early_layers or max(1, depth - 3)  # official --early_layers 9 (base), 21 (large)
        if not 1 <= self.early_layers <= depth:
            raise ValueError(f"early_layers {self.early_layers} is not in [1, {depth}]")
        # drop path and the init rescale continue the backbone's schedule from block early_layers on
        rates = drop_path_rates(drop_path, max(depth, self.early_layers + head_layers))
        self.cls_pt_layers = nn.ModuleList(
            Block(dim, heads, qv_bias=True, init_values=layer_scale, drop_path=rates[self.early_layers + i])
            for i in range(head_layers))
        # official: these blocks are built after the model's init ran (`self.apply(self._init_weights)` in the
        # parent's __init__), so they keep PyTorch's default init; only the fix-init rescale is applied, with layer
        # ids early_layers + 1, early_layers + 2 (`fix_init_cls_pt_weight`). We do the same.
        rescale_residual_branches(self.cls_pt_layers, first=self.early_layers + 1)

    def forward_branches(self, imgs, mask):
        """imgs [B, 3, H, W] normalised, mask [B, N] bool -> (main, aggregation) normed patch tokens, [B, N, D] each."""
        x = self.encoder.embed(imgs)  # [B, N, D]
        w = mask.unsqueeze(-1).to(x.dtype)  # [B, N, 1]
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = self.encoder.prepend_cls(x)  # [B, 1+N, D]
        attn_bias = self.encoder.rel_pos_bias()  # [H, 1+N, 1+N], shared by every block, the extra ones too
        for i, block in enumerate(self.encoder.blocks, start=1):
            x = block(x, attn_bias)
            if i == self.early_layers:
                early = x[:, 1:]  # [B, N, D], the patch states after block early_layers
        agg = torch.cat([x[:, :1], early], dim=1)  # [B, 1+N, D]: the last block's cls + the early patch states
        for block in self.cls_pt_layers:
            agg = block(agg, attn_bias)
        return self.encoder.norm(x)[:, 1:], self.encoder.norm(agg)[:, 1:]  # one shared final norm

    def forward(self, imgs, tok_view, mask, slots):
        """As BEiT.forward -> (loss = CE main + CE aggregation, the main branch's masked-token accuracy)."""
        with torch.no_grad():
            ids = self.tokenizer.get_codebook_indices(tok_view)  # [B, N]
        order, valid = masked_positions(mask, slots)  # [B, K] each (exact counts: all valid)
        labels = ids.gather(1, order).masked_fill(~valid, -100)  # [B, K]
        losses, accuracy = [], None
        for x in self.forward_branches(imgs, mask):
            x = x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, N, D] -> [B, K, D]
            logits = self.lm_head(x).float()  # [B, K, V], the shared head
            losses.append(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100))
            if accuracy is None:  # official mlm_acc_1 (the main branch)
                accuracy = ((logits.argmax(-1) == labels) & valid).sum() / valid.sum()
        return losses[0] + losses[1], accuracy.detach()


def build_beit2(cfg, tokenizer=None):
    """The BEiT v2 pre-training model; without a tokenizer (bench.py, the random-init baseline) a fresh VQ-KD
    without its teacher, in a fork of the generators as build_model does."""
    if tokenizer is None:
        with seeded_rng(mix_seed(cfg.seed, 1_000_003)):
            tokenizer = new_vqkd(cfg, with_teacher=False)
    tokenizer.teacher = None  # stage 2 needs only the ids: free the teacher stage 1 may have left (GPU memory)
    return BEiTv2(tokenizer, cfg.img_size, cfg.patch_size, cfg.model, tokenizer.vocab_size, cfg.drop_path,
                  layer_scale(cfg), cfg.early_layers or None, cfg.head_layers)


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
#                                                  visualisation                                                     #
# ---------------------------------------------------------------------------------------------------------------- #
@torch.no_grad()
def save_reconstruction(model, imgs, tok_views, cfg, path, title, amp):
    """Rows: original | masked blocks | the tokenizer's tokens decoded (the targets) | the predicted tokens at the
    masked positions (target tokens elsewhere) decoded. The same masks every epoch (seed 0)."""
    was_training = model.training
    model.eval()
    masks = mask_generator(cfg)
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
    p = cfg.patch_size
    m = mask.view(-1, 1, *model.grid_size).float().repeat_interleave(p, 2).repeat_interleave(p, 3)  # [B, 1, H, W]
    rows = [denormalize(imgs), denormalize(imgs) * (1 - m) + 0.5 * m, target_img, pred_img]
    shown = ("decodes through the tokenizer's decoder" if tokenizer.decode(ids[:1], model.grid_size) is not None
             else "one colour per token id (VQ-KD decodes teacher features, not pixels)")
    note = f"masked-token accuracy on these images {acc:.1%}; {shown}"
    save_image_grid(rows, path, f"{title}\n{note}", labels=["original", "masked", "target tokens", "predicted"])


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      train                                                         #
# ---------------------------------------------------------------------------------------------------------------- #
def main():
    cfg, preset = parse_config(Config, PRESETS, description=__doc__.split("\n\n")[0])
    run = Run(cfg, "beit", preset)  # sets cfg.lr = blr x global batch / 256
    tokenizer, tokenizer_path = obtain_tokenizer(cfg, run)  # stage 1 when its file does not hold a finished one
    if cfg.stage == "tokenizer":
        if load_file(tokenizer_path, "tokenizer")["complete"]:
            run.log(f"stage 1 done: {tokenizer_path}")
        return
    cfg.vocab_size, cfg.dvae_stride = tokenizer.vocab_size, tokenizer.stride  # a tokenizer file brings its own
    cfg.tokenizer = f"{tokenizer.kind}:{tokenizer_path}"  # the kind decides the model: vqkd = BEiT v2
    tok_size = tokenizer_view_size(cfg, tokenizer.stride)
    data = None if cfg.eval_only else build_two_view_data(cfg, run, tok_size, tokenizer.interpolation)
    with seeded_rng(cfg.seed + run.dist.rank, run.device):  # as Run seeded it: the monitors rebuild this init
        model = build_model(cfg, tokenizer).to(run.device)
    # AdamW(0.9, 0.999), wd 0.05 except 1-D parameters, biases and the official `no_weight_decay` (cls token; there
    # is no pos_embed); the mask token and the relative position table *are* decayed, as officially
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, no_decay=("encoder.cls_token",)), lr=cfg.lr,
                                  betas=(0.9, 0.999), fused=True)
    start_epoch, start_step = run.start(model, optimizer)
    masks = mask_generator(cfg)
    v2 = is_v2(cfg)  # BEiT v2: exact mask counts, patch aggregation
    run.log(f"BEiT{' v2' if v2 else ''} {cfg.model}/{cfg.patch_size} at {cfg.img_size}px: "
            f"{count_params(model) / 1e6:.2f}M trainable parameters ({count_params(model.encoder) / 1e6:.2f}M encoder), "
            f"{tokenizer.vocab_size} visual tokens from {tokenizer_path} on the {tok_size}px view; "
            f"{'exactly' if v2 else 'at most'} {masks.num_masking_patches} of {masks.num_patches} patches masked, "
            f"blocks >= {masks.min_num_patches}")
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
                lr = set_lr(optimizer, beit_lr(it, data.steps_per_epoch, cfg))
                update = (step + 1) % cfg.accum_iter == 0  # the last micro-step of an accumulation updates
                set_grad_sync(train_model, update)
                with run.autocast():
                    loss, acc = pretraining_step(train_model, batch, cfg, run.step_generator(it))  # masks: (seed, step)
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
                if run.end_of_step(epoch, step, loss, lr, grad_norm):  # log, guard, checkpoint, signal, --max-steps
                    break
            start_step = 0
            mlm_acc = run.mean_over_ranks(accuracy / max(run.epoch_steps, 1)).item()
            if not run.done:  # (--max-steps ends mid-epoch: no epoch summary, but the grid of where it stopped)
                run.end_of_epoch(epoch, mlm_acc=round(mlm_acc, 5))
                run.log(f"epoch {epoch}: masked-token accuracy {mlm_acc:.2%}")
            if run.is_main:
                save_reconstruction(model, fixed, fixed_tok, cfg, run.out / f"recon_e{epoch}.png",
                                    f"BEiT{' v2' if v2 else ''} {cfg.model} epoch {epoch}, {'' if v2 else '<= '}"
                                    f"{masks.num_masking_patches}/{masks.num_patches} patches masked in blocks",
                                    run.autocast())
            if run.done:
                break
            if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
                run.write_log(kind="eval", epoch=epoch, **monitors(model.encoder, build_model, run))
        run.finish_training(time.perf_counter() - t0)

    results = report("beit", model.encoder, build_model, run, FINETUNE)  # monitors, encoder.pth, results.json, ...
    results["mlm_acc"] = mlm_acc  # of the last epoch (None with --eval-only)
    results["tokenizer"] = {"path": str(tokenizer_path), **load_file(tokenizer_path, "tokenizer").get("stats", {})}
    run.write_json("results.json", results)


if __name__ == "__main__":
    cli(main)
