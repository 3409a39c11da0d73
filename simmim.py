"""SimMIM: A Simple Framework for Masked Image Modeling (Xie, Zhang, Cao, Lin, Bao, Yao, Dai, Hu, 2021),
arXiv:2111.09886.

Cut the image into square mask units of 32 x 32 pixels (2 x 2 ViT patches at 224 px) and hide a random 60 % of them.
The hidden patches keep their place in the sequence: their embeddings are replaced by one learned mask token, and the
ViT encoder runs on *all* tokens (unlike MAE, whose encoder sees only the visible ones). A linear head -- a 1 x 1
convolution from each token to its p x p x 3 pixel values, then PixelShuffle back to the image layout -- predicts the
raw pixels, and the loss is the L1 distance to the input image (ImageNet-normalised, no per-patch normalisation) on the
hidden pixels only (paper §3). The encoder is the BEiT-style ViT of the official code: no absolute position embedding,
one relative position bias table shared by all blocks, layer scale 0.1, q and v biases; the exported encoder loads
into timm's `Beit`. After pre-training the head is discarded and the encoder is fine-tuned or probed.

Run:     python simmim.py                                   # offline demo on the built-in synthetic set
         python simmim.py --data cifar10 --data-path ./data  # the small-data preset (ViT-T/2 at 32 px, mask unit 4)
         python simmim.py --data imagenet --data-path /data/imagenet --model vit_base
         torchrun --nproc_per_node 16 simmim.py --data imagenet --data-path /data/imagenet  # official: 16 x 128
Deviations from the official code:
  - masks are drawn on the device from a (seed, rank, step) generator (official: numpy in the workers; exact resume)
  - the mask token lives beside the encoder, not inside it, so that `encoder.pth` loads into timm with strict=True
  - the fine-tune keeps the shared relative position table (official: copies it into every block first; see FINETUNE)
  - the demo/small/medium presets are not the paper's recipe (see PRESETS)
Results: docs/RESULTS.md#simmim
"""
import math
import time
import typing
from dataclasses import dataclass

import torch
import torch.nn as nn

from common import UserError
from common.data import build_train_data, preview_images
from common.evaluation import denormalize, monitors, report, save_image_grid
from common.training import (Run, TrainConfig, cli, cosine_lr, param_groups, parse_config, scaled_lr, set_grad_sync,
                             set_lr)
from common.vit import (VisionTransformer, count_params, init_beit_style, set_grad_checkpointing, trunc_normal_sigma,
                        vit_kwargs)


