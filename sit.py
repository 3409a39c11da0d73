"""SiT: Self-supervised vIsion Transformer (Atito, Awais, Kittler, 2021; v3 2022), arXiv:2104.03602, with GMML, Group
Masked Model Learning (Atito, Awais, Kittler, 2022), arXiv:2205.14986.

GMML corrupts *groups* of connected pixels: each image gets one corruption type, either "drop" (rectangular blocks
filled with zeros, the dataset's mean colour, or N(0, 1) noise in normalised space, until 50 % of the pixels are
covered) or "replace" (blocks copied from the same coordinates of another image of the batch, until 30 %). Blocks
are up to 30 % of the image side and are not aligned to the patch grid, so a patch is often only partly hidden.
The ViT student sees the corrupted image and reconstructs the *whole* clean image from its patch tokens (three
Linear + GELU layers and a transposed convolution back to p x p pixels); the loss is the L1 distance on the corrupted
pixels only. A second loss learns global features: each image is augmented into two DINO-style views, a momentum
teacher (an EMA of the student, per-iteration cosine 0.996 -> 1) embeds the *clean* views, and the student's cls
embedding of one corrupted view must pick the teacher's embedding of the other view of the same image among the
teacher's embeddings of the other images (MoCo-v3-style InfoNCE, tau 0.2, x 2 tau, negatives gathered across GPUs).
Total = contrastive + lambda x reconstruction (lambda 1 on ImageNet, 5 on small datasets: the method was built to
pre-train transformers on small data). The encoder (cls token, learned position embedding) is then fine-tuned.
This is the official repository's HEAD (paper v3). SiT v1 (April 2021) was another method: no teacher, a 4-way
rotation task and a SimCLR NT-Xent loss (tau 0.5) on extra tokens, L1 over the whole image with grey, blurred, noise
and replacement patches, and the three losses weighted by learned uncertainties.

Run:     python sit.py                                   # offline demo on the built-in synthetic set
         python sit.py --data cifar10 --data-path ./data  # the small-data preset (ViT-T/2, lambda 5)
         python sit.py --data imagenet --data-path /data/imagenet --model vit_small
         torchrun --nproc_per_node 4 sit.py --data imagenet --data-path /data/imagenet --batch-size 64  # official run

Deviations from the official code:
  - the corruption is drawn batched on the device from a (seed, rank, step) generator (official: per image, OS-seeded)
  - the teacher holds no reconstruction head (official: it has one, updated by EMA and never called)
  - the synchronised BatchNorm is our own small module, same statistics (nn.SyncBatchNorm refuses CPU tensors)
  - the Gaussian-blur radius scales with the image side (official: pixels of the 224-px crop; the same at 224)
  - on the resident path the augmentation is batched float arithmetic (see BatchedViews)
  - the reconstruction head's transposed-convolution kernel is the model's patch size (official: always 16)
  - the lr warm-up reaches its peak one iteration later (MAE's per-iteration rule)
  - the fine-tune pools the mean patch token into one linear layer (official: cls + mean into a 2-layer MLP, DeiT's)
  - the ImageNet fine-tune sets the lr per iteration (DeiT: per epoch), without repeated augmentation or model EMA
  - the demo/small/medium presets are not the paper's recipe (see PRESETS)
Results: docs/RESULTS.md#sit
"""
import copy
import math
import time
import typing
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F
from PIL import ImageFilter
from torchvision import transforms as T

from common import UserError
from common.data import (IMAGENET_MEAN, IMAGENET_STD, build_train_data, color_jitter, crop_resize_flip, grayscale,
                         imagenet_stats, preview_images, sample_resized_crops)
from common.evaluation import denormalize, monitors, report, save_image_grid
from common.training import (Run, TrainConfig, cli, cosine_lr, param_groups, parse_config, scaled_lr, set_grad_sync,
                             set_lr)
from common.vit import VisionTransformer, count_params, set_grad_checkpointing, vit_kwargs


# ---------------------------------------------------------------------------------------------------------------- #
#                                           GMML corruption (group masking)                                          #
# ---------------------------------------------------------------------------------------------------------------- #
DROP_TYPES = ("zeros", "noise")
MAX_BLOCK = 0.3  # official max_block_sz: a block side is below int(0.3 x the image side)
MAX_ROUNDS = 126  # blocks drawn per image; the official loop needs ~40 (at most ~75) to reach a 50 % target
BLOCKS_PER_WORD = 63  # blocks per int64 bit set in sample_blocks (the sign bit unused)


