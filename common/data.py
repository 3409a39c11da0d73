"""Datasets, transforms and loaders.

Reproducibility contract (what exact resume relies on): the order of the images in epoch e is a permutation drawn
from (seed, e) and split across ranks like DistributedSampler; the random augmentation of image i in epoch e is
drawn from (seed, e, i) on the PIL path, and from (seed, e, step, rank) on the resident path. Nothing depends on
worker processes or on how far an earlier process got, so a run resumed at (epoch, step) sees the same batches.

Two training pipelines, same augmentation distribution:
  * PIL: a DataLoader with worker processes decodes (no more pixels than the crop needs), crops and resizes one
    image at a time to uint8; normalised on the training device (ImageNet, folders). With --decode device the workers
    only draw the crops and read the files' bytes; the training device decodes the batch's JPEGs at once
    (torchvision.io.decode_jpeg: nvJPEG on a GPU, libjpeg-turbo on the CPU), crops and resizes them.
  * resident: the whole split as one uint8 tensor on the training device; crop + resize + flip + normalise are
    done for the whole batch at once with `grid_sample` (synthetic, CIFAR, STL-10, MNIST, Fashion-MNIST).
"""
import contextlib
import gzip
import math
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg

from . import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")


@dataclass(frozen=True)
class DatasetInfo:
    native_size: int  # pixels of the stored images (0: any size; synthetic is rendered at the requested size)
    scale: str  # which preset a method uses for it: demo, small, medium, imagenet
    in_memory: bool  # small enough to hold as one uint8 tensor (the resident path)

    def stored_size(self, img_size):
        """Side of the images as stored for a run at img_size: the native size, img_size for synthetic (rendered at
        the requested size), 0 for folders of images of any size."""
        return self.native_size or (img_size if self.in_memory else 0)


DATASETS = {
    "synthetic": DatasetInfo(0, "demo", True),
    "imagenet": DatasetInfo(0, "imagenet", False),
    "folder": DatasetInfo(0, "imagenet", False),
    "cifar10": DatasetInfo(32, "small", True),
    "cifar100": DatasetInfo(32, "small", True),
    "stl10": DatasetInfo(96, "medium", True),
    "mnist": DatasetInfo(28, "small", True),
    "fashion-mnist": DatasetInfo(28, "small", True),
}


def default_workers():
    """DataLoader workers per process when --workers is not given: the cores this process may run on (its CPU
    affinity, which a container or taskset narrows; os.cpu_count() counts the whole machine) shared among the
    processes torchrun starts on this node (LOCAL_WORLD_SIZE), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity call on this OS (macOS, Windows)
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def ignore_stop_signals(worker_id=None):
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which saves a checkpoint and shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def mix_seed(*values):
    """A deterministic 63-bit seed from a few integers (seed, epoch, index, ...)."""
    s = 0
    for v in values:
        s = (s * 1_000_003 + int(v) + 1) % (2 ** 63)
    return s


@contextlib.contextmanager
def seeded_rng(seed, device=None):
    """Run a block on the global generators seeded with `seed` -- the CPU one, and `device`'s when it is a CUDA
    device -- then put their states back. For code that draws from the global RNG without a generator argument
    (torchvision's random transforms, nn.Linear's init, drop path), so that it neither depends on nor shifts the
    training's random stream. torch.manual_seed would reseed *every* CUDA device, which fork_rng(devices=[]) does
    not restore: only the generators restored here are seeded."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for d in devices:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------------------------- #
#                                  synthetic shapes: the offline dataset of tests and demo                           #
# ---------------------------------------------------------------------------------------------------------------- #
def _shape_mask(label, u, v):
    """Inside-test of shape `label` in its local frame (u, v in about [-1, 1]); [H, W] bool."""
    r, a = np.hypot(u, v), np.arctan2(v, u)
    s3 = math.sqrt(3.0)
    if label == 0:  # disk
        return r <= 1.0
    if label == 1:  # ring
        return (r <= 1.0) & (r >= 0.6)
    if label == 2:  # square
        return np.maximum(abs(u), abs(v)) <= 0.8
    if label == 3:  # square frame
        m = np.maximum(abs(u), abs(v))
        return (m <= 0.9) & (m >= 0.55)
    if label == 4:  # triangle
        return (v >= -0.5) & (s3 * u + v <= 1.0) & (-s3 * u + v <= 1.0)
    if label == 5:  # plus
        return ((abs(u) <= 0.3) & (abs(v) <= 0.95)) | ((abs(v) <= 0.3) & (abs(u) <= 0.95))
    if label == 6:  # five-pointed star
        return r <= 0.55 + 0.4 * np.cos(5 * a)
    if label == 7:  # elongated ellipse
        return u ** 2 + (v / 0.4) ** 2 <= 1.0
    if label == 8:  # crescent
        return (r <= 1.0) & (np.hypot(u - 0.45, v) > 0.75)
    if label == 9:  # three dots
        d = [np.hypot(u - 0.6 * math.cos(t), v - 0.6 * math.sin(t)) for t in (math.pi / 2, 7 * math.pi / 6, -math.pi / 6)]
        return np.minimum(np.minimum(d[0], d[1]), d[2]) <= 0.33
    if label == 10:  # half disk
        return (r <= 1.0) & (v >= 0.0)
    if label == 11:  # L shape
        return ((abs(u + 0.35) <= 0.3) & (abs(v) <= 0.9)) | ((abs(v + 0.6) <= 0.3) & (u >= -0.65) & (u <= 0.8))
    raise ValueError(label)


SYNTHETIC_CLASSES = ("disk", "ring", "square", "frame", "triangle", "plus", "star", "ellipse", "crescent",
                     "three dots", "half disk", "L shape")


