"""GPU readiness, proven on the CPU: no host sync inside a training step (a count of the calls that would make the
host wait for the GPU), one compiled graph per method, the device each process takes under torchrun."""
import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import common.training as training
from common.training import resolve_device
from conftest import ROOT, TINY, read_log, run_script
from test_mae import run_main_in_process

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
DECODER = ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2"]
BEIT_TOKENIZER = ["--vocab-size", "64", "--dvae-stride", "4", "--dvae-hidden", "16", "--dvae-codebook-dim", "16",
                  "--tokenizer-epochs", "1", "--tokenizer-batch-size", "16"]
VQKD_TOKENIZER = ["--vocab-size", "64", "--vqkd-codebook-dim", "8", "--tokenizer-epochs", "1",
                  "--tokenizer-batch-size", "16"]
IGPT = ["--model", "igpt_nano", "--img-size", "8", "--palette-size", "8", "--palette-images", "32", "--batch-size",
        "16", "--workers", "0", "--n-samples", "2"]
# 96 images of batch 16: 6 steps an epoch; --max-steps 5 leaves steps 2, 3, 4 between two non-logging steps
STEPS = ["--subset", "96", "--epochs", "1", "--max-steps", "5", "--log-every", "1000", "--amp", "fp32"]
METHODS = {"mae": TINY + DECODER, "simmim": TINY + ["--mask-patch-size", "8"], "beit": TINY + BEIT_TOKENIZER,
           "beit2": TINY + VQKD_TOKENIZER, "sit": TINY + ["--head-hidden-dim", "64", "--out-dim", "32"],
           "convmae": TINY + DECODER, "igpt": IGPT}

# Tensor methods and functions that make the host wait for the device: a value read back, an output whose size
# depends on the data (nonzero, a boolean-mask index, bincount without a fixed length), or host data copied in
# (a tensor built from Python numbers: a blocking copy from pageable memory on CUDA)
SYNCING = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "argwhere", "cpu", "numpy",
           "masked_select", "unique", "unique_consecutive", "bincount", "tensor", "as_tensor", "from_numpy"}


class SyncCounter(TorchFunctionMode):
    """Counts the syncing calls made while it is active, by name."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        boolean_index = name in ("__getitem__", "__setitem__") and any(
            torch.is_tensor(a) and a.dtype == torch.bool for a in _flat(args[1:2]))
        if name in SYNCING or boolean_index:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _flat(items):
    for item in items:
        if isinstance(item, (tuple, list)):
            yield from _flat(item)
        else:
            yield item


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """BEiT v2's teacher: the encoder.pth of a 2-step mae.py run."""
    out = tmp_path_factory.mktemp("mae") / "run"
    run_script("mae.py", *TINY, *DECODER, "--max-steps", "2", "--out", out, env=ONE_THREAD)
    return out / "encoder.pth"


def syncs_per_step(method, argv, monkeypatch):
    """main() of `method` for 5 steps with the syncing calls counted step by step. A step's window runs from the
    non-finite guard's update of the step before (every loop calls it once per micro-step, before its logging) to
    its own: the rest of the previous step's bookkeeping, the next batch, the masks, forward, backward and update.
    Returns {(stage, step): calls} for the steps whose previous step did not log (stage 0: the tokenizer's training
    where there is one, then the method's)."""
    counter, windows, state = SyncCounter(), {}, {"stage": 0, "last": None}
    real_update = training.NonFiniteGuard.update

    def update(self, step, *values):
        real_update(self, step, *values)
        if state["last"] is not None and step == 0:  # the step count restarts: the next stage
            state["stage"] += 1
        if state["last"] is not None and step == state["last"] + 1 and step >= 2:
            windows[(state["stage"], step)] = list(counter.calls)
        counter.calls.clear()
        state["last"] = step

    monkeypatch.setattr(training.NonFiniteGuard, "update", update)
    module = importlib.import_module(method)
    if method == "igpt":  # its report (monitors per layer, samples) has a name of its own
        monkeypatch.setattr(module, "report_igpt", lambda *a, **k: {})
        monkeypatch.setattr(module, "report", None, raising=False)
    with counter:
        run_main_in_process(module, argv, monkeypatch)
    return windows


