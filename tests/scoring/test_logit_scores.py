"""Logit scorers against their float64 formulas, per backend, and the one-pass path."""

from __future__ import annotations

import importlib

import pytest
import torch
from exact_scores import exact_scores

import elogitnorm_fast as ef
from elogitnorm_fast.scoring import energy, entropy_score, gen, logit_scores, max_logit, msp

# the module (the package attribute of the same name is the function)
ls = importlib.import_module("elogitnorm_fast.scoring.logit_scores")
ALL = ("msp", "max_logit", "energy", "entropy", "gen")

CPU_OP_REASON = ef.unavailable_reason("cpu", "cpu", op="logit_scores")
_CPU_SKIP = pytest.mark.skipif(
    CPU_OP_REASON is not None,
    reason="C++ op elogitnorm_fast::logit_scores not registered (extension not built: "
    "run `pip install -e .`)",
)
BACKENDS = ["torch", pytest.param("cpu", marks=_CPU_SKIP)]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


def formula(logits: torch.Tensor, name: str, temperature=1.0, gamma=0.1, top_m=100):
    """The documented score in float64, from the softmax written out (finite logits)."""
    z = logits.double()
    p = torch.softmax(z, dim=1)
    top, where = z.max(dim=1)
    rest = z.scatter(1, where[:, None], float("-inf"))
    if name == "msp":
        # log(p_top / (1 - p_top)), 1 - p_top summed from the other classes
        return top - torch.logsumexp(rest, dim=1)
    if name == "max_logit":
        return top
    if name == "energy":
        return temperature * torch.logsumexp(z / temperature, dim=1)
    if name == "entropy":
        return -torch.log(-(p * torch.log_softmax(z, dim=1)).sum(dim=1))
    if name == "gen":
        m = min(top_m, z.shape[1])
        top_p, order = torch.sort(p, dim=1, descending=True, stable=True)
        top_p = top_p[:, :m]
        one_minus = 1 - top_p
        # 1 - p_max summed from the other classes: float64's 1 - p_max is 0 for a saturated row
        # (p_max = 1 - 1e-87) while (1 - p)^gamma is not.
        one_minus[:, 0] = p.scatter(1, order[:, :1], 0.0).sum(dim=1)
        return -torch.log((top_p**gamma * one_minus**gamma).sum(dim=1))
    raise KeyError(name)


