"""Evaluation of a pre-trained encoder: kNN and linear probe on frozen features (monitors), image grids, and pictures
of a visual tokenizer's codebook (BEiT, BEiT v2). Fine-tuning, the headline number of every MIM paper, is finetune.py's.

kNN and the linear probe are *monitors*: masked-image-modeling features are known to score low on them (MAE's kNN
is about 11 % on ImageNet in lightly's benchmark, while it fine-tunes to 83.6 %). Both are reported for the cls
token and for the mean of the patch tokens, next to the same numbers for the randomly initialised encoder.
"""
import json
import math
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Subset

from .data import build_eval_loader, imagenet_stats, mix_seed, seeded_rng, stratified_indices
from .training import Preempted, barrier, cosine_lr, on_any_rank, progress, set_lr


# ---------------------------------------------------------------------------------------------------------------- #
#                                                   features                                                         #
# ---------------------------------------------------------------------------------------------------------------- #
def shard(loader, rank, world):
    """The same loader over this rank's contiguous chunk of the dataset (chunks in rank order)."""
    n = len(loader.dataset)
    per = math.ceil(n / world)
    part = Subset(loader.dataset, range(min(rank * per, n), min((rank + 1) * per, n)))
    return DataLoader(part, batch_size=loader.batch_size, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn, generator=torch.Generator())


@torch.no_grad()
def extract_features(encoder, loader, run):
    """Frozen features of a whole labelled split, computed in shards over the ranks and gathered on every rank.
    Returns (cls token [N, D], mean of patch tokens [N, D], labels [N]), float32 on the device. A stop signal ends
    a rank's loop at the next batch (the gather still happens, so the ranks stay in step): the caller then sees
    stop_agreed() and drops the features."""
    was_training = encoder.training
    encoder.eval()
    cls_f, mean_f, labels = [], [], []
    batches = shard(loader, run.dist.rank, run.dist.world_size)
    for imgs, y in progress(batches, run.is_main, desc="features"):
        if stop_requested(run):
            break
        with run.autocast():
            tokens = encoder.forward_features(imgs.to(run.device, non_blocking=True))  # [B, 1+N, D]
        cls_f.append(tokens[:, 0].float())
        mean_f.append(tokens[:, 1:].float().mean(dim=1))
        labels.append(y.to(run.device))
    encoder.train(was_training)
    dim = encoder.embed_dim
    out = [torch.cat(cls_f) if cls_f else torch.zeros(0, dim, device=run.device),
           torch.cat(mean_f) if mean_f else torch.zeros(0, dim, device=run.device),
           torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=run.device)]
    if run.dist.world_size > 1:
        out = [gather_rows(t, run.dist.world_size) for t in out]
    return out


def gather_rows(t, world):
    """Concatenate every rank's rows in rank order (chunks may differ in length: pad, gather, trim)."""
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch_dist.all_gather(sizes, n)
    longest = int(max(sizes))
    padded = torch.cat([t, t.new_zeros(longest - t.shape[0], *t.shape[1:])])
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch_dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


