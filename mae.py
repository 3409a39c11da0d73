"""MAE: Masked Autoencoders Are Scalable Vision Learners (He, Chen, Xie, Li, Dollár, Girshick, 2021), arXiv:2111.06377.

Cut the image into p x p patches and hide a random 75 % of them. The ViT encoder sees only the visible 25 % (no mask
tokens, which is why MAE is cheap); a small decoder (8 blocks of width 512) gets the encoded visible tokens plus a
shared learned mask token at every hidden position, adds fixed 2D sin-cos position embeddings, and predicts the
pixels of every patch. The loss is the mean squared error on the hidden patches only, against the patch pixels
normalised per patch (mean 0, variance 1: `--norm-pix-loss`, used by the released models). After pre-training the
decoder is discarded and the encoder is fine-tuned or probed.

Run:     python mae.py                                   # offline demo on the built-in synthetic set
         python mae.py --data cifar10 --data-path ./data  # the small-data preset (ViT-T/2, 2000 epochs)
         python mae.py --data imagenet --data-path /data/imagenet --model vit_base
         torchrun --nproc_per_node 8 mae.py --data imagenet --data-path /data/imagenet --accum-iter 8
Deviations from the official code:
  - masks are drawn from a generator seeded by (seed, rank, step) instead of the global RNG, so that resume is exact
  - the encoder lives under `encoder.` (timm names inside it)
  - `patchify` handles non-square images
  - the demo/small presets are not the paper's recipe (see PRESETS)
Results: docs/RESULTS.md#mae
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
from common.vit import (Block, VisionTransformer, count_params, layer_norm, run_block, set_grad_checkpointing,
                        sincos_pos_embed_2d, vit_kwargs)


# ---------------------------------------------------------------------------------------------------------------- #
#                                                     masking                                                        #
# ---------------------------------------------------------------------------------------------------------------- #
def random_masking(x, mask_ratio, noise=None):
    """Per-sample random masking by sorting uniform noise (paper §3 "Masking"; official `random_masking`).

    x: [B, N, D] patch tokens (position embedding already added). The int(N * (1 - ratio)) patches with the
    smallest noise stay visible. Passing `noise` [B, N] reproduces a given masking exactly.
    Returns x_visible [B, N_vis, D] (in shuffled order), mask [B, N] (1 = masked), ids_restore [B, N].
    """
    B, N, D = x.shape
    n_keep = int(N * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, N, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # [B, N]: ascending noise, the first n_keep are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, N]: position of each patch in the shuffled order
    ids_keep = ids_shuffle[:, :n_keep]  # [B, N_vis]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # [B, N, D] -> [B, N_vis, D]
    mask = torch.ones(B, N, device=x.device)
    mask[:, :n_keep] = 0  # in shuffled order: kept first
    mask = torch.gather(mask, 1, ids_restore)  # [B, N] back in patch order, 1 = masked
    return x_visible, mask, ids_restore


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      model                                                         #
# ---------------------------------------------------------------------------------------------------------------- #
class MAE(nn.Module):
    def __init__(self, img_size=224, patch_size=16, model="vit_base", decoder_dim=512, decoder_depth=8,
                 decoder_heads=16, norm_pix_loss=True):
        super().__init__()
        # encoder: a standard ViT with a fixed sin-cos position table (timm names, exported as encoder.pth)
        self.encoder = VisionTransformer(img_size, pos_embed="sincos", **vit_kwargs(model, patch_size))
        dim, self.patch_size = self.encoder.embed_dim, patch_size
        self.grid_size = self.encoder.patch_embed.grid_size
        self.num_patches = self.encoder.patch_embed.num_patches
        # decoder: only used during pre-training
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        table = sincos_pos_embed_2d(decoder_dim, *self.grid_size, cls_token=True)
        self.decoder_pos_embed = nn.Parameter(table.unsqueeze(0), requires_grad=False)  # [1, 1+N, D_dec], fixed
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads) for _ in range(decoder_depth))
        self.decoder_norm = layer_norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size ** 2 * 3)  # pixels of one patch
        self.grad_checkpointing = False  # the decoder blocks under activation checkpointing (set_grad_checkpointing)
        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """Embed all patches (+ position), drop the masked ones, prepend cls, run the blocks on the visible tokens.
        Returns latent [B, 1+N_vis, D], mask [B, N], ids_restore [B, N]."""
        x = self.encoder.embed(imgs)  # [B, N, D], sin-cos position added before masking
        x_visible, mask, ids_restore = random_masking(x, mask_ratio, noise)  # [B, N_vis, D]
        x = self.encoder.prepend_cls(x_visible)  # [B, 1+N_vis, D]
        x = self.encoder.norm(self.encoder.run_blocks(x))
        return x, mask, ids_restore

    def forward_decoder(self, latent, ids_restore):
        """Put a mask token at every hidden position, unshuffle, add position, decode, predict patch pixels.
        latent [B, 1+N_vis, D] -> pred [B, N, p*p*3] (cls dropped)."""
        x = self.decoder_embed(latent)  # [B, 1+N_vis, D_dec]
        B, n_vis, D = x.shape[0], x.shape[1] - 1, x.shape[2]
        mask_tokens = self.mask_token.expand(B, ids_restore.shape[1] - n_vis, -1)  # [B, N - N_vis, D_dec]
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [B, N, D_dec] in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))  # [B, N, D_dec] in patch order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # [B, 1+N, D_dec]; cls joins the decoder
        for block in self.decoder_blocks:
            x = run_block(block, x, grad_checkpointing=self.grad_checkpointing)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # [B, N, p*p*3]

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error per patch, averaged over the masked patches only (paper §3 "Reconstruction
        target"). Target: the normalised image's patches, per-patch normalised with --norm-pix-loss (unbiased
        variance + 1e-6, as the official code)."""
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
        """[B, 3, H, W] -> [B, N, p*p*3]; patches row-major, values inside a patch in (row, column, channel)
        order with the channel fastest, as the official `patchify`."""
        B, C, H, W = imgs.shape
        p, (h, w) = self.patch_size, self.grid_size
        x = imgs.reshape(B, C, h, p, w, p)  # [B, 3, h, p, w, p]
        x = torch.einsum("bchpwq->bhwpqc", x)  # [B, h, w, p, p, 3]
        return x.reshape(B, h * w, p * p * C)  # [B, N, p*p*3]

    def unpatchify(self, x):
        """[B, N, p*p*3] -> [B, 3, H, W], the inverse of patchify."""
        B = x.shape[0]
        p, (h, w) = self.patch_size, self.grid_size
        x = x.reshape(B, h, w, p, p, 3)  # [B, h, w, p, p, 3]
        x = torch.einsum("bhwpqc->bchpwq", x)  # [B, 3, h, p, w, p]
        return x.reshape(B, 3, h * p, w * p)

    def initialize_weights(self):
        """Official `initialize_weights`: the patch conv as a Linear with xavier_uniform (its bias keeps PyTorch's
        default), cls and mask tokens N(0, 0.02), every Linear xavier_uniform with zero bias ("following official
        JAX ViT"), LayerNorm 1/0. The sin-cos tables were filled at construction."""
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # [D, 3, p, p] viewed as [D, 3p^2]
        nn.init.normal_(self.encoder.cls_token, std=0.02)
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
    model = MAE(cfg.img_size, cfg.patch_size, cfg.model, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads,
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
    """Defaults = the official ImageNet recipe (PRETRAIN.md: 800/1600 epochs, batch 4096, blr 1.5e-4, warm-up 40)."""
    host_memory_gib = (2.48, 0.043)  # GiB (fixed, per image) on a CPU in fp32 at these defaults: bench.py --memory
    mask_ratio: float = 0.75  # fraction of patches hidden from the encoder
    norm_pix_loss: bool = True  # target = each patch normalised by its own mean/std (the released models use it)
    decoder_dim: int = 512  # decoder width (paper: 512)
    decoder_depth: int = 8  # decoder blocks (paper: 8)
    decoder_heads: int = 16  # decoder attention heads (paper: 16)

    def check(self):
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
    run = Run(cfg, "mae", preset)  # devices, processes, --out; resolves cfg.out, cfg.compile, a preset's accum_iter
    data = None if cfg.eval_only else build_train_data(cfg, run.dist, crop_scale=(0.2, 1.0), interpolation="bicubic",
                                                       log=run.log)
    model = build_model(cfg).to(run.device)
    cfg.lr = scaled_lr(cfg, run.global_batch)  # lr = blr x global batch / 256 (the official linear scaling rule)
    # AdamW(0.9, 0.95), wd 0.05 except biases and norms (cls and mask token *are* decayed, as officially)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95),
                                  fused=True)  # one kernel per step, faster than foreach
    start_epoch, start_step = run.start(model, optimizer)
    run.log(f"MAE {cfg.model}/{cfg.patch_size} at {cfg.img_size}px: {count_params(model) / 1e6:.2f}M trainable "
            f"parameters ({count_params(model.encoder) / 1e6:.2f}M encoder)")
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
                save_reconstruction(model, fixed.to(run.device), cfg.mask_ratio, run.out / f"recon_e{epoch}.png",
                                    f"MAE {cfg.model} epoch {epoch}, mask ratio {cfg.mask_ratio}", run.autocast())
            if run.done:
                break
            if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
                run.write_log(kind="eval", epoch=epoch, **monitors(model.encoder, build_model, run))
        run.finish_training(time.perf_counter() - t0)

    report("mae", model.encoder, build_model, run)  # monitors, encoder.pth, results.json, fine-tune


