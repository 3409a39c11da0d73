"""Run by tests/test_gpu_ready.py under `torchrun --nproc_per_node 2` (CPU, gloo): methods' main() one after the other
with --compile on the aot_eager backend; for each, every process prints one JSON line with the method, the modules
it compiled, its graphs and its graph breaks.

    torchrun --nproc_per_node 2 tests/graph_worker.py '[["mae", [ARGS...]], ["sit", [ARGS...]]]'
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
    for method, argv in json.loads(sys.argv[1]):
        module = importlib.import_module(method)
        for name in ("report", "report_igpt"):  # no monitors: the training steps are what is counted
            if hasattr(module, name):
                setattr(module, name, lambda *a, **k: {})
        torch._dynamo.reset()
        counters.clear()
        compiled.clear()
        sys.argv = [f"{method}.py", *argv, "--compile"]
        module.main()
        print(json.dumps({"method": method, "rank": torch.distributed.get_rank(), "compiled": compiled,
                          "graphs": counters["stats"]["unique_graphs"],
                          "breaks": sum(counters["graph_break"].values())}), flush=True)


if __name__ == "__main__":
    main()