# ---------------------------------------------------------------------------------------------------------------- #
#                                                kNN and linear probe                                                #
# ---------------------------------------------------------------------------------------------------------------- #
@torch.no_grad()
def knn_accuracy(train_x, train_y, test_x, test_y, num_classes, k=20, temperature=0.07, chunk=1024, stop=None):
    """Weighted kNN on cosine similarity (InstDisc / DINO protocol): the k nearest training features vote for
    their label with weight exp(similarity / T). Returns top-1 accuracy in %, or None when `stop()` (asked between
    chunks) said to stop."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    k = min(k, len(train_x))
    correct = 0
    for start in range(0, len(test_x), chunk):
        if stop is not None and stop():
            return None
        sim = test_x[start: start + chunk] @ train_x.T  # [b, N_train]
        top_sim, top_idx = sim.topk(k, dim=1)  # [b, k]
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())  # [b, classes]
        correct += (votes.argmax(1) == test_y[start: start + chunk]).sum().item()
    return 100.0 * correct / max(len(test_x), 1)


def linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs=90, batch_size=1024, blr=0.1, seed=0,
                 stop=None):
    """The MAE linear-probe head on frozen features: BatchNorm1d without affine (eps 1e-6) + Linear (std 0.01),
    SGD momentum 0.9, lr = blr x batch / 256 with 10 % warm-up then cosine, no weight decay.
    official (MAE): LARS, 90 epochs over augmented images at batch 16384; we: plain SGD on features computed
    once without augmentation (fast enough to run at every evaluation). Returns top-1 accuracy in %, or None when
    `stop()` (asked before every step) said to stop."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False, eps=1e-6),
                         nn.Linear(train_x.shape[1], num_classes)).to(train_x.device)
    with torch.no_grad():
        head[1].weight.copy_(torch.randn(head[1].weight.shape, generator=g) * 0.01)
        head[1].bias.zero_()
    batch_size = min(batch_size, len(train_x))
    lr = blr * batch_size / 256
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps = len(train_x) // batch_size
    for epoch in range(epochs):
        order = torch.randperm(len(train_x), generator=g).to(train_x.device)
        for i in range(steps):
            if stop is not None and stop():
                return None
            set_lr(opt, cosine_lr(epoch + i / steps, lr, 0.0, epochs / 10, epochs))
            idx = order[i * batch_size: (i + 1) * batch_size]  # [b]
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        pred = torch.cat([head(test_x[s: s + 4096]).argmax(1) for s in range(0, len(test_x), 4096)])
    return 100.0 * (pred == test_y).float().mean().item()


MONITORS = ("knn_cls", "linear_cls", "knn_mean", "linear_mean")  # what probe() measures of an encoder, in its order
SMOKE_EVAL_IMAGES = (1000, 500)  # (train, val) images of the monitors of a --max-steps run without --eval-images


def stop_requested(run):
    """Whether a stop signal (SIGTERM / SIGINT, Run.stop) has reached this process; a run-like object without a
    handler (tests, tools) never stops."""
    stop = getattr(run, "stop", None)
    return bool(stop is not None and stop.requested)


def stop_hook(run):
    """{"stop": whether a stop signal has come} for knn_accuracy / linear_probe, which then end early and return
    None; {} for a run-like object without a handler (tests, tools), which never stops."""
    return {"stop": partial(stop_requested, run)} if getattr(run, "stop", None) is not None else {}


def stop_agreed(run):
    """stop_requested on any rank, agreed by all: every rank calls it at the same point of the monitors."""
    return on_any_rank(stop_requested(run), run.dist.world_size, run.device)


def probe(encoder, train_loader, val_loader, num_classes, run):
    """kNN and linear-probe accuracy (%) of one encoder, for the cls token and the mean-pooled patch tokens
    (MONITORS). A stop signal ends it at the next batch, chunk or step: it returns what it finished."""
    results = {}
    if stop_agreed(run):
        return results
    tr_cls, tr_mean, tr_y = extract_features(encoder, train_loader, run)
    if stop_agreed(run):
        return results
    va_cls, va_mean, va_y = extract_features(encoder, val_loader, run)
    if stop_agreed(run) or not run.is_main:
        return results
    stop = stop_hook(run)  # rank 0 alone from here (the next stop_agreed tells the others)
    for name, tr, va in (("cls", tr_cls, va_cls), ("mean", tr_mean, va_mean)):
        knn = knn_accuracy(tr, tr_y, va, va_y, num_classes, **stop)
        if knn is None:
            break
        results[f"knn_{name}"] = round(knn, 2)
        linear = linear_probe(tr, tr_y, va, va_y, num_classes, seed=run.cfg.seed, **stop)
        if linear is None:
            break
        results[f"linear_{name}"] = round(linear, 2)
    return results


def eval_image_caps(cfg):
    """(train, val): the most images of each split the monitors see, 0 = all. --eval-images N: N and N; unset, a
    --max-steps run (a smoke test) takes SMOKE_EVAL_IMAGES, so that its monitors end in about a minute on a CPU, and
    any other run evaluates everything."""
    n = getattr(cfg, "eval_images", None)
    if n is not None:
        return n, n
    return SMOKE_EVAL_IMAGES if getattr(cfg, "max_steps", 0) else (0, 0)