# ---------------------------------------------------------------------------------------------------------------- #
#                                          presets and fine-tune recipes                                             #
# ---------------------------------------------------------------------------------------------------------------- #
# Presets by dataset scale; a flag given on the command line always wins.
PRESETS = {
    # `python mae.py`: the offline demo. A CPU-sized model and schedule for a run of minutes, evaluation included;
    # not a research recipe (the lr is raised for the short run).
    "demo": dict(img_size=32, patch_size=4, model="vit_micro", decoder_dim=128, decoder_depth=2, decoder_heads=4,
                 epochs=3, warmup_epochs=0.5, batch_size=128, blr=1.5e-3, workers=2),
    # CIFAR-10/100, (Fashion-)MNIST at their native 32/28 px: the recipe of IcarusWizard/MAE for CIFAR-10: ViT-T,
    # patch 2, a 4 x 192 decoder with 3 heads, global batch 4096 (here 512 x 8 accumulation steps on one GPU), blr
    # 1.5e-4, 2000 epochs, 200 warm-up, mask 0.75, and pixel targets without per-patch normalisation (patches of
    # 2 x 2 x 3 = 12 values).
    "small": dict(patch_size=2, model="vit_tiny", decoder_dim=192, decoder_depth=4, decoder_heads=3, batch_size=512,
                  accum_iter=8, blr=1.5e-4, epochs=2000, warmup_epochs=200, norm_pix_loss=False),
    # STL-10 (96 px): our own interpolation between the two (no published recipe): 12 x 12 patches of 8 px.
    "medium": dict(img_size=96, patch_size=8, model="vit_small", decoder_dim=256, decoder_depth=4, decoder_heads=8,
                   batch_size=256, accum_iter=4, epochs=800, warmup_epochs=40),
    "imagenet": {},
}

