"""Run by tests/test_reliability.py under `torchrun --nproc_per_node 2` (CPU, gloo).

Checks what the training loop's DDP pieces promise: `set_grad_sync(model, False)` (a non-final micro-step of an
accumulation) leaves each rank's gradients local, `set_grad_sync(model, True)` averages them; the data order
shards the epoch disjointly over the ranks and reshuffles every epoch; the logged loss is the mean over the ranks.
Exits non-zero on failure.
"""
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.data import epoch_order  # noqa: E402
from common.training import Run, set_grad_sync, setup_distributed  # noqa: E402


def gathered(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def main():
    d = setup_distributed("cpu")
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(4, 3))
    x = torch.full((2, 4), float(d.rank + 1))  # different data on each rank

    set_grad_sync(model, False)  # accumulate locally
    model(x).sum().backward()
    g0, g1 = gathered(model.module.weight.grad)
    assert not torch.equal(g0, g1), "gradients were synchronised on a no-sync micro-step"
    local = model.module.weight.grad.clone()

    set_grad_sync(model, True)  # last micro-step: all-reduce the accumulated gradients
    model(x).sum().backward()
    g0, g1 = gathered(model.module.weight.grad)
    assert torch.equal(g0, g1), "gradients differ after a sync step"
    expected = sum(gathered(local)) / 2 * 2  # each rank: 2 x its local grad, then averaged over ranks
    assert torch.allclose(g0, expected), (g0, expected)

    # the logged loss is the mean over the ranks (official `all_reduce_mean`): 1 and 2 -> 1.5 on both
    mean = Run.mean_over_ranks(SimpleNamespace(dist=d), torch.tensor(float(d.rank + 1)))
    assert mean.item() == 1.5, mean

    a = epoch_order(20, seed=0, epoch=0, rank=d.rank, world=2)
    others = gathered(a)
    assert not set(others[0].tolist()) & set(others[1].tolist()), "ranks share images in an epoch"
    assert not torch.equal(a, epoch_order(20, seed=0, epoch=1, rank=d.rank, world=2)), "no reshuffle"
    dist.destroy_process_group()
    print(f"rank {d.rank}: ok")


if __name__ == "__main__":
    main()