def capped(loader, n, seed):
    """`loader` over a seeded draw of n of its images with every class keeping its share (stratified_indices, the
    draw of --subset), in dataset order; the loader itself when n is 0 or not below its size."""
    ds = loader.dataset
    if not n or n >= len(ds):
        return loader
    part = Subset(ds, stratified_indices(ds.labels, n, seed).tolist())
    return DataLoader(part, batch_size=loader.batch_size, num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                      worker_init_fn=loader.worker_init_fn, generator=torch.Generator())


def evaluate(encoder, random_encoder, run):
    """Monitors of the encoder and of the same encoder at random initialisation, on the dataset's labelled
    train/val split (at most eval_image_caps of each). Returns {} (and says so) for data without labels. A stop
    signal ends them at the next batch: the result then holds what finished and, under "skipped", the names
    ("pretrained/linear_mean", ...) of what did not."""
    cfg = run.cfg
    train_loader = build_eval_loader(cfg, "train", run.dist)
    val_loader = build_eval_loader(cfg, "val", run.dist)
    if train_loader is None or val_loader is None:
        run.log(f"evaluation skipped: {cfg.data} at {cfg.data_path} has no labelled train/ and val/ split")
        return {}
    t = time.perf_counter()
    num_classes = train_loader.dataset.num_classes
    sizes = len(train_loader.dataset), len(val_loader.dataset)
    train_cap, val_cap = eval_image_caps(cfg)
    train_loader, val_loader = capped(train_loader, train_cap, cfg.seed), capped(val_loader, val_cap, cfg.seed)
    if (len(train_loader.dataset), len(val_loader.dataset)) != sizes:
        run.log(f"monitors on {len(train_loader.dataset)} of {sizes[0]} train and {len(val_loader.dataset)} of "
                f"{sizes[1]} val images (" + ("--eval-images" if getattr(cfg, "eval_images", None) is not None
                                              else "the cap of a --max-steps run; --eval-images 0 for all") + ")")
    results = {"pretrained": probe(encoder, train_loader, val_loader, num_classes, run),
               "random_init": probe(random_encoder, train_loader, val_loader, num_classes, run)}
    barrier()
    if run.is_main:
        skipped = [f"{name}/{key}" for name, got in results.items() for key in MONITORS if key not in got]
        p, r = results["pretrained"], results["random_init"]
        if skipped:
            results["skipped"] = skipped
            run.log(f"eval stopped by a signal after {time.perf_counter() - t:.0f}s: pretrained {p}, random init "
                    f"{r}; skipped {', '.join(skipped)}")
        else:
            run.log(f"eval ({time.perf_counter() - t:.0f}s): kNN cls {p['knn_cls']} / mean {p['knn_mean']}, linear "
                    f"cls {p['linear_cls']} / mean {p['linear_mean']}  (random init: kNN {r['knn_cls']} / "
                    f"{r['knn_mean']}, linear {r['linear_cls']} / {r['linear_mean']})")
    return results


def initial_encoder(build_model, run):
    """The encoder as it was initialised before pre-training: built again from the run's seed (as Run seeds rank 0)
    in a fork of the generators, so the training's random stream is untouched."""
    with seeded_rng(run.cfg.seed, run.device):
        return build_model(run.cfg).encoder.to(run.device)


STOP_MONITORS = "stopping the monitors at the next batch, then writing results.json"  # (StopSignal.action)


@contextmanager
def stop_action(run, action):
    """Inside: a stop signal's message says `action` (StopSignal.action) rather than the training loop's."""
    stop = getattr(run, "stop", None)
    before = stop.action if stop is not None else None
    if stop is not None:
        stop.action = action
    try:
        yield
    finally:
        if stop is not None:
            stop.action = before


def monitors(encoder, build_model, run):
    """evaluate() of the encoder next to its baseline, the encoder at its initialisation. Every random draw of the
    evaluation (the probe heads' init) happens in a fork of the generators: a run with --eval-every trains exactly
    as one without."""
    with stop_action(run, STOP_MONITORS):
        baseline = initial_encoder(build_model, run)
        with seeded_rng(mix_seed(run.cfg.seed, run.dist.rank, 2), run.device):
            return evaluate(encoder, baseline, run)


