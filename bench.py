"""bench.py: training speed, FLOPs, MFU and memory of every method file, and data-loading throughput (--loader).

`python bench.py` runs, for each method file present (mae.py, simmim.py, beit.py, beit2.py, sit.py, convmae.py,
igpt.py), the training step its main() runs, on random images already on the device (a method whose batches are
several views turns them into those with its own `bench_batch(imgs, cfg)`; data loading is measured apart, --loader):
    zero_grad(set_to_none) -> training_loss(model, imgs, cfg, generator) under autocast -> backward ->
    clip_grad_norm_ (when the method clips) -> AdamW step (fused)
with this step's masks drawn from a generator seeded per step, as in training. The config is the method's ImageNet
recipe with --model / --img-size / --patch-size / --batch-size replaced (a method whose paper sizes are not ViTs
maps the ViT name to its nearest one with `bench_model(name)`, and names its row with `bench_label(cfg)`: iGPT's
vit_base is iGPT-S, 24 x 512, reading 224-px crops at its native 32 x 32 pixels). Columns:
  params      trainable parameters.
  tokens/s    img/s x the sequence positions of one image (patches; iGPT: pixels of its n_px x n_px grid).
  GFLOP/img   matmul and convolution FLOPs (2 per multiply-add) counted by torch.utils.flop_counter.FlopCounterMode:
              "fwd" over one forward, "train" over one forward + backward (counted, not 3 x forward). Elementwise
              ops, norms, softmax and the optimizer are not counted (the usual MFU convention). Convolutions count
              what they compute: grouped and depthwise ones 1/groups of a dense one, in backward too (torch 2.14's
              formula counts a grouped conv's weight gradient as if dense; see conv_backward_flop).
  img/s       batch / median seconds of --steps timed steps, after 2 warm-up steps (the first allocates the
              optimizer state, and compiles). CUDA: a pair of CUDA events per step, read after one synchronize;
              CPU: time.perf_counter. Three ways: eager fp32, eager bf16 autocast, torch.compile + bf16 autocast;
              the bf16 two only where bf16 is fast (CUDA, CPUs with AMX or AVX512-BF16; --bf16 forces them).
  MFU         train FLOP per step / median step seconds / the matmul peak measured in this run in the same dtype
              (the fastest of 10 square matmuls, 8192^2 on CUDA, 2048^2 on the CPU, measured before and after the
              methods; the higher counts).
  compile s   the warm-up steps of the compiled model minus 2 steady-state steps: the compile time.
  peak mem    over the timed steps (the high-water mark is reset after the warm-up): CUDA: max_memory_allocated;
              CPU: the process's peak RSS (ru_maxrss after /proc/self/clear_refs; the whole process, so it includes
              the Python/torch runtime and, for the compiled column, what the compiler keeps).
torch.compile is on by default on CUDA and off on the CPU (--compile / --no-compile), as in training: on 2 CPU
cores compiling one base model takes minutes. `--preset demo` times each method at the size its bare
`python METHOD.py` trains instead, and with --compile adds a table of the steps after which compiling has paid for
itself next to the steps the demo runs. The compile time depends on the inductor cache: run once with
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) for a cold cache, then again with the same directory for a warm one.

`python bench.py --loader` measures the input pipelines in img/s: an ImageNet-style folder of JPEGs (--data-path,
else 500 x 375 at quality 90 written to a temporary folder) through the DataLoader path of common/data.py
(ResizedCropFlip: decode no larger than the crop needs + RandomResizedCrop(scale 0.2-1, bicubic) + flip to uint8)
with 0, 1, 2 workers, timed as the uint8 batches the workers deliver (a GPU normalises them in one operation of its
own), each 1- and 2-worker row followed by torchvision's pipeline on the same files (ImageFolder + the same
RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize in the workers, as the official MAE builds it); then a small 32 px set (synthetic, held in memory like CIFAR) through the DataLoader path and through
the resident path (ResidentData, augmented in batches on the device). Epoch 0 is the warm-up (worker start-up, page
cache; its time to first batch is reported apart); then --loader-epochs epochs are timed, each from its first
request to its last batch, and a row's img/s is their median. The run ends with `speedup N.NNx`: ours / torchvision
img/s with the same workers, the mean over 1 and 2 workers.

`python bench.py --memory` measures the memory each method's ImageNet recipe needs, per GPU and on the host.
GPU: one training forward at two small batches on the CPU under bf16 autocast, as a GPU runs it, counting every byte
saved for backward (torch.autograd.graph.saved_tensors_hooks, each storage once; the GPU's fused attention stands in
for the CPU's bf16 one), without and with activation checkpointing (--grad-checkpointing), as fixed + per image; plus
the input batch and the state: fp32 weights, gradients, DDP's gradient buckets and AdamW's two moments per trainable
parameter, frozen teachers and tokenizers at their size. The table gives the largest per-GPU batch within 90 % of
80 GB (GPU_BUDGET) and whether the recipe's per-GPU batch, with its preset's checkpointing, fits. Host (unless
--no-host-memory): the peak RSS of the fp32 training step (as above, fp32 column) at two batch sizes
(--memory-batches), each in a process of its own (the high-water mark of one process would carry over), fitted as
fixed + per image. These are the `host_memory_gib` of each file's Config, which --help's preset table and the run's
memory check use.

Run:     python bench.py                    # every method, ViT-B/16 at 224 px, batch 64 on CUDA, 8 on the CPU
         python bench.py --methods mae --model vit_large --batch-size 128 --json bench-large.json
         python bench.py --methods mae,igpt --steps 3
         python bench.py --preset demo --compile   # each demo's model: does torch.compile pay off within the demo?
         python bench.py --loader           # data-loading throughput
         python bench.py --loader --data-path ~/photos --loader-epochs 5   # a folder of your own images
         python bench.py --memory           # GPU and host memory of each ImageNet recipe (fixed + per image)
Results: docs/PERFORMANCE.md (each table with its machine, torch version and command).
"""
import argparse
import dataclasses
import gc
import importlib
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from PIL import Image, ImageDraw
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count
from torchvision import datasets
from torchvision import transforms as T

from common import UserError
from common.data import (IMAGENET_MEAN, IMAGENET_STD, SYNTHETIC_CLASSES, ArrayDataset, LoaderData, ResidentData,
                         ResizedCropFlip, SyntheticDataset, build_dataset, mix_seed, render_synthetic)
from common.training import (cli, cpu_has_fast_bf16, param_groups, parse_config, reuse_freed_host_memory,
                             setup_distributed)
from common.vit import VIT_SIZES, count_params, set_grad_checkpointing

