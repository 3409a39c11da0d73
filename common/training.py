"""Training utilities shared by every method: config, distributed setup, lr schedule, optimizer groups, precision,
compile, checkpoints, logging, and the reliability pieces (exact resume, preemption, non-finite guard).

The training loop itself stays in each method's main(); `Run` holds the state that loop needs around it.
"""
import argparse
import ctypes
import dataclasses
import datetime
import inspect
import io
import json
import math
import multiprocessing
import os
import pickle
import random
import re
import signal
import sys
import tempfile
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import UserError
from .data import DATASETS, available_host_memory, class_list, default_workers, mix_seed
from .vit import VIT_SIZES


# ---------------------------------------------------------------------------------------------------------------- #
#                                                      config                                                        #
# ---------------------------------------------------------------------------------------------------------------- #
@dataclass
class TrainConfig:
    """Flags every method accepts. A method subclasses this with its own fields and paper defaults; the comment
    after each field is its --help text. Fields not given on the command line come from the method's preset for
    the dataset's scale (demo / small / medium / imagenet), then from these defaults."""
    lr_batch_div: typing.ClassVar[int] = 256  # lr = blr x global batch / this (SimMIM uses 512)
    # Host memory of one training process on a CPU at the class defaults (the ImageNet recipe) in fp32, in GiB:
    # (fixed, per image of --batch-size), as `python bench.py --memory` measures it; None: not measured.
    host_memory_gib: typing.ClassVar[typing.Optional[tuple]] = None

    data: str = "synthetic"  # dataset: synthetic, imagenet, folder, cifar10, cifar100, stl10, mnist, fashion-mnist
    data_path: str = ""  # dataset root (imagenet/folder: train/ and val/ class folders; torchvision sets: their files)
    out: str = ""  # output folder (default runs/<method>-<data>-<time>)
    model: str = "vit_base"  # encoder: vit_tiny, vit_small, vit_base, vit_large, vit_huge (vit_nano, vit_micro: tests, demo)
    img_size: int = 224  # input resolution in pixels
    patch_size: int = 0  # ViT patch size (0 = the model's default: 16, or 14 for vit_huge)
    epochs: int = 800  # pre-training epochs
    batch_size: int = 64  # images per process per step
    accum_iter: int = 1  # micro-steps per optimizer step (global batch = batch-size x processes x accum-iter)
    blr: float = 1.5e-4  # base learning rate, scaled by global batch / 256
    lr: typing.Optional[float] = None  # absolute learning rate (overrides --blr)
    min_lr: float = 0.0  # floor of the cosine schedule
    warmup_epochs: float = 40  # linear warm-up from 0, in (fractional) epochs
    weight_decay: float = 0.05  # AdamW weight decay (not on biases, norms, position tables)
    clip_grad: typing.Optional[float] = None  # clip the global gradient norm to this (none by default)
    amp: str = "auto"  # precision: bf16, fp16, fp32, auto (bf16 where fast, else fp16 on CUDA, fp32 on CPU)
    compile: typing.Optional[bool] = None  # torch.compile the model (default: on for CUDA, off for CPU)
    grad_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1/3 more compute
    workers: int = default_workers()  # DataLoader worker processes: this process's share of its cores by default
    resident: bool = True  # hold small datasets on the device and augment in batches (--no-resident: DataLoader)
    decode: str = "workers"  # where JPEGs are decoded: workers (PIL) or device (decode_jpeg in batches; nvJPEG on a GPU)
    skip_bad_images: bool = False  # list an unreadable image in <out>/bad_images.txt and use another (default: stop)
    seed: int = 0  # seed of init, data order, augmentation and masks
    resume: str = ""  # checkpoint to continue from, or "auto" for <out>/checkpoint.pth
    eval_only: bool = False  # only evaluate the --resume checkpoint
    eval_every: int = 0  # evaluate (kNN + linear probe) every N epochs, 0 = only at the end
    # --eval-images: a seeded draw with every class keeping its share. Unset, a --max-steps run (a smoke test) takes
    # 1000 train / 500 val images, so that its monitors end in about a minute, and any other run takes them all
    eval_images: typing.Optional[int] = None  # monitors: <= N train and N val images (0 = all; 1000/500 with --max-steps)
    finetune_epochs: int = 0  # after pre-training, fine-tune for N epochs (the file's FINETUNE recipe for the input size)
    finetune_baseline: bool = False  # also fine-tune the random-init encoder (same recipe, data and budget)
    max_steps: int = 0  # stop after this many steps in total (smoke tests), 0 = no cap
    ckpt_every_steps: int = 0  # also checkpoint every N steps (0 = only at epoch ends)
    log_every: int = 20  # progress/log every N steps (a host sync)
    subset: int = 0  # use N images of each split, a seeded draw with every class in proportion (0 = all)
    device: str = ""  # cpu, cuda, cuda:1 (default: cuda when available)

    def check(self):
        """Reject bad values with one clear line. Subclasses add their own checks and call this."""
        if self.data not in DATASETS:
            raise UserError(f"unknown dataset {self.data!r}; choose from {', '.join(DATASETS)}")
        if self.model not in VIT_SIZES:
            raise UserError(f"unknown model {self.model!r}; choose from {', '.join(VIT_SIZES)}")
        if self.amp not in ("auto", "bf16", "fp16", "fp32"):
            raise UserError(f"unknown --amp {self.amp!r}; choose from auto, bf16, fp16, fp32")
        if self.decode not in ("workers", "device"):
            raise UserError(f"unknown --decode {self.decode!r}; choose workers or device")
        if self.decode == "device" and DATASETS[self.data].in_memory:
            raise UserError(f"--decode device decodes image files (--data imagenet or folder); --data {self.data} "
                            f"is held in memory")
        for name in ("epochs", "batch_size", "accum_iter", "img_size", "log_every"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("patch_size", "workers", "max_steps", "ckpt_every_steps", "subset", "eval_every",
                     "finetune_epochs", "warmup_epochs", "weight_decay", "min_lr", "eval_images"):
            if (getattr(self, name) or 0) < 0:
                raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.blr <= 0 or (self.lr is not None and self.lr <= 0):
            raise UserError("the learning rate must be positive")
        if self.img_size % self.patch_size:
            raise UserError(f"--img-size {self.img_size} is not divisible by --patch-size {self.patch_size}")
        if self.eval_only and not self.resume:
            raise UserError("--eval-only needs --resume PATH (or auto)")
        if self.warmup_epochs >= self.epochs:  # the lr would rise all run long and never decay
            raise UserError(f"--warmup-epochs {self.warmup_epochs:g} is not shorter than --epochs {self.epochs}; "
                            f"give a shorter --warmup-epochs (presets set it for their full-length --epochs)")


def field_help(cls):
    """The trailing comment of each dataclass field, read from the source: the config is its own --help."""
    helps = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            for m in re.finditer(r"^\s+(\w+)\s*:[^=\n]+=[^#\n]*#\s*(.+)$", inspect.getsource(klass), re.M):
                helps[m.group(1)] = m.group(2).strip()
    return helps


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def memory_advice(cfg, processes, available_bytes):
    """One line when a CPU run at the ImageNet recipe (the Config defaults' model and size, whose need is measured)
    would need more host memory than is available, with the largest --batch-size that fits and the --accum-iter
    that keeps the global batch; None when it fits or there is no estimate."""
    cls = type(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    if cls.host_memory_gib is None or available_bytes is None or \
            (cfg.model, cfg.img_size) != (defaults["model"], defaults["img_size"]):
        return None
    fixed, per_image = cls.host_memory_gib
    need, available = processes * (fixed + per_image * cfg.batch_size), available_bytes / 2 ** 30
    if need <= available:
        return None
    per_step = cfg.batch_size * cfg.accum_iter  # images per process per update: kept by the suggestion
    fits = [b for b in range(1, cfg.batch_size)
            if per_step % b == 0 and processes * (fixed + per_image * b) <= available]
    line = (f"memory: this run needs about {need:.0f} GiB of host memory ({processes} x ({fixed:g} GiB + {per_image:g} "
            f"GiB per image x --batch-size {cfg.batch_size}), fp32), {available:.0f} GiB are available: ")
    if not fits:
        return line + "even one image per step does not fit; use a smaller --model or a machine with more memory"
    return line + f"--batch-size {fits[-1]} --accum-iter {per_step // fits[-1]} fits and keeps the global batch"


def presets_epilog(presets, cls=None):
    """--help's closing text: which preset each dataset takes, and every value each preset sets."""
    lines = ["Defaults above are those of a bare run (--data synthetic: the demo preset; 'imagenet:' gives the",
             "class default where the preset changes it). Another --data takes its scale's preset for every flag",
             "not given on the command line (--img-size: the dataset's native size unless the preset sets it):"]
    def flag(name, value):
        name = name.replace("_", "-")
        return (f"--{name}" if value else f"--no-{name}") if isinstance(value, bool) else f"--{name} {value}"

    need = cls.host_memory_gib if cls else None
    for scale, values in presets.items():
        names = ", ".join(name for name, info in DATASETS.items() if info.scale == scale)
        line = f"  {scale} ({names}):" + ("" if values else " the defaults (paper recipe)")
        for item in (flag(k, v) for k, v in values.items()):  # wrapped between flags, never inside one
            if len(line) + 1 + len(item) > 100:
                lines.append(line)
                line = "     "
            line += " " + item
        lines.append(line)
        if scale == "imagenet" and need:
            batch = values.get("batch_size", cls.batch_size)
            lines.append(f"      needs ~{need[0] + need[1] * batch:.0f} GiB of host memory per process on a CPU in fp32 "
                         f"({need[0]:g} + {need[1]:g} GiB/image x batch {batch})")
    lines.append("The resolved config is printed at start and saved to <out>/config.json.")
    return "\n".join(lines)


def build_parser(cls, description, presets=None):
    """One option per field (no aliases), its help from the field's comment, and the default a bare
    `python method.py` really uses: the demo preset's value where it sets one."""
    presets = presets or {}
    bare = presets.get(DATASETS[cls.data].scale, {})
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                     argument_default=argparse.SUPPRESS, epilog=presets_epilog(presets, cls) if presets else None)
    hints, helps = typing.get_type_hints(cls), field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in getattr(cls, "hidden", ()):  # a field this program does not use
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        text, default = helps.get(f.name, ""), bare.get(f.name, f.default)
        if default not in (None, ""):
            other = f.default not in (None, "", default)  # the preset changed it: give the class default too
            text += f" [default: {default}" + (f"; imagenet: {f.default}]" if other else "]")
        flag = f"--{f.name.replace('_', '-')}"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, help=text, metavar=kind.__name__.upper())
    return parser