def _close(actual, expected, dtype, name=""):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 2), (17, 3), (64, 10), (33, 1000), (7, 4099)])
def test_every_score_matches_formula(backend, dtype, shape):
    logits = (torch.randn(*shape) * 4).to(dtype)
    out = logit_scores(logits, ALL, backend=backend)
    assert list(out) == list(ALL)
    for name in ALL:
        assert out[name].shape == (shape[0],)
        assert out[name].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        _close(out[name], formula(logits, name), dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_pass_equals_separate_functions(backend):
    logits = torch.randn(200, 37) * 3
    together = logit_scores(logits, ALL, backend=backend)
    separate = {
        "msp": msp(logits, backend=backend),
        "max_logit": max_logit(logits, backend=backend),
        "energy": energy(logits, backend=backend),
        "entropy": entropy_score(logits, backend=backend),
        "gen": gen(logits, backend=backend),
    }
    for name in ALL:
        torch.testing.assert_close(together[name], separate[name])
        _close(separate[name], formula(logits, name), torch.float32, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_energy_temperature(backend, temperature):
    logits = torch.randn(50, 20, dtype=torch.float64) * 5
    out = energy(logits, temperature, backend=backend)
    torch.testing.assert_close(out, formula(logits, "energy", temperature))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma,top_m", [(0.1, 1), (0.1, 5), (0.5, 100), (0.1, 10_000)])
def test_gen_against_direct_formula(backend, gamma, top_m):
    logits = torch.randn(40, 50, dtype=torch.float64) * 3
    out = gen(logits, gamma, top_m, backend=backend)
    torch.testing.assert_close(out, formula(logits, "gen", gamma=gamma, top_m=top_m))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_and_saturated_rows(backend):
    logits = torch.tensor(
        [[1.0, 1.0, 1.0, 1.0], [0.0, 200.0, 0.0, -5.0], [3.0, 3.0, -1.0, -1.0], [-80, 0, 0, 0]],
        dtype=torch.float64,
    )
    out = logit_scores(logits, ALL, backend=backend)
    exact = exact_scores(logits)  # the saturated row needs more than float64's softmax
    for name in ALL:
        torch.testing.assert_close(out[name], exact[name], rtol=1e-9, atol=1e-9)
        assert torch.isfinite(out[name]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_minus_inf_logits(backend):
    logits = torch.randn(6, 9)
    logits[:, 3:] = -float("inf")
    out = logit_scores(logits, ALL, backend=backend)
    for name in ALL:
        torch.testing.assert_close(
            out[name].double(), formula(logits[:, :3], name, top_m=100), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_empty(backend):
    base = torch.randn(30, 40)
    view = base[::2, ::3]
    out = logit_scores(view, ALL, backend=backend)
    for name in ALL:
        _close(out[name], formula(view, name), torch.float32)
    empty = logit_scores(torch.randn(0, 5), ALL, backend=backend)
    assert all(t.shape == (0,) for t in empty.values())


@pytest.mark.parametrize("chunk_rows", [1, 2, 7, 100, 101, 500])
def test_torch_path_chunks_rows(chunk_rows):
    logits = torch.randn(101, 30)
    out = logit_scores(logits, ALL, backend="torch", chunk_rows=chunk_rows)
    whole = logit_scores(logits, ALL, backend="torch")
    for name in ALL:
        _close(out[name], formula(logits, name), torch.float32)
        # rows are computed on their own: the chunking never changes a value
        assert torch.equal(out[name], whole[name])
    with pytest.raises(ValueError, match="chunk_rows must be an integer >= 1 or None, got 0"):
        logit_scores(logits, ALL, chunk_rows=0)


def test_low_precision_error_within_twice_torch():
    # flash-attention's rule: error vs the fp32 reference at most twice plain torch's own error.
    logits = (torch.randn(500, 300) * 4).half()
    ref = formula(logits.float(), "energy")
    torch_err = (torch.logsumexp(logits, dim=1).double() - ref).abs().max()
    ours = (energy(logits).double() - ref).abs().max()
    assert ours <= 2 * torch_err + 1e-6


def test_inputs_not_modified_and_no_grad():
    logits = torch.randn(10, 5, requires_grad=True)
    before = logits.detach().clone()
    out = logit_scores(logits, ALL)
    assert torch.equal(logits.detach(), before)
    assert not any(t.requires_grad for t in out.values())


def test_validation_errors():
    with pytest.raises(ValueError, match="2-D"):
        msp(torch.randn(5))
    with pytest.raises(ValueError, match="names"):
        logit_scores(torch.randn(2, 3), ("bogus",))
    with pytest.raises(ValueError, match="backend"):
        logit_scores(torch.randn(2, 3), backend="gpu")
    with pytest.raises(ValueError, match="temperature"):
        energy(torch.randn(2, 3), 0.0)
    with pytest.raises(ValueError, match="top_m"):
        gen(torch.randn(2, 3), top_m=0)
    with pytest.raises(ValueError, match="C = 0"):
        msp(torch.randn(2, 0))
    with pytest.raises(ValueError, match="floating"):
        msp(torch.ones(2, 3, dtype=torch.long))


def test_auto_backend_choice_is_visible():
    logits = torch.randn(3, 4)
    expected = "cpu" if CPU_OP_REASON is None else "torch"
    assert ls.resolve_backend(logits) == expected
    assert ls.BACKENDS == ("auto", "torch", "cpu", "triton")


def test_backends_that_cannot_score_are_refused():
    for name in ("reference", "cuda"):
        with pytest.raises(ValueError, match=rf"backend must be .*for logit_scores, got '{name}'"):
            logit_scores(torch.randn(2, 3), backend=name)


def test_triton_backend_refused_on_cpu_without_interpreter():
    # the registry's reason for the triton backend on CPU tensors (this process does not
    # interpret: the interpreter suite runs in its own process)
    if ef.unavailable_reason("triton", "cpu", op="logit_scores") is None:
        pytest.skip("TRITON_INTERPRET=1 in this process")
    with pytest.raises(RuntimeError, match="backend 'triton' is not available on cpu: .*"
                       "(triton is not installed|CUDA)"):
        ls.resolve_backend(torch.randn(2, 2), "triton")


@_CPU_SKIP
def test_cpu_op_opcheck():
    logits = torch.randn(20, 30)
    for flags in [(True, True, True, True, True), (False, False, True, False, True)]:
        torch.library.opcheck(
            torch.ops.elogitnorm_fast.logit_scores.default, (logits, *flags, 2.0, 0.1, 5)
        )


@_CPU_SKIP
def test_cpu_op_compiles_fullgraph():
    def scores(z):
        return torch.ops.elogitnorm_fast.logit_scores(
            z, True, True, True, True, False, 1.0, 0.1, 100
        )

    logits = torch.randn(16, 10)
    compiled = torch.compile(scores, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(logits), scores(logits))


@_CPU_SKIP
def test_cpu_op_large_rows_parallel():
    logits = torch.randn(5000, 257)
    out = logit_scores(logits, ALL, backend="cpu")
    for name in ALL:
        _close(out[name], formula(logits, name), torch.float32, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (100, 10), (3000, 1000), (64, 33000)])
def test_triton_on_gpu_matches_formula(dtype, shape):
    logits = (torch.randn(*shape) * 4).to(dtype).cuda()
    out = logit_scores(logits, ALL, backend="triton")
    for name in ALL:
        _close(out[name].cpu(), formula(logits.cpu(), name), dtype)
    torch.testing.assert_close(
        logit_scores(logits, ("energy",), temperature=2.0, backend="triton")["energy"]
        .cpu()
        .double(),
        formula(logits.cpu(), "energy", 2.0),
        rtol=2e-5,
        atol=2e-5,
    )
