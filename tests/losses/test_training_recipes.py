"""The training recipes the README promises, each run for real on the CPU: the loss is compared
with the float64 reference, or the step with the same step written without the recipe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import elogitnorm_fast as ef
from elogitnorm_fast.reference import elogitnorm_reference

CPU_BACKENDS = [name for name in ("cpu", "torch", "reference")
                if name in ef.available_backends("cpu")]


class TinyNet(nn.Module):
    """A trunk and a linear head, exposing the head through ``get_classifier()`` as timm models
    do."""

    def __init__(self, classes: int = 7, features: int = 6, bias: bool = True) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, features), nn.Tanh())
        self.fc = nn.Linear(features, classes, bias=bias)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk(x))


def _batch(rows: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 5, generator=generator), torch.randint(0, 7, (rows,),
                                                                     generator=generator)


def _reference_grads(model: TinyNet, x, y, scale: float = 1.0) -> dict[str, torch.Tensor]:
    twin = TinyNet(bias=model.fc.bias is not None).double()
    twin.load_state_dict(model.state_dict())
    (scale * elogitnorm_reference(twin(x.double()), twin.fc.weight, y)).backward()
    return {name: p.grad for name, p in twin.named_parameters()}


def _check_grads(model: TinyNet, expected: dict[str, torch.Tensor]) -> None:
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad.double(), expected[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_get_classifier_and_bias_free_heads(backend, bias):
    torch.manual_seed(1)
    model = TinyNet(bias=bias)
    x, y = _batch()
    ef.ELogitNormLoss(backend=backend)(model(x), model.get_classifier().weight, y).backward()
    _check_grads(model, _reference_grads(model, x, y))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_accumulation_divides_the_loss_in_place(backend):
    torch.manual_seed(2)
    model, steps = TinyNet(), 3
    for seed in range(steps):
        x, y = _batch(seed=seed)
        loss = ef.elogitnorm_loss(model(x), model.fc.weight, y, backend=backend)
        loss /= steps
        loss.backward()
    expected: dict[str, torch.Tensor] = {}
    for seed in range(steps):
        for name, grad in _reference_grads(model, *_batch(seed=seed), scale=1 / steps).items():
            expected[name] = expected.get(name, 0) + grad
    _check_grads(model, expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_scaler_gives_the_unscaled_gradients(backend):
    torch.manual_seed(3)
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = _batch()
    loss = ef.elogitnorm_loss(model(x), model.fc.weight, y, backend=backend)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    _check_grads(model, _reference_grads(model, x, y))
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 1024.0  # no inf / NaN found, so no back-off


@pytest.mark.parametrize("loss_name", ["elogitnorm", "logitnorm"])
def test_autocast_loss_is_float32_like_cross_entropy(loss_name):
    torch.manual_seed(4)
    model = TinyNet()
    x, y = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        if loss_name == "elogitnorm":
            loss = ef.elogitnorm_loss(logits, model.fc.weight, y)
        else:
            loss = ef.logitnorm_loss(logits, y)
        baseline = nn.functional.cross_entropy(logits, y)
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == baseline.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_compiled_model_and_loss_train_like_the_reference():
    torch.manual_seed(5)
    model = TinyNet()
    x, y = _batch()

    def step(net: TinyNet) -> torch.Tensor:
        return ef.elogitnorm_loss(net(x), net.fc.weight, y)

    torch.compile(step, fullgraph=True)(model).backward()
    _check_grads(model, _reference_grads(model, x, y))