# Fields that describe this invocation, never taken from the run being resumed (a resumed run goes on to the end of
# its schedule unless --max-steps is given again; the printed resume hint repeats it: `Run.resume_hint`).
NOT_RESUMED = ("resume", "eval_only", "max_steps")


def saved_config(cls, given):
    """With --resume, the settings of the run it continues: `<out>/config.json` for `--resume auto` (none yet: a
    requeued job's first start), the checkpoint's own for `--resume PATH`. Only fields of `cls` that the command
    line does not set; the lr is worked out again when a flag it depends on is given."""
    resume = given.get("resume")
    if not resume:
        return {}
    if resume == "auto":
        if "out" not in given:
            raise UserError("--resume auto needs --out DIR, the folder of the run to continue")
        path = Path(given["out"]) / "config.json"
        if not path.is_file():
            return {}
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
    else:
        ckpt = load_file(resume)
        saved = ckpt.get("config", {}) if isinstance(ckpt, dict) else {}
    fields = {f.name for f in dataclasses.fields(cls)}
    saved = {k: v for k, v in saved.items() if k not in ("method", "classes")} if isinstance(saved, dict) else None
    if saved is None or set(saved) - fields:
        return {}  # another method's run: Run.load names it
    if {"lr", "blr", "batch_size", "accum_iter"} & set(given):
        saved.pop("lr", None)  # scaled again from --blr and the global batch, as a fresh run with these flags would
    return {k: v for k, v in saved.items() if k not in given and k not in NOT_RESUMED}


