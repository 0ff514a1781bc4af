"""Fused linear + ELogitNorm / LogitNorm against the unfused losses on ``F.linear``'s logits.

Every case draws fresh features, weight and bias and compares the fused loss and its three
gradients with ``elogitnorm_loss(F.linear(features, weight, bias), weight, target)`` (or
``logitnorm_loss``): in float64 against the ``reference`` backend, in float32 against the
unfused fast path of the same backend.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import elogitnorm_fast as ef
from elogitnorm_fast.linear_losses import CHUNK_BYTES, WEIGHT_SHARE, default_chunk_rows

FUSED = [name for name in ("torch", "cpu") if ef.unavailable_reason(name, "cpu") is None]
LOSSES = ("elogitnorm", "logitnorm")
REDUCTIONS = ("mean", "sum", "none")
#: (N, C, D): fewer rows than classes, more rows than classes.
SHAPES = ((7, 19, 5), (23, 6, 4))
#: Rows per chunk: one, an odd size that leaves a short last chunk, more than N.
CHUNKS = (1, 5, 1000)


def make_inputs(n, c, d, kind="random", *, dtype=torch.float64, bias=True, generator=None):
    """Fresh features, weight, bias (or None) and targets; tensors require grad.

    ``ties``: small integers everywhere, so logits tie, the row maximum included;
    ``some_ignored`` / ``all_ignored``: targets set to -100.
    """
    if kind == "ties":
        x = torch.randint(-2, 3, (n, d), generator=generator).double()
        w = torch.randint(-2, 3, (c, d), generator=generator).double()
        b = torch.randint(-1, 2, (c,), generator=generator).double()
    else:
        x = torch.randn(n, d, generator=generator, dtype=torch.float64)
        w = torch.randn(c, d, generator=generator, dtype=torch.float64)
        b = torch.randn(c, generator=generator, dtype=torch.float64)
    target = torch.randint(0, c, (n,), generator=generator)
    if kind == "some_ignored":
        target[::3] = -100
    elif kind == "all_ignored":
        target[:] = -100
    leaves = [t.to(dtype).requires_grad_(True) for t in (x, w, b)]
    return leaves[0], leaves[1], leaves[2] if bias else None, target


def unfused(loss, features, weight, bias, target, backend, **options):
    options.pop("chunk_rows", None)
    logits = F.linear(features, weight, bias)
    if loss == "elogitnorm":
        return ef.elogitnorm_loss(logits, weight, target, backend=backend, **options)
    return ef.logitnorm_loss(logits, target, backend=backend, **options)


def fused(loss, features, weight, bias, target, backend, **options):
    call = ef.linear_elogitnorm_loss if loss == "elogitnorm" else ef.linear_logitnorm_loss
    return call(features, weight, bias, target, backend=backend, **options)


def grads(loss, tensors, upstream):
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    found = iter(torch.autograd.grad(loss, wanted, upstream))
    return [next(found) if t is not None and t.requires_grad else None for t in tensors]


def compare(loss, backend, expected_backend, inputs, *, rtol, atol, **options):
    """Fused on ``backend`` against unfused on ``expected_backend``, on copies of the same
    inputs: loss (value, dtype, shape) and the gradient of every input that requires one."""
    features, weight, bias, target = inputs
    copies = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad)
              for t in (features, weight, bias)]
    ours = fused(loss, features, weight, bias, target, backend, **options)
    theirs = unfused(loss, *copies, target, expected_backend, **options)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol, equal_nan=True)
    upstream = torch.rand(ours.shape, dtype=ours.dtype) + 0.5
    for mine, other, tensor in zip(grads(ours, (features, weight, bias), upstream),
                                   grads(theirs, copies, upstream), (features, weight, bias),
                                   strict=True):
        if tensor is None or not tensor.requires_grad:
            continue
        assert mine.dtype == tensor.dtype
        torch.testing.assert_close(mine, other, rtol=rtol, atol=atol)



def compare_to_float64(loss, backend, inputs, *, rtol, atol, reference="reference", **options):
    """Fused on ``backend`` against the unfused loss on ``reference`` in float64, on the same
    (rounded) values: loss and the gradient of every input that requires one, in its dtype.
    Returns the fused loss."""
    features, weight, bias, target = inputs
    exact = [None if t is None else t.detach().double().requires_grad_(t.requires_grad)
             for t in (features, weight, bias)]
    ours = fused(loss, features, weight, bias, target, backend, **options)
    truth = unfused(loss, *exact, target, reference, **options)
    torch.testing.assert_close(ours.double(), truth, rtol=rtol, atol=atol, equal_nan=True)
    upstream = torch.rand(truth.shape, dtype=torch.float64, device=truth.device) + 0.5
    tensors = (features, weight, bias)
    for mine, expected, tensor in zip(grads(ours, tensors, upstream.to(ours.dtype)),
                                      grads(truth, exact, upstream), tensors, strict=True):
        if tensor is not None and tensor.requires_grad:
            assert mine.dtype == tensor.dtype
            torch.testing.assert_close(mine.double(), expected, rtol=rtol, atol=atol)
    return ours

@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_float64_matches_reference(backend, loss, reduction, shape, chunk):
    inputs = make_inputs(*shape)
    compare(loss, backend, "reference", inputs, rtol=1e-9, atol=1e-10, reduction=reduction,
            chunk_rows=chunk)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("kind", ["ties", "some_ignored", "all_ignored"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float64_special_rows_match_reference(backend, loss, kind, reduction):
    inputs = make_inputs(11, 9, 6, kind)
    compare(loss, backend, "reference", inputs, rtol=1e-9, atol=1e-10, reduction=reduction,
            chunk_rows=4)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(37, 300, 16), (300, 37, 16)])
def test_float32_matches_unfused_fast_path(backend, loss, reduction, shape):
    inputs = make_inputs(*shape, "some_ignored", dtype=torch.float32)
    compare(loss, backend, backend, inputs, rtol=2e-4, atol=2e-6, reduction=reduction,
            chunk_rows=7)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", LOSSES)
def test_options_reach_the_loss(backend, loss):
    inputs = make_inputs(9, 12, 5)
    inputs[3][1::3] = 3  # ignore_index below is a class: these rows are ignored
    options = {"ignore_index": 3, "reduction": "sum", "chunk_rows": 2}
    if loss == "elogitnorm":
        options.update(eps=0.3, divisor="paper")
    else:
        options.update(tau=0.5)
    compare(loss, backend, "reference", inputs, rtol=1e-9, atol=1e-10, **options)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("frozen", ["none", "features", "weight", "bias", "no_bias"])
def test_inputs_without_grad_or_bias(backend, loss, frozen):
    features, weight, bias, target = make_inputs(10, 14, 5, bias=frozen != "no_bias")
    if frozen in ("features", "weight", "bias"):
        {"features": features, "weight": weight, "bias": bias}[frozen].requires_grad_(False)
    compare(loss, backend, "reference", (features, weight, bias, target), rtol=1e-9,
            atol=1e-10, chunk_rows=3)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", LOSSES)
def test_no_grad_gives_the_loss(backend, loss):
    features, weight, bias, target = make_inputs(10, 14, 5)
    with torch.no_grad():
        ours = fused(loss, features, weight, bias, target, backend, chunk_rows=3)
        theirs = unfused(loss, features, weight, bias, target, "reference")
    assert not ours.requires_grad
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(("half", "weight_dtype"), [
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16), (torch.float16, torch.float32)])
def test_half_precision_features(backend, loss, half, weight_dtype):
    """bf16 / fp16 features (fp32 or 16-bit weight and bias): the float64 reference on the same
    rounded values, within 16-bit rounding of the logits, and gradients in the inputs' dtypes."""
    features, weight, bias, target = make_inputs(40, 60, 16)
    x = features.detach().to(half).requires_grad_(True)
    w = weight.detach().to(weight_dtype).requires_grad_(True)
    b = bias.detach().to(weight_dtype).requires_grad_(True)
    ours = fused(loss, x, w, b, target, backend, chunk_rows=9)
    assert ours.dtype == torch.promote_types(half, weight_dtype)
    exact = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    truth = unfused(loss, *exact, target, "reference")
    torch.testing.assert_close(ours.double(), truth, rtol=2e-2, atol=2e-2)
    mine = grads(ours, (x, w, b), torch.ones((), dtype=ours.dtype))
    expected = grads(truth, exact, torch.ones((), dtype=torch.float64))
    for value, reference, tensor in zip(mine, expected, (x, w, b), strict=True):
        assert value.dtype == tensor.dtype
        error = (value.double() - reference).norm() / reference.norm()
        assert error < 3e-2


