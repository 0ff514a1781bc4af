"""ELogitNorm under DistributedDataParallel (two gloo ranks on the CPU, loopback only).

One DDP step over two ranks, each with half of the batch, must give the same parameters as one
single-process step on the whole batch (the mean loss over equal halves, averaged by DDP, is the
mean over the whole batch): for the loss on the logits, and for the fused linear loss that takes
the place of the head (its weight gradient is reduced by DDP like any other).
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

import elogitnorm_fast as ef

from gloo_ranks import FINISH, run_ranks

SETUP = textwrap.dedent(
    """
    import torch
    from torch import nn

    import elogitnorm_fast as ef


    class Net(nn.Module):
        def __init__(self, fused):
            super().__init__()
            self.trunk = nn.Sequential(nn.Linear(12, 16), nn.ReLU())
            self.head = nn.Linear(16, 7)
            self.criterion = ef.LinearELogitNormLoss(self.head) if fused else None

        def forward(self, x, y):  # the loss, so that DDP sees the whole step
            if self.criterion is not None:
                return self.criterion(self.trunk(x), y)
            return ef.elogitnorm_loss(self.head(self.trunk(x)), self.head.weight, y)


    def make_model(fused):
        torch.manual_seed(3)
        return Net(fused)


    def make_batch():
        generator = torch.Generator().manual_seed(5)
        return (torch.randn(16, 12, generator=generator),
                torch.randint(0, 7, (16,), generator=generator))


    def sgd_step(model, x, y):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        model(x, y).backward()
        optimizer.step()
    """
)
WORKER = SETUP + textwrap.dedent(
    """
    import sys
    import torch.distributed as dist

    out_path, fused, rank = sys.argv[1], sys.argv[2] == "fused", int(sys.argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = make_model(fused)
    ddp = nn.parallel.DistributedDataParallel(model)
    x, y = make_batch()
    half = x.shape[0] // 2
    rows = slice(rank * half, (rank + 1) * half)
    sgd_step(ddp, x[rows], y[rows])
    if rank == 0:
        torch.save(model.state_dict(), out_path)
    """
) + FINISH


@pytest.mark.parametrize("form", ["logits", "fused"])
def test_ddp_step_equals_single_process_step(tmp_path, form):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run_ranks(script, [str(tmp_path / "ddp_state.pt"), form])
    ddp_state = torch.load(tmp_path / "ddp_state.pt", weights_only=True)

    helpers: dict = {"ef": ef, "nn": nn}
    exec(SETUP, helpers)  # the same model, batch and step, in this process
    model = helpers["make_model"](form == "fused")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    helpers["sgd_step"](model, *helpers["make_batch"]())
    for name, value in model.state_dict().items():
        assert not torch.equal(value, before[name]), f"{name} did not move in the reference step"
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