# ---------------------------------------------------------------------------------------------------------------- #
#                                                     masking                                                        #
# ---------------------------------------------------------------------------------------------------------------- #
class MaskGenerator:
    """Random masking in square units of `mask_patch_size` pixels (paper §3, "Masking strategy"; official
    `MaskGenerator` in data/data_simmim.py).

    The image is a grid of units, ceil(units x ratio) of them are chosen uniformly without replacement (the same
    exact count for every image), and each chosen unit hides the mask_patch_size / patch_size squared ViT patches it
    covers. Returns [B, N] float masks over the token grid, row-major, 1 = masked.
    official: one mask per sample, drawn with numpy (`np.random.permutation`) in the dataset transform on the CPU;
    we: the whole batch at once on the training device from a torch.Generator (the first `count` of a random
    permutation, as the official, obtained by sorting uniform noise), so the masks of a step follow from (seed, step).
    """

    def __init__(self, img_size=224, mask_patch_size=32, patch_size=16, mask_ratio=0.6):
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else img_size
        if img_h % mask_patch_size or img_w % mask_patch_size:
            raise ValueError(f"image size {img_h}x{img_w} is not a multiple of the mask unit {mask_patch_size}")
        if mask_patch_size % patch_size:
            raise ValueError(f"mask unit {mask_patch_size} is not a multiple of the patch size {patch_size}")
        self.units = (img_h // mask_patch_size, img_w // mask_patch_size)  # the grid of mask units
        self.scale = mask_patch_size // patch_size  # tokens per unit side
        self.num_units = self.units[0] * self.units[1]
        self.mask_count = math.ceil(self.num_units * mask_ratio)  # official: int(np.ceil(token_count * mask_ratio))

    def __call__(self, batch_size, generator=None, device=None):
        noise = torch.rand(batch_size, self.num_units, generator=generator, device=device)  # [B, units]
        hidden = noise.argsort(dim=1)[:, :self.mask_count]  # [B, count]: a uniformly random subset per image
        mask = torch.zeros(batch_size, self.num_units, device=device).scatter_(1, hidden, 1.0)  # [B, units]
        mask = mask.view(batch_size, *self.units)  # [B, units_h, units_w]
        mask = mask.repeat_interleave(self.scale, 1).repeat_interleave(self.scale, 2)  # [B, h, w] token grid
        return mask.flatten(1)  # [B, N], 1 = masked


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      model                                                         #
# ---------------------------------------------------------------------------------------------------------------- #
class SimMIM(nn.Module):
    def __init__(self, img_size=224, patch_size=16, model="vit_base", drop_path=0.1, layer_scale=0.1):
        super().__init__()
        # encoder: the official pre-training ViT (USE_APE False, USE_SHARED_RPB True, INIT_VALUES 0.1, QKV_BIAS
        # True = q and v biases, LayerNorm eps 1e-6); timm Beit names, exported as encoder.pth
        self.encoder = VisionTransformer(img_size, qv_bias=True, init_values=layer_scale, drop_path_rate=drop_path,
                                         pos_embed=None, rel_pos_bias=True, **vit_kwargs(model, patch_size))
        dim, self.patch_size = self.encoder.embed_dim, patch_size
        self.grid_size = self.encoder.patch_embed.grid_size
        self.num_patches = self.encoder.patch_embed.num_patches
        # official: `encoder.mask_token`; here beside the encoder so that the encoder's state dict is exactly timm's
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # the "linear head" (paper §3, "Prediction head"): a 1x1 conv D -> p*p*3 per token, then PixelShuffle lays
        # those values out as the token's p x p pixels. official: 3 output channels hard-coded (the input is always
        # RGB here too), PyTorch's default init, no norm, no activation
        self.decoder = nn.Sequential(nn.Conv2d(dim, patch_size ** 2 * 3, kernel_size=1), nn.PixelShuffle(patch_size))
        self.initialize_weights()

    def forward_encoder(self, imgs, mask):
        """Patch embeddings, hidden ones replaced by the mask token, cls prepended, all tokens through the blocks.
        imgs [B, 3, H, W], mask [B, N] (1 = masked) -> feature map [B, D, h, w] (cls dropped)."""
        x = self.encoder.embed(imgs)  # [B, N, D]; no absolute position (pos_embed=None)
        w = mask.unsqueeze(-1).to(x.dtype)  # [B, N, 1]
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w  # official blend: before the cls token and the blocks
        x = self.encoder.prepend_cls(x)  # [B, 1+N, D]
        x = self.encoder.norm(self.encoder.run_blocks(x))  # the shared relative position bias is added in every block
        B, _, D = x.shape
        return x[:, 1:].transpose(1, 2).reshape(B, D, *self.grid_size)  # [B, N, D] -> [B, D, h, w]

    def pixel_mask(self, mask):
        """Token mask [B, N] -> pixel mask [B, 1, H, W] (each token's 1 repeated over its p x p pixels)."""
        p = self.patch_size
        mask = mask.view(mask.shape[0], *self.grid_size)  # [B, h, w]
        return mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)  # [B, 1, H, W]

    def forward_loss(self, imgs, x_rec, mask):
        """L1 on the hidden pixels only (paper §3, "Prediction targets", Eq. 1), as the official: the sum over hidden
        (pixel, channel) elements / (number of hidden pixels + 1e-5) / channels, i.e. the mean L1 per hidden element.
        The target is the input itself: ImageNet-normalised pixels, no per-patch normalisation."""
        mask_px = self.pixel_mask(mask)  # [B, 1, H, W]
        l1 = (imgs - x_rec.float()).abs()  # [B, 3, H, W], fp32
        return (l1 * mask_px).sum() / (mask_px.sum() + 1e-5) / imgs.shape[1]

    def forward(self, imgs, mask):
        """imgs [B, 3, H, W] normalised, mask [B, N] (1 = masked) -> (loss, reconstruction [B, 3, H, W])."""
        x_rec = self.decoder(self.forward_encoder(imgs, mask))  # [B, D, h, w] -> [B, p*p*3, h, w] -> [B, 3, H, W]
        return self.forward_loss(imgs, x_rec, mask), x_rec

    def initialize_weights(self):
        """The official pre-training init of the encoder (`init_beit_style`, shared with BEiT: cls token, trunc-normal
        0.02 at +-1 sigma, the 1/sqrt(2 l) rescale), then the mask token, trunc-normal too; the decoder keeps
        PyTorch's default init (the official `_init_weights` never reaches it)."""
        init_beit_style(self.encoder)
        trunc_normal_sigma(self.mask_token)


