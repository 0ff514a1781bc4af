"""ELogitNorm under DistributedDataParallel (two gloo ranks on the CPU, loopback only).

One DDP step over two ranks, each with half of the batch, must give the same parameters as one
single-process step on the whole batch (the mean loss over equal halves, averaged by DDP, is the
mean over the whole batch).
"""

from __future__ import annotations

import textwrap

import torch
from torch import nn

import elogitnorm_fast as ef

from gloo_ranks import FINISH, run_ranks

SETUP = textwrap.dedent(
    """
    import torch
    from torch import nn

    import elogitnorm_fast as ef


    def make_model():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 7))


    def make_batch():
        generator = torch.Generator().manual_seed(5)
        return (torch.randn(16, 12, generator=generator),
                torch.randint(0, 7, (16,), generator=generator))


    def sgd_step(model, head, x, y):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        ef.elogitnorm_loss(model(x), head.weight, y).backward()
        optimizer.step()
    """
)
WORKER = SETUP + textwrap.dedent(
    """
    import sys
    import torch.distributed as dist

    out_path, rank = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    x, y = make_batch()
    half = x.shape[0] // 2
    rows = slice(rank * half, (rank + 1) * half)
    sgd_step(ddp, ddp.module[2], x[rows], y[rows])  # the head as a DDP user reaches it
    if rank == 0:
        torch.save(model.state_dict(), out_path)
    """
) + FINISH


def test_ddp_step_equals_single_process_step(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run_ranks(script, [str(tmp_path / "ddp_state.pt")])
    ddp_state = torch.load(tmp_path / "ddp_state.pt", weights_only=True)

    helpers: dict = {"ef": ef, "nn": nn}
    exec(SETUP, helpers)  # the same model, batch and step, in this process
    model = helpers["make_model"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    helpers["sgd_step"](model, model[2], *helpers["make_batch"]())
    for name, value in model.state_dict().items():
        assert not torch.equal(value, before[name]), f"{name} did not move in the reference step"
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
