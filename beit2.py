"""BEiT v2: Masked Image Modeling with Vector-Quantized Visual Tokenizers (Peng, Dong, Bao, Ye, Wei, 2022),
arXiv:2208.06366.

BEiT (beit.py) with semantic targets. Stage 1 trains VQ-KD, a ViT encoder whose patch features are quantized
(nearest of 8192 unit-norm 32-d codes by cosine, EMA codebook, k-means init, commitment loss) and decoded by a
1-block ViT into the features of a frozen teacher (knowledge distillation, paper §2.2): an encoder.pth of any method
file here, or a timm model on disk (the paper's is CLIP ViT-B/16); loss 1 - cos per token. Stage 2 is BEiT with those
ids as targets, exactly 75 of 196 patches hidden in blocks, and patch aggregation (§2.3): 2 extra blocks read the last
cls token with the patch states of block 9 (of 12) and predict the masked ids too, through the shared norm and head;
loss = CE(main) + CE(aggregation). The branch is dropped for evaluation and export, so `encoder.pth` is BEiT's.
This file takes from beit.py what the two share, as the official beit2/ builds on beit/: the BEiT model, blockwise
masking, the two-view data and the stage-1 loop; it adds the tokenizer, the exact mask count and the aggregation.

Run:     python mae.py --out runs/mae && python beit2.py --teacher runs/mae/encoder.pth   # offline demo
         python beit2.py --stage tokenizer --teacher runs/mae/encoder.pth --out runs/vqkd  # stage 1 only
         python beit2.py --data imagenet --data-path /data/imagenet --teacher vit_base_patch16_clip_224.openai
         torchrun --nproc_per_node 16 beit2.py --data imagenet --data-path /data/imagenet --teacher ...
Deviations from the official code (beyond beit.py's, which hold here too):
  - k-means init synchronised across ranks (official: per rank, never synchronised)
  - the codebook is a buffer and its statistics use index_add; no usage EMA (stage 1 logs the usage)
  - the teacher is any encoder of this repository or a timm model (official: CLIP or DINO, built in)
  - the masked patches that top up a mask come from the step's Random (official: NumPy's global generator)
  - stage 1 uses the two-view augmentation, colour jitter included (official VQ-KD: crop + flip only)
  - stage 1's AdamW is (0.9, 0.999), cosine from --tokenizer-lr, no warm-up (official: (0.9, 0.99), 10 warm-up epochs)
  - stage 2 crops with scale (0.08, 1) (official v2: 0.2)
  - the VQ-KD encoder's size is --model's unless --vqkd-model (official: ViT-B for every BEiT size)
  - dead-code restart of the codebook, --vqkd-restart-after N (official: none); on (20) in the presets below ImageNet
Results: docs/RESULTS.md#beit-v2
"""
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F

import beit
from beit import (MAX_ATTEMPTS, BEiT, BEiTConfig, MaskingGenerator, beit_lr, build_two_view_data, fixed_views,
                  layer_scale, masked_positions, obtain_tokenizer, pretraining_step, save_reconstruction,
                  tokenizer_view_size)
from common import UserError
from common.data import IMAGENET_MEAN, IMAGENET_STD, mix_seed, preview_images, seeded_rng
from common.evaluation import monitors, report
from common.training import (Run, cli, load_file, param_groups, parse_config, scaled_lr, set_grad_sync, set_lr,
                             state_dict_fits)
from common.vit import (VIT_SIZES, Block, VisionTransformer, count_params, drop_path_rates, rescale_residual_branches,
                        run_block, set_grad_checkpointing, vit_kwargs)


