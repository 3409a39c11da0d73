import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# A tiny end-to-end configuration shared by the CLI tests: 2 blocks of width 64, 16 tokens, 64 images.
TINY = ["--model", "vit_nano", "--img-size", "16", "--patch-size", "4", "--subset", "64", "--batch-size", "16",
        "--epochs", "2", "--warmup-epochs", "0.5", "--workers", "0", "--log-every", "1"]


def run_script(script, *args, timeout=300, env=None, check=True):
    """Run a method script in a subprocess from the repo root; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc


def read_log(out, kind):
    return [r for r in map(json.loads, (Path(out) / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture
def tiny():
    return list(TINY)


@pytest.fixture
def one_thread():
    """The tiny models of the tests are overhead-bound: one thread avoids oversubscribing a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_encoder_matches_timm_beit(encoder, img_size=32):
    """A tiny BEiT-style encoder (patch 4, width 64, 2 blocks, 2 heads, layer scale 0.1) loads into timm's `Beit` with
    strict=True and gives the same features. Its zero/constant-initialised parameters get values first, so a mix-up
    would show."""
    timm = pytest.importorskip("timm")  # installed by requirements.txt: this runs in CI
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "gamma" in name or "bias" in name:
                p.normal_(0, 0.5)
    ref = timm.models.beit.Beit(img_size=img_size, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=0,
                                use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                                init_values=0.1, global_pool="token")
    ref.load_state_dict(encoder.state_dict(), strict=True)
    imgs = torch.randn(2, 3, img_size, img_size)
    encoder.eval(), ref.eval()
    with torch.no_grad():
        assert torch.allclose(encoder.forward_features(imgs), ref.forward_features(imgs), atol=1e-5)


def assert_loss_ignores_visible_targets(model, imgs, view, mask, slots, ids, loss, changed):
    """BEiT's loss (v1 and v2) reads the tokenizer's ids at masked positions only: other ids at the visible positions
    leave it as it is, another id at the masked position `changed` (batch, patch) moves it."""
    other = ids.clone()
    other[~mask] = (other[~mask] + 1) % model.tokenizer.vocab_size
    model.tokenizer.get_codebook_indices = lambda v: other
    with torch.no_grad():
        assert model(imgs, view, mask, slots)[0].item() == pytest.approx(loss.item(), rel=1e-6)
        other[changed] = (other[changed] + 1) % model.tokenizer.vocab_size
        assert model(imgs, view, mask, slots)[0].item() != pytest.approx(loss.item(), rel=1e-6)


def assert_same_law(a, b, z=3.7):
    """Two samples' counts over the same bins (1-D tensors or arrays; bins empty in both are dropped) agree by the
    two-sample chi-square test for equal sample sizes, sum (a - b)^2 / (a + b), at the level of a normal z
    (3.7: one false alarm in ~10,000 runs); the threshold is the Wilson-Hilferty approximation of the chi-square
    quantile with bins - 1 degrees of freedom."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.sum() == b.sum(), (a.sum(), b.sum())
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    stat = ((a - b) ** 2 / (a + b)).sum().item()
    df = len(a) - 1
    if df == 0:  # one bin: both samples all in it
        return
    limit = df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3
    assert stat < limit, f"chi-square {stat:.1f} >= {limit:.1f} ({df} degrees of freedom)\n{a.tolist()}\n{b.tolist()}"


def photo_like(width, height, seed=0):
    """An RGB image with detail at every scale (smooth colour fields + texture + noise), as a photo compresses."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(height, width),
                                             mode="bicubic", align_corners=False)[0]  # [3, H, W]
    x = torch.arange(width) / width
    y = torch.arange(height).view(-1, 1) / height
    texture = 0.15 * torch.sin(40 * x + 25 * y) * torch.cos(13 * y - 7 * x)  # [H, W]
    img = (smooth + texture + 0.03 * torch.randn(3, height, width, generator=g)).clamp(0, 1)
    return Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy())  # [3, H, W] -> [H, W, 3]