def render_synthetic(index, size, seed):
    """Image `index` of a synthetic split: a shape of class index % 12 with random colour, position, scale and
    rotation over a random textured background (stripes, checkerboard or a noisy gradient, in random colours).
    Colours are drawn independently of the class, so the mean colour says nothing about the label.
    Returns (uint8 [size, size, 3], label)."""
    label = index % len(SYNTHETIC_CLASSES)
    rng = np.random.default_rng([seed, index])
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size * 2 - 1  # pixel centres in [-1, 1], [H, W] each
    # background texture in two random colours of moderate contrast (the shape should be the salient object)
    c1 = rng.random(3)
    c2 = np.clip(c1 + rng.normal(0, 0.25, size=3), 0, 1)
    kind = rng.integers(3)
    if kind == 0:  # stripes at a random angle and frequency
        phi, freq = rng.uniform(0, math.pi), rng.uniform(2, 6)
        t = 0.5 + 0.5 * np.sin(freq * math.pi * (x * math.cos(phi) + y * math.sin(phi)) + rng.uniform(0, 6.3))
    elif kind == 1:  # checkerboard
        n = rng.integers(2, 6)
        t = ((np.floor((x + 1) * n) + np.floor((y + 1) * n)) % 2).astype(np.float64)
    else:  # gradient
        phi = rng.uniform(0, 2 * math.pi)
        t = 0.5 + 0.5 * (x * math.cos(phi) + y * math.sin(phi)) / math.sqrt(2)
    img = c1 * t[..., None] + c2 * (1 - t[..., None])  # [H, W, 3]
    # the shape: scale, rotate, translate into the image
    scale = rng.uniform(0.35, 0.65)
    theta = rng.uniform(0, 2 * math.pi)
    cx, cy = rng.uniform(-1 + scale, 1 - scale, size=2)
    xs, ys = (x - cx) / scale, (y - cy) / scale
    u = xs * math.cos(theta) + ys * math.sin(theta)  # inverse rotation into the shape's frame
    v = -xs * math.sin(theta) + ys * math.cos(theta)
    fg = rng.random(3)
    if np.abs(fg - (c1 + c2) / 2).mean() < 0.3:  # keep the shape visible against the background
        fg = 1.0 - fg
    mask = _shape_mask(label, u, v)
    img[mask] = fg
    img += rng.normal(0, 0.03, size=img.shape)  # sensor noise
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label


# ---------------------------------------------------------------------------------------------------------------- #
#                                                  image datasets                                                    #
# ---------------------------------------------------------------------------------------------------------------- #
def to_rgb(img):
    """Any PIL mode -> RGB: 16-bit grayscale is scaled (PIL's own conversion would clip it to white), palette
    and alpha images are flattened, CMYK/L/1 converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64) / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * 255 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # resolves palette transparency without PIL's warning
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path, transform=None):
    """Decode an image file to RGB -- or, with a `transform` that decodes by itself (ResizedCropFlip: no more
    pixels than its crop needs), to that transform's output; an unreadable file is a UserError that names it."""
    try:
        with Image.open(path) as img:  # the header only: size and mode are known, nothing is decoded yet
            if transform is not None:
                return transform(img)
            img.load()
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


class ImageDataset(Dataset):
    """Base class: `load(i)` -> (PIL RGB image, label or -1). Keys are an index, or (index, epoch) from
    EpochSampler, in which case the transform's randomness is seeded from (seed, epoch, index)."""

    num_classes = 0
    transform = None
    seed = 0

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, None)
        if self.transform is None or epoch is None:
            return self.load_transformed(i)
        # torchvision's random transforms (and ResizedCropFlip) draw from the global CPU generator: seed it per image
        with seeded_rng(mix_seed(self.seed, epoch, i)):
            return self.load_transformed(i)

    def load_transformed(self, i):
        """(image i through the transform, or as loaded when there is none, label)."""
        img, label = self.load(i)
        return (img if self.transform is None else self.transform(img)), label


class SyntheticDataset(ImageDataset):
    """Rendered from the index (no files, deterministic): 12 shape classes, any resolution."""

    SPLITS = {"pretrain": (0, 10_000), "train": (0, 5_000), "val": (1, 1_000)}  # (seed, length)

    def __init__(self, split, size):
        self.split_seed, length = self.SPLITS[split]
        self.ids = np.arange(length)  # which rendered images this split holds (a --subset keeps some of them)
        self.size = size
        self.num_classes = len(SYNTHETIC_CLASSES)

    def __len__(self):
        return len(self.ids)

    @property
    def labels(self):
        return self.ids % len(SYNTHETIC_CLASSES)

    def render(self, i):
        return render_synthetic(int(self.ids[i]), self.size, self.split_seed)

    def load(self, i):
        arr, label = self.render(i)
        return Image.fromarray(arr), label

    def as_uint8(self):
        imgs, labels = zip(*(self.render(i) for i in range(len(self))))
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)  # [N, 3, H, W]


class ArrayDataset(ImageDataset):
    """Images already in memory as uint8 [N, H, W, C] or [N, H, W] (grayscale) with integer labels."""

    def __init__(self, images, labels, num_classes):
        self.images, self.labels, self.num_classes = images, np.asarray(labels, dtype=np.int64), num_classes

    def __len__(self):
        return len(self.images)

    def load(self, i):
        return Image.fromarray(self.images[i]).convert("RGB"), int(self.labels[i])

    def as_uint8(self):
        x = torch.from_numpy(np.ascontiguousarray(self.images))
        x = x.unsqueeze(-1).expand(-1, -1, -1, 3) if x.ndim == 3 else x  # gray [N, H, W] -> [N, H, W, 3]
        return x.permute(0, 3, 1, 2).contiguous(), torch.from_numpy(self.labels)  # [N, H, W, 3] -> [N, 3, H, W]