def sample_blocks(targets, height, width, align, generator, device):
    """The block loop of the official `GMML_drop_rand_patches`, for n images at once and without a host sync.

    Each image adds random rectangles *while* its covered area (the union, so the last block overshoots) is below its
    target in pixels: top-left r = (randint(0, H - a) // a) * a, height h = round(min(randint(a, int(0.3 H)), H - r)
    / a) * a (numpy randint's upper bound is exclusive; rounded half to even, as Python's round), the same for the
    columns, a = `align` (1 = pixel blocks: sides 1 .. int(0.3 H) - 1). A block that the rounding pushes past the
    border is cut there, as the official slicing does. targets: [n] pixels. Returns the mask [n, H, W], True =
    corrupted.
    official: a `while` loop per image; we: MAX_ROUNDS blocks per image drawn at once, each pixel's first covering
    block found, and each image keeps its blocks up to the first whose union reaches the target: the same law, with
    no loop whose length the host must read. An image still short of its target after MAX_ROUNDS blocks keeps them all
    (docs/FIDELITY.md: never seen).
    """
    n, a, R = targets.shape[0], max(1, align), MAX_ROUNDS
    max_h, max_w = int(height * MAX_BLOCK), int(width * MAX_BLOCK)  # official int(H * max_block_sz): 67 at 224 px

    def randint(low, high):
        return torch.randint(low, high, (n, R, 1), device=device, generator=generator)

    top = randint(0, height - a) // a * a  # [n, R, 1]
    left = randint(0, width - a) // a * a
    h = (torch.minimum(randint(a, max_h), height - top) / a).round().long() * a  # [n, R, 1]
    w = (torch.minimum(randint(a, max_w), width - left) / a).round().long() * a
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = (rows >= top) & (rows < top + h)  # [n, R, H]: the rows block r spans
    in_cols = (cols >= left) & (cols < left + w)  # [n, R, W]
    # first[i, y, x] = the first block covering pixel (y, x) of image i (R: none). Blocks go in words of 63 as bit
    # sets, bit r = block r: a row's word ANDed with a column's holds the blocks covering that pixel, and its lowest
    # set bit is the first of them (one AND per pixel per 63 blocks instead of one test per block)
    bits = 2 ** torch.arange(BLOCKS_PER_WORD, device=device)  # [63] int64
    first = torch.full((n, height, width), R, dtype=torch.long, device=device)
    for r0 in range(0, R, BLOCKS_PER_WORD):
        row_word = (in_rows[:, r0:r0 + BLOCKS_PER_WORD].long() * bits.view(1, -1, 1)).sum(dim=1)  # [n, H]
        col_word = (in_cols[:, r0:r0 + BLOCKS_PER_WORD].long() * bits.view(1, -1, 1)).sum(dim=1)  # [n, W]
        word = row_word.unsqueeze(2) & col_word.unsqueeze(1)  # [n, H, W]
        lowest = (word & -word).double().log2().round().long()  # index of the lowest set bit (word > 0)
        first = torch.where((word != 0) & (first == R), r0 + lowest, first)
    # covered[i, r] = pixels covered by blocks 0..r; the loop adds block r + 1 while covered[i, r] < target
    per_round = torch.zeros(n, R + 1, device=device).scatter_add_(
        1, first.flatten(1), torch.ones(n, height * width, device=device))  # [n, R + 1]: pixels first covered at r
    covered = per_round[:, :R].cumsum(dim=1)  # [n, R]
    blocks = 1 + (covered < targets.view(n, 1)).sum(dim=1)  # [n]: blocks the official loop adds
    return first < blocks.view(n, 1, 1)


def gmml_corrupt(x, cfg, generator):
    """GMML corruption of one view of a batch (official `GMML_drop_rand_patches` in the dataset transform, then
    `GMML_replace_list` in the collate function), batched. x: clean, normalised [B, 3, H, W].

    Per image, one type. With probability --replace-prob (official: 0.5 whatever --drop-type, as its collate function
    does not pass the drop type on): "replace", blocks covering U(min(0.5, r), r) of the pixels (r = --drop-replace,
    0.3: exactly 30 %) copied from the same coordinates of the clean image `partner` of the same view, a uniform draw
    from the batch that may be the image itself (official randint(0, B)). Otherwise "drop", blocks covering
    U(min(0.5, d), d) (d = --drop-perc, 0.5: exactly 50 %) filled with zeros (= the mean colour after normalisation)
    or i.i.d. N(0, 1), one fill type per image among --drop-type. The fill depends only on the pixel, not on which
    block covered it, so it is applied once to the final mask. official: a Python loop over images in the data workers
    with np.random reseeded from the OS; we: all images at once on the training device from `generator`, so a step's
    corruption follows from (seed, rank, step). Returns (corrupted [B, 3, H, W], mask [B, 1, H, W], 1 = corrupted).
    """
    B, _, H, W = x.shape
    dev = x.device
    types = cfg.drop_type.split("-")
    replace = torch.rand(B, device=dev, generator=generator) < (cfg.replace_prob if cfg.drop_replace > 0 else 0.0)
    top = torch.where(replace, cfg.drop_replace, cfg.drop_perc)  # [B] the type's upper bound
    low = torch.clamp(top, max=0.5)  # official np.random.uniform(min(0.5, max_replace), max_replace)
    targets = (low + (top - low) * torch.rand(B, device=dev, generator=generator)) * H * W  # [B] pixels
    mask = sample_blocks(targets, H, W, cfg.patch_size if cfg.align else 1, generator, dev).unsqueeze(1)  # [B, 1, H, W]
    partner = torch.randint(0, B, (B,), device=dev, generator=generator)  # [B]
    kind = torch.randint(0, len(types), (B,), device=dev, generator=generator).view(B, 1, 1, 1)  # drop fill per image
    fill = torch.zeros_like(x)
    if "noise" in types:
        noise = torch.randn(x.shape, device=dev, generator=generator, dtype=x.dtype)
        fill = torch.where(kind == types.index("noise"), noise, fill)
    fill = torch.where(replace.view(B, 1, 1, 1), x[partner], fill)  # [B, 3, H, W]
    return torch.where(mask, fill, x), mask.float()


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      model                                                         #
# ---------------------------------------------------------------------------------------------------------------- #
class AllReduceSum(torch.autograd.Function):
    """Sum over the processes, differentiable: the gradient of a sum is the sum of the gradients (what
    nn.SyncBatchNorm's backward does for its statistics)."""

    @staticmethod
    def forward(ctx, x):
        return funcol.wait_tensor(funcol.all_reduce(x, "sum", dist.group.WORLD))  # (functional: traceable, one graph)

    @staticmethod
    def backward(ctx, grad):
        return funcol.wait_tensor(funcol.all_reduce(grad, "sum", dist.group.WORLD))


def distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch (every process's batch together), as
    nn.SyncBatchNorm, which the official code converts every BatchNorm to. nn.SyncBatchNorm runs on CUDA only; this one
    all-reduces the batch sums through the process group (NCCL or gloo), so the same module runs on every device and
    is tested on CPU: 2 processes x B give the outputs and gradients of 1 process x 2B. In one process, in eval mode,
    or outside torchrun it is exactly nn.BatchNorm1d (same state dict). The statistics are computed in fp32."""

    def forward(self, x):
        if not (self.training and distributed()):
            return super().forward(x)
        x = x.float()
        mean, var, n = self.global_stats(x)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / max(n - 1, 1), self.momentum)  # unbiased, as PyTorch's
                self.num_batches_tracked += 1
        y = (x - mean) * torch.rsqrt(var + self.eps)  # [N, C]
        return y * self.weight + self.bias if self.affine else y

    def global_stats(self, x):
        """Mean and biased variance [C] over the global batch, in two passes (the sum, then the sum of squared
        deviations), and the global batch size."""
        n = x.shape[0] * dist.get_world_size()  # official nn.SyncBatchNorm all-reduces the counts (a host sync);
        # every rank's batch has the same size here (drop_last), so the count is known without asking
        mean = AllReduceSum.apply(x.sum(dim=0)) / n  # [C]
        var = AllReduceSum.apply((x - mean).square().sum(dim=0)) / n  # [C]
        return mean, var, n


class CLSHead(nn.Module):
    """official CLSHead (nlayers 3): Linear(D, 4096), BN, ReLU, Linear(4096, 4096), BN, GELU, Linear(4096, 256),
    BN without affine. (The mixed ReLU / GELU is the official one.) Names as the official, so its weights load."""

    def __init__(self, in_dim, out_dim=256, hidden_dim=4096):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), SyncBatchNorm1d(hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim), SyncBatchNorm1d(hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, out_dim), SyncBatchNorm1d(out_dim, affine=False))

    def forward(self, x):
        return self.mlp(x)  # [B, D] -> [B, out_dim]


class RECHead(nn.Module):
    """official RECHead: three Linear(D, D) + GELU on every patch token, then a transposed convolution that turns each
    token into its own p x p x 3 pixels. No output activation: the target is the normalised image. official: the
    kernel is always 16 (`RECHead(embed_dim)`, its default patch_size); we: the model's patch size."""

    def __init__(self, in_dim, patch_size, in_chans=3):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, in_dim), nn.GELU(),
                                 nn.Linear(in_dim, in_dim), nn.GELU())
        self.convTrans = nn.ConvTranspose2d(in_dim, in_chans, kernel_size=patch_size, stride=patch_size)

    def forward(self, x, grid_size):
        x = self.mlp(x).transpose(1, 2)  # [B, N, D] -> [B, D, N]
        return self.convTrans(x.unflatten(2, grid_size))  # [B, D, h, w] -> [B, 3, H, W]