@pytest.mark.parametrize("backend", FUSED)
def test_autocast_loss_is_float32_as_unfused(backend):
    features, weight, bias, target = make_inputs(12, 30, 8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = ef.linear_elogitnorm_loss(features, weight, bias, target, backend=backend)
        theirs = ef.elogitnorm_loss(F.linear(features, weight, bias), weight, target,
                                    backend="reference")
    assert ours.dtype == theirs.dtype == torch.float32
    # Unfused, autocast rounds the logits to bf16; fused, they stay fp32.
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("loss", LOSSES)
def test_modules_match_functional_and_fill_the_head(loss):
    features, weight, bias, target = make_inputs(9, 11, 4, dtype=torch.float32)
    head = nn.Linear(4, 11)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    module = ef.LinearELogitNormLoss if loss == "elogitnorm" else ef.LinearLogitNormLoss
    from_linear = module(head, chunk_rows=2, backend="torch")
    from_tensors = module(weight, bias, chunk_rows=4, backend="torch")
    assert {name for name, _ in from_linear.named_parameters()} == {"linear.weight",
                                                                   "linear.bias"}
    from_linear(features, target).backward()
    from_tensors(features, target).backward()
    exact = [t.detach().double().requires_grad_(True) for t in (features, weight, bias)]
    expected = unfused(loss, *exact, target, "reference")
    _, grad_weight, grad_bias = grads(expected, exact, torch.ones((), dtype=torch.float64))
    for module_grad in (head.weight.grad, weight.grad):
        torch.testing.assert_close(module_grad.double(), grad_weight, rtol=1e-4, atol=1e-6)
    for module_grad in (head.bias.grad, bias.grad):
        torch.testing.assert_close(module_grad.double(), grad_bias, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(from_linear(features, target).double(), expected,
                                   rtol=1e-5, atol=1e-6)


def test_module_rejects_a_second_bias():
    with pytest.raises(ValueError, match="bias must be None"):
        ef.LinearELogitNormLoss(nn.Linear(3, 4), torch.zeros(4))
    with pytest.raises(TypeError, match="head must be an nn.Linear"):
        ef.LinearLogitNormLoss("fc")


@pytest.mark.parametrize(
    ("change", "error", "text"),
    [
        ({"features": torch.zeros(4)}, ValueError, "features must be 2-D"),
        ({"features": torch.zeros(4, 3, dtype=torch.int64)}, TypeError, "features must be"),
        ({"weight": torch.zeros(6, 5)}, ValueError, "features must have D = 5"),
        ({"bias": torch.zeros(5)}, ValueError, r"bias must have shape \(6,\)"),
        ({"target": torch.zeros(3, dtype=torch.int64)}, ValueError, "target must have shape"),
        ({"target": torch.full((4,), 9)}, ValueError, "target values must be in"),
        ({"chunk_rows": 0}, ValueError, "chunk_rows must be an integer >= 1"),
        ({"chunk_rows": 2.0}, ValueError, "chunk_rows must be an integer >= 1"),
        ({"backend": "reference"}, ValueError, "backend must be 'auto' or one of"),
        ({"backend": "gpu"}, ValueError, "backend must be"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"eps": -1.0}, ValueError, "eps must be a finite number > 0"),
        ({"divisor": "rows"}, ValueError, "divisor must be one of"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an integer"),
    ],
)
def test_invalid_arguments_raise_one_line_before_any_work(change, error, text):
    arguments = {"features": torch.zeros(4, 3), "weight": torch.zeros(6, 3),
                 "bias": torch.zeros(6), "target": torch.zeros(4, dtype=torch.int64),
                 "backend": "torch", **change}
    features, weight, bias, target = (arguments.pop(k) for k in ("features", "weight", "bias",
                                                                 "target"))
    with pytest.raises(error, match=text) as raised:
        ef.linear_elogitnorm_loss(features, weight, bias, target, **arguments)
    assert "\n" not in str(raised.value)


def test_logitnorm_checks_tau():
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        ef.linear_logitnorm_loss(torch.zeros(2, 3), torch.zeros(4, 3), None,
                                 torch.zeros(2, dtype=torch.int64), tau=0.0)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_create_graph_names_the_unfused_path(backend, reduction):
    features, weight, bias, target = make_inputs(5, 7, 3)
    loss = ef.linear_elogitnorm_loss(features, weight, bias, target, backend=backend,
                                     reduction=reduction)
    with pytest.raises(RuntimeError, match=r"elogitnorm_loss\(F\.linear"):
        torch.autograd.grad(loss.sum(), features, create_graph=True)


@pytest.mark.parametrize("rows_total", [1, 10, 10_000])
@pytest.mark.parametrize("classes", [1, 1000, 10**6, 10**8])
@pytest.mark.parametrize("features", [1, 256, 2048])
def test_default_chunk_fits_the_budget(rows_total, classes, features):
    """The largest chunk whose logits fit CHUNK_BYTES, or 1 / WEIGHT_SHARE of the C x D weight
    where that is more (every chunk costs passes over the weight: larger heads, larger chunks)."""
    chunk = default_chunk_rows(rows_total, classes, features, 4)
    budget = max(CHUNK_BYTES, classes * features * 4 // WEIGHT_SHARE)
    assert 1 <= chunk <= rows_total
    assert chunk == 1 or chunk * classes * 4 <= budget
    assert chunk == rows_total or (chunk + 1) * classes * 4 > budget


def test_default_chunk_of_the_large_heads():
    assert default_chunk_rows(1024, 100_000, 512, 4) == 83  # 32 MiB of logits
    assert default_chunk_rows(256, 1_000_000, 256, 4) == 32  # 1/8 of the 1 GiB weight


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", LOSSES)
def test_compile_fullgraph_matches_reference(backend, loss):
    features, weight, bias, target = make_inputs(12, 20, 6, "some_ignored",
                                                 dtype=torch.float32)
    torch._dynamo.reset()

    def step(x, w, b, y):
        return fused(loss, x, w, b, y, backend, chunk_rows=5)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    ours = compiled(features, weight, bias, target)
    exact = [t.detach().double().requires_grad_(True) for t in (features, weight, bias)]
    truth = unfused(loss, *exact, target, "reference")
    torch.testing.assert_close(ours.double(), truth, rtol=1e-5, atol=1e-6)
    for value, reference in zip(grads(ours, (features, weight, bias), torch.ones(())),
                                grads(truth, exact, torch.ones((), dtype=torch.float64)),
                                strict=True):
        torch.testing.assert_close(value.double(), reference, rtol=1e-4, atol=1e-6)


def relative_errors(loss, backend, features, weight, bias, target):
    """Relative (norm) error of the fused float32 loss and gradients against the float64
    reference on the same values."""
    mine = [t.detach().clone().requires_grad_(True) for t in (features, weight, bias)]
    exact = [t.detach().double().requires_grad_(True) for t in (features, weight, bias)]
    ours = fused(loss, *mine, target, backend, chunk_rows=5)
    truth = unfused(loss, *exact, target, "reference")
    values = (ours, *torch.autograd.grad(ours, mine))
    expected = (truth, *torch.autograd.grad(truth, exact))
    return [((v.double() - e).norm() / e.norm()).item() for v, e in zip(values, expected,
                                                                        strict=True)]


@pytest.mark.parametrize("backend", FUSED)
def test_near_duplicate_weight_rows(backend):
    """Two classes 3e-3 apart with different biases: large distance-term coefficients whose
    GEMM form would cancel (the close pairs are added from the difference)."""
    features, weight, bias, target = make_inputs(12, 30, 64, dtype=torch.float32)
    with torch.no_grad():
        weight[15] = weight[0] + 3e-3 * torch.randn(64)
        bias[0] += 20.0
        bias[15] = bias[0] - 0.5
    errors = relative_errors("elogitnorm", backend, features, weight, bias, target)
    assert max(errors) < 5e-6, errors


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("scale", ["large_logits", "large_weight", "tiny_weight"])
def test_extreme_scales(backend, scale):
    """Logits near 1e30 and weights near 1e31 or 1e-33, which the CPU kernels rescale."""
    features, weight, bias, target = make_inputs(12, 30, 64, dtype=torch.float32)
    with torch.no_grad():
        if scale == "large_logits":
            features *= 1e15
            weight *= 1e15
        elif scale == "large_weight":
            weight *= 1e31
            bias *= 1e31
        else:
            weight *= 1e-33
            bias.zero_()
    errors = relative_errors("elogitnorm", backend, features, weight, bias, target)
    assert max(errors) < 5e-6, errors


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_backward_twice_with_retain_graph_gives_the_same_gradients(backend, loss, reduction):
    features, weight, bias, target = make_inputs(9, 11, 4, "some_ignored")
    out = fused(loss, features, weight, bias, target, backend, reduction=reduction, chunk_rows=4)
    upstream = torch.rand(out.shape, dtype=out.dtype) + 0.5
    first = torch.autograd.grad(out, (features, weight, bias), upstream, retain_graph=True)
    second = torch.autograd.grad(out, (features, weight, bias), 3.0 * upstream)
    for once, again in zip(first, second, strict=True):
        torch.testing.assert_close(again, 3.0 * once)
    exact = [t.detach().requires_grad_(True) for t in (features, weight, bias)]
    truth = grads(unfused(loss, *exact, target, "reference", reduction=reduction), exact,
                  upstream)
    for value, reference in zip(first, truth, strict=True):
        torch.testing.assert_close(value, reference)


class _NewWeightSizedTensors(TorchDispatchMode):
    """Records the ops whose output has ``shape`` and memory of its own (not a view or an
    in-place result of an input)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.ops = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
            inputs = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            storage = out.untyped_storage().data_ptr()
            if all(a.untyped_storage().data_ptr() != storage for a in inputs):
                self.ops.append(str(func))
        return out


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_makes_no_copy_of_the_weight_gradient(backend, reduction):
    """The C x D gradient formed in the forward becomes ``weight.grad`` itself: a scaled copy
    would double the largest buffer of a 10^6-class head."""
    features, weight, bias, target = make_inputs(6, 9, 4, dtype=torch.float32)
    loss = ef.linear_elogitnorm_loss(features, weight, bias, target, backend=backend,
                                     reduction=reduction)
    with _NewWeightSizedTensors(weight.shape) as seen:
        (2.0 * loss).backward()
    assert seen.ops == []
    exact = [t.detach().double().requires_grad_(True) for t in (features, weight, bias)]
    truth = grads(unfused("elogitnorm", *exact, target, "reference", reduction=reduction),
                  exact, torch.full((), 2.0, dtype=torch.float64))
    torch.testing.assert_close(weight.grad.double(), truth[1], rtol=1e-5, atol=1e-6)