# Fine-tune recipes of finetune.py (and --finetune-epochs), one per data scale (finetune.finetune_scale); fields: its
# FinetuneRecipe's.
FINETUNE = {
    # FINETUNE.md, ViT-B: 100 epochs, 5 warm-up, blr 5e-4 (batch 1024), layer decay 0.65, drop path 0.1, wd 0.05,
    # RandAugment m9 (timm rand-m9-mstd0.5-inc1), random erasing 0.25, mixup 0.8, cutmix 1.0 (switch 0.5), label
    # smoothing 0.1, cosine to 1e-6 after the warm-up, no clipping.
    "imagenet": dict(epochs=100, warmup_epochs=5, blr=5e-4, min_lr=1e-6, layer_decay=0.65, drop_path=0.1,
                     crop_scale=(0.08, 1.0), rand_augment=9, erasing=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1),
    "vit_large": dict(epochs=50, warmup_epochs=5, blr=1e-3, layer_decay=0.75, drop_path=0.2),  # FINETUNE.md, ViT-L
    "vit_huge": dict(epochs=50, warmup_epochs=5, blr=1e-3, layer_decay=0.75, drop_path=0.3),  # FINETUNE.md, ViT-H
    # STL-10 and other 65-128 px images: our choice (no published recipe); ImageNet's, with a milder crop.
    "medium": dict(epochs=100, warmup_epochs=5, blr=5e-4, layer_decay=0.65, drop_path=0.1, crop_scale=(0.2, 1.0),
                   rand_augment=9, erasing=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1),
    # 28-64 px images: our choice for short runs on small images. A milder crop (8 % of a 32-px image is a few
    # pixels), no RandAugment, erasing, mixup or cutmix, and batch 64 for 4x the steps of an epoch, at lr 1e-3 (blr
    # 4e-3 x 64 / 256).
    "small": dict(epochs=50, warmup_epochs=5, batch_size=64, blr=4e-3, layer_decay=0.75, drop_path=0.1,
                  crop_scale=(0.5, 1.0), rand_augment=0, erasing=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1),
}


# ---------------------------------------------------------------------------------------------------------------- #
#                                                  visualisation                                                     #
# ---------------------------------------------------------------------------------------------------------------- #
@torch.no_grad()
def save_reconstruction(model, imgs, mask_ratio, path, title, amp):
    """Rows: original | masked input | reconstruction | reconstruction pasted into the visible patches.
    With --norm-pix-loss the model predicts normalised patches; they are shown un-normalised with the mean/std
    of the *true* patch (so colour and brightness come from the ground truth: the usual MAE visualisation)."""
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