class SiT(nn.Module):
    """The student (encoder + contrastive head + reconstruction head) and its momentum teacher (encoder + contrastive
    head, no gradients). The teacher is part of the module, so checkpoints hold it and resume is exact."""

    def __init__(self, img_size=224, patch_size=16, model="vit_small", drop_path=0.1, out_dim=256,
                 head_hidden_dim=4096, lmbda=1.0, temperature=0.2):
        super().__init__()
        # the official DINO-style ViT: qkv bias, LayerNorm eps 1e-6, one cls token, a learned position embedding
        self.encoder = VisionTransformer(img_size, pos_embed="learned", drop_path_rate=drop_path,
                                         **vit_kwargs(model, patch_size))
        dim = self.encoder.embed_dim
        self.grid_size = self.encoder.patch_embed.grid_size
        self.cls_head = CLSHead(dim, out_dim, head_hidden_dim)
        self.rec_head = RECHead(dim, patch_size)
        self.lmbda, self.temperature = lmbda, temperature
        self.initialize_weights()
        # official: a second network built alike, then loaded with the student's state dict; never in eval mode, so
        # its BatchNorms use batch statistics. official: it also holds a RECHead (EMA-updated, never called); we: not.
        self.teacher = nn.ModuleDict({"encoder": copy.deepcopy(self.encoder), "cls_head": copy.deepcopy(self.cls_head)})
        self.teacher["encoder"].set_drop_path(0.0)
        self.teacher.requires_grad_(False)

    def initialize_weights(self):
        """official: trunc_normal(0.02) for pos_embed, the cls token and every Linear (biases 0; truncated at +-2,
        i.e. not truncated), LayerNorm 1/0; the patch conv, the BatchNorms and the transposed conv keep PyTorch's
        default init (the official `_init_weights` only visits Linear and LayerNorm, and RECHead creates its
        ConvTranspose2d after calling it)."""
        nn.init.trunc_normal_(self.encoder.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.encoder.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def student_parameters(self):
        """The student's parameters in the order of self.teacher.parameters() (encoder, contrastive head), then the
        reconstruction head's, which the teacher does not have."""
        for part in (self.encoder, self.cls_head, self.rec_head):
            yield from part.parameters()

    def reconstruct(self, corrupted):
        """Student: corrupted images [B, 3, H, W] -> (cls token [B, D], reconstruction [B, 3, H, W])."""
        x = self.encoder.forward_features(corrupted)  # [B, 1+N, D], final norm on every token
        return x[:, 0], self.rec_head(x[:, 1:], self.grid_size)

    def forward(self, clean, corrupted, mask):
        """clean, corrupted: [2B, 3, H, W] (view 1 of every image, then view 2), mask [2B, 1, H, W] (1 = corrupted).
        Returns (loss, contrastive loss, reconstruction loss, reconstruction [2B, 3, H, W])."""
        with torch.no_grad():  # official: the teacher's parameters have requires_grad False; no graph is kept here
            teacher = self.teacher["cls_head"](self.teacher["encoder"].forward_features(clean)[:, 0])  # [2B, out]
        cls, recon = self.reconstruct(corrupted)
        student = self.cls_head(cls)  # [2B, out]
        c_loss = contrastive_loss(student, teacher, self.temperature)
        r_loss = reconstruction_loss(recon, clean, mask)
        return c_loss + self.lmbda * r_loss, c_loss, r_loss, recon


def build_model(cfg):
    model = SiT(cfg.img_size, cfg.patch_size, cfg.model, cfg.drop_path, cfg.out_dim, cfg.head_hidden_dim, cfg.lmbda,
                cfg.temperature)
    return set_grad_checkpointing(model, cfg.grad_checkpointing)  # a no-op for the teacher: it runs without gradients


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      losses                                                        #
# ---------------------------------------------------------------------------------------------------------------- #
def reconstruction_loss(recon, target, mask):
    """L1 on the corrupted pixels only (official: `F.l1_loss(..., reduction='none')[mask == 1].mean()`, the mask the
    same on all 3 channels): the mean absolute error over the corrupted (pixel, channel) elements of the batch."""
    l1 = (recon.float() - target).abs()  # [B, 3, H, W], fp32
    return (l1 * mask).sum() / (mask.sum() * target.shape[1]).clamp(min=1)


@torch.no_grad()
def gather_across_ranks(x):
    """The teacher embeddings of every process, in rank order (official `concat_all_gather`): [N, C] -> [N world, C].
    A functional collective: torch.compile traces it into the step's graph."""
    if not distributed():
        return x
    return funcol.wait_tensor(funcol.all_gather_tensor(x.contiguous(), gather_dim=0, group=dist.group.WORLD))


def info_nce(q, k, temperature):
    """official `SimCLR.contrastive_loss` (MoCo v3's): cosine logits of the student queries q [N, C] against the
    teacher keys k [N, C] of every process; the positive of query i is key i of this process, all other keys are
    negatives. Cross-entropy x 2 tau."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    k = gather_across_ranks(k)  # [N world, C]
    logits = q @ k.T / temperature  # [N, N world]
    rank = dist.get_rank() if distributed() else 0
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
    return F.cross_entropy(logits, labels) * (2 * temperature)


def contrastive_loss(student, teacher, temperature):
    """Each corrupted view's student embedding against the teacher's embedding of the *other* clean view, summed over
    the two directions (official `SimCLR.forward`). student, teacher: [2B, C], view 1 then view 2."""
    s1, s2 = student.chunk(2)
    t1, t2 = teacher.detach().chunk(2)
    return info_nce(s1, t2, temperature) + info_nce(s2, t1, temperature)


def training_losses(model, views, cfg, generator):
    """One pre-training forward as main() runs it: both views of the batch corrupted from `generator` (each view on
    its own, replacement partners from the same view, as the official collate function), the teacher on the clean
    views, the student on the corrupted ones. `model` may be wrapped (DDP / torch.compile).
    Returns (loss, contrastive, reconstruction)."""
    corrupted, masks = zip(*(gmml_corrupt(v, cfg, generator) for v in views))
    loss, c_loss, r_loss, _ = model(torch.cat(views), torch.cat(corrupted), torch.cat(masks))  # [2B, ...] each
    return loss, c_loss, r_loss


def training_loss(model, views, cfg, generator):
    """The total loss of training_losses (bench.py's hook)."""
    return training_losses(model, views, cfg, generator)[0]


# ---------------------------------------------------------------------------------------------------------------- #
#                                 teacher (EMA) update and per-parameter clipping                                    #
# ---------------------------------------------------------------------------------------------------------------- #
@torch.no_grad()
def update_teacher(model, momentum):
    """EMA after each optimizer step (official): teacher <- m teacher + (1 - m) student, over parameters only (the
    BatchNorm running statistics are not averaged)."""
    for p_student, p_teacher in zip(model.student_parameters(), model.teacher.parameters()):
        p_teacher.mul_(momentum).add_(p_student.detach(), alpha=1 - momentum)


def clip_gradients(parameters, clip):
    """official `utils.clip_gradients`: each parameter's gradient is clipped to norm `clip` on its own (not one global
    norm): g *= min(1, clip / (||g|| + 1e-6)). Returns the global norm before clipping (for the non-finite guard)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])  # [num tensors]
    for g, coef in zip(grads, (clip / (norms + 1e-6)).clamp(max=1.0)):
        g.mul_(coef)
    return torch.linalg.vector_norm(norms)


# ---------------------------------------------------------------------------------------------------------------- #
#                                        two DINO-style views of each image                                          #
# ---------------------------------------------------------------------------------------------------------------- #
CROP_SCALE = (0.2, 1.0)  # official: DINO's global crops with scale (0.2, 1) instead of (0.4, 1); no local crops
BLUR_RADIUS = (0.1, 2.0)  # official: PIL blur radius U(0.1, 2) px at 224 px; we scale it with the side (see below)
BLUR_REFERENCE_SIDE = 224


def blur_radius_range(img_size):
    """official: radius in pixels of the 224-px crop (CIFAR and the other small sets are upsampled to 224 first);
    we: the same fraction of the side at any --img-size, so a 32-px view is blurred as its 224-px upsampling was."""
    return tuple(r * img_size / BLUR_REFERENCE_SIDE for r in BLUR_RADIUS)


class PILGaussianBlur:
    """official `GaussianBlur`: PIL's ImageFilter.GaussianBlur(radius ~ U(lo, hi)) with probability p. The draws come
    from torch's generator (official: Python's `random`), which the DataLoader path seeds per image."""

    def __init__(self, p, radius):
        self.p, self.radius = p, radius

    def __call__(self, img):
        u = torch.rand(2)
        if u[0] >= self.p:
            return img
        lo, hi = self.radius
        return img.filter(ImageFilter.GaussianBlur(radius=lo + (hi - lo) * u[1].item()))


class DataAugmentationSiT:
    """The official `DataAugmentationSiT` (PIL, one image at a time, for the DataLoader path): two views of an image.
    Both: RandomResizedCrop(scale 0.2-1, bicubic), flip, ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2,
    Gaussian blur; view 1 is always blurred, view 2 with p 0.1 and solarized with p 0.2; then normalised."""

    def __init__(self, img_size):
        def view(blur_p, solarize_p):
            return T.Compose([
                T.RandomResizedCrop(img_size, scale=CROP_SCALE, interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(p=0.5),
                T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                PILGaussianBlur(blur_p, blur_radius_range(img_size)),
            ] + ([T.RandomSolarize(threshold=128, p=solarize_p)] if solarize_p else []) + [  # = ImageOps.solarize
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ])
        self.view1, self.view2 = view(1.0, 0.0), view(0.1, 0.2)

    def __call__(self, img):
        return self.view1(img), self.view2(img)


def gaussian_blur(x, sigma, kernel_size):
    """Per-image Gaussian blur as torchvision's tensor gaussian_blur (separable kernel of `kernel_size` taps, reflect
    padding), with sigma [B] per image. [B, C, H, W] -> [B, C, H, W]."""
    B, C, H, W = x.shape
    t = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - (kernel_size - 1) / 2  # [k] tap offsets
    kernel = torch.exp(-0.5 * (t / sigma.view(B, 1)) ** 2)  # [B, k]
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # [B*C, k], one per channel
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, B * C, H, W), (pad, pad, pad, pad), mode="reflect")  # [1, B*C, H+2p, W+2p]
    y = F.conv2d(y, kernel.view(B * C, 1, 1, kernel_size), groups=B * C)  # rows: [1, B*C, H+2p, W]
    y = F.conv2d(y, kernel.view(B * C, 1, kernel_size, 1), groups=B * C)  # columns: [1, B*C, H, W]
    return y.view(B, C, H, W)


class BatchedViews:
    """DataAugmentationSiT for a whole batch on the device (the resident path), every random parameter drawn per image
    from the step's generator. Same steps and distributions as the PIL pipeline, computed in float instead of PIL's
    uint8; the differences: the crop is resized by grid_sample (bicubic a = -0.75; PIL: -0.5), colour jitter follows
    torchvision's *tensor* ops (HSV hue in float, PIL quantises hue to 8 bits), grayscale weights 0.2989/0.587/0.114
    (PIL: 0.299/0.587/0.114), and the blur is an exact Gaussian (PIL's GaussianBlur is three box blurs)."""

    def __init__(self, img_size):
        self.img_size = img_size
        self.radius = blur_radius_range(img_size)
        self.kernel_size = 2 * math.ceil(3 * self.radius[1]) + 1  # +-3 sigma of the widest blur
        self.mean, self.std = imagenet_stats()

    def __call__(self, images, generator):
        """uint8 [B, 3, H, W] on the device -> (view 1, view 2), each normalised [B, 3, img, img]."""
        self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)  # copied once, then found there
        x = images.float() / 255
        return self.view(x, generator, blur_p=1.0, solarize_p=0.0), self.view(x, generator, blur_p=0.1, solarize_p=0.2)

    def view(self, x, generator, blur_p, solarize_p):
        B, _, H, W = x.shape
        dev = x.device

        def uniform(lo, hi):
            return lo + (hi - lo) * torch.rand(B, device=dev, generator=generator)  # [B]

        top, left, h, w = sample_resized_crops(B, H, W, CROP_SCALE, (3 / 4, 4 / 3), generator, dev)
        flip = uniform(0, 1) < 0.5
        x = crop_resize_flip(x, top, left, h, w, flip, self.img_size, "bicubic").clamp(0, 1)  # PIL clips too
        x = color_jitter(x, generator, p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
        gray = (uniform(0, 1) < 0.2).view(B, 1, 1, 1)
        x = torch.where(gray, grayscale(x).expand_as(x), x)
        blur = (uniform(0, 1) < blur_p).view(B, 1, 1, 1)
        x = torch.where(blur, gaussian_blur(x, uniform(*self.radius), self.kernel_size), x)
        solarize = (uniform(0, 1) < solarize_p).view(B, 1, 1, 1)
        x = torch.where(solarize & (x >= 128 / 255), 1 - x, x)  # PIL: pixels >= 128 become 255 - pixel
        return (x - self.mean) / self.std


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      config                                                        #
# ---------------------------------------------------------------------------------------------------------------- #
@dataclass
class Config(TrainConfig):
    """Defaults = the official recipe (main.py at HEAD 7f22e9c; its README's ImageNet run: 4 GPUs x 64 images)."""
    host_memory_gib = (2.55, 0.309)  # GiB (fixed, per image) on a CPU in fp32 at these defaults: bench.py --memory
    batch_size: int = 64  # images per process per step, two views each (official README: 64 per GPU on 4 GPUs)
    blr: float = 5e-4  # base learning rate, scaled by global batch / 256 (official --lr 5e-4)
    min_lr: float = 1e-6  # floor of the cosine schedule (official --min_lr)
    warmup_epochs: float = 10  # linear warm-up from 0, in (fractional) epochs (official --warmup_epochs)
    weight_decay: float = 0.04  # AdamW weight decay at the start, cosine per iteration to --weight-decay-end
    weight_decay_end: float = 0.1  # weight decay at the end (official --weight_decay_end; the GMML repo: 0.4)
    clip_grad: typing.Optional[float] = 3.0  # clip EACH parameter's gradient norm to this (official clip_gradients)
    drop_path: float = 0.1  # stochastic depth of the student's last block, linear from 0 (the teacher has none)
    drop_perc: float = 0.5  # pixels covered by "drop" blocks: U(min(0.5, x), x) of the image (official --drop_perc)
    drop_type: str = "zeros"  # fill of drop blocks: zeros (the mean colour), noise (N(0, 1)), or zeros-noise (per image)
    drop_replace: float = 0.3  # pixels covered by "replace" blocks (official --drop_replace; 0 = no replacement)
    replace_prob: float = 0.5  # share of images corrupted by replacement instead of drop blocks (official: 0.5)
    align: bool = False  # snap the blocks to the patch grid (official --drop_align <patch size>; default: pixels)
    lmbda: float = 1.0  # weight of the reconstruction loss: contrastive + lmbda x reconstruction (README: 5 on small data)
    temperature: float = 0.2  # InfoNCE temperature (official --simclr_temp); the loss is scaled by 2 x this
    out_dim: int = 256  # contrastive embedding size (official --out_dim)
    head_hidden_dim: int = 4096  # width of the two hidden layers of the contrastive head (official: 4096)
    momentum_teacher: float = 0.996  # EMA momentum of the teacher at the start, cosine per iteration to 1

    def check(self):
        super().check()
        if not 0 < self.drop_perc < 1:
            raise UserError(f"--drop-perc must be in (0, 1), got {self.drop_perc}")
        if not 0 <= self.drop_replace < 1:
            raise UserError(f"--drop-replace must be in [0, 1), got {self.drop_replace}")
        if not 0 <= self.replace_prob <= 1:
            raise UserError(f"--replace-prob must be in [0, 1], got {self.replace_prob}")
        unknown = set(self.drop_type.split("-")) - set(DROP_TYPES)
        if unknown:
            raise UserError(f"unknown --drop-type {'-'.join(sorted(unknown))!r}; use {', '.join(DROP_TYPES)} or "
                            f"several joined by '-'")
        side = int(self.img_size * MAX_BLOCK)
        if side <= (self.patch_size if self.align else 1):
            raise UserError(f"--img-size {self.img_size}: blocks of up to {MAX_BLOCK:.0%} of the side ({side} px) "
                            + (f"cannot hold a {self.patch_size}-px grid cell; drop --align" if self.align
                               else "are too small; use a larger --img-size"))
        if self.temperature <= 0:
            raise UserError(f"--temperature must be positive, got {self.temperature}")
        if not 0 <= self.momentum_teacher <= 1:
            raise UserError(f"--momentum-teacher must be in [0, 1], got {self.momentum_teacher}")
        if self.lmbda < 0 or self.weight_decay_end < 0:
            raise UserError("--lmbda and --weight-decay-end must not be negative")
        if not 0 <= self.drop_path < 1:
            raise UserError(f"--drop-path must be in [0, 1), got {self.drop_path}")
        if self.out_dim <= 0 or self.head_hidden_dim <= 0:
            raise UserError("--out-dim and --head-hidden-dim must be positive")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise UserError(f"--clip-grad must be positive, got {self.clip_grad}")


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      train                                                         #
# ---------------------------------------------------------------------------------------------------------------- #
def main():
    cfg, preset = parse_config(Config, PRESETS, description=__doc__.split("\n\n")[0])
    run = Run(cfg, "sit", preset)  # devices, processes, --out; resolves cfg.out, cfg.compile, a preset's accum_iter
    data = None if cfg.eval_only else build_train_data(
        cfg, run.dist, crop_scale=CROP_SCALE, interpolation="bicubic", log=run.log,
        transform=DataAugmentationSiT(cfg.img_size), augment=BatchedViews(cfg.img_size))  # batches: (view 1, view 2)
    model = build_model(cfg).to(run.device)
    cfg.lr = scaled_lr(cfg, run.global_batch)  # lr = blr x global batch / 256 (official: --lr x batch / 256, as DINO)
    # official: AdamW with PyTorch's defaults (0.9, 0.999); no decay on biases and 1-D parameters (norms); the cls
    # token and pos_embed *are* decayed (DINO's get_params_groups). The teacher has no trainable parameters.
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=True)
    start_epoch, start_step = run.start(model, optimizer)
    run.log(f"SiT {cfg.model}/{cfg.patch_size} at {cfg.img_size}px: {count_params(model) / 1e6:.2f}M trainable "
            f"parameters ({count_params(model.encoder) / 1e6:.2f}M encoder, {count_params(model.cls_head) / 1e6:.2f}M "
            f"contrastive head, {count_params(model.rec_head) / 1e6:.2f}M reconstruction head) + the teacher; "
            f"corruption: {cfg.replace_prob if cfg.drop_replace else 0:.0%} replace ({cfg.drop_replace:.0%}), "
            f"the rest {cfg.drop_type} ({cfg.drop_perc:.0%}), {'aligned to the patches' if cfg.align else 'pixel'} "
            f"blocks")
    fixed = preview_images(cfg, run.dist)  # the same 8 images in every reconstruction grid
    t0 = time.perf_counter()

    if not cfg.eval_only:
        train_model = run.wrap(model)  # torch.compile and/or DDP
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            run.start_epoch(epoch, start_step, data.steps_per_epoch)
            parts = torch.zeros(2, device=run.device)  # this epoch's contrastive and reconstruction losses
            for step, (views, _) in enumerate(data.epoch(epoch, start_step), start_step):
                it = epoch * data.steps_per_epoch + step
                first = it - step % cfg.accum_iter  # the update's first micro-step: its schedules are read there
                progress = first / data.steps_per_epoch  # in epochs: lr, weight decay and momentum follow it
                lr = set_lr(optimizer, cosine_lr(progress, cfg.lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs))
                # official: the weight decay of the decayed group (param_groups' first) follows a cosine from
                # --weight-decay to --weight-decay-end over all iterations, without warm-up
                optimizer.param_groups[0]["weight_decay"] = cosine_lr(progress, cfg.weight_decay, cfg.weight_decay_end,
                                                                      0, cfg.epochs)
                update = (step + 1) % cfg.accum_iter == 0  # the last micro-step of an accumulation updates
                set_grad_sync(train_model, update)
                with run.autocast():
                    loss, c_loss, r_loss = training_losses(train_model, views, cfg, run.step_generator(it))
                run.scaler.scale(loss / cfg.accum_iter).backward()
                grad_norm = None
                if update:
                    run.scaler.unscale_(optimizer)
                    if cfg.clip_grad:
                        grad_norm = clip_gradients(model.student_parameters(), cfg.clip_grad)
                    run.scaler.step(optimizer)
                    run.scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    # teacher momentum: cosine from --momentum-teacher to 1 over all iterations (official schedule)
                    update_teacher(model, cosine_lr(progress, cfg.momentum_teacher, 1.0, 0, cfg.epochs))
                parts += torch.stack([c_loss, r_loss]).detach().float()
                run.log_step(epoch, step, loss, lr, grad_norm)  # progress bar, non-finite guard, --log-every line
                if run.should_stop(step):  # at an update: --max-steps reached, or a stop signal
                    run.save_checkpoint(epoch, step + 1)
                    run.exit_if_preempted()  # a stop signal ends the process here; --resume auto continues
                    break
                if run.should_checkpoint(step):  # every --ckpt-every-steps
                    run.save_checkpoint(epoch, step + 1)
            start_step = 0
            if not run.done:  # (--max-steps ends mid-epoch: no epoch summary, but the grid of where it stopped)
                c_mean, r_mean = run.mean_over_ranks(parts / max(run.epoch_steps, 1)).tolist()
                run.log(f"epoch {epoch}: contrastive {c_mean:.4f}, reconstruction {r_mean:.4f}")
                run.log_epoch(epoch, contrastive=c_mean, reconstruction=r_mean)
                run.save_checkpoint(epoch + 1, 0)
            if run.is_main:
                save_reconstruction(model, fixed.to(run.device), cfg, run.out / f"recon_e{epoch}.png",
                                    f"SiT {cfg.model} epoch {epoch}", run.autocast())
            if run.done:
                break
            if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
                run.write_log(kind="eval", epoch=epoch, **monitors(model.encoder, build_model, run))
        run.finish_training(time.perf_counter() - t0)

    report("sit", model.encoder, build_model, run)  # monitors, encoder.pth, results.json, fine-tune