# ---------------------------------------------------------------------------------------------------------------- #
#                              stage 1: the VQ-KD tokenizer distilled from a teacher                                 #
# ---------------------------------------------------------------------------------------------------------------- #
# VQ-KD (official beit2/modeling_vqkd.py, norm_ema_quantizer.py) replaces BEiT's pixel-level dVAE by a *semantic*
# tokenizer: it encodes the image with a ViT, quantizes every patch to the nearest of `vocab_size` unit-norm codes and
# trains a small decoder to reconstruct, from the codes alone, a frozen teacher's features of the image (paper §2.2).
# Its codes are BEiT v2's targets; it decodes teacher features, not pixels (its authors confirm), so there is no
# picture of them to show. It follows the tokenizer interface of beit.py's stage 1 (see the dVAE there).
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
    (the official code has no codebook loss term); instead, in training, each code moves by an EMA of the l2-normalised
    mean of the vectors assigned to it in the batch (counts and sums all-reduced over the ranks),
        e <- l2norm(decay e + (1 - decay) l2norm(mean)),
    and a code nobody picked keeps its value. The output is straight-through: z + sg(z_q - z), the value of z_q with
    the gradient of z. The codebook is a buffer: not a parameter, so no optimizer or weight decay touches it
    (official: an nn.Parameter with requires_grad=False). It starts empty and is initialised on the first training
    batch by 10 rounds of spherical k-means (official --quantize_kmeans_init).
    official: each rank runs k-means on its own batch and the ranks keep different codebooks; we: every rank runs
    it on the batches of all ranks (all-gathered) and takes rank 0's result, so the ranks agree from the start.
    official: the assignment statistics through a [M, V] one-hot matrix; we: index_add (the same sums).
    official: also an EMA of code usage (`cluster_size`), only for logging; we: the usage is counted by stage 1.
    ours, off by default (restart_after = 0): dead-code restart (restart_dead_codes)."""

    def __init__(self, vocab_size, dim, beta=1.0, decay=0.99, restart_after=0):
        super().__init__()
        self.vocab_size, self.dim, self.beta, self.decay = vocab_size, dim, beta, decay
        self.restart_after = restart_after
        self.register_buffer("codebook", torch.zeros(vocab_size, dim))  # [V, d], unit rows once initialised
        # steps since each code was last picked: saved with the tokenizer where restarts are on (exact resume)
        self.register_buffer("idle", torch.zeros(vocab_size, dtype=torch.long), persistent=restart_after > 0)
        self.register_buffer("initted", torch.zeros((), dtype=torch.bool))
        self.known_ready = False  # `initted` as last read on the host: once True, no step reads it again
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "known_ready", False))

    def ready(self):
        """Whether the codebook is initialised: `initted` is read from the device until it says so, then the answer is
        kept on the host, so that a training step does not wait for the device to ask."""
        if not self.known_ready:
            self.known_ready = bool(self.initted)
        return self.known_ready

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
        self.known_ready = True

    @torch.no_grad()
    def ema_update(self, flat, ids):
        """One EMA step of the codebook towards the l2-normalised mean of the vectors assigned to each code."""
        bins = torch.zeros(self.vocab_size, dtype=flat.dtype, device=flat.device).index_add_(
            0, ids, torch.ones_like(ids, dtype=flat.dtype))  # [V] (a fixed length: no sync, unlike bincount on CUDA)
        sums = torch.zeros_like(self.codebook).index_add_(0, ids, flat)  # [V, d]
        if distributed():
            torch_dist.all_reduce(bins)
            torch_dist.all_reduce(sums)
        mean = l2norm(sums / bins.clamp(min=1).unsqueeze(1))  # [V, d]; an unused code's is 0 (l2norm of 0)
        # so an unused code becomes l2norm(decay e) = e: unchanged (official: the same, plus a torch.where that
        # puts e itself in place of its mean -- the same result)
        self.codebook.copy_(l2norm(self.decay * self.codebook + (1 - self.decay) * mean))
        if self.restart_after:
            self.restart_dead_codes(flat, bins)

    @torch.no_grad()
    def restart_dead_codes(self, flat, bins):
        """Dead-code restart, the usual remedy of a codebook that collapses onto a few codes (ours; the official
        quantizer has none): a code no vector of any rank picked for `restart_after` steps in a row moves onto a
        random vector of this step's batch, where it is the nearest code of at least that vector. The vectors are
        rank 0's (shared by an all-reduce of rank 0's picks and the others' zeros), so the ranks keep one codebook.
        flat [M, d] unit rows of this rank, bins [V] the codes' counts over all ranks."""
        self.idle.copy_(torch.where(bins > 0, 0, self.idle + 1))
        dead = self.idle >= self.restart_after  # [V]
        picks = flat[torch.randint(flat.shape[0], (self.vocab_size,), device=flat.device)]  # [V, d]
        if distributed():
            picks = picks * (torch_dist.get_rank() == 0)
            torch_dist.all_reduce(picks)  # rank 0's picks on every rank
        self.codebook.copy_(torch.where(dead.unsqueeze(1), picks, self.codebook))
        self.idle.masked_fill_(dead, 0)

    def forward(self, z, generator=None):
        """z [B, N, d] (fp32) -> (z_q [B, N, d] straight-through, commitment loss, ids [B, N])."""
        z = l2norm(z)
        flat = z.reshape(-1, self.dim)  # [B N, d]
        if self.training and not self.ready():  # (official: also in eval; an untrained tokenizer is not used there)
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
                 target_dim=512, decay=0.99, teacher="", restart_after=0):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, stride=stride, img_size=img_size, model=model,
                           codebook_dim=codebook_dim, decoder_depth=decoder_depth, target_dim=target_dim, decay=decay,
                           teacher=teacher, **({"restart_after": restart_after} if restart_after else {}))
        # (restart_after only where restarts are on: the official quantizer's tokenizer.pth is as it was)
        self.vocab_size, self.stride = vocab_size, stride
        self.encoder = vqkd_vit(img_size, stride, 3, model)
        self.grid = self.encoder.patch_embed.grid_size
        dim = self.encoder.embed_dim
        self.encode_task_layer = task_layer(dim, codebook_dim)
        self.quantize = NormEMAQuantizer(vocab_size, codebook_dim, beta=1.0, decay=decay, restart_after=restart_after)
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

    def encode_unquantized(self, view):
        """view [B, 3, H, W] in [0, 1] -> z [B, N, d] in fp32, what the quantizer receives."""
        x = patch_tokens(self.encoder, view * 2 - 1)  # [B, N, D]; official pre_process: [0, 1] -> [-1, 1]
        with torch.autocast(view.device.type, enabled=False):
            return self.encode_task_layer(x.float())  # [B, N, d]

    def encode(self, view, generator=None):
        """view [B, 3, H, W] in [0, 1] -> (codes [B, N, d] straight-through, commitment loss, ids [B, N])."""
        z = self.encode_unquantized(view)
        with torch.autocast(view.device.type, enabled=False):
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

    @torch.no_grad()
    def prepare(self, view, generator, progress):
        """Before a training step, eagerly: the k-means init of the codebook on the first batch, as the quantizer's
        first training forward would do it (the same vectors and generator), so that the step itself never branches
        on it (one compiled graph). The step takes no other input (no schedule: official VQ-KD anneals nothing)."""
        if not self.quantize.ready():
            z = l2norm(self.encode_unquantized(view))  # [B, N, d], as the quantizer normalises it
            self.quantize.kmeans_init(z.reshape(-1, self.quantize.dim), generator)  # [B N, d]
        return ()

    def forward(self, view):
        """Stage-1 loss (official VQKD.forward): (loss, ids [B, N], logged scalars). A codebook not yet initialised
        (a forward without `prepare`) is initialised here from the global generator, as the official first training
        forward does."""
        target = self.targets(view)  # [B, N, C]
        z_q, commit, ids = self.encode(view)
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


