"""Run by tests/test_gpu_ready.py under `torchrun --nproc_per_node 2` (CPU, gloo): methods' main() one after the other
with --compile on the aot_eager backend; for each, every process appends one JSON line with the method, the modules
it compiled, its graphs and its graph breaks to ROWS_DIR/rank<R>.jsonl (a file per process: lines printed by two
processes to one pipe can run together).

    torchrun --nproc_per_node 2 tests/graph_worker.py '[["mae", [ARGS...]], ["sit", [ARGS...]]]' ROWS_DIR
"""
import importlib
import json
import sys
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common.training as training  # noqa: E402


def main():
    from torch._dynamo.utils import counters
    real_compile, compiled = torch.compile, []

    def compile_aot_eager(model, **kw):
        compiled.append(type(model).__name__)
        return real_compile(model, backend="aot_eager", **kw)

    training.torch.compile = compile_aot_eager
    runs, rows_dir = json.loads(sys.argv[1]), Path(sys.argv[2])
    for method, argv in runs:
        module = importlib.import_module(method)
        for name in ("report", "report_igpt"):  # no monitors: the training steps are what is counted
            if hasattr(module, name):
                setattr(module, name, lambda *a, **k: {})
        torch._dynamo.reset()
        counters.clear()
        compiled.clear()
        sys.argv = [f"{method}.py", *argv, "--compile"]
        module.main()
        rank = torch.distributed.get_rank()
        row = {"method": method, "rank": rank, "compiled": compiled, "graphs": counters["stats"]["unique_graphs"],
               "breaks": sum(counters["graph_break"].values())}
        with open(rows_dir / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