# ---------------------------------------------------------------------------------------------------------------- #
#                                          presets and fine-tune recipes                                             #
# ---------------------------------------------------------------------------------------------------------------- #
# Presets by dataset scale; a flag given on the command line always wins.
PRESETS = {
    # `python sit.py`: the offline demo. A CPU-sized model and schedule; not a research recipe. A SiT step costs
    # about 8 encoder passes per image (student forward + backward and teacher forward, on two views of every token),
    # so the demo pre-trains on a subset; the lr is raised for the short run, the head is narrower, and lmbda is the
    # small-data 5.
    "demo": dict(img_size=32, patch_size=4, model="vit_micro", head_hidden_dim=1024, lmbda=5.0, subset=2000,
                 epochs=3, warmup_epochs=0.5, batch_size=64, blr=2e-3, workers=2),
    # CIFAR-10/100, (Fashion-)MNIST at their native 32/28 px: our choice (the paper upsamples small datasets to 224
    # px and trains ViT-S/16). ViT-T with patch 2 gives a 16 x 16 grid like ImageNet's 14 x 14; lmbda 5 as the README
    # advises for small data; the official schedule and global batch 256 (lr 5e-4).
    "small": dict(patch_size=2, model="vit_tiny", lmbda=5.0, batch_size=256),
    # STL-10 (96 px): our choice as well: ViT-S/8 (12 x 12 tokens), lmbda 5, global batch 256.
    "medium": dict(img_size=96, patch_size=8, model="vit_small", lmbda=5.0, batch_size=256),
    "imagenet": {},
}