ROOT = Path(__file__).resolve().parent
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist: --quality's data
METHODS = ("mae", "simmim", "beit", "beit2", "sit", "convmae", "igpt")  # benchmarked when <name>.py exists
WARMUP_STEPS = 2
PRECISIONS = (  # (name, autocast dtype or None, torch.compile)
    ("fp32", None, False),
    ("bf16", torch.bfloat16, False),
    ("compiled_bf16", torch.bfloat16, True),
)


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      flags                                                         #
# ---------------------------------------------------------------------------------------------------------------- #
class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each flag's default to its help, except where the help already says what the default is."""

    def _get_help_string(self, action):
        return action.help if "(default:" in action.help else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage="python bench.py [--loader] [flags]",
                                formatter_class=HelpWithDefaults)
    p.add_argument("--methods", default="", help="comma list, e.g. mae,simmim (default: every method file present)")
    p.add_argument("--preset", choices=("imagenet", "demo"), default="imagenet",
                   help="imagenet: each method's ImageNet recipe at --model / --img-size / --patch-size; demo: the "
                        "model, input and batch that a bare `python METHOD.py` trains (its demo preset), with the "
                        "steps of that run, so that --compile shows whether compiling pays off within it")
    p.add_argument("--model", default=argparse.SUPPRESS,  # absent unless given: --preset demo refuses it
                   help=f"encoder size: {', '.join(VIT_SIZES)} (default: vit_base)")
    p.add_argument("--img-size", type=int, default=argparse.SUPPRESS, help="input resolution in pixels (default: 224)")
    p.add_argument("--patch-size", type=int, default=0, help="0 = the model's default")
    p.add_argument("--batch-size", type=int, default=0,
                   help="images per step (0: 64 on CUDA, 8 on the CPU, the preset's with --preset demo; --loader: "
                        "32 for JPEGs, 256 for 32 px)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per column (the median is reported)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile + bf16 (default: on for CUDA, off for the CPU)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="time the bf16 columns (default: where bf16 is fast: CUDA, CPUs with AMX or AVX512-BF16)")
    p.add_argument("--device", default="", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--json", default="", help="output file (default: bench.json, or bench_loader.json with --loader)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N steps of each method (eager, bf16 where it runs, else fp32) and print the top "
                        "ops by their share of the step")
    p.add_argument("--loader", action="store_true", help="measure data loading instead of training steps")
    p.add_argument("--memory", action="store_true",
                   help="measure each ImageNet recipe's memory: on a GPU (bytes saved for backward under bf16 "
                        "autocast, counted on the CPU, + weights, gradients and AdamW state; the largest per-GPU "
                        "batch) and on the host (CPU, fp32, at --memory-batches), each fitted as fixed + per image")
    p.add_argument("--memory-batches", default="4,8", help="--memory: the two batch sizes of the host table")
    p.add_argument("--host-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="--memory: also the host table (a bench.py process per method and batch: minutes each)")
    p.add_argument("--loader-images", type=int, default=256, help="--loader: JPEGs in the temporary folder")
    p.add_argument("--data-path", default="",
                   help="--loader: time this folder of images (class subfolders or flat; with train/, its train/) "
                        "instead of generated JPEGs (default: a temporary folder of --loader-images); --quality: "
                        f"Fashion-MNIST's IDX files, {FASHION_MNIST} if not given")
    p.add_argument("--loader-epochs", type=int, default=1,
                   help="--loader: epochs timed per row after the warm-up one (img/s: their median)")
    p.add_argument("--small-images", type=int, default=4096, help="--loader: images of the 32 px set")
    p.add_argument("--quality", action="store_true",
                   help="compare the methods under one protocol (pre-training, monitors, fine-tuning on "
                        "Fashion-MNIST) and write the table into --quality-doc and results.png beside it")
    p.add_argument("--quality-epochs", type=int, default=2, help="--quality: pre-training epochs of every method")
    p.add_argument("--quality-finetune-epochs", type=int, default=5, help="--quality: fine-tuning epochs")
    p.add_argument("--quality-out", default="runs/quality", help="--quality: the runs' folder (runs found there are "
                                                                   "reused, stopped ones continued)")
    p.add_argument("--quality-doc", default=str(ROOT / "docs" / "RESULTS.md"),
                   help="--quality: the markdown file that receives the table (results.png goes beside it)")
    p.add_argument("--quality-flags", default="", help="--quality: flags appended to every pre-training command")
    p.add_argument("--quality-finetune-flags", default="",
                   help="--quality: flags appended to every finetune.py command")
    p.add_argument("--seed", type=int, action="append", dest="seeds",
                   help="--quality: a seed of every row; give it twice for a spread (default: 0)")
    args = p.parse_args(argv)
    if args.profile < 0:
        raise UserError(f"--profile must not be negative, got {args.profile}")
    if args.preset == "demo" and ("model" in args or "img_size" in args or args.patch_size):
        raise UserError("--preset demo benchmarks each demo's own model and input; --model, --img-size and "
                        "--patch-size set the sizes of --preset imagenet")
    args.model, args.img_size = getattr(args, "model", "vit_base"), getattr(args, "img_size", 224)
    if args.data_path and not os.path.isdir(args.data_path) and not args.quality:
        raise UserError(f"--data-path {args.data_path} is not a folder")
    args.data_path = args.data_path or (FASHION_MNIST if args.quality else "")
    args.seeds = args.seeds or [0]
    if args.quality and (args.quality_epochs <= 0 or args.quality_finetune_epochs <= 0):
        raise UserError("--quality-epochs and --quality-finetune-epochs must be positive")
    for name in ("img_size", "steps", "loader_images", "small_images", "loader_epochs"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.batch_size < 0 or args.patch_size < 0:
        raise UserError("--batch-size and --patch-size must not be negative")
    if args.model not in VIT_SIZES:
        raise UserError(f"unknown model {args.model!r}; choose from {', '.join(VIT_SIZES)}")
    try:
        torch.device(args.device or "cpu")
    except RuntimeError:
        raise UserError(f"unknown device {args.device!r}; use cpu, cuda or cuda:N") from None
    return args


def select_methods(names):
    """The methods to benchmark: the --methods list, or every one of METHODS whose file exists."""
    if not names:
        return [m for m in METHODS if (ROOT / f"{m}.py").exists()]
    chosen = [m.strip() for m in names.split(",") if m.strip()]
    for m in chosen:
        if m not in METHODS:
            raise UserError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if not (ROOT / f"{m}.py").exists():
            raise UserError(f"{m}.py does not exist (yet)")
    return chosen


def method_config(module, args):
    """The method's ImageNet recipe with the benchmark's sizes, or (--preset demo) its demo preset with only the
    batch replaced when --batch-size is given; check() turns a bad size into one clear line."""
    if args.preset == "demo":  # the command line of a bare run, parsed as the method file parses it
        return parse_config(module.Config, module.PRESETS, ["--batch-size", str(args.batch_size)] if args.batch_size
                            else [])[0]
    model = module.bench_model(args.model) if hasattr(module, "bench_model") else args.model
    overrides = dict(model=model, img_size=args.img_size, batch_size=args.batch_size,
                     patch_size=args.patch_size or VIT_SIZES[args.model][3])
    cfg = module.Config(**{**module.PRESETS.get("imagenet", {}), **overrides})
    cfg.check()
    return cfg


# ---------------------------------------------------------------------------------------------------------------- #
#                                                    hardware                                                        #
# ---------------------------------------------------------------------------------------------------------------- #
def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def hardware(device):
    cpu = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host: {cpu}"
    return cpu


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's RSS high-water mark, which ru_maxrss reports
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # elsewhere the number stays the peak since the process started
        pass


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / 2 ** 20 / (1024 if sys.platform == "darwin" else 1)


# ---------------------------------------------------------------------------------------------------------------- #
#                                               counting and timing                                                  #
# ---------------------------------------------------------------------------------------------------------------- #
def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                       _output_padding, _groups, output_mask, out_shape=None, **kwargs):
    """FLOPs of a convolution's backward: each gradient asked for (input, weight) costs what the forward does, as
    for a matmul: the input gradient is the transposed convolution of grad_out with the same weights, and every
    weight [C_out, C_in / groups, k, k] meets the same batch x positions in its gradient as in the forward.
    torch 2.14's formula counts the weight gradient as a dense convolution of x with grad_out, C_in x C_out x ...,
    without the 1 / groups the weight shape carries in the forward: a depthwise conv's weight gradient would read
    C times too large (C = 256-384 channels in ConvMAE-B), and the MFU above 100 % (fixed upstream after 2.14: that
    term is divided by groups)."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)  # grad_out has the forward's shape
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(forward):
    """(forward FLOPs, forward + backward FLOPs) of `forward()` -> scalar loss, one pass.

    FlopCounterMode has formulas for the CUDA attention kernels but none for the CPU's fused SDPA kernel
    (`_scaled_dot_product_flash_attention_for_cpu`), which it would count as 0; under the math backend SDPA is two
    counted batched matmuls on every device, 2*T*T*d each per head, and 2x that in backward. Convolution backward
    goes through conv_backward_flop (grouped convolutions)."""
    mapping = {torch.ops.aten.convolution_backward: conv_backward_flop}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        loss = forward()
        fwd = counter.get_total_flops()
        loss.backward()
    return fwd, counter.get_total_flops()


def run_steps(step, first, n, device):
    """Call step(i) for i = first .. first+n-1; the seconds each took. CUDA: events around each step, read after one
    synchronize at the end (no host sync between steps, as in training)."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for i, (start, end) in enumerate(events, first):
            start.record()
            step(i)
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1000 for start, end in events]
    seconds = []
    for i in range(first, first + n):
        t = time.perf_counter()
        step(i)
        seconds.append(time.perf_counter() - t)
    return seconds


def matmul_peak(device, dtype, reps=10):
    """FLOP/s of a big square matmul in `dtype`, the fastest of `reps`: the denominator of MFU. The fastest, not the
    median: on a shared machine a neighbour only ever slows a matmul down, and a peak that dips with the noise
    made MFU swing by half (up to "100 %") between runs."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = run_steps(lambda i: a @ b, 0, WARMUP_STEPS + reps, device)[WARMUP_STEPS:]
    return 2 * n ** 3 / min(seconds)


# ---------------------------------------------------------------------------------------------------------------- #
#                                                 training steps                                                     #
def demo_steps(cfg):
    """Pre-training steps of the demo run on one process: epochs x full batches of its images (the synthetic
    set's pre-training split, or the preset's --subset of it), as ResidentData counts them."""
    images = cfg.subset or len(SyntheticDataset("pretrain", cfg.img_size))
    return cfg.epochs * (images // cfg.batch_size)


# ---------------------------------------------------------------------------------------------------------------- #
def bench_method(module, cfg, args, device):
    """One table row: build the method's model, count its FLOPs, then time the three ways of running it."""
    name = module.__name__
    torch.manual_seed(0)
    model = module.build_model(cfg).to(device)
    model.train()
    # the optimizer's hyper-parameters do not change its cost; fused is the fastest AdamW on CUDA and on the CPU
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.blr, fused=True)
    imgs = bench_batch(module, cfg, device)
    generator = torch.Generator(device=device)

    def masks(step):  # this step's masks, as Run.step_generator: a function of (seed, step)
        return generator.manual_seed(mix_seed(cfg.seed, 0, step))

    fwd, train = count_flops(lambda: module.training_loss(model, imgs, cfg, masks(0)))
    optimizer.zero_grad(set_to_none=True)
    label = (module.bench_label(cfg) if hasattr(module, "bench_label") else
             f"{cfg.model}/{cfg.patch_size} {cfg.img_size}px")
    row = {"method": name, "model": f"{label} batch {cfg.batch_size}",
           "params": count_params(model), "tokens_per_img": tokens_per_image(module, cfg),
           "fwd_gflop_per_img": fwd / cfg.batch_size / 1e9,
           "train_gflop_per_img": train / cfg.batch_size / 1e9}
    if args.preset == "demo":
        row["run_steps"] = demo_steps(cfg)
    for precision, dtype, compiled in PRECISIONS:
        if (compiled and not args.compile) or (dtype is not None and not args.bf16):
            row[precision] = None
            continue
        net = torch.compile(model) if compiled else model

        def step(i):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is not None):
                loss = module.training_loss(net, imgs, cfg, masks(i))
            loss.backward()
            if cfg.clip_grad:  # as main() does
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()

        t = time.perf_counter()
        run_steps(step, 0, WARMUP_STEPS, device)
        synchronize(device)
        warmup_s = time.perf_counter() - t
        reset_peak_memory(device)  # the peak of the timed steps: steady state, not the compiler's
        seconds = statistics.median(run_steps(step, WARMUP_STEPS, args.steps, device))
        row[precision] = {"img_s": cfg.batch_size / seconds, "step_ms": seconds * 1e3,
                          "train_flop_s": train / seconds,
                          "peak_mem_gib": peak_memory_gib(device)}
        if args.profile and not compiled and (dtype is not None) == args.bf16:
            row["profile"] = {"precision": precision, "steps": args.profile,
                              "ops": profile_ops(step, WARMUP_STEPS + args.steps, args.profile, device)}
        if compiled:
            row[precision]["compile_s"] = warmup_s - WARMUP_STEPS * seconds
            torch._dynamo.reset()  # drop the compiled graphs before the next method
        print(f"  {name} {precision}: {row[precision]['img_s']:.1f} img/s", flush=True)
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def profile_ops(step, first, n, device, top=15):
    """torch.profiler over n steps: the `top` ops by self time (device time on CUDA, CPU time otherwise), each as
    (name, calls per step, ms per step, share of the step's summed self time)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run_steps(step, first, n, device)
        synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events)
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [{"op": e.key, "calls": e.count / n, "ms": getattr(e, key) / n / 1e3, "share": getattr(e, key) / total}
            for e in events[:top]]


def profile_table(row):
    """A method's profile as a table: the top ops and their share of the step."""
    prof = row["profile"]
    lines = [f"{row['method']} {row['model']}, {prof['precision']}, {prof['steps']} profiled steps:",
             "| op | calls / step | ms / step | share of the step |", "|---|---|---|---|"]
    lines += [f"| `{o['op']}` | {o['calls']:.0f} | {o['ms']:.1f} | {o['share']:.1%} |" for o in prof["ops"]]
    return "\n".join(lines)