def build_model(cfg):
    model = SimMIM(cfg.img_size, cfg.patch_size, cfg.model, cfg.drop_path, cfg.layer_scale)
    return set_grad_checkpointing(model, cfg.grad_checkpointing)


def training_loss(model, imgs, cfg, generator):
    """One pre-training forward as main() and bench.py run it: this step's masks from `generator`, then the loss.
    `model` may be wrapped (DDP / torch.compile), so sizes come from cfg."""
    masks = MaskGenerator(cfg.img_size, cfg.mask_patch_size, cfg.patch_size, cfg.mask_ratio)
    loss, _ = model(imgs, masks(imgs.shape[0], generator, imgs.device))
    return loss


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      config                                                        #
# ---------------------------------------------------------------------------------------------------------------- #
@dataclass
class Config(TrainConfig):
    """Defaults = the official ViT-B recipe (configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml:
    800 epochs, 16 GPUs x 128 = batch 2048, base lr 1e-4 per 512, warm-up 10 epochs from 5e-7, x0.1 at epoch 700).
    The paper's ViT-B setting differs in base lr, warm-up and schedule; its Swin ablations use lr 8e-4 at batch 2048
    with a cosine schedule (`--sched cosine`)."""
    host_memory_gib = (1.73, 0.21)  # GiB (fixed, per image) on a CPU in fp32 at these defaults: bench.py --memory
    lr_batch_div: typing.ClassVar[int] = 512  # official: lr = BASE_LR x global batch / 512 (MAE and BEiT use 256)

    batch_size: int = 128  # images per process per step (official: 128 per GPU on 16 GPUs)
    blr: float = 1e-4  # base learning rate, scaled by global batch / 512 (official BASE_LR)
    warmup_epochs: float = 10  # linear warm-up from --warmup-lr to the peak, in (fractional) epochs
    warmup_lr: typing.Optional[float] = None  # first warm-up lr (default: official WARMUP_LR 5e-7 x global batch / 512)
    sched: str = "multistep"  # after warm-up: multistep (official ViT-B: x0.1 at --lr-step-at) or cosine (Swin)
    lr_step_at: float = 0.875  # multistep: lr x 0.1 from this fraction of --epochs on (official: epoch 700 of 800)
    clip_grad: typing.Optional[float] = 5.0  # clip the global gradient norm to this (official TRAIN.CLIP_GRAD)
    mask_patch_size: int = 32  # side of a mask unit in pixels; a multiple of --patch-size that divides --img-size
    mask_ratio: float = 0.6  # fraction of mask units hidden (rounded up: ceil(units x ratio), exact for every image)
    drop_path: float = 0.1  # stochastic depth of the last block, linear from 0 (official ViT-B: 0.1)
    layer_scale: float = 0.1  # initial value of the per-channel block gains gamma_1, gamma_2 (official INIT_VALUES)

    def check(self):
        super().check()
        if not 0 < self.mask_ratio < 1:
            raise UserError(f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_patch_size <= 0 or self.mask_patch_size % self.patch_size:
            raise UserError(f"--mask-patch-size {self.mask_patch_size} must be a positive multiple of --patch-size "
                            f"{self.patch_size} (a mask unit covers whole patches)")
        if self.img_size % self.mask_patch_size:
            raise UserError(f"--img-size {self.img_size} is not divisible by --mask-patch-size {self.mask_patch_size}")
        if self.sched not in ("multistep", "cosine"):
            raise UserError(f"unknown --sched {self.sched!r}; choose multistep or cosine")
        if not 0 < self.lr_step_at <= 1:
            raise UserError(f"--lr-step-at must be in (0, 1], got {self.lr_step_at}")
        if self.sched == "multistep" and self.warmup_epochs > self.lr_step_at * self.epochs:
            raise UserError(f"the warm-up ({self.warmup_epochs} epochs) must end before the lr step at epoch "
                            f"{self.lr_step_at * self.epochs:g}")  # the official scheduler asserts this too
        if self.warmup_lr is not None and self.warmup_lr < 0:
            raise UserError("--warmup-lr must not be negative")
        if not 0 <= self.drop_path < 1:
            raise UserError(f"--drop-path must be in [0, 1), got {self.drop_path}")


# ---------------------------------------------------------------------------------------------------------------- #
#                                                  lr schedule                                                       #
# ---------------------------------------------------------------------------------------------------------------- #
def simmim_lr(epoch, cfg):
    """lr at fractional `epoch` (step / steps per epoch + epoch), set every iteration as the official scheduler.

    Warm-up: linear from --warmup-lr (official WARMUP_LR, 5e-7 x batch / 512: *not* zero, unlike MAE and BEiT) to
    the peak over --warmup-epochs. Then multistep (official ViT-B config): the peak until --lr-step-at x --epochs,
    0.1 x peak after; the milestone scales with --epochs (700 of 800 epochs = 0.875). Or cosine (official Swin
    configs, timm's CosineLRScheduler without `warmup_prefix`): the half cosine from the peak to --min-lr spans the
    whole run *including* the warm-up, so it is already slightly below the peak when the warm-up ends."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * epoch / cfg.warmup_epochs
    if cfg.sched == "cosine":
        return cosine_lr(epoch, cfg.lr, cfg.min_lr, 0, cfg.epochs)  # no warm-up term: the cosine counts from epoch 0
    return cfg.lr * (0.1 if epoch >= cfg.lr_step_at * cfg.epochs else 1.0)


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      train                                                         #
# ---------------------------------------------------------------------------------------------------------------- #
def main():
    cfg, preset = parse_config(Config, PRESETS, description=__doc__.split("\n\n")[0])
    run = Run(cfg, "simmim", preset)  # devices, processes, --out; resolves cfg.out, cfg.compile, a preset's accum_iter
    data = None if cfg.eval_only else build_train_data(cfg, run.dist, crop_scale=(0.67, 1.0), crop_ratio=(3 / 4, 4 / 3),
                                                       interpolation="bilinear", log=run.log)  # torchvision default
    model = build_model(cfg).to(run.device)
    cfg.lr = scaled_lr(cfg, run.global_batch)  # lr = blr x global batch / 512 (the official scaling rule)
    if cfg.warmup_lr is None:  # official: WARMUP_LR 5e-7, scaled like the lr
        cfg.warmup_lr = 5e-7 * run.global_batch / cfg.lr_batch_div
    # AdamW(0.9, 0.999), wd 0.05 except 1-D parameters, biases and the official `no_weight_decay` (cls token; there
    # is no pos_embed); the mask token and the relative position table *are* decayed, as officially
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, no_decay=("encoder.cls_token",)), lr=cfg.lr,
                                  betas=(0.9, 0.999), fused=True)  # one kernel per step, faster than foreach
    start_epoch, start_step = run.start(model, optimizer)
    masks = MaskGenerator(cfg.img_size, cfg.mask_patch_size, cfg.patch_size, cfg.mask_ratio)
    run.log(f"SimMIM {cfg.model}/{cfg.patch_size} at {cfg.img_size}px: {count_params(model) / 1e6:.2f}M trainable "
            f"parameters ({count_params(model.encoder) / 1e6:.2f}M encoder); {masks.mask_count} of {masks.num_units} "
            f"mask units of {cfg.mask_patch_size}px hidden ({masks.mask_count / masks.num_units:.1%})")
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
                lr = set_lr(optimizer, simmim_lr(first / data.steps_per_epoch, cfg))
                update = (step + 1) % cfg.accum_iter == 0  # the last micro-step of an accumulation updates
                set_grad_sync(train_model, update)
                with run.autocast():
                    loss = training_loss(train_model, imgs, cfg, run.step_generator(it))  # masks from (seed, step)
                run.scaler.scale(loss / cfg.accum_iter).backward()
                grad_norm = None
                if update:
                    run.scaler.unscale_(optimizer)
                    if cfg.clip_grad:  # (no clipping: skip the norm too, a full pass over the gradients)
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
                save_reconstruction(model, fixed.to(run.device), cfg, run.out / f"recon_e{epoch}.png",
                                    f"SimMIM {cfg.model} epoch {epoch}, {masks.mask_count}/{masks.num_units} units of "
                                    f"{cfg.mask_patch_size}px hidden", run.autocast())
            if run.done:
                break
            if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
                run.write_log(kind="eval", epoch=epoch, **monitors(model.encoder, build_model, run))
        run.finish_training(time.perf_counter() - t0)

    report("simmim", model.encoder, build_model, run)  # monitors, encoder.pth, results.json, fine-tune


# ---------------------------------------------------------------------------------------------------------------- #
#                                          presets and fine-tune recipes                                             #
# ---------------------------------------------------------------------------------------------------------------- #
# Presets by dataset scale; a flag given on the command line always wins. Each keeps the structure of the ImageNet
# masking (mask units of 2 x 2 patches, ~60 % of them hidden); only the demo's 8 x 8 token grid is coarser than 14 x 14.
PRESETS = {
    # `python simmim.py`: the offline demo. A CPU-sized model and schedule for a run of minutes, evaluation
    # included; not a research recipe. 32 px, patch 4, mask unit 8: an 8 x 8 token grid of 4 x 4 units (10 of 16
    # hidden). The encoder sees all 65 tokens (MAE's: 17), so a step costs more than MAE's at the same model and
    # batch, hence only 2 epochs; the lr is raised for the short run (1e-3 at batch 128).
    "demo": dict(img_size=32, patch_size=4, mask_patch_size=8, model="vit_micro", batch_size=128, epochs=2,
                 warmup_epochs=0.5, blr=4e-3, workers=2),
    # CIFAR-10/100, (Fashion-)MNIST, at 32 px (MNIST's 28 px are resized to 32): our choice, there is no published
    # SimMIM recipe at this scale. Patch 2 and mask unit 4 give a 16 x 16 token grid of 8 x 8 units of 2 x 2 tokens
    # (39 of 64 hidden), the shape of ImageNet's 14 x 14 tokens in 7 x 7 units; ViT-T; the official schedule and
    # global batch 2048 (512 x 4 accumulation steps on one GPU), i.e. lr 4e-4 as on ImageNet.
    "small": dict(img_size=32, patch_size=2, mask_patch_size=4, model="vit_tiny", batch_size=512, accum_iter=4),
    # STL-10 (96 px): our choice as well. Patch 8 and mask unit 16: 12 x 12 tokens in 6 x 6 units (22 of 36 hidden);
    # ViT-S, global batch 2048 (256 x 8).
    "medium": dict(img_size=96, patch_size=8, mask_patch_size=16, model="vit_small", batch_size=256, accum_iter=8),
    "imagenet": {},
}

# Fine-tune recipes of finetune.py (and --finetune-epochs), one per data scale (finetune.finetune_scale); fields: its
# FinetuneRecipe's.
FINETUNE = {
    # official configs/vit_base__800ep/simmim_finetune__vit_base__img224__800ep.yaml + config.py: 100 epochs, 20 of
    # them warm-up from 2.5e-7, base lr 1.25e-3 per 512 images, timm's cosine over all steps (warm-up included) to
    # 2.5e-7 (warm-up and min lr scaled by batch / 512 too), the lr updated after each step, layer decay 0.65, drop
    # path 0.1, wd 0.05, clip 5.0; augmentation as MAE's (rand-m9-mstd0.5-inc1, erasing 0.25, mixup 0.8, cutmix 1.0,
    # smoothing 0.1; its colour jitter 0.4 is unused: timm applies it only without RandAugment). official: head
    # init trunc_normal(0.02) x 0.001 and the shared relative position table copied into every block; we: the same
    # std (2e-5) and the shared table kept.
    "imagenet": dict(epochs=100, warmup_epochs=20, blr=1.25e-3, lr_batch_div=512, warmup_lr=2.5e-7, min_lr=2.5e-7,
                     scale_floor=True, schedule="timm", layer_decay=0.65, drop_path=0.1, clip_grad=5.0,
                     crop_scale=(0.08, 1.0), rand_augment=9, erasing=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1),
    # STL-10 and other 65-128 px images: our choice; the ImageNet recipe with a milder crop.
    "medium": dict(epochs=100, warmup_epochs=20, blr=1.25e-3, lr_batch_div=512, warmup_lr=2.5e-7, min_lr=2.5e-7,
                   scale_floor=True, schedule="timm", layer_decay=0.65, drop_path=0.1, clip_grad=5.0,
                   crop_scale=(0.2, 1.0), rand_augment=9, erasing=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1),
    # 28-64 px images: our choice for short runs on small images: SimMIM's schedule and clipping, a 10 % warm-up, a
    # milder crop, no RandAugment / erasing / mixup / cutmix; batch 64 for 4x the steps of an epoch, at lr 1e-3
    # (blr 8e-3 x 64 / 512), as MAE's small recipe.
    "small": dict(epochs=50, warmup_epochs=5, batch_size=64, blr=8e-3, lr_batch_div=512, warmup_lr=2.5e-7,
                  min_lr=2.5e-7, scale_floor=True, schedule="timm", layer_decay=0.75, drop_path=0.1, clip_grad=5.0,
                  crop_scale=(0.5, 1.0), rand_augment=0, erasing=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1),
}


# ---------------------------------------------------------------------------------------------------------------- #
#                                                  visualisation                                                     #
# ---------------------------------------------------------------------------------------------------------------- #
@torch.no_grad()
def save_reconstruction(model, imgs, cfg, path, title, amp):
    """Rows: original | masked input | prediction (every pixel) | prediction pasted into the visible pixels.
    The target is the ImageNet-normalised image itself (no per-patch normalisation), so un-normalising the
    prediction with the dataset mean/std is exact. The same masks every epoch (seed 0)."""
    was_training = model.training
    model.eval()
    masks = MaskGenerator(cfg.img_size, cfg.mask_patch_size, cfg.patch_size, cfg.mask_ratio)
    mask = masks(imgs.shape[0], torch.Generator().manual_seed(0)).to(imgs.device)  # [B, N]
    with amp:
        _, x_rec = model(imgs, mask)  # [B, 3, H, W]
    model.train(was_training)
    m = model.pixel_mask(mask)  # [B, 1, H, W]
    rows = [denormalize(imgs), denormalize(imgs) * (1 - m) + 0.5 * m, denormalize(x_rec),
            denormalize(imgs * (1 - m) + x_rec.float() * m)]
    note = "target = the normalised input (no per-patch norm): prediction un-normalised exactly; loss on grey only"
    save_image_grid(rows, path, f"{title}\n{note}", labels=["original", "masked", "prediction", "pasted"])


if __name__ == "__main__":
    cli(main)