class FileDataset(ImageDataset):
    """A list of image files with labels (-1 when unlabelled). An unreadable file ends the run with a UserError
    naming it, unless `bad_images_log` is set (--skip-bad-images): it is then listed in that file and replaced by
    another image of the dataset."""

    MAX_REPLACEMENTS = 20  # unreadable files in a row before the dataset is taken to be no folder of images at all
    bad_images_log = None

    def __init__(self, files, labels, num_classes):
        self.files, self.labels, self.num_classes = files, labels, num_classes

    def __len__(self):
        return len(self.files)

    def load(self, i):
        return load_image(self.files[i]), self.labels[i]

    def load_transformed(self, i):
        for attempt in range(self.MAX_REPLACEMENTS):
            try:
                # ResizedCropFlip (and DeviceDecodeCrop) take the opened file: they decode it themselves, at reduced
                # size (or leave a JPEG to the training device)
                if isinstance(self.transform, ResizedCropFlip):
                    return load_image(self.files[i], self.transform), self.labels[i]
                return super().load_transformed(i)
            except UserError as e:
                if self.bad_images_log is None:
                    raise UserError(f"{e} (--skip-bad-images would list it and go on with another image)") from None
                self.list_bad_image(self.files[i], e)
                # a replacement: a seeded draw from (seed, index, attempt), the same one every epoch and every run
                i = int(torch.randint(len(self), (), generator=torch.Generator().manual_seed(
                    mix_seed(self.seed, i, attempt))))
        raise UserError(f"{self.MAX_REPLACEMENTS} unreadable images in a row (listed in {self.bad_images_log}): "
                        f"are these files images?")

    def list_bad_image(self, path, error):
        """Append `path` to bad_images_log (once: each process, DataLoader workers included, checks the file) and
        say so on stderr."""
        log = Path(self.bad_images_log)
        if log.exists() and path in log.read_text().split("\n"):
            return
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:  # one short append: whole lines even when several workers write
            f.write(path + "\n")
        print(f"warning: skipped an unreadable image, listed in {log}: {error}", file=sys.stderr, flush=True)


def _images_under(root):
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def scan_folder(root, require_classes=False, classes=None):
    """Images of a folder: with class subfolders (labelled) or flat / nested without classes (unlabelled).
    `classes`: the class list every split shares (train/'s, `class_list`): a subfolder's label is its index there,
    so the same class has the same integer in every split; a subfolder that is not in it is refused."""
    if not os.path.exists(root):
        raise UserError(f"data path {root} does not exist")
    if not os.path.isdir(root):
        raise UserError(f"data path {root} is not a folder")
    if not os.listdir(root):
        raise UserError(f"data path {root} is empty")
    subdirs = sorted(d.name for d in os.scandir(root) if d.is_dir())
    top_files = [f for f in os.listdir(root) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if subdirs and not top_files:  # class subfolders
        classes = classes or subdirs
        files, labels = [], []
        for name in subdirs:
            path = os.path.join(root, name)
            if name not in classes:
                raise UserError(f"class folder {path} has no counterpart in the training split's classes; "
                                f"every split takes its labels from train/ (add the class there or remove it here)")
            imgs = _images_under(path)
            if not imgs:
                raise UserError(f"class folder {path} holds no images ({' '.join(IMAGE_EXTENSIONS)}); remove it "
                                f"or add its images (an empty class would shift every later label)")
            files += imgs
            labels += [classes.index(name)] * len(imgs)
        return FileDataset(files, labels, len(classes))
    if not require_classes:
        files = _images_under(root)
        if files:
            return FileDataset(files, [-1] * len(files), 0)
    if require_classes and top_files:
        raise UserError(f"{root} holds images directly; expected one subfolder per class")
    raise UserError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) found under {root}")


def class_list(name, data_path):
    """The class names of a labelled image folder, from its training split (train/, or the folder itself): the one
    list whose order numbers the labels of every split. None for other datasets and unlabelled folders."""
    if name not in ("imagenet", "folder") or not data_path:
        return None
    root = os.path.join(data_path, "train") if os.path.isdir(os.path.join(data_path, "train")) else data_path
    if not os.path.isdir(root) or any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(root)):
        return None
    return sorted(d.name for d in os.scandir(root) if d.is_dir()) or None