def write_results(run, results):
    """results.json once the monitors (results["eval"]) are over. If a stop signal cut them short (results["eval"]
    lists what did not finish under "skipped") or would cut the fine-tuning after them: results.json holds what
    finished and says what did not ("stopped"), and the process ends as a preempted run does (exit 0)."""
    skipped = results["eval"].pop("skipped", [])
    stopped = stop_agreed(run) and bool(skipped or run.cfg.finetune_epochs)  # (a signal that cut nothing short: done)
    if stopped:
        results["stopped"] = "a stop signal during the monitors: " + "; ".join(
            ([f"skipped {', '.join(skipped)}"] if skipped else []) + (["fine-tuning not run"]
                                                                      if run.cfg.finetune_epochs else []))
    run.write_json("results.json", results)
    run.log(f"wrote {run.out}/results.json")
    if stopped:
        run.log(f"stopped by signal during the monitors; {run.out}/encoder.pth and results.json are written. Run the "
                f"monitors again with --eval-only --resume auto --out {run.out}")
        barrier()
        raise Preempted()


def report(method, encoder, build_model, run, extra=None):
    """End of a run: encoder.pth (timm names) at once, then the monitors (with the random-init baseline) and
    results.json (with the method's own numbers, `extra`) -- both before any fine-tuning, so a failure there loses
    neither -- then the optional fine-tuning (and its random-init baseline with --finetune-baseline), added to
    results.json. A stop signal during the monitors stops them at the next batch (write_results)."""
    cfg = run.cfg
    run.save_file(encoder.state_dict(), "encoder.pth")
    with stop_action(run, STOP_MONITORS):
        run.log(f"wrote {run.out}/encoder.pth; the monitors (kNN and linear probe, pre-trained and random init) next")
        results = {"method": method, "data": cfg.data, "model": cfg.model, "global_step": run.global_step,
                   "final_loss": run.last_loss, **(extra or {}), "eval": monitors(encoder, build_model, run)}
    write_results(run, results)
    if cfg.finetune_epochs:  # finetune.py's program on the encoder.pth just written, into <out>/finetune
        from finetune import after_pretraining
        results["finetune"] = after_pretraining(run)
        run.write_json("results.json", results)
    run.log(f"fine-tune it: python finetune.py --init {run.out}/encoder.pth   (--linear-probe for MAE's linear probe)")
    return results


# ---------------------------------------------------------------------------------------------------------------- #
#                                                   image grids                                                      #
# ---------------------------------------------------------------------------------------------------------------- #
def denormalize(x):
    """ImageNet-normalised [B, 3, H, W] -> [0, 1] for viewing."""
    mean, std = imagenet_stats(device=x.device)
    return (x.float() * std + mean).clamp(0, 1)