def new_vqkd(cfg, config=None, with_teacher=True):
    """The VQ-KD of this run: one of a saved tokenizer file's `config` (its teacher, named in the config, is loaded
    when training first needs it), or a fresh one whose view is the model's (stride = patch size, so the token grid
    is the patch grid) and whose decoder head is as wide as the teacher's features. Without the teacher (the stage-2
    model's random-init baseline and bench.py only need the vocabulary and the encoder) the head takes the encoder's
    width."""
    if config is not None:
        return VQKD(**config)
    teacher = load_teacher(cfg.teacher) if with_teacher else None
    if with_teacher and teacher is None:
        raise UserError("beit2.py trains its tokenizer from a teacher: give --teacher (an encoder.pth of this "
                        "repository or a timm model name whose weights are on disk)")
    model = cfg.vqkd_model or cfg.model
    tokenizer = VQKD(cfg.vocab_size, cfg.patch_size, cfg.img_size, model, cfg.vqkd_codebook_dim,
                     cfg.vqkd_decoder_depth, teacher.dim if teacher else VIT_SIZES[model][0], cfg.vqkd_decay,
                     cfg.teacher, cfg.vqkd_restart_after)
    return tokenizer.use_teacher(teacher) if teacher else tokenizer


# ---------------------------------------------------------------------------------------------------- the teacher
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
    state_dict_fits(vit, state, f"--teacher {path} does not fit its config.json")
    vit.load_state_dict(state)
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


