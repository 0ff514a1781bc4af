"""ELogitNorm under DistributedDataParallel (two gloo processes on the CPU, loopback only).

One DDP step over two ranks, each with half of the batch, must give the same parameters as one
single-process step on the whole batch (the mean loss over equal halves, averaged by DDP, is the
mean over the whole batch).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import elogitnorm_fast as ef

WORLD = 2


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 7))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(16, 12, generator=generator), torch.randint(0, 7, (16,),
                                                                   generator=generator)


def _step(model: nn.Module, head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = ef.elogitnorm_loss(model(x), head.weight, y)
    loss.backward()
    optimizer.step()


def _worker(rank: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        x, y = _batch()
        half = x.shape[0] // WORLD
        rows = slice(rank * half, (rank + 1) * half)
        _step(ddp, model[2], x[rows], y[rows])
        if rank == 0:
            torch.save(model.state_dict(), out_path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_step_equals_single_process_step(tmp_path):
    out_path = str(tmp_path / "ddp_state.pt")
    mp.start_processes(_worker, args=(_free_port(), out_path), nprocs=WORLD, join=True,
                       start_method="spawn")
    ddp_state = torch.load(out_path, weights_only=True)

    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, model[2], *_batch())
    for name, value in model.state_dict().items():
        assert not torch.equal(value, before[name]), f"{name} did not move in the reference step"
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