def save_image_grid(rows, path, caption, labels=None, scale=None):
    """rows: list of [B, 3, H, W] images in [0, 1], drawn top to bottom (row names in `labels`), under a caption
    that says how they were made. Small images are upscaled (nearest) so the grid is readable."""
    B, _, H, W = rows[0].shape
    scale = scale or max(1, 96 // H)
    pad, label_w, caption_h = 2, 110, 14 * (caption.count("\n") + 1) + 6
    grid = Image.new("RGB", (label_w + B * (W * scale + pad), caption_h + len(rows) * (H * scale + pad)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 3), caption, fill="black")
    for r, row in enumerate(rows):
        y0 = caption_h + r * (H * scale + pad)
        if labels:
            draw.text((4, y0 + H * scale // 2 - 5), labels[r], fill="black")
        arr = (row.detach().float().cpu().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for b in range(B):
            tile = Image.fromarray(arr[b]).resize((W * scale, H * scale), Image.NEAREST)
            grid.paste(tile, (label_w + b * (W * scale + pad), y0))
    grid.save(path)


# ---------------------------------------------------------------------------------------------------------------- #
#                                                 training curves                                                    #
# ---------------------------------------------------------------------------------------------------------------- #
CURVE_SKIP = {"kind", "step", "epoch", "img_per_s", "seconds", "world_size"}  # bookkeeping, not curves


def flat_numbers(record, prefix=""):
    """The numeric fields of a log record, nested dicts flattened to "a/b" (a monitor's {"pretrained": {"knn_cls":
    ...}} -> "pretrained/knn_cls"), lists and bookkeeping fields left out."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flat_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in CURVE_SKIP:
            out[prefix + key] = value
    return out


def read_curves(log_path):
    """A run's curves from its log.jsonl: {name: ([x], [y])} of the training loss and lr per step ("loss", "lr"),
    a tokenizer's per-step loss ("tokenizer loss") and the numbers of every epoch and eval record per epoch
    ("epoch loss", "top1", "pretrained/knn_mean", ...; a random-init baseline's are left out). A resumed run logs its
    steps again from the checkpoint: the last record of a step wins."""
    steps, tokenizer_steps, epochs = {}, {}, {}
    for line in Path(log_path).read_text().splitlines():
        record = json.loads(line)
        kind = record.get("kind")
        if kind == "step":
            steps[record["step"]] = record
        elif kind == "tokenizer_step":
            tokenizer_steps[record["step"]] = record
        elif kind in ("epoch", "eval"):
            numbers = flat_numbers(record)
            if kind == "epoch":
                numbers = {("epoch loss" if k == "loss" else k): v for k, v in numbers.items()}
            epochs.setdefault(record["epoch"], {}).update(
                {k: v for k, v in numbers.items() if not k.startswith("random_init/")})
    curves = {}
    for name, table, field in (("loss", steps, "loss"), ("lr", steps, "lr"), ("tokenizer loss", tokenizer_steps,
                                                                                "loss")):
        points = sorted((x, r[field]) for x, r in table.items() if field in r)
        if points:
            curves[name] = tuple(map(list, zip(*points)))  # ([steps], [values])
    for name in dict.fromkeys(k for numbers in epochs.values() for k in numbers):
        points = sorted((e, numbers[name]) for e, numbers in epochs.items() if name in numbers)
        curves[name] = tuple(map(list, zip(*points)))  # ([epochs], [values])
    return curves


def draw_panel(draw, box, title, xs, ys, xlabel):
    """One line chart in box (x0, y0, x1, y1): the curve, its title, and the x and y ranges at the axes' ends.
    A single point is drawn as a dot."""
    x0, y0, x1, y1 = box
    left, top, right, bottom = x0 + 52, y0 + 18, x1 - 8, y1 - 26  # the plotting area inside the labels
    draw.text((left, y0 + 3), title, fill="black")
    draw.rectangle((left, top, right, bottom), outline="grey")
    lo, hi = min(ys), max(ys)
    span_y, span_x = (hi - lo) or abs(hi) or 1.0, (max(xs) - min(xs)) or 1
    points = [(left + (x - min(xs)) / span_x * (right - left),
               bottom - (y - lo) / span_y * (bottom - top) if hi > lo else (top + bottom) / 2) for x, y in zip(xs, ys)]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    for x, y in points[:: max(1, len(points) // 40)] if len(points) < 60 else []:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(31, 119, 180))
    draw.text((x0 + 2, top - 4), f"{hi:.3g}", fill="black")
    draw.text((x0 + 2, bottom - 8), f"{lo:.3g}", fill="black")
    draw.text((left, bottom + 4), f"{xlabel} {min(xs):g}", fill="black")
    end = f"{max(xs):g}"
    draw.text((right - 6 * len(end), bottom + 4), end, fill="black")


def save_curves(log_path, path, title):
    """curves.png: a panel per curve of read_curves (loss and lr per step, then the epoch-level numbers), three to
    a row, under `title`. Nothing is written for a log without steps yet."""
    curves = read_curves(log_path)
    if not curves:
        return
    w, h, columns = 340, 190, 3
    rows = math.ceil(len(curves) / columns)
    image = Image.new("RGB", (w * min(columns, len(curves)), 20 + h * rows), "white")
    draw = ImageDraw.Draw(image)
    draw.text((6, 4), title, fill="black")
    for i, (name, (xs, ys)) in enumerate(curves.items()):
        x0, y0 = (i % columns) * w, 20 + (i // columns) * h
        per_step = name in ("loss", "lr", "tokenizer loss")
        draw_panel(draw, (x0, y0, x0 + w, y0 + h), name + (" per step" if per_step else " per epoch"), xs, ys,
                   "step" if per_step else "epoch")
    image.save(path)


# ---------------------------------------------------------------------------------------------------------------- #
#                                          visual tokens and their codebook                                          #
# ---------------------------------------------------------------------------------------------------------------- #
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
