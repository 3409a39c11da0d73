import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