# Fine-tune recipes of finetune.py (and --finetune-epochs), one per data scale (finetune.finetune_scale); fields: its
# FinetuneRecipe's.
FINETUNE = {
    # official: "we used Deit code without any parameter optimisation" (github.com/Sara-Ahmed/SiT/issues/34), i.e.
    # DeiT's defaults: 300 epochs, 5 warm-up from 1e-6, lr 5e-4 x batch / 512, timm's cosine over all epochs to 1e-5,
    # wd 0.05, drop path 0.1, RandAugment m9, erasing 0.25, mixup 0.8, cutmix 1.0, smoothing 0.1, no layer decay.
    # we: the lr set per iteration (DeiT: per epoch); no repeated augmentation and no model EMA (DeiT has both).
    "imagenet": dict(epochs=300, warmup_epochs=5, blr=5e-4, lr_batch_div=512, warmup_lr=1e-6, min_lr=1e-5,
                     schedule="timm", layer_decay=1.0, drop_path=0.1, crop_scale=(0.08, 1.0), rand_augment=9,
                     erasing=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1),
    # STL-10 and other 65-128 px images: our choice, the same with a milder crop.
    "medium": dict(epochs=300, warmup_epochs=5, blr=5e-4, lr_batch_div=512, warmup_lr=1e-6, min_lr=1e-5,
                   schedule="timm", layer_decay=1.0, drop_path=0.1, crop_scale=(0.2, 1.0), rand_augment=9,
                   erasing=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1),
    # 28-64 px images and short budgets: the small-image recipe of the other methods: 10 % warm-up, blr 1e-3,
    # layer decay 0.75, crop 0.5-1, no RandAugment / erasing / mixup / cutmix.
    "small": dict(epochs=50, warmup_epochs=5, blr=1e-3, layer_decay=0.75, drop_path=0.1, crop_scale=(0.5, 1.0),
                  rand_augment=0, erasing=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1),
}