def parse_config(cls, presets, argv=None, description=None):
    """Command line -> config. Precedence: command line > with --resume, the resumed run's saved config > the
    method's preset for the dataset's scale > defaults. Returns (config, the preset fields that were applied)."""
    return resolve_config(cls, given_settings(cls, argv, description, presets), presets)


def given_settings(cls, argv=None, description=None, presets=None):
    """The fields the command line sets, plus with --resume those of the run it continues (saved_config)."""
    given = vars(build_parser(cls, description, presets).parse_args(argv))
    return {**saved_config(cls, given), **given}  # `--resume auto --out DIR` alone continues the run as it was


def resolve_config(cls, given, presets):
    """The config from the given settings, the preset of the dataset's scale and the class defaults."""
    data = given.get("data", cls.data)
    if data not in DATASETS:
        raise UserError(f"unknown dataset {data!r}; choose from {', '.join(DATASETS)}")
    preset = {k: v for k, v in presets.get(DATASETS[data].scale, {}).items() if k not in given}
    native = DATASETS[data].native_size
    if native and "img_size" not in given and "img_size" not in preset:
        preset["img_size"] = native  # CIFAR trains at 32 px and MNIST at 28 unless the preset or the user says
    cfg = cls(**{**preset, **given})
    if cfg.model in VIT_SIZES and not cfg.patch_size:
        cfg.patch_size = VIT_SIZES[cfg.model][3]
    cfg.check()
    return cfg, preset


# ---------------------------------------------------------------------------------------------------------------- #
#                                         schedule, optimizer groups, precision                                      #
# ---------------------------------------------------------------------------------------------------------------- #
def cosine_lr(epoch, peak_lr, min_lr, warmup_epochs, epochs):
    """Per-iteration schedule of the official MAE (`util/lr_sched.py`): `epoch` is fractional (step / steps per
    epoch + epoch); linear warm-up from exactly 0, then a half cosine from the peak down to min_lr."""
    if epoch < warmup_epochs:
        return peak_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, lr):
    """Write lr into every group (times the group's layer-decay `lr_scale`, when it has one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def scaled_lr(cfg, global_batch):
    """The peak learning rate: --lr when given, else the linear scaling rule blr x global batch / lr_batch_div
    (256 for most methods; the method's config says when its paper scales otherwise)."""
    return cfg.lr if cfg.lr is not None else cfg.blr * global_batch / cfg.lr_batch_div


def param_groups(model, weight_decay, no_decay=()):
    """Two AdamW groups as timm's `add_weight_decay`: no decay on 1-D parameters (norms, layer scales) and biases
    and on the names in `no_decay`; frozen parameters (fixed sin-cos tables) are left out entirely."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if p.ndim <= 1 or name.endswith(".bias") or name in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def cpu_has_fast_bf16():
    """AMX or AVX512-BF16: CPUs that run bf16 matmuls natively, several times faster than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_amp(amp, device):
    """--amp -> torch dtype for autocast (None = fp32); fp16 only on CUDA."""
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs CUDA; use bf16 or fp32 on the CPU")
    if amp == "auto":
        if device.type == "cuda":  # native bf16 only (Ampere and newer): V100/T4 emulate it slowly, fp16 is fast there
            amp = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        else:
            amp = "bf16" if cpu_has_fast_bf16() else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp]