# ---------------------------------------------------------------------------------------------------------------- #
#                                   stage 2: exact-count masks, patch aggregation                                    #
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

    def batched(self, batch_size, generator, attempts=MAX_ATTEMPTS):
        """`draw`'s law for the batch on the device (MaskingGenerator.batched, then the top-up): each image's
        missing patches are a uniform choice among its unmasked ones, the lowest of a random key per patch."""
        mask = super().batched(batch_size, generator, attempts)  # [B, N]
        missing = self.num_masking_patches - mask.sum(dim=1, keepdim=True)  # [B, 1]
        keys = torch.rand(mask.shape, device=mask.device, generator=generator) + mask  # masked patches sort last
        rank = keys.argsort(dim=1).argsort(dim=1)  # [B, N]: each patch's place in its image's key order
        return mask | (rank < missing)


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
        self.grad_checkpointing = False  # both branches under activation checkpointing (set_grad_checkpointing)

    def forward_branches(self, imgs, mask):
        """imgs [B, 3, H, W] normalised, mask [B, N] bool -> (main, aggregation) normed patch tokens, [B, N, D] each."""
        x = self.encoder.embed(imgs)  # [B, N, D]
        w = mask.unsqueeze(-1).to(x.dtype)  # [B, N, 1]
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = self.encoder.prepend_cls(x)  # [B, 1+N, D]
        attn_bias = self.encoder.rel_pos_bias()  # [H, 1+N, 1+N], shared by every block, the extra ones too
        for i, block in enumerate(self.encoder.blocks, start=1):
            x = run_block(block, x, attn_bias, grad_checkpointing=self.grad_checkpointing)
            if i == self.early_layers:
                early = x[:, 1:]  # [B, N, D], the patch states after block early_layers
        agg = torch.cat([x[:, :1], early], dim=1)  # [B, 1+N, D]: the last block's cls + the early patch states
        for block in self.cls_pt_layers:
            agg = run_block(block, agg, attn_bias, grad_checkpointing=self.grad_checkpointing)
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


def mask_generator(cfg):
    """BEiT's blockwise generator with BEiT's budget for this grid, topped up to the exact count."""
    return beit.mask_generator(cfg, ExactMaskingGenerator)


def build_model(cfg, tokenizer=None):
    """The BEiT v2 pre-training model; without a tokenizer (bench.py, the random-init baseline) a fresh VQ-KD
    without its teacher, in a fork of the generators as beit.build_model does."""
    if tokenizer is None:
        with seeded_rng(mix_seed(cfg.seed, 1_000_003)):
            tokenizer = new_vqkd(cfg, with_teacher=False)
    tokenizer.teacher = None  # stage 2 needs only the ids: free the teacher stage 1 may have left (GPU memory)
    model = BEiTv2(tokenizer, cfg.img_size, cfg.patch_size, cfg.model, tokenizer.vocab_size, cfg.drop_path,
                   layer_scale(cfg), cfg.early_layers or None, cfg.head_layers)
    return set_grad_checkpointing(model, cfg.grad_checkpointing)


