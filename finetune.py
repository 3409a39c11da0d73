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
import importlib
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn

from common import UserError
from common.data import DATASETS, LoaderData, build_eval_loader, finetune_transform, mix_seed, run_dataset
from common.evaluation import (Classifier, FinetuneRecipe, finetune_lr, layer_decay_groups, mix_batch, shard,
                               soft_target_cross_entropy)
from common.training import (Run, TrainConfig, cli, given_settings, load_file, progress, resolve_config,
                             set_grad_sync, set_lr, state_dict_fits)
from common.vit import count_params

METHODS = ("mae", "simmim", "beit", "beit2", "sit", "convmae")  # the methods whose encoders fine-tune here


# ---------------------------------------------------------------------------------------------------------------- #
#                                          the encoder to start from                                                 #
# ---------------------------------------------------------------------------------------------------------------- #
@dataclass
class Source:
    """What --init holds: the method, its pre-training config (the fields its encoder is built from) and the encoder's
    state dict in our names; `dropped`: the keys of the file that are not the encoder's (decoder, heads, ...)."""
    path: str
    method: str
    pretrain: dict
    state: dict
    dropped: list


def read_init(path):
    """--init -> Source. Our encoder.pth (the config.json beside it names the method and its settings), or a
    checkpoint.pth of our pre-training (its encoder part)."""
    ckpt = load_file(path, "--init")
    if isinstance(ckpt, dict) and "method" in ckpt and "config" in ckpt and "model" in ckpt:  # our checkpoint.pth
        encoder = {k.removeprefix("encoder."): v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
        dropped = [k for k in ckpt["model"] if not k.startswith("encoder.")]
        return Source(str(path), ckpt["method"], ckpt["config"], encoder, dropped)
    config = Path(path).parent / "config.json"
    if not config.is_file():
        raise UserError(f"--init {path}: no config.json beside it to say which method and model wrote it")
    pretrain = json.loads(config.read_text())
    if "method" not in pretrain:
        raise UserError(f"--init {path}: {config} does not say which method wrote it (a run of an older version: add "
                        f'"method": "<mae, simmim, ...>" to it)')
    return Source(str(path), pretrain["method"], pretrain, ckpt, [])


def build_encoder(source, img_size, random_init=False):
    """The method's encoder as its pre-training built it, at `img_size`, with the weights of --init, or with its
    initialisation (`random_init`: the baseline). BEiT-style encoders get one relative position table per block, each
    a copy of the shared one, as their fine-tuning does."""
    if source.method not in METHODS:
        raise UserError(f"--init {source.path} is a {source.method} encoder; finetune.py fine-tunes "
                        f"{', '.join(METHODS)} (iGPT fine-tunes in igpt.py)")
    module = importlib.import_module(source.method)
    names = {f.name for f in fields(module.Config)}
    pcfg = module.Config(**{k: v for k, v in source.pretrain.items() if k in names})
    if img_size != pcfg.img_size:
        raise UserError(f"--img-size {img_size}: {source.path} was pre-trained at {pcfg.img_size} px, and resizing its "
                        f"position tables is not supported yet; fine-tune at --img-size {pcfg.img_size}")
    encoder = module.build_model(pcfg).encoder
    state_dict_fits(encoder, source.state, f"--init {source.path} does not fit a {source.method} {pcfg.model} encoder")
    if not random_init:
        encoder.load_state_dict(source.state)
    if getattr(encoder, "rel_pos_bias", None) is not None:
        encoder.split_rel_pos_bias()
    return encoder, pcfg


# ---------------------------------------------------------------------------------------------------------------- #
#                                                 the classifier                                                     #
# ---------------------------------------------------------------------------------------------------------------- #
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
# 16384 (512 x 32 GPUs), RandomResizedCrop + flip only. Smaller images and budgets: our choice, shorter, milder crop.
LINEAR_PROBE = {
    "imagenet": dict(epochs=90, warmup_epochs=10, blr=0.1, batch_size=512, weight_decay=0.0, min_lr=0.0),
    "medium": dict(epochs=90, warmup_epochs=10, blr=0.1, batch_size=256, weight_decay=0.0, min_lr=0.0,
                   crop_scale=(0.2, 1.0)),
    "small": dict(epochs=20, warmup_epochs=2, blr=0.1, batch_size=256, weight_decay=0.0, min_lr=0.0,
                  crop_scale=(0.5, 1.0)),
}
PLAIN = dict(rand_augment=0, erasing=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, drop_path=0.0, layer_decay=1.0)


@dataclass
class Config(TrainConfig):
    init: str = ""  # the pre-trained encoder: a method's <out>/encoder.pth (or checkpoint.pth), or an official file
    linear_probe: bool = False  # MAE's linear probe: frozen encoder, BatchNorm + linear layer on the cls token, LARS
    random_init: bool = False  # the baseline: --init's architecture and recipe, its weights as initialised, not loaded
    pool: str = "mean"  # "mean" (patch tokens, then a LayerNorm) or "cls" (the normalised cls token)
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
    hidden = ("finetune_epochs", "finetune_baseline", "eval_every", "eval_images", "resident")  # pre-training flags

    def check(self):
        super().check()
        if not self.init and not self.resume:
            raise UserError("--init is required: the encoder.pth of a pre-training run, or an official checkpoint")
        if self.pool not in ("mean", "cls"):
            raise UserError(f"--pool {self.pool!r}: choose mean or cls")


def recipe_preset(source, data, img_size, linear_probe):
    """The flags the recipe sets for this encoder and data: the method's FINETUNE table (or LINEAR_PROBE) for the
    input size and model, as Config fields; the model and patch size of the encoder; its image size unless the
    dataset has its own."""
    from common.evaluation import finetune_scale
    size = img_size or DATASETS[data].native_size or source.pretrain["img_size"]
    model = source.pretrain["model"]
    if linear_probe:
        values = {**PLAIN, **LINEAR_PROBE[finetune_scale(size)]}
    else:
        table = importlib.import_module(source.method).FINETUNE if source.method in METHODS else {}
        scale = finetune_scale(size)
        values = {**table.get(scale, {}), **(table.get(model, {}) if scale == "imagenet" else {})}
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
    source = read_init(given["init"])
    given.setdefault("data", source.pretrain.get("data", Config.data))
    if "data_path" not in given and given["data"] == source.pretrain.get("data"):
        given["data_path"] = source.pretrain.get("data_path", "")
    preset, values = recipe_preset(source, given["data"], given.get("img_size"), given.get("linear_probe", False))
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
    encoder, _ = build_encoder(source, cfg.img_size, cfg.random_init)
    encoder.set_drop_path(recipe.drop_path)
    num_classes = train_set.num_classes
    model = (LinearProbe(encoder, num_classes) if cfg.linear_probe else
             Classifier(encoder.requires_grad_(True), num_classes, cfg.pool)).to(run.device)
    cfg.lr = cfg.lr if cfg.lr is not None else cfg.blr * run.global_batch / cfg.lr_batch_div
    floor = run.global_batch / recipe.lr_batch_div if recipe.scale_floor else 1.0  # SimMIM scales the floors too
    optimizer = build_optimizer(model, cfg, recipe)
    start_epoch, start_step = run.start(model, optimizer)
    run.log(f"{'linear probe' if cfg.linear_probe else 'fine-tune'} of {source.path}"
            f"{' (its architecture, randomly initialised)' if cfg.random_init else ''} ({source.method} "
            f"{source.pretrain['model']}, {len(source.dropped)} keys of the file not used): "
            f"{count_params(model) / 1e6:.2f}M trainable parameters, {num_classes} classes, recipe "
            + ", ".join(f"{k}={v}" for k, v in asdict(recipe).items()))
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
                update = (step + 1) % cfg.accum_iter == 0
                set_grad_sync(train_model, update)
                with run.autocast():
                    loss = soft_target_cross_entropy(train_model(imgs), targets)
                run.scaler.scale(loss / cfg.accum_iter).backward()
                grad_norm = None
                if update:
                    run.scaler.unscale_(optimizer)
                    if recipe.clip_grad:
                        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad)
                    run.scaler.step(optimizer)
                    run.scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                run.log_step(epoch, step, loss, lr, grad_norm)
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
            run.log(f"epoch {epoch}: val top-1 {top1}, top-5 {top5}" + (" (best)" if top1 > best["top1"] else ""))
            record = {"model": model.state_dict(), "epoch": epoch, "top1": top1, "top5": top5}
            run.save_file(record, "last.pth")
            if top1 > best["top1"]:
                best = {"epoch": epoch, "top1": top1, "top5": top5}
                run.save_file(record, "best.pth")
            if run.done:
                break
        run.finish_training(time.perf_counter() - t0, "fine-tuning")

    if cfg.eval_only or start_epoch == cfg.epochs:  # nothing trained here: validate what was loaded
        top1, top5 = validate(model, val_loader, run)
    run.save_file(timm_names(model), "model.pth")
    results = {"init": source.path, "random_init": cfg.random_init, "method": source.method, "model": cfg.model,
               "mode": "linear probe" if cfg.linear_probe else "fine-tune", "top1": top1, "top5": top5,
               "best": best, "global_step": run.global_step, "recipe": asdict(recipe)}
    run.write_json("results.json", results)
    run.log(f"val top-1 {top1}, top-5 {top5} (best: {best['top1']} after epoch {best['epoch']}); wrote "
            f"{run.out}/model.pth and results.json")
    return results


def best_so_far(out):
    """The best epoch of this run so far (its best.pth, after a resume), or none yet."""
    path = Path(out) / "best.pth"
    if path.is_file():
        saved = load_file(path)
        return {k: saved[k] for k in ("epoch", "top1", "top5")}
    return {"epoch": None, "top1": -math.inf, "top5": -math.inf}


if __name__ == "__main__":
    cli(main)