def bench_batch(module, cfg, device):
    """What the method's training_loss takes as its images: random images [B, 3, H, W] on the device, or the
    method's own `bench_batch(imgs, cfg)` of them (e.g. several views, as its data pipeline yields)."""
    imgs = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device)
    return module.bench_batch(imgs, cfg) if hasattr(module, "bench_batch") else imgs


def tokens_per_image(module, cfg):
    """Sequence positions per image: the method's own count (iGPT: one per pixel of its n_px grid) or the patches."""
    if hasattr(module, "tokens_per_image"):
        return module.tokens_per_image(cfg)
    return (cfg.img_size // cfg.patch_size) ** 2


def training_table(rows):
    head = ("| method | model | params (M) | fwd GFLOP/img | train GFLOP/img | fp32 img/s | fp32 tokens/s | fp32 MFU "
            "| bf16 img/s | bf16 tokens/s | bf16 MFU | compiled bf16 img/s | compiled MFU | compile s "
            "| peak mem GiB fp32 / bf16 / compiled |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        def cell(precision, key, fmt):
            return fmt.format(r[precision][key]) if r[precision] else "—"

        def tokens(precision):
            return f"{r[precision]['img_s'] * r['tokens_per_img']:.0f}" if r[precision] else "—"
        compiled = (cell("compiled_bf16", "img_s", "{:.1f}") if r["compiled_bf16"] else
                    "not run (use --compile)" if r["bf16"] else "—")
        lines.append("| " + " | ".join([
            r["method"], r["model"], f"{r['params'] / 1e6:.2f}", f"{r['fwd_gflop_per_img']:.2f}",
            f"{r['train_gflop_per_img']:.2f}", cell("fp32", "img_s", "{:.1f}"), tokens("fp32"),
            cell("fp32", "mfu", "{:.1%}"), cell("bf16", "img_s", "{:.1f}"), tokens("bf16"),
            cell("bf16", "mfu", "{:.1%}"), compiled,
            cell("compiled_bf16", "mfu", "{:.1%}"), cell("compiled_bf16", "compile_s", "{:.0f}"),
            " / ".join(cell(p, "peak_mem_gib", "{:.2f}") for p, _, _ in PRECISIONS)]) + " |")
    return "\n".join(lines)


def compile_table(rows):
    """--preset demo --compile: does compiling pay off within the demo? The steps after which the compile time is
    won back (compile s / the seconds each compiled step saves) next to the steps the demo runs."""
    lines = ["| method | model | bf16 step ms | compiled step ms | compile s | pays off after (steps) | demo steps |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        eager, compiled = r["bf16"]["step_ms"], r["compiled_bf16"]["step_ms"]
        saved_s = (eager - compiled) / 1e3
        after = f"{r['compiled_bf16']['compile_s'] / saved_s:.0f}" if saved_s > 0 else "never (not faster)"
        lines.append(f"| {r['method']} | {r['model']} | {eager:.1f} | {compiled:.1f} | "
                     f"{r['compiled_bf16']['compile_s']:.0f} | {after} | {r['run_steps']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------- #
#                                                     memory                                                         #
# ---------------------------------------------------------------------------------------------------------------- #
GPU_BYTES = 80e9  # an "80 GB" GPU counted as 80 x 10^9 bytes: a little less than such a card holds
GPU_HEADROOM = 0.10  # kept free: CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation, backward's gradients
GPU_BUDGET = GPU_BYTES * (1 - GPU_HEADROOM)
GPU_MEMORY_BATCHES = (2, 4)  # one forward at each; the bytes per image are the slope between them
# Per trainable parameter on each GPU: fp32 weight, fp32 .grad, DDP's fp32 gradient bucket (a copy unless
# gradient_as_bucket_view), AdamW's exp_avg and exp_avg_sq (fp32; every method's optimizer is AdamW)
TRAINABLE_BYTES = 4 + 4 + 4 + 2 * 4


def bench_memory(args):
    """--memory: the host table (`host_memory_rows`, unless --no-host-memory) and the GPU table (`gpu_memory_row`)."""
    if args.preset != "imagenet":
        raise UserError("--memory measures the ImageNet recipes; --preset demo sizes the training table")
    names = select_methods(args.methods)
    host = host_memory_rows(args, names) if args.host_memory else []
    gpu = []
    for name in names:
        module = importlib.import_module(name)
        recipe = module.Config(**module.PRESETS.get("imagenet", {}))  # the per-GPU batch of the ImageNet recipe
        cfg = method_config(module, argparse.Namespace(**{**vars(args), "batch_size": recipe.batch_size}))
        gpu.append(gpu_memory_row(module, cfg))
        print(f"  {name}: {gpu[-1]['need_gb']:.1f} GB at batch {cfg.batch_size}", flush=True)
    return {"host_rows": host, "gpu_rows": gpu}


def host_memory_rows(args, names):
    """One row per method: the fp32 training step's peak RSS at two batch sizes, each measured by a bench.py process
    of its own, and the line through them: fixed GiB + GiB per image."""
    b1, b2 = (int(b) for b in args.memory_batches.split(","))
    if not 0 < b1 < b2:
        raise UserError(f"--memory-batches needs two increasing batch sizes, got {args.memory_batches}")
    rows = []
    for name in names:
        peaks = []
        for batch in (b1, b2):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "row.json"
                subprocess.run([sys.executable, str(ROOT / "bench.py"), "--methods", name, "--batch-size", str(batch),
                                "--steps", "1", "--no-compile", "--no-bf16", "--device", "cpu", "--model", args.model,
                                "--img-size", str(args.img_size), "--json", str(out)], check=True,
                               stdout=subprocess.DEVNULL)
                row = json.loads(out.read_text())["rows"][0]
            peaks.append(row["fp32"]["peak_mem_gib"])
        per_image = (peaks[1] - peaks[0]) / (b2 - b1)
        module = importlib.import_module(name)
        rows.append({"method": name, "model": row["model"].rsplit(" batch", 1)[0], "batches": [b1, b2],
                     "peak_gib": peaks, "fixed_gib": peaks[0] - per_image * b1, "per_image_gib": per_image,
                     "recipe_batch": module.Config.batch_size, "stated": module.Config.host_memory_gib})
    return rows


class FusedAttentionStandIn(torch.autograd.Function):
    """What a GPU's fused attention (flash or memory-efficient SDPA) keeps for backward: q, k, v, the output, the
    fp32 log-sum-exp of each query's row [B, H, N] and the bias; common/vit.py's bf16 path on the CPU keeps the
    [B, H, N, N] attention instead. Forward only: it stands in while saved bytes are counted."""

    @staticmethod
    def forward(ctx, q, k, v, attn_bias, causal):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, is_causal=causal)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # [B, H, N]
        ctx.save_for_backward(q, k, v, out, lse, *([] if attn_bias is None else [attn_bias]))
        return out


def fused_attention_stand_in(q, k, v, attn_bias=None, causal=False):
    return FusedAttentionStandIn.apply(q, k, v, attn_bias, causal)


def block_modules(model):
    """The blocks `run_block` may checkpoint: the members of every block list held by a module that has a
    `grad_checkpointing` switch."""
    return [block for owner in model.modules() if hasattr(owner, "grad_checkpointing")
            for blocks in owner.children() if isinstance(blocks, torch.nn.ModuleList) for block in blocks]


def saved_bytes(module, model, cfg):
    """One training forward (the method's training_loss on bench_batch images, cfg.batch_size of them) on the CPU under
    bf16 autocast, as a GPU runs it (the GPU's attention kernel stands in for the CPU's bf16 one). Returns (bytes
    saved for backward, the most bytes one block call saves, bytes of the input batch). Each storage counts once
    (views share theirs); parameters and buffers count as state, not here. Under activation checkpointing a block
    keeps only its inputs: its backward runs its forward again, so one block's saved bytes come on top then."""
    state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved, block_bytes, start = {}, [0], []

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in state:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def enter(*_):
        start.append(sum(saved.values()))

    def leave(*_):
        block_bytes.append(sum(saved.values()) - start.pop())

    blocks = block_modules(model)
    hooks = [b.register_forward_pre_hook(enter) for b in blocks] + [b.register_forward_hook(leave) for b in blocks]
    batch = bench_batch(module, cfg, torch.device("cpu"))
    try:
        with mock.patch("common.vit.explicit_attention", fused_attention_stand_in), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
            loss = module.training_loss(model, batch, cfg, torch.Generator().manual_seed(cfg.seed))
    finally:
        for h in hooks:
            h.remove()
    del loss  # the graph holds the saved tensors, so their storages stayed distinct until now
    inputs = batch if isinstance(batch, (tuple, list)) else [batch]
    return sum(saved.values()), max(block_bytes), sum(t.nbytes for t in inputs)


def gpu_memory_row(module, cfg, batches=GPU_MEMORY_BATCHES):
    """What one GPU holds in a training step of cfg (its batch_size per GPU): the state (TRAINABLE_BYTES per
    trainable parameter; frozen ones, EMA teachers and tokenizers at their size), and without and with activation
    checkpointing the line fixed + per image (fixed_bytes, per_image_bytes) through two forwards (`saved_bytes`) of
    the bytes saved for backward plus the input batch (checkpointed: plus one block's recompute). Where
    cfg.grad_checkpointing is set (the preset), its need is the checkpointed one."""
    torch.manual_seed(0)
    model = module.build_model(cfg)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(t.nbytes for t in [*model.parameters(), *model.buffers()] if not t.requires_grad)
    state = trainable * TRAINABLE_BYTES + frozen
    line = {}
    for checkpointing in (False, True):
        set_grad_checkpointing(model, checkpointing)
        points = [saved_bytes(module, model, dataclasses.replace(cfg, batch_size=b)) for b in batches]
        saved, block, inputs = ([p[i] for p in points] for i in range(3))
        total = [s + x + (k if checkpointing else 0) for s, x, k in zip(saved, inputs, block)]
        per_image = (total[1] - total[0]) / (batches[1] - batches[0])
        line[checkpointing] = (total[0] - per_image * batches[0], per_image)  # (fixed, per image) bytes
    set_grad_checkpointing(model, cfg.grad_checkpointing)
    label = (module.bench_label(cfg) if hasattr(module, "bench_label") else
             f"{cfg.model}/{cfg.patch_size} {cfg.img_size}px")
    row = {"method": module.__name__, "model": label, "batch": cfg.batch_size, "accum_iter": cfg.accum_iter,
           "checkpointing": cfg.grad_checkpointing, "trainable_params": trainable, "state_bytes": state,
           "fixed_bytes": {"plain": line[False][0], "checkpointed": line[True][0]},
           "per_image_bytes": {"plain": line[False][1], "checkpointed": line[True][1]}}
    return gpu_fit(row)


def gpu_fit(row):
    """Adds to a gpu_memory_row: the bytes at its batch with its checkpointing (need_gb, fits: within GPU_BUDGET),
    and the largest batch within GPU_BUDGET without and with checkpointing."""
    def need(batch, kind):
        return row["state_bytes"] + row["fixed_bytes"][kind] + row["per_image_bytes"][kind] * batch

    def largest(kind):
        return max(0, int((GPU_BUDGET - need(0, kind)) // row["per_image_bytes"][kind]))
    kind = "checkpointed" if row["checkpointing"] else "plain"
    row["need_gb"] = need(row["batch"], kind) / 1e9
    row["fits"] = need(row["batch"], kind) <= GPU_BUDGET
    row["largest_batch"] = {k: largest(k) for k in ("plain", "checkpointed")}
    return row


def memory_table(result):
    """The host table (when measured) and the GPU table of a bench_memory result."""
    tables = []
    if result["host_rows"]:
        lines = ["| method | model | peak GiB at the two batches | fixed GiB | GiB per image | at the recipe's batch "
                 "| Config.host_memory_gib |", "|---|---|---|---|---|---|---|"]
        for r in result["host_rows"]:
            need = r["fixed_gib"] + r["per_image_gib"] * r["recipe_batch"]
            peaks = ", ".join(f"{p:.2f} (batch {b})" for p, b in zip(r["peak_gib"], r["batches"]))
            lines.append(f"| {r['method']} | {r['model']} | {peaks} | {r['fixed_gib']:.2f} "
                         f"| {r['per_image_gib']:.3f} | {need:.1f} (batch {r['recipe_batch']}) "
                         f"| {r['stated'] or '—'} |")
        tables.append("\n".join(lines))
    lines = [f"| method | model | params (M) | state GB | MB/image plain / checkpointed | largest batch in "
             f"{GPU_BUDGET / 1e9:.0f} GB plain / checkpointed | preset per-GPU batch | checkpointing | GB at that "
             f"batch | fits {GPU_BUDGET / 1e9:.0f} GB |", "|" + "---|" * 10]
    for r in result["gpu_rows"]:
        per_image = " / ".join(f"{r['per_image_bytes'][k] / 1e6:.1f}" for k in ("plain", "checkpointed"))
        largest = " / ".join(str(r["largest_batch"][k]) for k in ("plain", "checkpointed"))
        batch = f"{r['batch']}" + (f" (x {r['accum_iter']} accum)" if r["accum_iter"] > 1 else "")
        lines.append(f"| {r['method']} | {r['model']} | {r['trainable_params'] / 1e6:.1f} "
                     f"| {r['state_bytes'] / 1e9:.2f} | {per_image} | {largest} | {batch} "
                     f"| {'on' if r['checkpointing'] else 'off'} | {r['need_gb']:.1f} "
                     f"| {'yes' if r['fits'] else 'NO'} |")
    tables.append("\n".join(lines))
    return "\n\n".join(tables)


# ---------------------------------------------------------------------------------------------------------------- #
#                                                  data loading                                                      #
# ---------------------------------------------------------------------------------------------------------------- #
def write_jpegs(root, n):
    """n JPEGs of 500 x 375 (a typical ImageNet photo) at quality 90 in one folder per class: synthetic shapes
    rendered at 500 px (textured, with sensor noise, so they compress like photos rather than flat colour) and
    cropped to 375 rows."""
    for i in range(n):
        img, label = render_synthetic(i, 500, seed=0)
        folder = root / SYNTHETIC_CLASSES[label].replace(" ", "_")
        folder.mkdir(exist_ok=True)
        Image.fromarray(img[:375]).save(folder / f"{i:05d}.jpg", quality=90)


def time_epochs(loaders, device, epochs=1):
    """For each of `loaders` (objects with .epoch(e)): (seconds to the first batch of epoch 0, images of epochs
    1..epochs, their img/s). Epoch 0 is the warm-up: it starts the worker processes (persistent afterwards) and
    fills the page cache; each timed epoch runs from its first request to its last batch, and the img/s is the
    median over the timed epochs. The loaders take turns epoch by epoch, so that pipelines compared side by side
    share whatever else a shared machine runs meanwhile, and a burst of it moves one epoch, not the row."""
    first_batch_s, counts, rates = [], [[] for _ in loaders], [[] for _ in loaders]
    for data in loaders:
        t = time.perf_counter()
        batches = data.epoch(0)
        next(batches)
        first_batch_s.append(time.perf_counter() - t)
        for _ in batches:
            pass
    for epoch in range(1, epochs + 1):
        for k, data in enumerate(loaders):
            t = time.perf_counter()
            counts[k].append(sum(len(imgs) for imgs, _ in data.epoch(epoch)))
            synchronize(device)
            rates[k].append(counts[k][-1] / (time.perf_counter() - t))
    return [(first, sum(n), statistics.median(r)) for first, n, r in zip(first_batch_s, counts, rates)]


class FlatImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder over a folder without class subfolders: every image under it is class 0."""

    def find_classes(self, directory):
        return [""], {"": 0}  # the one class folder is the root itself (os.path.join(root, "") = root)


class TorchvisionLoader:
    """The reference pipeline: torchvision's ImageFolder with RandomResizedCrop + RandomHorizontalFlip + ToTensor +
    Normalize, through a DataLoader with shuffling, as the official MAE's main_pretrain.py builds it (scale (0.2, 1),
    bicubic: the law ResizedCropFlip follows). epoch(e) as LoaderData's, for time_epochs."""

    def __init__(self, root, img_size, batch_size, workers, device):
        crop = T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC)
        transform = T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        classes = any(d.is_dir() for d in os.scandir(root))
        self.dataset = (datasets.ImageFolder if classes else FlatImageFolder)(root, transform)
        self.loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                 pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=True)
        self.device = device

    def epoch(self, epoch):
        for imgs, labels in self.loader:
            yield imgs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


class WorkerBatches:
    """Our DataLoader's batches as its workers deliver them, uint8 [B, 3, S, S], for time_epochs: what a GPU
    receives, which then normalises the batch in one operation of its own (LoaderData.epoch); on a CPU-only bench
    that operation would run in the main process, beside the workers, and be timed as loading."""

    def __init__(self, data):
        self.data = data

    def epoch(self, epoch):
        self.data.sampler.set_epoch(epoch)
        return iter(self.data.loader)


def bench_loader(args, device):
    """The loader table: the JPEG folder (--data-path, else generated) through our DataLoader path with 0, 1, 2
    workers, and beside the 1- and 2-worker rows torchvision's reference pipeline on the same files; then the 32 px
    set both ways. Returns rows (ours), torchvision_rows and speedup (ours / torchvision img/s, the mean of the
    ratios at 1 and 2 workers: per worker, as both use the same number)."""
    rows, reference = [], []

    def measure(pipeline, workers, batch_size, *runs):
        """runs: (table, path, loader) each; the loaders are timed in turns, one row each into its table."""
        timings = time_epochs([loader for _, _, loader in runs], device, args.loader_epochs)
        for (table, path, _), (first_batch_s, n, img_s) in zip(runs, timings):
            table.append(dict(pipeline=pipeline, path=path, workers=workers, batch_size=batch_size, images=n,
                              img_s=img_s, first_batch_s=first_batch_s))
            print(f"  {pipeline}, {path}, {workers} workers: {img_s:.0f} img/s", flush=True)

    size = args.img_size
    with tempfile.TemporaryDirectory(prefix="bench-jpegs-") as tmp:
        if args.data_path:
            root, pipeline = args.data_path, f"JPEG folder {args.data_path} -> {size}"
        else:
            t = time.perf_counter()
            write_jpegs(Path(tmp), args.loader_images)
            print(f"wrote {args.loader_images} JPEGs (500x375, quality 90) to {tmp} in {time.perf_counter() - t:.1f}s")
            root, pipeline = tmp, f"JPEG folder 500x375 -> {size}"
        batch_size = args.batch_size or 32
        train = os.path.join(root, "train")  # the split build_dataset reads when there is one
        for workers in (0, 1, 2):
            ds = build_dataset("folder", "pretrain", data_path=root)
            ds.transform = ResizedCropFlip(size, (0.2, 1.0))
            runs = [(rows, "DataLoader", WorkerBatches(LoaderData(ds, batch_size, 0, 0, 1, workers, device)))]
            if workers:  # torchvision's with as many workers, in turns with ours
                runs.append((reference, "torchvision ImageFolder", TorchvisionLoader(
                    train if os.path.isdir(train) else root, size, batch_size, workers, device)))
            measure(pipeline, workers, batch_size, *runs)

    # the small set in memory as uint8, as CIFAR is: the same images through both paths
    images, labels = build_dataset("synthetic", "pretrain", img_size=32, subset=args.small_images).as_uint8()
    batch_size = args.batch_size or 256
    for workers in (0, 1, 2):
        ds = ArrayDataset(images.permute(0, 2, 3, 1).numpy(), labels.numpy(), len(SYNTHETIC_CLASSES))
        ds.transform = ResizedCropFlip(32, (0.2, 1.0))
        measure("synthetic 32 px in memory", workers, batch_size,
                (rows, "DataLoader", LoaderData(ds, batch_size, 0, 0, 1, workers, device)))
    measure("synthetic 32 px in memory", 0, batch_size, (rows, f"resident on {device}", ResidentData(
        images, labels, batch_size, 32, (0.2, 1.0), (3 / 4, 4 / 3), "bicubic", 0, 0, 1, device)))
    ours = {r["workers"]: r["img_s"] for r in rows[:3]}
    speedup = statistics.mean(ours[r["workers"]] / r["img_s"] for r in reference)
    return dict(rows=rows, torchvision_rows=reference, speedup=speedup)


def loader_table(rows, reference=()):
    """Our rows, each torchvision row right after ours with the same pipeline and workers."""
    lines = ["| pipeline | path | workers | batch | images timed | img/s | first batch s (incl. worker start-up) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        beside = [t for t in reference if (t["pipeline"], t["workers"]) == (r["pipeline"], r["workers"])]
        lines += [f"| {t['pipeline']} | {t['path']} | {t['workers']} | {t['batch_size']} | {t['images']} | "
                  f"{t['img_s']:.0f} | {t['first_batch_s']:.2f} |" for t in [r, *beside]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      main                                                          #
# ---------------------------------------------------------------------------------------------------------------- #
def bench_training(args, device):
    """The training table's numbers: the matmul peaks, then one row per method."""
    if args.preset == "imagenet":
        args.batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
    if args.compile is None:
        args.compile = device.type == "cuda"
    if args.bf16 is None:  # emulated bf16 (an AVX2-only CPU) runs matmuls far slower than fp32: nothing to learn
        args.bf16 = device.type == "cuda" or cpu_has_fast_bf16()
    modules = [importlib.import_module(m) for m in select_methods(args.methods)]
    if not modules:
        raise UserError(f"no method file found in {ROOT}")
    configs = [(module, method_config(module, args)) for module in modules]  # every size error before any timing
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if args.bf16 else {})}
    peaks = {name: matmul_peak(device, dtype) for name, dtype in dtypes.items()}
    rows = [bench_method(m, cfg, args, device) for m, cfg in configs]
    peaks = {name: max(peaks[name], matmul_peak(device, dtype)) for name, dtype in dtypes.items()}  # before and after
    for row in rows:  # MFU against the peak of the same dtype
        for precision, dtype, _ in PRECISIONS:
            if row[precision]:
                row[precision]["mfu"] = row[precision]["train_flop_s"] / peaks["bf16" if dtype else "fp32"]
    peaks.setdefault("bf16", None)
    return dict(peak_tflops={name: peak and peak / 1e12 for name, peak in peaks.items()},
                peak_mem=("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                          "process peak RSS (ru_maxrss) over the timed steps, incl. the Python/torch runtime"),
                steps=args.steps, warmup_steps=WARMUP_STEPS,
                rows=rows)


# ---------------------------------------------------------------------------------------------------------------- #
#                                    --quality: seven methods, one protocol                                          #
# ---------------------------------------------------------------------------------------------------------------- #
# Every method pre-trains the same encoder -- ViT-micro/4 (192 wide, 6 blocks, 3 heads) on 32 x 32 inputs, 8 x 8
# patches; ConvMAE: its hybrid at that width and depth with an 8-px total stride; iGPT: a decoder of that width and
# depth on the 8 x 8 pixels of the image downsampled, the same 64 positions -- on Fashion-MNIST (all 60,000
# training images, resized from 28 px), for the same images seen at the same batch, each with its method's lr rule
# (blr x batch / the method's divisor) and the small-data preset of its file for everything the protocol does not
# set. Then kNN (k = 20) and the linear monitor on frozen mean-pooled features (10,000 train / the 10,000 test
# images; iGPT: its best layer's), next to the same numbers of each encoder at its random initialisation, and
# finetune.py with one recipe for every encoder (MAE's small-image recipe, 10,000 labelled images), next to the
# same fine-tune of the same architecture from random initialisation ("its scratch": the encoders differ, e.g. BEiT's
# relative positions and layer scale, so each row has its own). BEiT v2's teacher is the MAE row's encoder.
QUALITY_METHODS = ("mae", "simmim", "beit", "beit2", "sit", "convmae", "igpt")
QUALITY_COMMON = ["--data", "fashion-mnist", "--model", "vit_micro", "--img-size", "32", "--patch-size", "4",
                  "--batch-size", "256", "--accum-iter", "1", "--eval-images", "10000", "--workers", "0"]
DVAE_STAGE = ["--vocab-size", "512", "--tokenizer-epochs", "1", "--tokenizer-batch-size", "128", "--tokenizer-lr",
              "2e-3", "--tokenizer-min-lr", "1e-4"]  # stage 1 of BEiT and BEiT v2: one epoch, 512 codes
QUALITY_FLAGS = {
    "mae": ["--decoder-dim", "128", "--decoder-depth", "2", "--decoder-heads", "4", "--blr", "1.5e-3"],
    "simmim": ["--mask-patch-size", "8", "--blr", "2e-3"],
    "beit": DVAE_STAGE + ["--dvae-stride", "4", "--dvae-hidden", "32", "--dvae-codebook-dim", "64",
                          "--dvae-kl-warmup", "0.2", "--dvae-temp-anneal", "0.5", "--blr", "2e-3"],
    "beit2": DVAE_STAGE + ["--blr", "2e-3"],  # + --teacher: the MAE row's encoder.pth
    "sit": ["--head-hidden-dim", "1024", "--blr", "2e-3"],
    "convmae": ["--patch-size", "8", "--decoder-dim", "128", "--decoder-depth", "2", "--decoder-heads", "4",
                "--blr", "1.5e-3", "--amp", "fp32"],  # (bf16 convolutions are slow on CPUs)
    "igpt": ["--model", "vit_micro", "--n-px", "8", "--palette-size", "16", "--palette-images", "2000",
             "--blr", "1e-3"],
}
QUALITY_FINETUNE = ["--recipe", "mae", "--img-size", "32", "--subset", "10000", "--warmup-epochs", "0.5",
                    "--workers", "0"]  # the pre-training's 32 px (Fashion-MNIST's own size is 28)
QUALITY_BEGIN, QUALITY_END = "<!-- bench.py --quality: table begin -->", "<!-- bench.py --quality: table end -->"


def quality_run(script, argv, out, log):
    """`python script argv --out out`, its output in `log`; skipped when out/results.json exists (a finished run),
    continued with --resume auto when out holds a checkpoint (a stopped one). Returns out/results.json."""
    results = out / "results.json"
    if results.exists():
        return json.loads(results.read_text())
    resume = ["--resume", "auto"] if (out / "checkpoint.pth").exists() else []
    command = [sys.executable, str(ROOT / script), *map(str, argv), "--out", str(out), *resume]
    print(f"  {shlex.join(command[1:])}  (> {log})", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        code = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0 or not results.exists():
        raise UserError(f"{script} exited {code} without {results}; see {log}")
    return json.loads(results.read_text())


def quality_seed(method, seed, args):
    """One method's row at one seed: pre-training (with its monitors), then finetune.py on its encoder. Returns the
    row's numbers."""
    root = Path(args.quality_out) / f"seed{seed}"
    budget = ["--epochs", args.quality_epochs, "--warmup-epochs", args.quality_epochs / 10, "--seed", seed]
    extra = ["--teacher", root / "mae" / "encoder.pth"] if method == "beit2" else []
    argv = [*QUALITY_COMMON, "--data-path", args.data_path, *QUALITY_FLAGS[method], *budget, *extra,
            *shlex.split(args.quality_flags)]
    pretrained = quality_run(f"{method}.py", argv, root / method, root / f"{method}.log")
    row = quality_numbers(method, pretrained, root / method)
    if method in ("mae", "simmim", "beit", "beit2", "sit", "convmae"):  # finetune.py's encoders (not iGPT's)
        for key, start, name in (("finetune", [], "finetune"), ("scratch", ["--random-init"], "finetune-random-init")):
            tuned = quality_run("finetune.py", ["--init", root / method / "encoder.pth", *start,
                                                *quality_finetune_flags(args)],
                                root / method / name, root / f"{method}-{name}.log")
            row[key] = tuned["top1"]
    return row


def quality_finetune_flags(args):
    return [*QUALITY_FINETUNE, "--epochs", args.quality_finetune_epochs, "--seed", 0,
            *shlex.split(args.quality_finetune_flags)]


def quality_numbers(method, results, out):
    """The table's numbers of a pre-training run from its results.json and log.jsonl."""
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["kind"] == "step"]
    done = [r for r in log if r["kind"] == "done"][-1]
    tokenizer_seconds = sum(r["seconds"] for r in log if r["kind"] == "tokenizer_epoch")
    config = json.loads((out / "config.json").read_text())
    evaluation = results["eval"]
    if method == "igpt":  # its per-layer monitors: the best layer's linear probe, the best layer's kNN
        pretrained, baseline = ({"knn": e["best_knn"], "linear": e["best_linear"]} for e in (
            evaluation["pretrained"], evaluation["random_init"]))
    else:
        pretrained, baseline = ({"knn": e["knn_mean"], "linear": e["linear_mean"]} for e in (
            evaluation["pretrained"], evaluation["random_init"]))
    images = results["global_step"] * config["batch_size"] * done["world_size"]
    return {"loss_start": steps[0]["loss"], "loss_end": results["final_loss"], "knn": pretrained["knn"],
            "linear": pretrained["linear"], "random_knn": baseline["knn"], "random_linear": baseline["linear"],
            "minutes": (done["seconds"] + tokenizer_seconds) / 60, "img_per_s": images / done["seconds"],
            "codes_used": results.get("tokenizer", {}).get("codes_used"),
            "perplexity": results.get("tokenizer", {}).get("perplexity")}


def spread(values, digits=1):
    """'mean' for one seed, 'mean ± half the range' for several, with `digits` decimals; '-' for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.{digits}f}" + (f" ± {(max(values) - min(values)) / 2:.{digits}f}" if len(values) > 1 else "")


def quality_table(rows):
    """The markdown table: a row per method, its seeds merged."""
    lines = ["| method | loss start -> end | kNN | linear | its random init: kNN, linear | fine-tune | its scratch | "
             "pre-training min | img/s | codebook use, perplexity |", "|---|---|---|---|---|---|---|---|---|---|"]
    for method, seeds in rows.items():
        cell = lambda key, digits=1: spread([s.get(key) for s in seeds], digits)  # noqa: E731
        codes = spread([s["codes_used"] * 100 for s in seeds if s["codes_used"] is not None], 0)
        codes = f"{codes} %, {cell('perplexity', 0)}" if codes != "-" else "-"
        lines.append(f"| {method} | {cell('loss_start', 3)} -> {cell('loss_end', 3)} | {cell('knn')} | "
                     f"{cell('linear')} | {cell('random_knn')}, {cell('random_linear')} | {cell('finetune')} | "
                     f"{cell('scratch')} | {cell('minutes')} | {cell('img_per_s', 0)} | {codes} |")
    return "\n".join(lines)


def save_results_chart(rows, path):
    """docs/results.png: for each method, bars of kNN, linear and fine-tune top-1 (mean over seeds), each crossed by
    a black line at the same number of the same encoder from its random initialisation (fine-tune: its scratch)."""
    metrics = (("knn", "random_knn", "kNN", (31, 119, 180)), ("linear", "random_linear", "linear", (255, 127, 14)),
               ("finetune", "scratch", "fine-tune", (44, 160, 44)))
    mean = lambda vs: sum(vs) / len(vs) if vs else None  # noqa: E731
    width, height, left, bottom, top = max(560, 120 * len(rows) + 90), 390, 50, 340, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), "Fashion-MNIST top-1 %, bench.py --quality", fill="black")
    draw.text((left, 24), "black line on each bar: the same encoder from random init (fine-tune: from scratch)",
              fill="black")
    y = lambda v: bottom - v / 100 * (bottom - top)  # noqa: E731
    for v in range(0, 101, 20):
        draw.line((left, y(v), width - 10, y(v)), fill=(230, 230, 230))
        draw.text((8, y(v) - 6), str(v), fill="black")
    for i, (method, seeds) in enumerate(rows.items()):
        x0 = left + 15 + i * 120
        for j, (key, reference, _, colour) in enumerate(metrics):
            value, base = (mean([s[k] for s in seeds if s.get(k) is not None]) for k in (key, reference))
            if value is not None:
                draw.rectangle((x0 + j * 30, y(value), x0 + j * 30 + 26, bottom), fill=colour)
            if base is not None:
                draw.line((x0 + j * 30 - 2, y(base), x0 + j * 30 + 28, y(base)), fill="black", width=3)
        draw.text((x0, bottom + 6), method, fill="black")
    for j, (_, _, name, colour) in enumerate(metrics):
        draw.rectangle((left + j * 110, height - 22, left + j * 110 + 10, height - 12), fill=colour)
        draw.text((left + j * 110 + 14, height - 23), name, fill="black")
    image.save(path)


def write_quality_doc(path, table, command, machine):
    """The table, its command and machine, between the QUALITY markers of `path` (added at its end if absent)."""
    block = f"{QUALITY_BEGIN}\n{machine}; `{command}`\n\n{table}\n{QUALITY_END}"
    text = path.read_text() if path.exists() else ""
    if QUALITY_BEGIN in text:
        text = text[:text.index(QUALITY_BEGIN)] + block + text[text.index(QUALITY_END) + len(QUALITY_END):]
    else:
        text += ("\n" if text else "") + block + "\n"
    path.write_text(text)


def bench_quality(args):
    """Every row of the protocol at every --seed (a finished run is reused, a stopped one continued), then the table
    in --quality-doc and results.png beside it."""
    methods = select_methods(args.methods)
    if "beit2" in methods and "mae" not in methods:
        methods.insert(0, "mae")  # BEiT v2's teacher
    rows = {}
    for method in methods:
        for seed in args.seeds:
            print(f"{method}, seed {seed}:", flush=True)
            rows.setdefault(method, []).append(quality_seed(method, seed, args))
    table = quality_table(rows)
    doc = Path(args.quality_doc)
    write_quality_doc(doc, table, shlex.join(["python", Path(sys.argv[0]).name, *sys.argv[1:]]),
                      hardware(torch.device("cpu")))
    save_results_chart(rows, doc.parent / "results.png")
    return {"rows": rows, "table": table}


def main():
    args = parse_args()
    t0 = time.perf_counter()
    device = setup_distributed(args.device).device
    reuse_freed_host_memory(device)  # as training does
    command = shlex.join(["python", *sys.argv])
    result = {"hardware": hardware(device), "torch": torch.__version__, "command": command, "device": str(device)}
    header = [f"hardware: {result['hardware']}", f"torch {torch.__version__}", f"command: {command}"]
    if args.loader:
        result.update(bench_loader(args, device))
        table = loader_table(result["rows"], result["torchvision_rows"])
    elif args.quality:
        result.update(bench_quality(args))
        table = result["table"]
    elif args.memory:
        result.update(bench_memory(args))
        table = memory_table(result)
    else:
        result.update(bench_training(args, device))
        peaks = result["peak_tflops"]
        bf16 = f"{peaks['bf16']:.2f} TFLOP/s" if peaks["bf16"] else "not run (--bf16 to force it)"
        header += [f"matmul peak (fastest of 10 square matmuls, before and after the methods): "
                   f"fp32 {peaks['fp32']:.2f} TFLOP/s, bf16 {bf16}", f"peak mem: {result['peak_mem']}"]
        table = training_table(result["rows"])
        table += "".join("\n\n" + profile_table(row) for row in result["rows"] if "profile" in row)
        timed = [row for row in result["rows"] if "run_steps" in row and row["compiled_bf16"]]
        if timed:
            table += "\n\n" + compile_table(timed)
    result["seconds"] = seconds = time.perf_counter() - t0
    path = Path(args.json or ("bench_loader.json" if args.loader else "bench_memory.json" if args.memory else
                              "bench_quality.json" if args.quality else "bench.json"))
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + "\n".join(header + [""]) + table)
    print(f"\n{seconds:.0f}s in all; wrote {path}")
    if args.loader:  # the last line: ours / torchvision img/s per worker, the mean over 1 and 2 workers
        print(f"speedup {result['speedup']:.2f}x")


if __name__ == "__main__":
    cli(main)