def _read_idx(path):
    """An IDX file (MNIST format), optionally gzipped -> numpy array."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()  # writable


def _find_idx(root, folder, stem):
    for d in (root, os.path.join(root, folder, "raw")):
        for name in (stem, stem + ".gz"):
            if os.path.isfile(os.path.join(d, name)):
                return os.path.join(d, name)
    return None


def _mnist_like(name, train, root):
    """MNIST / Fashion-MNIST from IDX files in `root` (e.g. Debian's /usr/share/datasets/fashion-mnist) or in
    root/<Name>/raw; downloaded by torchvision when absent and online."""
    import torchvision.datasets as tvd
    cls, folder = (tvd.MNIST, "MNIST") if name == "mnist" else (tvd.FashionMNIST, "FashionMNIST")
    prefix = "train" if train else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [_find_idx(root, folder, s) for s in stems]
    if None in paths:
        _download(lambda: cls(root, train=train, download=True), name, root)
        paths = [_find_idx(root, folder, s) for s in stems]
    return ArrayDataset(_read_idx(paths[0]), _read_idx(paths[1]), 10)


def _download(make, name, root):
    try:
        return make()
    except Exception as e:  # offline, a partial file, a full disk: say what to do
        raise UserError(f"{name} is not under {root} and could not be downloaded ({type(e).__name__}: {e}); "
                        f"put its files there or pass --data-path") from None


def build_dataset(name, split, data_path="", img_size=32, subset=0, transform=None, seed=0):
    """split: "pretrain" (the images pre-training sees), "train" (labelled, for probes), "val" (labelled).
    `subset`: keep N images, drawn at random from `seed` with every class in proportion (take_subset).
    Returns an ImageDataset, or None when the dataset has no such split (an unlabelled folder has no val)."""
    import torchvision.datasets as tvd
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    root = data_path or "./data"
    if name == "synthetic":
        ds = SyntheticDataset(split, img_size)
    elif name in ("imagenet", "folder"):
        if not data_path:
            raise UserError(f"--data {name} needs --data-path")
        sub = {"pretrain": "train", "train": "train", "val": "val"}[split]
        has_splits = os.path.isdir(os.path.join(data_path, "train"))
        parent = os.path.dirname(os.path.normpath(data_path))
        if not has_splits and os.path.basename(os.path.normpath(data_path)) in ("train", "val") and \
                os.path.isdir(os.path.join(parent, "train")):
            raise UserError(f"--data-path {data_path} is a split; pass the folder that holds train/ and val/: "
                            f"--data-path {parent}")
        if name == "imagenet" or has_splits:
            if not has_splits:
                scan_folder(data_path)  # a missing or empty path gets its own message
                raise UserError(f"{data_path} has no train/ folder (expected {data_path}/train/<class>/*.JPEG)")
            if not os.path.isdir(os.path.join(data_path, sub)):
                if name == "imagenet":
                    raise UserError(f"{data_path} has no {sub}/ folder")
                return None
            classes = class_list(name, data_path)
            ds = scan_folder(os.path.join(data_path, sub), require_classes=name == "imagenet", classes=classes)
            if split == "pretrain" and classes and os.path.isdir(os.path.join(data_path, "val")):
                scan_folder(os.path.join(data_path, "val"), classes=classes)  # its class folders, before any step
        elif split == "val":
            return None  # a plain folder is all training data
        else:
            ds = scan_folder(data_path)
        if split != "pretrain" and ds.num_classes == 0:
            return None
    elif name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        train = split != "val"
        try:
            raw = cls(root, train=train, download=False)
        except RuntimeError:
            raw = _download(lambda: cls(root, train=train, download=True), name, root)
        ds = ArrayDataset(raw.data, raw.targets, len(raw.classes))
    elif name == "stl10":
        tv_split = {"pretrain": "train+unlabeled", "train": "train", "val": "test"}[split]
        try:
            raw = tvd.STL10(root, split=tv_split, download=False)
        except RuntimeError:
            raw = _download(lambda: tvd.STL10(root, split=tv_split, download=True), name, root)
        ds = ArrayDataset(raw.data.transpose(0, 2, 3, 1), raw.labels, 10)  # [N, 3, H, W] -> [N, H, W, 3]
        if split == "pretrain":
            ds.labels = np.full(len(ds), -1)  # the unlabelled images carry -1; labels are unused in pre-training
    else:  # mnist, fashion-mnist
        ds = _mnist_like(name, split != "val", root)
    if subset and subset < len(ds):
        ds = take_subset(ds, subset, seed)
    ds.transform = transform
    return ds


def run_dataset(cfg, split, transform=None, img_size=None):
    """build_dataset with a run's settings (--data, --data-path, --img-size unless `img_size`, --subset, --seed) and
    --skip-bad-images, whose list of unreadable files is <out>/bad_images.txt."""
    ds = build_dataset(cfg.data, split, cfg.data_path, img_size or cfg.img_size, cfg.subset, transform, cfg.seed)
    if isinstance(ds, FileDataset) and cfg.skip_bad_images:
        ds.bad_images_log = os.path.join(cfg.out, "bad_images.txt")
    return ds


def stratified_indices(labels, n, seed):
    """n indices drawn at random (from `seed`) so that every label keeps its share: each class gets the floor of
    n x its fraction, and the images left over go to the classes with the largest remainders (Hamilton's method).
    Unlabelled data (all -1) is one class. Returns the indices in increasing order."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / len(labels)  # [classes], sums to n
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take), kind="stable")[: n - take.sum()]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def take_subset(ds, n, seed=0):
    """--subset: n images of the split, a seeded random draw that keeps every class in proportion (a plain "first
    n" of a class-sorted folder would show pre-training a few classes, and give the probe's train and val splits
    different ones)."""
    idx = stratified_indices(ds.labels, n, seed)
    if isinstance(ds, SyntheticDataset):
        ds.ids = ds.ids[idx]
    elif isinstance(ds, ArrayDataset):
        ds.images, ds.labels = ds.images[idx], ds.labels[idx]
    else:
        ds.files, ds.labels = [ds.files[i] for i in idx], [ds.labels[i] for i in idx]
    return ds


# ---------------------------------------------------------------------------------------------------------------- #
#                                                   transforms                                                       #
# ---------------------------------------------------------------------------------------------------------------- #
INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