# ---------------------------------------------------------------------------------------------------------------- #
#                                                  visualisation                                                     #
# ---------------------------------------------------------------------------------------------------------------- #
@torch.no_grad()
def save_reconstruction(model, imgs, cfg, path, title, amp):
    """Rows: clean | corrupted (the student's input) | reconstruction of the whole image. The images are the
    normalised inputs and the prediction targets them directly, so un-normalising with the dataset mean/std is exact.
    The same corruption every epoch (seed 0)."""
    was_training = model.training
    model.eval()
    corrupted, _ = gmml_corrupt(imgs, cfg, torch.Generator(device=imgs.device).manual_seed(0))
    with amp:
        _, recon = model.reconstruct(corrupted)  # [B, 3, H, W]
    model.train(was_training)
    note = "loss on the corrupted pixels only (zeros = the mean colour); target = the normalised clean image"
    save_image_grid([denormalize(imgs), denormalize(corrupted), denormalize(recon)], path, f"{title}\n{note}",
                    labels=["clean", "corrupted", "reconstruction"])


# ---------------------------------------------------------------------------------------------------------------- #
#                                                  bench.py hooks                                                    #
# ---------------------------------------------------------------------------------------------------------------- #
def bench_batch(imgs, cfg):
    """bench.py: the two views its training_loss takes, from random images [B, 3, H, W]."""
    return imgs, imgs.flip(-1)


def tokens_per_image(cfg):
    """bench.py's tokens/s: the student encodes two views of N patches per image (the teacher the same, clean)."""
    return 2 * (cfg.img_size // cfg.patch_size) ** 2


if __name__ == "__main__":
    cli(main)