def use_fast_cuda_math(device):
    """On CUDA: fp32 matmuls and convolutions on TF32 tensor cores (as PyTorch < 1.12 did by default, and as the
    official repositories ran), and cuDNN autotuning for the fixed input shapes of training. No-op elsewhere."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, glibc's <malloc.h>


def reuse_freed_host_memory(device):
    """On the CPU: glibc's malloc keeps the memory that freed tensors held and hands it to the next ones, instead of
    returning every block above 128 KiB to the kernel (mmap / munmap) and page-faulting the next one in, zeroed, at
    every step; the peak memory stays the same (docs/PERFORMANCE.md). What jemalloc or tcmalloc under LD_PRELOAD
    would do, from inside the process. Returns whether it applied (glibc only; elsewhere a no-op)."""
    if device.type != "cpu":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): its allocator stays as it is
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def interactive():
    """Progress bars only on a terminal: under SLURM, CI or `> log` every redraw would be a line in the file."""
    return sys.stderr.isatty()


def speed(imgs_per_s):
    """Images per second for the logs; seconds per image where that rounds to 0 (a large model on a CPU)."""
    if imgs_per_s >= 10:
        return f"{imgs_per_s:.0f} img/s"
    return f"{imgs_per_s:.1f} img/s" if imgs_per_s >= 1 else f"{1 / max(imgs_per_s, 1e-9):.1f} s/img"


def progress(iterable=None, is_main=True, **kwargs):
    """A tqdm bar on rank 0 when stderr is a terminal; otherwise a silent pass-through (the caller logs lines)."""
    return tqdm(iterable, disable=not (is_main and interactive()), dynamic_ncols=True, leave=False, **kwargs)


def set_grad_sync(model, sync):
    """DDP: all-reduce gradients in the next backward only when `sync` (the last micro-step of an accumulation);
    the flag nanoGPT toggles instead of wrapping the step in `no_sync()`. No-op without DDP."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = sync


# ---------------------------------------------------------------------------------------------------------------- #
#                                                    distributed                                                     #
# ---------------------------------------------------------------------------------------------------------------- #
@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def resolve_device(device, world, local_rank):
    """--device -> torch.device. Under torchrun (world > 1) every process takes the GPU of its local rank, whatever
    index --device names: `--device cuda:0` on 8 processes would otherwise put all of them on GPU 0."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    return device


def setup_distributed(device=""):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: join the group (nccl on CUDA, gloo on CPU). A no-op for a
    plain `python script.py`."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = resolve_device(device, world, local)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda, but no CUDA device is available")
        torch.cuda.set_device(device)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                      timeout=datetime.timedelta(minutes=30))
    return Dist(rank, world, local, device)


def on_any_rank(flag, world_size, device):
    """Whether `flag` is true on any process (an all-reduce MAX on `device`, a host sync; `flag` itself in one
    process). Every rank must call it at the same point."""
    if world_size == 1:
        return bool(flag)
    value = torch.tensor(float(flag), device=device)
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
    return bool(value.item())


def barrier():
    if torch_dist.is_initialized():
        torch_dist.barrier()


# ---------------------------------------------------------------------------------------------------------------- #
#                                                    checkpoints                                                     #
# ---------------------------------------------------------------------------------------------------------------- #
def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: a crash at any point
    leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_file(path, what="checkpoint"):
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a pickle, or a torch file holding objects other than tensors and plain data
        raise UserError(f"cannot read {what} {path}: not a file of tensors and plain data saved by torch.save "
                        f"(this project's checkpoints are; a pickle of other objects is not loaded)") from None
    except Exception as e:  # truncated zip, not a torch file at all
        first = (str(e).splitlines() or [""])[0].split(". ")[0][:200]  # torch's first sentence says what broke
        raise UserError(f"cannot read {what} {path}: not a complete file saved by torch.save ({type(e).__name__}"
                        + (f": {first})" if first else ")")) from None


def state_dict_fits(model, state, what, show=3):
    """One line, `what` then the first missing, unexpected and mis-shaped keys, when `state` does not fit `model`
    (torch's own message spans many lines and its first says only which class failed)."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(ours[k].shape)} here" for k in ours
              if k in state and state[k].shape != ours[k].shape]
    problems = [f"{len(keys)} {what}: " + ", ".join(keys[:show]) + (", ..." if len(keys) > show else "")
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if keys]
    if problems:
        raise UserError(f"{what}: " + "; ".join(problems))