def pretrain_transform(img_size, crop_scale, crop_ratio=(3 / 4, 4 / 3), interpolation="bicubic"):
    """RandomResizedCrop + horizontal flip + ImageNet normalisation: the pre-training augmentation of MAE,
    SimMIM and BEiT (each with its own crop scale and interpolation)."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=crop_scale, ratio=crop_ratio, interpolation=INTERPOLATION[interpolation]),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


DCT_SCALES = (8, 4, 2, 1)  # the 1/s reductions libjpeg decodes directly (PIL's Image.draft)


def draft_scale(crop_h, crop_w, out_size):
    """The largest DCT reduction s at which the crop keeps at least out_size pixels on its shorter side: decoding at
    1/s then never leaves the resize fewer pixels than the output has, and never 2x more per side than it needs
    (unless s is already at libjpeg's largest, 8)."""
    return next(s for s in DCT_SCALES if min(crop_h, crop_w) >= s * out_size or s == 1)


class ResizedCropFlip:
    """pretrain_transform's augmentation -- RandomResizedCrop(scale, ratio) + horizontal flip (p = 0.5) -- without
    its ToTensor + Normalize: returns uint8 [3, S, S], normalised on the device after the transfer (LoaderData; 4x
    fewer bytes to collate, pin and copy). The same draws from the global RNG as pretrain_transform: torchvision's
    get_params on the image's full size (known from a file's header before decoding), then the flip's torch.rand(1).
    Given an opened, not yet decoded JPEG file (load_image(path, transform)), it decodes at 1/s of the size by
    libjpeg's DCT scaling (Image.draft), s from draft_scale, so that a 224-px crop of a large photo is not decoded at
    full size; at full size an RGB JPEG is decoded by torchvision's decode_jpeg (PIL's pixels, faster); any other
    image (PNG, one already decoded) is used as it is. It crops before it resizes.
    official: PIL's crop + resize of the full decode; we: torch's antialiased resize of uint8 (PIL's filters, within
    2 levels of PIL's output, and faster), after a 1/s DCT-domain reduction where s > 1, with the crop box rounded
    to whole pixels of that reduced decode (a shift of under half an output pixel)."""

    def __init__(self, img_size, crop_scale, crop_ratio=(3 / 4, 4 / 3), interpolation="bicubic"):
        self.size, self.scale, self.ratio, self.mode = img_size, crop_scale, crop_ratio, interpolation

    def __call__(self, img):
        top, left, h, w = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)  # in full-size pixels
        x = self.crop(img, top, left, h, w).unsqueeze(0)  # [1, 3, h', w'], channels-last strides
        x = F.interpolate(x, size=(self.size, self.size), mode=self.mode, antialias=True)[0]  # [3, S, S]
        return x.flip(-1) if torch.rand(1) < 0.5 else x

    def crop(self, img, top, left, h, w):
        """The crop box of img as uint8 [3, h', w']: h x w, or about h/s x w/s where the JPEG is decoded at 1/s."""
        s = draft_scale(h, w, self.size)
        if s == 1 and img.format == "JPEG" and img.mode == "RGB" and img.filename:
            # no DCT scaling: torchvision's libjpeg-turbo decode, PIL's pixels bit for bit in ~3/4 of PIL's time
            return decode_jpeg_file(img.filename)[:, top:top + h, left:left + w]  # [3, H, W] -> [3, h, w]
        full_width = img.width
        drafted = img.draft("RGB", (img.width // s, img.height // s)) if s > 1 else None  # None: no DCT scaling
        s = full_width / drafted[1][2] if drafted else 1  # the reduction libjpeg will decode at: full size / its box
        img.load()
        box = [round(v / s) for v in (left, top, left + w, top + h)]  # the crop in pixels of the (reduced) decode
        return torch.from_numpy(np.array(to_rgb(img).crop(box))).permute(2, 0, 1)  # [h', w', 3] -> [3, h', w']


def quiet_decode_jpeg(data, device="cpu"):
    """torchvision.io.decode_jpeg to RGB of one JPEG's bytes (uint8 [n]) or a list of them (one batched call; nvJPEG
    on a GPU), without the DeprecationWarning torchvision 0.29 gives for its decoders (TorchCodec supersedes them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def decode_jpeg_file(path):
    """A JPEG file decoded by torchvision.io.decode_jpeg (libjpeg-turbo) to uint8 [3, H, W]; a file that does not
    decode raises OSError, as PIL's decoder does (load_image names the file)."""
    try:
        return quiet_decode_jpeg(torch.from_numpy(np.fromfile(path, dtype=np.uint8)))
    except RuntimeError as e:
        raise OSError(str(e)) from None


class JpegCrop(NamedTuple):
    """One image of DeviceDecodeCrop's batch still to decode, with its augmentation drawn."""
    data: torch.Tensor  # uint8 [n]: the bytes of the JPEG file
    box: tuple  # (top, left, h, w) of the crop in the image's full-size pixels
    flip: bool  # mirror the resized crop
    path: str  # the file (named when it cannot be decoded)


NVJPEG_MODES = ("RGB", "L")  # the JPEGs decode_jpeg(mode=RGB) takes on a GPU; CMYK and other files: the workers


class DeviceDecodeCrop(ResizedCropFlip):
    """ResizedCropFlip with the decode of a JPEG left to the training device (--decode device): the same draws from
    the global RNG in the same order (get_params on the full size from the header, then the flip's torch.rand(1)),
    but instead of pixels it returns a JpegCrop -- the file's bytes, the box, the flip -- and `decode_batch` turns
    the DataLoader's batch of them into pixels on the device, all JPEGs in one decode_jpeg call. A file the GPU
    decoder does not take (PNG, CMYK JPEG, an image already in memory) gets ResizedCropFlip's uint8 [3, S, S] in the
    worker, so that a folder may mix them.
    Against ResizedCropFlip: a JPEG is decoded at full size (no DCT scaling: decode_jpeg has none), then the crop is
    resized in float (CUDA's antialiased interpolate has no uint8 kernel) and rounded back to uint8: within 2 levels
    of ResizedCropFlip's output where it too decodes at full size (its uint8 resize rounds after each pass)."""

    def __call__(self, img):
        if img.format != "JPEG" or img.mode not in NVJPEG_MODES:
            return super().__call__(img)
        box = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)  # in full-size pixels
        flip = bool(torch.rand(1) < 0.5)
        return JpegCrop(torch.from_numpy(np.fromfile(img.filename, dtype=np.uint8)), box, flip, img.filename)

    def decode_batch(self, samples, device):
        """A batch of samples (JpegCrop, or uint8 [3, S, S] done in a worker) -> uint8 [B, 3, S, S] on `device`:
        the JPEGs decoded there in one call, each cropped (a slice of its full-size decode), resized as
        ResizedCropFlip resizes and flipped."""
        jpegs = [s for s in samples if isinstance(s, JpegCrop)]
        decoded = iter(decode_jpegs(jpegs, device))
        images = []
        for s in samples:
            if isinstance(s, JpegCrop):
                top, left, h, w = s.box
                x = next(decoded)[:, top:top + h, left:left + w].unsqueeze(0).float()  # [3, H, W] -> [1, 3, h, w]
                x = F.interpolate(x, size=(self.size, self.size), mode=self.mode, antialias=True)[0]  # [3, S, S]
                x = x.clamp_(0, 255).round_().to(torch.uint8)  # as torchvision's resize of uint8 through float
                s = x.flip(-1) if s.flip else x
            images.append(s.to(device, non_blocking=True))
        return torch.stack(images)  # [B, 3, S, S]


def decode_jpegs(jpegs, device):
    """The JpegCrops' files decoded on `device` in one torchvision.io.decode_jpeg call: a list of uint8 [3, H, W].
    A file that does not decode (truncated, say: its header read well in the worker) is a UserError naming it."""
    if not jpegs:
        return []
    try:
        return quiet_decode_jpeg([j.data for j in jpegs], device)
    except RuntimeError:  # which file: decode them one at a time
        for j in jpegs:
            try:
                quiet_decode_jpeg(j.data, device)
            except RuntimeError as e:
                raise UserError(f"cannot read image {j.path} on {device}: {e} (--decode workers reads each file in "
                                f"the workers, where --skip-bad-images can replace it)") from None
        raise


def collate_samples(batch):
    """DataLoader collate for DeviceDecodeCrop: (the samples as a list, as their bytes differ in length; labels)."""
    samples, labels = zip(*batch)
    return list(samples), torch.tensor(labels)


def imagenet_stats(shape=(1, 3, 1, 1), scale=1.0, device=None):
    """(mean, std) of ImageNet's normalisation as tensors of `shape` (a batch's by default), times `scale` (255 for
    uint8 images), on `device`."""
    return tuple(torch.tensor(v, device=device).view(shape) * scale for v in (IMAGENET_MEAN, IMAGENET_STD))


def normalize_uint8(images, mean, std):
    """uint8 [B, 3, H, W] in 0..255 -> float, (x - mean) / std with mean and std [1, 3, 1, 1] scaled to 0..255: what
    ToTensor + Normalize do, done for the batch on the device (in place on the one float copy)."""
    return images.float().sub_(mean).div_(std)


class EvalResize:
    """Resize(img_size / 0.875) + CenterCrop(img_size) for an image larger than the input (the ImageNet protocol);
    an image no larger than the input (CIFAR, MNIST, a folder of 32-px images) is only resized to it, decided per
    image, so that a folder of small images is not cropped like ImageNet photos."""

    def __init__(self, img_size):
        self.whole = T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC)
        self.crop = T.Compose([T.Resize(int(round(img_size / 0.875)), interpolation=T.InterpolationMode.BICUBIC),
                               T.CenterCrop(img_size)])
        self.img_size = img_size

    def __call__(self, img):
        return self.whole(img) if min(img.size) <= self.img_size else self.crop(img)