@pytest.mark.parametrize("method", list(METHODS))
def test_no_host_sync_inside_a_training_step(method, tmp_path, monkeypatch, one_thread, request):
    """3 steps of every method, and of each tokenizer's training, that neither follow nor are logging steps: none
    reads a value back from the device or makes a tensor whose size depends on the data."""
    argv = [*METHODS[method], *STEPS, "--out", tmp_path / "run"]
    if method == "beit2":
        argv += ["--teacher", request.getfixturevalue("teacher")]
    windows = syncs_per_step(method, argv, monkeypatch)
    stages = 2 if method in ("beit", "beit2") else 1
    expected = {(stage, step): [] for stage in range(stages) for step in (2, 3, 4)}
    assert {k: v for k, v in windows.items() if k in expected} == expected


def test_the_sync_counter_sees_a_sync(monkeypatch, tmp_path, one_thread):
    """The counter is not blind: an .item() added to MAE's loss shows in every window."""
    import mae
    real = mae.training_loss

    def loss_with_item(*args):
        loss = real(*args)
        loss.item()
        return loss

    monkeypatch.setattr(mae, "training_loss", loss_with_item)
    windows = syncs_per_step("mae", [*METHODS["mae"], *STEPS, "--out", tmp_path / "run"], monkeypatch)
    assert {k: v for k, v in windows.items()} == {(0, 2): ["item"], (0, 3): ["item"], (0, 4): ["item"]}