def gather_bytes(obj):
    """Every rank's `obj` (tensors and plain containers), on every rank, through torch.save bytes: all_gather_object
    cannot unpickle the generators' state tensors."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payloads = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(payloads, buf.getvalue())
    return payloads


def rng_state():
    """Python, numpy, torch and CUDA generator states, as plain tensors and tuples (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------------- #
#                                                 reliability pieces                                                 #
# ---------------------------------------------------------------------------------------------------------------- #
class Preempted(Exception):
    """Raised after a stop signal was honoured and the checkpoint written: the script exits 0."""


class NonFiniteError(Exception):
    """The loss or the gradients stopped being finite: the script exits 1 and keeps the last good checkpoint."""


class StopSignal:
    """SIGTERM / SIGINT (cluster preemption, Ctrl-C): the first asks the loop to finish its step, save and exit (the
    monitors at the end of a run: to stop at their next batch); a second one exits at once.
    Under torchrun one stop often arrives twice: Ctrl-C (or a scheduler's signal to the job) reaches the workers and
    torchrun, which forwards it to them at once. So there, a repeat within FORWARD_WINDOW seconds of the first
    counts as the same stop; torchrun ends the workers itself if they take more than 30 s to save."""

    FORWARD_WINDOW = 2.0

    def __init__(self, log):
        self.requested, self.log, self.first_at = False, log, None
        self.action = "finishing this step, then saving a checkpoint"  # what the first signal does, for its message
        self.under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.requested:
            if self.under_torchrun and time.monotonic() - self.first_at < self.FORWARD_WINDOW:
                return  # torchrun forwarding the signal this process got too
            signal.signal(signum, signal.SIG_DFL)  # a second signal: restore the default action and re-deliver it
            os.kill(os.getpid(), signum)
            return
        self.requested, self.first_at = True, time.monotonic()
        self.log(f"received {signal.Signals(signum).name}: {self.action} (send it again to exit at once)")


class NonFiniteGuard:
    """Remembers on the device the first step whose loss (or gradient norm) was not finite, without a host sync;
    `check()` (on log steps and before every checkpoint) raises NonFiniteError naming that step."""

    def __init__(self, device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, step, *values):
        bad = torch.stack([~torch.isfinite(v.detach().float()).all() for v in values]).any()
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step), self.first_bad)

    def check(self):
        step = int(self.first_bad)
        if step >= 0:
            raise NonFiniteError(step)