def training_loss(model, batch, cfg, generator):
    """The loss of one pre-training step, as bench.py times it."""
    return pretraining_step(model, batch, mask_generator(cfg), generator)[0]


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      config                                                        #
# ---------------------------------------------------------------------------------------------------------------- #
@dataclass
class Config(BEiTConfig):
    """BEiT's two stages (its official ImageNet recipe for stage 2) with the VQ-KD tokenizer and patch aggregation
    (official beit2/: vqkd_encoder_base_decoder_1x768x12_clip, beit_base_patch16_224_8k_vocab_cls_pt)."""
    host_memory_gib = (2.38, 0.248)  # GiB (fixed, per image) on a CPU in fp32 at these defaults: bench.py --memory
    teacher: str = ""  # VQ-KD's teacher: an encoder.pth of this repository (config.json beside it) or a timm name
    vqkd_model: str = ""  # VQ-KD encoder and decoder width ("" = --model; official: vit_base for every BEiT size)
    vqkd_codebook_dim: int = 32  # width of VQ-KD's unit-norm code space (official: 32)
    vqkd_decoder_depth: int = 1  # VQ-KD decoder blocks (official models: 1 or 3)
    vqkd_decay: float = 0.99  # EMA decay of VQ-KD's codebook (official: 0.99)
    # ours: off officially; on in the small-data presets, where the codebook otherwise collapses (docs/RESULTS.md)
    vqkd_restart_after: int = 0  # restart a code that no batch picked for N steps at an encoder output (0 = off)
    early_layers: int = 0  # patch aggregation reads the patch states after block N (0 = depth - 3 >= 1: 9 of 12)
    head_layers: int = 2  # blocks of the patch-aggregation branch (official: 2)

    def check(self):
        super().check()
        if self.vqkd_model and self.vqkd_model not in VIT_SIZES:
            raise UserError(f"unknown --vqkd-model {self.vqkd_model!r}; choose from {', '.join(VIT_SIZES)}")
        if self.vqkd_restart_after < 0:
            raise UserError(f"--vqkd-restart-after must not be negative, got {self.vqkd_restart_after}")
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


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      train                                                         #
# ---------------------------------------------------------------------------------------------------------------- #
def main():
    cfg, preset = parse_config(Config, PRESETS, description=__doc__.split("\n\n")[0])
    run = Run(cfg, "beit2", preset)  # devices, processes, --out; resolves cfg.out, cfg.compile, a preset's accum_iter
    # stage 1: VQ-KD, distilled from the teacher into its file unless that already holds a finished one
    tokenizer, tokenizer_path = obtain_tokenizer(cfg, run, "vqkd", partial(new_vqkd, cfg))
    if cfg.stage == "tokenizer":
        if load_file(tokenizer_path, "tokenizer")["complete"]:
            run.log(f"stage 1 done: {tokenizer_path}")
        return
    cfg.vocab_size = tokenizer.vocab_size  # a tokenizer file brings its own
    cfg.tokenizer = str(tokenizer_path)
    # stage 2: BEiT v2
    tok_size = tokenizer_view_size(cfg, tokenizer.stride)
    data = None if cfg.eval_only else build_two_view_data(cfg, run, tok_size, tokenizer.interpolation)
    with seeded_rng(cfg.seed + run.dist.rank, run.device):  # as Run seeded it: the monitors rebuild this init
        model = build_model(cfg, tokenizer).to(run.device)
    cfg.lr = scaled_lr(cfg, run.global_batch)  # lr = blr x global batch / 256 (official: 1.5e-3 at batch 2048)
    # AdamW(0.9, 0.999), wd 0.05 except 1-D parameters, biases and the cls token, as BEiT (official beit2: the same)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, no_decay=("encoder.cls_token",)), lr=cfg.lr,
                                  betas=(0.9, 0.999), fused=True)
    start_epoch, start_step = run.start(model, optimizer)
    masks = mask_generator(cfg)
    run.log(f"BEiT v2 {cfg.model}/{cfg.patch_size} at {cfg.img_size}px: {count_params(model) / 1e6:.2f}M trainable "
            f"parameters ({count_params(model.encoder) / 1e6:.2f}M encoder), {tokenizer.vocab_size} visual tokens from "
            f"{tokenizer_path} on the {tok_size}px view; exactly {masks.num_masking_patches} of {masks.num_patches} "
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
                                    f"BEiT v2 {cfg.model} epoch {epoch}, {masks.num_masking_patches}/"
                                    f"{masks.num_patches} patches masked in blocks", run.autocast())
            if run.done:
                break
            if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
                run.write_log(kind="eval", epoch=epoch, **monitors(model.encoder, build_model, run))
        run.finish_training(time.perf_counter() - t0)

    tokenizer = {"path": str(tokenizer_path), **load_file(tokenizer_path, "tokenizer").get("stats", {})}
    # encoder.pth, the monitors, results.json (with the last epoch's accuracy: None with --eval-only), fine-tuning
    report("beit2", model.encoder, build_model, run, extra={"mlm_acc": mlm_acc, "tokenizer": tokenizer})


# ---------------------------------------------------------------------------------------------------------------- #
#                                            presets and fine-tuning recipes                                         #
# ---------------------------------------------------------------------------------------------------------------- #
# Presets by dataset scale, a flag given on the command line always winning: BEiT's model, masking, schedule and
# stage-1 budget at every scale, without its dVAE's fields (VQ-KD's view is the model's, its stride the patch size).
# Below ImageNet scale, dead-code restart after 20 idle steps (ours): with a few hundred stage-1 steps the official
# quantizer alone keeps only a few of its codes in use (docs/RESULTS.md#beit-v2).
PRESETS = {scale: {**{k: v for k, v in preset.items() if not k.startswith("dvae_")},
                   **({"vqkd_restart_after": 20} if scale != "imagenet" else {})}
           for scale, preset in beit.PRESETS.items()}

# --finetune-epochs: BEiT's recipes (official beit2/ fine-tunes BEiT v2-B with BEiT's recipe structure).
FINETUNE = beit.FINETUNE


# ---------------------------------------------------------------------------------------------------------------- #
#                                                  bench.py hooks                                                    #
# ---------------------------------------------------------------------------------------------------------------- #
def bench_label(cfg):
    """bench.py's row name: the method, the encoder and the input size."""
    return f"BEiT v2 {cfg.model}/{cfg.patch_size} {cfg.img_size}px"


def bench_batch(imgs, cfg):
    """bench.py's hook: random images -> (model view, tokenizer view in [0, 1]: VQ-KD's view is the model's size;
    the teacher is not in the stage-2 step, so none is needed)."""
    size = tokenizer_view_size(cfg, cfg.patch_size)
    return imgs, torch.rand(imgs.shape[0], 3, size, size, device=imgs.device)


if __name__ == "__main__":
    cli(main)