# ----------------------------------------------------------------------------------------------------- devices
def test_every_torchrun_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    """Under torchrun, `--device cuda:0` (or cuda) puts process LOCAL_RANK on cuda:LOCAL_RANK; alone, the device
    is the one named; CPU stays CPU."""
    assert resolve_device("cuda:0", 8, 3) == torch.device("cuda", 3)
    assert resolve_device("cuda", 8, 5) == torch.device("cuda", 5)
    assert resolve_device("cuda:1", 1, 0) == torch.device("cuda", 1)
    assert resolve_device("cpu", 8, 3) == torch.device("cpu")
    # setup_distributed reads the torchrun variables
    set_devices, groups = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_devices.append)
    monkeypatch.setattr(training.torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(training.torch_dist, "init_process_group", lambda backend, **kw: groups.append(backend))
    for k, v in {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3"}.items():
        monkeypatch.setenv(k, v)
    d = training.setup_distributed("cuda:0")
    assert (d.rank, d.world_size, d.local_rank, d.device) == (11, 16, 3, torch.device("cuda", 3))
    assert set_devices == [torch.device("cuda", 3)] and groups == ["nccl"]


# ------------------------------------------------------------------------------------------------ one graph
def compiled_run(method, argv, monkeypatch):
    """main() of `method` with --compile on the aot_eager backend (Dynamo and AOTAutograd, as inductor receives
    them, without inductor's C++ build). Returns (the compiled modules' class names, graphs, graph breaks)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    real_compile, compiled = torch.compile, []

    def compile_aot_eager(model, **kw):
        compiled.append(type(model).__name__)
        return real_compile(model, backend="aot_eager", **kw)

    monkeypatch.setattr(training.torch, "compile", compile_aot_eager)
    module = importlib.import_module(method)
    if method == "igpt":
        monkeypatch.setattr(module, "report_igpt", lambda *a, **k: {})
        monkeypatch.setattr(module, "report", None, raising=False)
    torch._dynamo.reset()
    counters.clear()
    try:
        run_main_in_process(module, [*argv, "--compile"], monkeypatch)
        return compiled, counters["stats"]["unique_graphs"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()


COMPILED = {"mae": ["MAE"], "simmim": ["SimMIM"], "beit": ["DVAE", "BEiT"], "beit2": ["VQKD", "BEiTv2"],
            "sit": ["SiT"], "convmae": ["ConvMAE"], "igpt": ["ImageGPT"]}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_training_step_is_one_graph(method, tmp_path, monkeypatch, one_thread, request):
    """--compile over 5 steps of every method (and of each tokenizer's training): one graph per compiled module,
    no graph break, no recompilation (which would add a graph)."""
    argv = [*METHODS[method], *STEPS, "--out", tmp_path / "run"]
    if method == "beit2":
        argv += ["--teacher", request.getfixturevalue("teacher")]
    compiled, graphs, breaks = compiled_run(method, argv, monkeypatch)
    assert (compiled, graphs, breaks) == (COMPILED[method], len(COMPILED[method]), {})


def test_one_graph_in_two_processes(tmp_path, teacher):
    """The same for every method under torchrun with 2 processes (gloo), in one launch: DDP around the compiled
    modules, SiT's negatives gathered across the processes and its synchronised BatchNorm, BEiT v2's codebook
    statistics all-reduced: still one graph per compiled module and no break, in every process."""
    runs = [[m, [*map(str, METHODS[m]), *STEPS, "--out", str(tmp_path / m)]
             + (["--teacher", str(teacher)] if m == "beit2" else [])] for m in METHODS]
    port = 29700 + sum(map(ord, str(tmp_path))) % 200
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(ROOT / "tests" / "graph_worker.py"), json.dumps(runs), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for rank in (0, 1) for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()]
    rows = sorted(map(json.loads, lines), key=lambda r: (list(METHODS).index(r["method"]), r["rank"]))
    assert rows == [{"method": m, "rank": r, "compiled": COMPILED[m], "graphs": len(COMPILED[m]), "breaks": 0}
                    for m in METHODS for r in (0, 1)]


# ------------------------------------------------------------------------------------------------------- fp16
class CountingScaler(torch.amp.GradScaler):
    """A GradScaler that counts the losses it scales, kept in `made`."""
    made = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaled = 0
        CountingScaler.made.append(self)

    def scale(self, outputs):
        self.scaled += 1
        return super().scale(outputs)


@pytest.mark.parametrize("method", ["beit", "beit2", "igpt"])
def test_every_fp16_backward_is_scaled(method, tmp_path, monkeypatch, one_thread, request):
    """Under fp16 autocast (here on the CPU; on CUDA for V100 / T4) every backward goes through an enabled
    GradScaler: each tokenizer's training (5 steps: --max-steps caps stage 1 too), the method's steps (5) and iGPT's
    joint fine-tune (4 steps of its 64 labelled images); and the losses stay finite."""
    monkeypatch.setattr(training, "resolve_amp", lambda amp, device: torch.float16)
    monkeypatch.setattr(torch.amp, "GradScaler", CountingScaler)
    CountingScaler.made = []
    argv = [*METHODS[method], *STEPS, "--out", tmp_path / "run"]
    if method == "beit2":
        argv += ["--teacher", request.getfixturevalue("teacher")]
    module = importlib.import_module(method)
    if method == "igpt":  # the fine-tune, without the monitors around it
        finetuned = []
        monkeypatch.setattr(module, "report_igpt", lambda model, run: finetuned.append(
            module.finetune_joint(model, run, epochs=1)))
        monkeypatch.setattr(module, "report", None, raising=False)
        argv[argv.index("--subset") + 1] = "64"
    run_main_in_process(module, argv, monkeypatch)
    scaled = [s.scaled for s in CountingScaler.made]
    assert all(s.is_enabled() for s in CountingScaler.made)
    expected = {"beit": [5, 5], "beit2": [5, 5], "igpt": [4, 4]}[method]
    assert sorted(scaled) == sorted(expected)
    losses = [s["loss"] for s in read_log(tmp_path / "run", "step")]
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses)


# ----------------------------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("method", METHODS)
def test_an_update_takes_the_lr_of_its_first_micro_step(method, tmp_path, monkeypatch, one_thread, request):
    """--accum-iter 2 in every method: both micro-steps of an update run at the lr the schedule gives the first
    (official MAE `if data_iter_step % accum_iter == 0: adjust_learning_rate`), so the logged lr moves every other
    step during the warm-up."""
    argv = [*METHODS[method], *STEPS, "--accum-iter", "2", "--log-every", "1", "--max-steps", "4",
            "--out", tmp_path / "run"]
    if method == "beit2":
        argv += ["--teacher", request.getfixturevalue("teacher")]
    if method == "igpt":
        monkeypatch.setattr(importlib.import_module(method), "report_igpt", lambda *a, **k: {})
        monkeypatch.setattr(importlib.import_module(method), "report", None, raising=False)
    run_main_in_process(importlib.import_module(method), argv, monkeypatch)
    lrs = [s["lr"] for s in read_log(tmp_path / "run", "step")]
    assert len(lrs) == 4 and lrs[0] == lrs[1] and lrs[2] == lrs[3] and lrs[1] < lrs[2], lrs