# ---------------------------------------------------------------------------------------------------------------- #
#                                                     the run                                                        #
# ---------------------------------------------------------------------------------------------------------------- #
class Run:
    """What the training loop needs around it: distributed setup, device, precision, output folder, logging,
    checkpoints (atomic, resumable), the stop-signal handler and the non-finite guard. Only rank 0 writes files.
    The loop itself says when it logs, checkpoints and stops (`log_step`, `should_stop`, `should_checkpoint`,
    `save_checkpoint`, `log_epoch`)."""

    def __init__(self, cfg, method, preset=None):
        """Sets up the process. Three config fields depend on where the run happens and are resolved here (and
        saved so in config.json): `cfg.out` (unset: runs/<method>-<data>-<time>), `cfg.compile` (unset: on for CUDA)
        and, under torchrun, a preset's `cfg.accum_iter` (its share per process, so the global batch stays the
        preset's). The learning rate is the method's to set: `scaled_lr(cfg, run.global_batch)`."""
        self.cfg, self.method = cfg, method
        self.dist = setup_distributed(cfg.device)
        self.device, self.is_main = self.dist.device, self.dist.is_main
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        if cfg.compile is None:
            cfg.compile = self.device.type == "cuda"
        use_fast_cuda_math(self.device)
        reuse_freed_host_memory(self.device)
        self.preset = preset or {}
        world = self.dist.world_size
        if "accum_iter" in self.preset and world > 1:  # the preset's global batch, whatever the process count
            cfg.accum_iter = max(1, round(self.preset["accum_iter"] / world))
            self.log(f"the preset's --accum-iter {self.preset['accum_iter']} is for one process: {cfg.accum_iter} per "
                     f"process with {world} processes (global batch {cfg.batch_size * world * cfg.accum_iter}, "
                     f"preset: {cfg.batch_size * self.preset['accum_iter']})")
        self.global_batch = cfg.batch_size * world * cfg.accum_iter
        advice = memory_advice(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", 1)), available_host_memory()) \
            if self.device.type == "cpu" else None
        if advice:
            self.log(advice)  # (before the first step; the kernel's out-of-memory kill would say only "Killed")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.out = Path(cfg.out or f"runs/{method}-{cfg.data}-{stamp}")
        cfg.out = str(self.out)
        self.ckpt_path = self.out / "checkpoint.pth"
        self.check_out_dir()
        random.seed(cfg.seed + self.dist.rank)
        np.random.seed(cfg.seed + self.dist.rank)
        torch.manual_seed(cfg.seed + self.dist.rank)
        self.stop = StopSignal(self.log)
        self.guard = NonFiniteGuard(self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.model = self.optimizer = None
        self.global_step, self.done, self.preempted, self.bar, self.log_file, self.last_loss = 0, False, False, None, None, None
        self.bar_extra = {}  # shown on the progress bar beside the step's numbers (finetune.py: the last validation)

    # ---- setup ------------------------------------------------------------------------------------------------
    def check_out_dir(self):
        """Refuse an --out that is a file, not writable, or that holds another run (unless resuming it)."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file, not a folder")
        probe = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
        try:  # try it rather than trust os.access (which says yes to root on read-only file systems)
            tempfile.TemporaryFile(dir=probe).close()
        except OSError:
            raise UserError(f"--out {out} is not writable") from None
        if self.ckpt_path.exists() and not self.cfg.resume:
            raise UserError(f"{out} already holds a run; pass --resume auto to continue it or choose another --out")

    def log(self, msg):
        if self.is_main:
            tqdm.write(msg)  # prints above a running progress bar
            sys.stdout.flush()  # reach a piped log (SLURM, tee) now, not at exit

    def start(self, model, optimizer):
        """Register what checkpoints hold, restore a --resume checkpoint, write config.json. Returns the
        (epoch, step) to start from: (0, 0) for a fresh run."""
        self.model, self.optimizer = model, optimizer
        epoch, step = 0, 0
        if self.cfg.resume == "auto" and not self.ckpt_path.exists() and not self.cfg.eval_only:
            self.log(f"--resume auto: no {self.ckpt_path} yet, starting a new run")  # a requeued job's first start
        elif self.cfg.resume:
            epoch, step = self.load(self.ckpt_path if self.cfg.resume == "auto" else Path(self.cfg.resume))
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            classes = class_list(self.cfg.data, self.cfg.data_path)  # what the labels 0, 1, ... of every split mean
            saved = {"method": self.method, **asdict(self.cfg), **({"classes": classes} if classes else {})}
            (self.out / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
            self.log_file = open(self.out / "log.jsonl", "a")
        if self.preset:
            self.log(f"preset for {self.cfg.data}: " + ", ".join(f"{k}={v}" for k, v in self.preset.items()))
        self.log("config: " + json.dumps(asdict(self.cfg)))
        self.log(f"{self.dist.world_size} process(es) on {self.device}, precision {self.cfg.amp} -> "
                 f"{self.amp_dtype or torch.float32}, global batch {self.global_batch}, lr {self.cfg.lr:.3g}")
        return epoch, step

    def wrap(self, model):
        """torch.compile (--compile) then DDP (when launched by torchrun): the module the loop calls."""
        if self.cfg.compile:
            t = time.perf_counter()
            model = torch.compile(model)
            self.log(f"torch.compile wrapped the model in {time.perf_counter() - t:.1f}s "
                     f"(compilation happens in the first steps)")
        if self.dist.world_size > 1:
            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def step_generator(self, step):
        """A generator seeded from (seed, rank, step): masks are a function of the step, so resume is exact."""
        g = torch.Generator(device=self.device)
        return g.manual_seed(mix_seed(self.cfg.seed, self.dist.rank, step))

    # ---- bookkeeping around the loop ---------------------------------------------------------------------------
    def start_epoch(self, epoch, start_step, steps_per_epoch):
        self.steps_per_epoch = steps_per_epoch
        self.epoch_loss = torch.zeros((), device=self.device)
        self.epoch_steps, self.epoch_t0 = 0, time.perf_counter()
        self.last_log_t, self.last_log_step = time.perf_counter(), epoch * steps_per_epoch + start_step
        self.epoch = epoch
        self.bar = progress(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch}", is_main=self.is_main,
                            postfix=self.bar_extra or None)
        self.optimizer.zero_grad(set_to_none=True)  # a partial accumulation of the previous epoch is discarded

    def log_step(self, epoch, step, loss, lr, grad_norm=None):
        """After micro-step `step` of `epoch`: the progress bar, the non-finite guard (no host sync), and every
        --log-every steps a loss line (the one host sync: the loss averaged over the processes)."""
        it = epoch * self.steps_per_epoch + step  # global micro-step
        self.global_step = it + 1
        checked = [loss] + ([grad_norm] if grad_norm is not None and not self.scaler.is_enabled() else [])
        self.guard.update(it, *checked)
        self.epoch_loss += loss.detach().float()
        self.epoch_steps += 1
        self.bar.update(1)
        if self.global_step % self.cfg.log_every and not (self.global_step == 1 or self.is_last_step(epoch, step)):
            return  # (a short run still shows its first and last loss)
        self.guard.check()
        loss = self.mean_over_ranks(loss.detach().float()).item()  # the host sync of this step
        now = time.perf_counter()
        imgs_per_s = (it + 1 - self.last_log_step) * self.cfg.batch_size * self.dist.world_size / (now - self.last_log_t)
        self.last_log_t, self.last_log_step = now, it + 1
        if self.bar.disable:  # not a terminal: one plain line per logged step instead of a redrawn bar
            self.log(f"step {it} (epoch {self.epoch}, {step + 1}/{self.steps_per_epoch}): loss {loss:.4f}, "
                     f"lr {lr:.2e}, {speed(imgs_per_s)}")
        else:
            self.bar.set_postfix(step=it, loss=f"{loss:.4f}", lr=f"{lr:.2e}", speed=speed(imgs_per_s), **self.bar_extra)
        self.write_log(kind="step", step=it, loss=loss, lr=lr, img_per_s=round(imgs_per_s, 1))

    def is_last_step(self, epoch, step):
        """Whether micro-step `step` of `epoch` is the run's last: the end of the last epoch, or --max-steps."""
        last_of_last_epoch = epoch + 1 == self.cfg.epochs and step + 1 == self.steps_per_epoch
        return last_of_last_epoch or self.global_step == self.cfg.max_steps

    def at_update(self, step):
        """Whether micro-step `step` ends an optimizer update (or the epoch): the only places a run may stop or
        checkpoint, so that no accumulation is cut in half."""
        return (step + 1) % self.cfg.accum_iter == 0 or step + 1 == self.steps_per_epoch

    def should_stop(self, step):
        """At an update: --max-steps reached (sets `done`) or a stop signal (SIGTERM/SIGINT, agreed by all ranks)."""
        if not self.at_update(step):
            return False
        self.preempted = self.stop_requested()
        self.done = bool(self.cfg.max_steps and self.global_step >= self.cfg.max_steps)
        if self.done:  # the epoch is cut short and not summarised: the final loss is the mean of its steps so far
            self.last_loss = self.mean_over_ranks(self.epoch_loss / max(self.epoch_steps, 1)).item()
        return self.preempted or self.done

    def resume_hint(self):
        """The flags that continue this run as it was: its config.json supplies the rest."""
        return f"--resume auto --out {self.out}" + (f" --max-steps {self.cfg.max_steps}" if self.cfg.max_steps else "")

    def should_checkpoint(self, step):
        """At an update, every --ckpt-every-steps steps (epoch ends always checkpoint)."""
        every = self.cfg.ckpt_every_steps
        return bool(every) and self.at_update(step) and self.global_step % every == 0

    def exit_if_preempted(self):
        """After a stop signal's checkpoint: end the process (exit 0); `--resume auto` continues from there."""
        if self.preempted:
            self.save_curves()
            self.log(f"stopped by signal after step {self.global_step - 1}; checkpoint saved to {self.ckpt_path}. "
                     f"Continue with {self.resume_hint()}")
            barrier()
            raise Preempted()

    def mean_over_ranks(self, value):
        """The mean of a tensor over the processes (the official `all_reduce_mean`); itself in one process.
        SUM then divide: gloo has no AVG."""
        if self.dist.world_size == 1:
            return value
        value = value.clone()
        torch_dist.all_reduce(value)
        return value / self.dist.world_size

    def stop_requested(self):
        """The stop signal, agreed by all ranks (every --log-every steps under DDP so no rank waits on another)."""
        if self.dist.world_size == 1:
            return self.stop.requested
        if self.global_step % self.cfg.log_every:
            return False
        return on_any_rank(self.stop.requested, self.dist.world_size, self.device)

    def log_epoch(self, epoch, **extra):
        """The epoch's summary: mean loss and speed on the console and in log.jsonl (a host sync)."""
        self.guard.check()
        seconds = time.perf_counter() - self.epoch_t0
        loss = self.last_loss = self.mean_over_ranks(self.epoch_loss / max(self.epoch_steps, 1)).item()
        imgs = self.epoch_steps * self.cfg.batch_size * self.dist.world_size
        self.bar.close()
        self.bar = None
        self.log(f"epoch {epoch}: loss {loss:.4f}, {speed(imgs / seconds)}, {seconds:.1f}s")
        self.write_log(kind="epoch", epoch=epoch, loss=loss, img_per_s=round(imgs / seconds, 1),
                       seconds=round(seconds, 2), **extra)
        self.save_curves()

    def save_curves(self):
        """curves.png from log.jsonl (loss and lr per step, the epochs' numbers): after every epoch, at the end of
        training and at a stop, so that every run, a --max-steps one too, has its curves."""
        if self.log_file is not None:
            from .evaluation import save_curves  # (evaluation imports this module)
            save_curves(self.out / "log.jsonl", self.out / "curves.png",
                        f"{self.method} {self.cfg.model} on {self.cfg.data}, {self.out.name}")

    def write_log(self, **record):
        if self.log_file is not None:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()

    def finish_training(self, seconds, what="pre-training"):
        """End of training: under DDP, check that every rank ended with the same parameters (a silent desync would
        otherwise only show as worse numbers); log it."""
        identical = self.replicas_identical(self.model)
        self.write_log(kind="done", global_step=self.global_step, seconds=round(seconds, 1),
                       world_size=self.dist.world_size, replicas_identical=identical)
        self.save_curves()
        self.log(f"{what} done in {seconds:.0f}s")

    def replicas_identical(self, model):
        """Under DDP, whether every rank holds the same parameters of `model` (a fingerprint per tensor, gathered);
        logged. True on one process."""
        if self.dist.world_size == 1:
            return True
        sums = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                            for p in model.parameters()])  # [num tensors, 2], a fingerprint per tensor
        gathered = [torch.empty_like(sums) for _ in range(self.dist.world_size)]
        torch_dist.all_gather(gathered, sums)
        identical = all(torch.equal(g, gathered[0]) for g in gathered)
        self.log(f"DDP check: parameters {'identical' if identical else 'DIFFERENT'} on {self.dist.world_size} ranks")
        return identical

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def save_checkpoint(self, epoch, step):
        """Checkpoint with everything exact resume needs, at (epoch, step) = where training continues.
        Never writes a diverged model: the guard is checked first, then the weights themselves (gradients are only
        watched when clipped, so a NaN gradient of the last step shows up here)."""
        self.guard.check()
        if not torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all():
            raise NonFiniteError(self.global_step - 1)
        if step == self.steps_per_epoch:
            epoch, step = epoch + 1, 0
        rng = [rng_state()]  # every rank's generators: drop path and the like differ per rank and must resume so
        if self.dist.world_size > 1:
            rng = [torch.load(io.BytesIO(b), weights_only=True) for b in gather_bytes(rng_state())]
        if not self.is_main:
            return
        t = time.perf_counter()
        atomic_save({
            "method": self.method, "config": asdict(self.cfg), "epoch": epoch, "step": step,
            "global_step": self.global_step, "last_loss": self.last_loss, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng,
        }, self.ckpt_path)
        self.write_log(kind="checkpoint", epoch=epoch, step=step, seconds=round(time.perf_counter() - t, 3))

    def load(self, path):
        ckpt = load_file(path)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "method" not in ckpt:
            raise UserError(f"{path} is not a checkpoint of this project")
        if ckpt["method"] != self.method:
            raise UserError(f"{path} is a {ckpt['method']} checkpoint; this is {self.method}")
        saved = ckpt["config"]
        clash = [(key.replace("_", "-"), getattr(self.cfg, key), saved.get(key)) for key in ("model", "img_size",
                 "patch_size") if saved.get(key) != getattr(self.cfg, key)]
        if clash:
            raise UserError(", ".join(f"--{k} {ours}" for k, ours, _ in clash) + f" contradicts {path}, which holds "
                            + ", ".join(f"{k} {theirs}" for k, _, theirs in clash)
                            + " (leave the flag out to continue the run as it was saved)")
        changed = {k: (v, getattr(self.cfg, k)) for k, v in saved.items() if hasattr(self.cfg, k)
                   and getattr(self.cfg, k) != v and k not in (*NOT_RESUMED, "out")}
        if changed:  # allowed (a longer schedule, more workers), but never silent
            self.log("resuming with settings that differ from the checkpoint's: "
                     + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        state_dict_fits(self.model, ckpt["model"], f"{path} does not fit this model")
        self.model.load_state_dict(ckpt["model"])
        self.global_step, self.last_loss = ckpt["global_step"], ckpt.get("last_loss")
        if not self.cfg.eval_only:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.restore_rng(ckpt["rng"])
        self.log(f"resumed {path}: continuing at step {self.global_step} (epoch {ckpt['epoch']}, after "
                 f"{ckpt['step']} of its steps)")
        return ckpt["epoch"], ckpt["step"]

    def restore_rng(self, states):
        """This rank's generator states from the checkpoint (one per rank). Resumed with another process count,
        there is no state to take: each rank then reseeds from (seed, rank, global step), and says so."""
        rank, world = self.dist.rank, self.dist.world_size
        if len(states) == world:
            set_rng_state(states[rank])
            return
        self.log(f"the checkpoint holds the random state of {len(states)} process(es), this run has {world}: "
                 f"reseeding every rank from (seed, rank, step); the run goes on, but not bitwise as it would have")
        seed = mix_seed(self.cfg.seed, rank, self.global_step)
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)

    def save_file(self, obj, name):
        """A rank-0 output file (encoder.pth, ...), written atomically."""
        if self.is_main:
            atomic_save(obj, self.out / name)

    def write_json(self, name, obj):
        if self.is_main:
            (self.out / name).write_text(json.dumps(obj, indent=2) + "\n")


def cli(main):
    """Run a method's main(): bad input -> one line + exit 2; stop signal -> exit 0 after the checkpoint;
    divergence -> exit 1 with the step and the usual cure."""
    code = None
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except Preempted:
        code = 0
    except NonFiniteError as e:
        print(f"error: the loss or gradient became non-finite at step {e.args[0]}; the last good checkpoint was "
              f"kept. Try --amp fp32, a lower --blr/--lr, or --clip-grad, then --resume auto.", file=sys.stderr)
        code = 1
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
        # DataLoader workers ignore SIGTERM (ignore_stop_signals), the signal with which the interpreter's exit stops
        # the ones a failed step left running, and then waits for them forever: end them first, however the run
        # ended (an error here, or a collective that failed because another process ended on one)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # (DataLoader's handler would report each end as a crash)
        for worker in multiprocessing.active_children():
            worker.kill()
    if code is not None:
        sys.exit(code)