def eval_transform(img_size):
    """The evaluation transform: EvalResize, then ImageNet normalisation."""
    return T.Compose([EvalResize(img_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def finetune_transform(img_size, crop_scale=(0.08, 1.0), rand_augment=9, erasing=0.25):
    """Fine-tuning augmentation per image (mixup/cutmix act on the batch, evaluation.mix_batch):
    RandomResizedCrop(crop_scale, bicubic) + flip + RandAugment(2 ops, magnitude `rand_augment`; 0 = off) +
    normalise + RandomErasing(p = `erasing`, per-pixel N(0, 1) fill, one box).
    official (MAE, SimMIM): timm's `rand-m9-mstd0.5-inc1` and RandomErasing(mode "pixel", count 1). we:
    torchvision's RandAugment, which differs in three ways: every chosen op is applied (timm: each with p 0.5), the
    magnitude is fixed at 9 (timm: drawn per op from N(9, 0.5)), and its op list has Identity and plain Solarize /
    Posterize where timm's "inc1" has SolarizeAdd and severity that grows with the magnitude. torchvision's
    RandomErasing with value="random" is timm's "pixel" mode (area 2-33 %, log-uniform aspect 0.3-3.3)."""
    steps = [T.RandomResizedCrop(img_size, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC),
             T.RandomHorizontalFlip()]
    if rand_augment:
        steps.append(T.RandAugment(num_ops=2, magnitude=rand_augment))
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if erasing:
        steps.append(T.RandomErasing(p=erasing, value="random"))
    return T.Compose(steps)


# ---------------------------------------------------------------------------------------------------------------- #
#                                      batch order: a function of (seed, epoch)                                      #
# ---------------------------------------------------------------------------------------------------------------- #
def epoch_order(n, seed, epoch, rank, world, shuffle=True):
    """This rank's indices for an epoch: a permutation from (seed, epoch), cut to a multiple of the world size
    and dealt out like DistributedSampler (rank r takes positions r, r + world, ...)."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
    else:
        order = torch.arange(n)
    return order[: n - n % world][rank::world]  # [n // world]


class EpochSampler(Sampler):
    """Yields (index, epoch) keys for full batches of this rank, starting at batch `start_step` (resume)."""

    def __init__(self, n, batch_size, seed, rank, world):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return (self.n // self.world // self.batch_size - self.start_step) * self.batch_size

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch, self.rank, self.world)
        usable = len(order) // self.batch_size * self.batch_size
        for i in order[self.start_step * self.batch_size: usable].tolist():
            yield i, self.epoch


# ---------------------------------------------------------------------------------------------------------------- #
#                                           the resident (on-device) path                                            #
# ---------------------------------------------------------------------------------------------------------------- #
def sample_resized_crops(n, height, width, scale, ratio, generator, device):
    """torchvision's RandomResizedCrop.get_params for n images at once: up to 10 tries of (area fraction ~
    U(scale), log aspect ~ U(log ratio)), the first crop that fits wins, else the central crop clamped to
    `ratio`. Returns (top, left, crop_h, crop_w), each a float tensor [n]."""
    area = height * width
    tries = 10
    target = area * torch.empty(n, tries, device=device).uniform_(scale[0], scale[1], generator=generator)  # [n, 10]
    log_r = torch.empty(n, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))  # [n, 10]
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # [n, 10]
    first = ok.float().argmax(dim=1, keepdim=True)  # index of the first fitting try, [n, 1]
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)  # [n]
    # fallback when no try fits: whole image, clamped to the aspect range
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    any_ok = ok.any(dim=1)
    w = torch.where(any_ok, w, torch.full_like(w, fw))
    h = torch.where(any_ok, h, torch.full_like(h, fh))
    u = torch.rand(2, n, device=device, generator=generator)
    top = torch.where(any_ok, torch.floor(u[0] * (height - h + 1)), (height - h) // 2)
    left = torch.where(any_ok, torch.floor(u[1] * (width - w + 1)), (width - w) // 2)
    return top, left, h, w


# Batched versions of torchvision's tensor colour ops (torchvision.transforms.functional), with one factor per image.
# x: [B, 3, H, W] in [0, 1]; factor: [B, 1, 1, 1].
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (PIL's "L" uses 0.299, 0.587, 0.114)


def grayscale(x):
    r, g, b = GRAY_WEIGHTS  # (Python numbers: no constant tensor copied to the device per batch)
    return r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3]  # [B, 1, H, W]


def blend(x, y, factor):
    return (factor * x + (1 - factor) * y).clamp(0, 1)


def adjust_brightness(x, factor):
    return blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x, factor):
    return blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)  # towards the mean grey of each image


def adjust_saturation(x, factor):
    return blend(x, grayscale(x), factor)


def adjust_hue(x, shift):
    """Rotate the hue by `shift` (a fraction of the circle) in HSV, as torchvision's tensor adjust_hue."""
    value, argmax = x.max(dim=1)  # [B, H, W]; ties go to the first channel (r, then g), as torchvision's
    chroma = value - x.min(dim=1).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r, g, b = x.unbind(dim=1)
    hue = torch.where(argmax == 0, (g - b) / safe, torch.where(argmax == 1, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    hue = torch.remainder(hue + shift.view(-1, 1, 1), 1.0)  # [B, H, W] in [0, 1)
    sat = chroma / torch.where(value > 0, value, torch.ones_like(value))
    # HSV -> RGB: channel n in (R, G, B) = (5, 3, 1): v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # (built on the device)
    k = torch.remainder(n + 6 * hue.unsqueeze(1), 6)  # [B, 3, H, W]
    return value.unsqueeze(1) * (1 - sat.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))


def color_jitter(x, generator, p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
    """RandomApply(ColorJitter(brightness, contrast, saturation, hue), p) for a batch: per image, with probability
    p, the ops in a random order (torchvision: randperm(4)) with factors U(1 -/+ brightness), U(1 -/+ contrast),
    U(1 -/+ saturation) and a hue shift U(-hue, hue); an op whose strength is 0 is skipped, as torchvision's. Each
    of the 4 positions evaluates the ops and keeps, per image, the one its order puts there (elementwise passes
    instead of a Python loop over images). x: [B, 3, H, W] in [0, 1]."""
    B, dev = x.shape[0], x.device
    u = torch.rand(B, 5, device=dev, generator=generator)  # [B, 5]: apply?, then one draw per op
    apply = u[:, 0] < p
    strengths = (brightness, contrast, saturation, hue)
    centres = (1.0, 1.0, 1.0, 0.0)  # hue is a shift around 0
    order = torch.rand(B, 4, device=dev, generator=generator).argsort(dim=1)  # [B, 4]: a random permutation
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for position in range(4):
        for k, op in enumerate(ops):
            if strengths[k] == 0:
                continue
            chosen = (apply & (order[:, position] == k)).view(B, 1, 1, 1)
            factor = centres[k] + (2 * u[:, 1 + k] - 1) * strengths[k]  # [B] in centre -/+ strength
            x = torch.where(chosen, op(x, factor if op is adjust_hue else factor.view(B, 1, 1, 1)), x)
    return x


def crop_resize_flip(images, top, left, crop_h, crop_w, flip, out_size, mode):
    """Batched crop + resize (+ horizontal flip) with one grid_sample, pixel-centre aligned like a PIL resize of
    the crop: output column u samples input x = left + (u + 0.5) * crop_w / out - 0.5 (mirrored when flipped).
    images: float [B, C, H, W] -> [B, C, out, out]."""
    B, _, H, W = images.shape
    sx, sy = crop_w / W, crop_h / H  # half-extent of the crop in normalised coordinates, [B]
    tx, ty = (2 * left + crop_w) / W - 1, (2 * top + crop_h) / H - 1  # centre of the crop, [B]
    theta = torch.zeros(B, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = torch.where(flip, -sx, sx)
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, [B, 1, out_size, out_size], align_corners=False)  # [B, out, out, 2] as (x, y)
    # clamp to the centres of the crop's edge pixels, as resizing a cropped image does (exact for bilinear; a
    # bicubic tap at the very edge still reads one pixel beyond the crop)
    lo = torch.stack([(2 * left + 1) / W - 1, (2 * top + 1) / H - 1], dim=1).view(B, 1, 1, 2)
    hi = torch.stack([(2 * (left + crop_w) - 1) / W - 1, (2 * (top + crop_h) - 1) / H - 1], dim=1).view(B, 1, 1, 2)
    grid = torch.maximum(torch.minimum(grid, hi.to(grid.dtype)), lo.to(grid.dtype))
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)


class ResidentData:
    """The whole split as a uint8 tensor on the device; augmentation batched on the device.
    Same distribution as `pretrain_transform` (tests/test_data.py checks crop statistics and flip rate).
    official: PIL resize; we: bicubic grid_sample (cubic a=-0.75 vs PIL's -0.5), an upsampling-only path."""

    def __init__(self, images, labels, batch_size, img_size, crop_scale, crop_ratio, interpolation, seed, rank,
                 world, device, augment=None):
        self.images, self.labels = images.to(device), labels.to(device)  # uint8 [N, 3, H, W], [N]
        self.batch_augment = augment or self.augment  # a method's own views: (uint8 batch, generator) -> views
        self.batch_size, self.img_size, self.seed, self.rank, self.world = batch_size, img_size, seed, rank, world
        self.crop_scale, self.crop_ratio, self.mode, self.device = crop_scale, crop_ratio, interpolation, device
        self.mean, self.std = imagenet_stats(scale=255, device=device)
        self.steps_per_epoch = len(images) // world // batch_size

    def augment(self, images, generator):
        B, _, H, W = images.shape
        top, left, h, w = sample_resized_crops(B, H, W, self.crop_scale, self.crop_ratio, generator, self.device)
        flip = torch.rand(B, device=self.device, generator=generator) < 0.5
        x = (images.float() - self.mean) / self.std  # normalise first: border padding then repeats real pixels
        return crop_resize_flip(x, top, left, h, w, flip, self.img_size, self.mode)

    def epoch(self, epoch, start_step=0):
        order = epoch_order(len(self.images), self.seed, epoch, self.rank, self.world).to(self.device)
        generator = torch.Generator(device=self.device)
        for step in range(start_step, self.steps_per_epoch):
            idx = order[step * self.batch_size: (step + 1) * self.batch_size]  # [B]
            generator.manual_seed(mix_seed(self.seed, epoch, step, self.rank))
            yield self.batch_augment(self.images[idx], generator), self.labels[idx]


class LoaderData:
    """The DataLoader path: worker processes decode and augment (ResizedCropFlip, or a method's own transform), or
    with DeviceDecodeCrop draw the crops and read the JPEGs' bytes, which are decoded here, on the device. A batch of
    uint8 images is normalised here, on the device, after the transfer."""

    def __init__(self, dataset, batch_size, seed, rank, world, workers, device):
        dataset.seed = seed
        self.sampler = EpochSampler(len(dataset), batch_size, seed, rank, world)
        self.decode = dataset.transform.decode_batch if isinstance(dataset.transform, DeviceDecodeCrop) else None
        # own generator: creating the iterator draws worker seeds from it, not from the global RNG (exact resume)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=True,
                                 worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(seed),
                                 collate_fn=collate_samples if self.decode else None)
        self.device = device
        self.steps_per_epoch = len(dataset) // world // batch_size
        self.mean, self.std = imagenet_stats(scale=255, device=device)

    def epoch(self, epoch, start_step=0):
        self.sampler.set_epoch(epoch, start_step)
        for imgs, labels in self.loader:
            imgs = self.decode(imgs, self.device) if self.decode else to_device(imgs, self.device)
            if isinstance(imgs, torch.Tensor) and imgs.dtype == torch.uint8:
                imgs = normalize_uint8(imgs, self.mean, self.std)
            yield imgs, labels.to(self.device, non_blocking=True)


def to_device(x, device):
    """A batch, or a list/tuple of views of it (a transform that returns several tensors), moved to the device."""
    if isinstance(x, (list, tuple)):
        return tuple(to_device(t, device) for t in x)
    return x.to(device, non_blocking=True)


def available_host_memory():
    """Bytes of host memory a new allocation can take (Linux: MemAvailable, which counts reclaimable page cache);
    None where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def resident_fits(num_bytes, device):
    """Hold a split on the device when it takes at most a quarter of the device's free memory."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_host_memory()
    return free is not None and num_bytes <= free / 4


def build_train_data(cfg, dist, crop_scale, crop_ratio=(3 / 4, 4 / 3), interpolation="bicubic", log=print,
                     transform=None, augment=None):
    """The pre-training batches: resident when the dataset allows and fits (and --resident), else a DataLoader.
    Each yields (images, labels), images [B, 3, H, W] with the law of `pretrain_transform(crop_scale, ...)` by
    default (the DataLoader path: ResizedCropFlip, or DeviceDecodeCrop with --decode device; normalised on the device).
    A method with its own views passes both paths of them: `transform` (PIL image -> tensor, or a tuple of views)
    for the DataLoader and `augment` ((uint8 [B, 3, H, W] on the device, generator) -> the same views, batched) for
    the resident path; the batches then carry that tuple. With `transform` alone the DataLoader path is used."""
    if transform is not None and cfg.decode == "device":
        raise UserError("--decode device decodes the default crop's JPEGs; this method's own views are made in the "
                        "workers (--decode workers)")
    info = DATASETS[cfg.data]
    ds = run_dataset(cfg, "pretrain")
    if len(ds) // dist.world_size < cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {len(ds)} images of {cfg.data}"
                        + (f" split over {dist.world_size} processes" if dist.world_size > 1 else ""))
    native = info.stored_size(cfg.img_size)
    if cfg.resident and info.in_memory and native <= cfg.img_size and (transform is None or augment is not None):
        nbytes = len(ds) * 3 * native * native
        if resident_fits(nbytes, dist.device):
            images, labels = ds.as_uint8()
            log(f"data: {cfg.data}, {len(ds)} images resident on {dist.device} ({nbytes / 2**20:.0f} MiB), "
                f"augmented in batches")
            return ResidentData(images, labels, cfg.batch_size, cfg.img_size, crop_scale, crop_ratio, interpolation,
                                cfg.seed, dist.rank, dist.world_size, dist.device, augment)
    crop = DeviceDecodeCrop if cfg.decode == "device" else ResizedCropFlip
    ds.transform = transform or crop(cfg.img_size, crop_scale, crop_ratio, interpolation)
    cfg.resident = False  # (config.json says which path the run took)
    decoded = f"JPEGs decoded on {dist.device} in batches" if cfg.decode == "device" else "decoded in the workers"
    log(f"data: {cfg.data}, {len(ds)} images, DataLoader with {cfg.workers} workers, {decoded}")
    return LoaderData(ds, cfg.batch_size, cfg.seed, dist.rank, dist.world_size, cfg.workers, dist.device)


class TensorImages(Dataset):
    """An in-memory split already at the model input size (uint8 [N, 3, S, S]) with the eval transform done on the
    tensor: what eval_transform gives through PIL when there is nothing to resize. Synthetic images are rendered once
    instead of at every pass (the monitors make two), with the same numbers as through PIL and faster."""

    def __init__(self, images, labels, num_classes):
        self.images, self.labels, self.num_classes = images, labels, num_classes
        self.mean, self.std = imagenet_stats(shape=(3, 1, 1))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return (self.images[i] / 255 - self.mean) / self.std, int(self.labels[i])  # [3, S, S]


def build_eval_loader(cfg, split, dist, batch_size=None, workers=None, transform=None):
    """A fixed-order loader over a labelled split with the eval transform (all of it on every rank; evaluation
    shards by itself). None when the dataset has no such labelled split."""
    info = DATASETS[cfg.data]
    ds = run_dataset(cfg, split, transform or eval_transform(cfg.img_size))
    if ds is None:
        return None
    if transform is None and info.in_memory and info.stored_size(cfg.img_size) == cfg.img_size:
        images, labels = ds.as_uint8()
        ds, workers = TensorImages(images, labels, ds.num_classes), 0
    return DataLoader(ds, batch_size=batch_size or cfg.batch_size, shuffle=False, worker_init_fn=ignore_stop_signals,
                      num_workers=cfg.workers if workers is None else workers, pin_memory=dist.device.type == "cuda",
                      generator=torch.Generator())


def preview_indices(labels, n, seed):
    """n indices, one image of each class in turn (round-robin over the classes, each class's images in a seeded
    order), so that a grid of a class-sorted folder shows every class rather than n images of the first one.
    Unlabelled images (-1) are one group: a seeded draw."""
    labels = torch.as_tensor(np.asarray(labels))
    g = torch.Generator().manual_seed(seed)
    groups = [idx[torch.randperm(len(idx), generator=g)].tolist()
              for idx in ((labels == c).nonzero().flatten() for c in labels.unique())]  # [classes][their images]
    turns = (group[i] for i in range(max(map(len, groups), default=0)) for group in groups if i < len(group))
    return [i for _, i in zip(range(n), turns)]


def preview_images(cfg, dist, n=8):
    """n images of the val split (or of the pre-training split), one per class in turn (preview_indices), eval
    transform: [n, 3, H, W]."""
    transform = eval_transform(cfg.img_size)
    ds = run_dataset(cfg, "val", transform)
    if ds is None:  # an unlabelled folder has no val split
        ds = run_dataset(cfg, "pretrain", transform)
    return torch.stack([ds[i][0] for i in preview_indices(ds.labels, n, cfg.seed)])
