"""The ``triton`` backend on the CPU, through the Triton interpreter (design.md section 4).

The interpreter is chosen when triton's kernels are defined, from ``TRITON_INTERPRET`` in the
environment. Another test module of the same pytest process may already have imported triton
without it, so the parity tests of this file run in a child pytest process with
``TRITON_INTERPRET=1`` (the ``INNER`` half below); the parent process only checks availability and
reports the child's failures. Run the child half directly with::

    TRITON_INTERPRET=1 ELOGITNORM_FAST_TRITON_INNER=1 python -m pytest tests/test_triton_backend.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import elogitnorm_fast as ef
from elogitnorm_fast.reference import elogitnorm_reference, logitnorm_reference

from parity import KINDS, REDUCTIONS, check_elogitnorm, check_logitnorm, make_case

INNER = os.environ.get("ELOGITNORM_FAST_TRITON_INNER") == "1"
HAS_TRITON = __import__("importlib.util").util.find_spec("triton") is not None
#: fp32 kernels against the float64 reference (same bounds as the torch backend's fp32 tests).
RTOL, ATOL = 2e-4, 2e-6

if not INNER:

    @pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
    def test_kernels_match_reference_under_the_interpreter():
        """Runs the INNER tests of this file in a child process with TRITON_INTERPRET=1."""
        env = dict(os.environ, TRITON_INTERPRET="1", ELOGITNORM_FAST_TRITON_INNER="1")
        command = [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider",
                   "-W", "ignore::RuntimeWarning"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
        assert " passed" in done.stdout and " failed" not in done.stdout, done.stdout[-3000:]

    def test_cpu_tensors_rejected_without_the_interpreter(monkeypatch):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        reason = ef.unavailable_reason("triton", "cpu")
        assert reason is not None and ("TRITON_INTERPRET" in reason or "triton" in reason)
        logits, weight, target = make_case(4, 3, 2, dtype=torch.float32)
        with pytest.raises(RuntimeError, match="triton"):
            ef.elogitnorm_loss(logits, weight, target, backend="triton")

    def test_package_works_when_triton_is_missing():
        """With triton unimportable the package imports, triton is unavailable, torch works."""
        code = (
            "import sys; sys.modules['triton'] = None\n"
            "import torch, elogitnorm_fast as ef\n"
            "assert 'triton' not in ef.available_backends(), ef.available_backends()\n"
            "print(ef.unavailable_reason('triton'))\n"
            "z = torch.randn(4, 3, requires_grad=True); w = torch.randn(3, 2)\n"
            "ef.elogitnorm_loss(z, w, torch.tensor([0, 1, 2, 0])).backward()\n"
            "assert 'triton' not in sys.modules or sys.modules['triton'] is None\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "triton" in done.stdout

else:  # ---------------- child process: TRITON_INTERPRET=1, CPU tensors ----------------

    from elogitnorm_fast.backends import triton_backend

    def _rows_module():
        import elogitnorm_fast.kernels.rows as rows

        return rows

    @pytest.fixture(params=["single", "streaming"])
    def block_mode(request, monkeypatch):
        """Rows on chip in one block, or streamed over column blocks of 4."""
        if request.param == "streaming":
            _stream(monkeypatch, 4)
        return request.param

    def _stream(monkeypatch, block):
        rows = _rows_module()
        monkeypatch.setattr(rows, "MAX_SINGLE_BLOCK", 2)
        monkeypatch.setattr(rows, "STREAM_BLOCK", block)

    @pytest.fixture(autouse=True)
    def _quiet():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # masked-out lanes compute log(0)
            yield

    def test_interpreter_is_active():
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert triton_backend.unavailable_reason(torch.device("cpu")) is None
        assert ef.resolve_backend("triton", torch.device("cpu")) is triton_backend

    @pytest.mark.parametrize("reduction", REDUCTIONS)
    @pytest.mark.parametrize("c", [1, 3, 10, 257, 1000])
    @pytest.mark.parametrize("n", [1, 5, 64])
    def test_elogitnorm_matches_reference(n, c, reduction):
        logits, weight, target = make_case(n, c, 6, dtype=torch.float32)
        check_elogitnorm("triton", logits, weight, target, reduction, rtol=RTOL, atol=ATOL)

    @pytest.mark.parametrize("reduction", REDUCTIONS)
    @pytest.mark.parametrize("c", [1, 3, 10, 257, 1000])
    @pytest.mark.parametrize("n", [1, 5, 64])
    def test_logitnorm_matches_reference(n, c, reduction):
        logits, _, target = make_case(n, c, 1, dtype=torch.float32)
        target[::4] = -100
        check_logitnorm("triton", logits, target, reduction, rtol=RTOL, atol=ATOL)

    #: (N, C, column block) for rows longer than one block: partial last blocks, C = 1000.
    STREAMING = [(1, 3, 2), (5, 10, 4), (7, 257, 64), (16, 100, 32), (3, 1000, 128)]

    @pytest.mark.parametrize("reduction", ["mean", "none"])
    @pytest.mark.parametrize("n,c,block", STREAMING)
    def test_streamed_rows_match_reference(n, c, block, reduction, monkeypatch):
        _stream(monkeypatch, block)
        assert not _rows_module().launch_config(c)["SINGLE"]
        logits, weight, target = make_case(n, c, 6, dtype=torch.float32)
        target[::3] = -100
        check_elogitnorm("triton", logits, weight, target, reduction, rtol=RTOL, atol=ATOL)
        check_logitnorm("triton", logits, target, reduction, rtol=RTOL, atol=ATOL)

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("reduction", REDUCTIONS)
    def test_special_rows_match_reference(kind, reduction, block_mode):
        """Ties with the max, all-equal rows, ignored rows, coincident weight rows."""
        logits, weight, target = make_case(9, 6, 5, kind, dtype=torch.float32)
        loss, grad_logits, grad_weight = check_elogitnorm(
            "triton", logits, weight, target, reduction, rtol=RTOL, atol=ATOL
        )
        if kind != "all_ignored" or reduction != "mean":
            assert torch.isfinite(loss).all()
        else:
            assert torch.isnan(loss)
        assert torch.isfinite(grad_logits).all() and torch.isfinite(grad_weight).all()
        check_logitnorm("triton", logits, target, reduction, rtol=RTOL, atol=ATOL)

    def test_all_ignored_mean_gives_nan_loss_and_zero_gradient():
        logits, weight, target = make_case(6, 4, 3, "all_ignored", dtype=torch.float32)
        for loss in (ef.elogitnorm_loss(logits, weight, target, backend="triton"),
                     ef.logitnorm_loss(logits, target, backend="triton")):
            assert torch.isnan(loss)
            (grad,) = torch.autograd.grad(loss, logits)
            assert torch.equal(grad, torch.zeros_like(grad))

    def test_zero_row_logitnorm_matches_reference():
        logits = torch.zeros(3, 5, requires_grad=True)
        target = torch.tensor([0, 4, 2])
        check_logitnorm("triton", logits, target, "none", rtol=RTOL, atol=ATOL)

    @pytest.mark.parametrize("reduction", REDUCTIONS)
    def test_triton_op_path_matches_reference(reduction, monkeypatch):
        """The torch.library.triton_op path (what torch.compile traces), run eagerly."""
        monkeypatch.setattr(triton_backend, "EAGER_FAST_PATH", False)
        logits, weight, target = make_case(9, 7, 5, "some_ignored", dtype=torch.float32)
        check_elogitnorm("triton", logits, weight, target, reduction, rtol=RTOL, atol=ATOL)
        rows = ef.elogitnorm_loss(logits, weight, target, reduction="none", backend="triton")
        assert "triton_elogitnorm_rows" in type(rows.grad_fn).__name__
        check_logitnorm("triton", logits, target, reduction, rtol=RTOL, atol=ATOL)

    def test_paper_divisor_matches_reference():
        logits, weight, target = make_case(16, 7, 5, dtype=torch.float32)
        check_elogitnorm("triton", logits, weight, target, "mean", rtol=RTOL, atol=ATOL,
                         divisor="paper")

    def test_strided_inputs_and_expanded_upstream_gradient(block_mode):
        logits, weight, target = make_case(12, 9, 6, dtype=torch.float32)
        column_major = logits.detach().t().contiguous().t().requires_grad_(True)
        padded = torch.zeros(12, 16)[:, :9].copy_(logits.detach()).requires_grad_(True)
        weight_strided = torch.stack([weight.detach()] * 2, dim=2)[:, :, 0].requires_grad_(True)
        ref_z = logits.detach().double().requires_grad_(True)
        ref_w = weight.detach().double().requires_grad_(True)
        elogitnorm_reference(ref_z, ref_w, target, reduction="none").sum().backward()
        for z in (column_major, padded):
            loss = ef.elogitnorm_loss(z, weight_strided, target, reduction="none",
                                      backend="triton")
            # loss.sum().backward(): the upstream gradient is a stride-0 expansion of ones.
            grad_z, grad_w = torch.autograd.grad(loss.sum(), (z, weight_strided))
            torch.testing.assert_close(grad_z.double(), ref_z.grad, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(grad_w.double(), ref_w.grad, rtol=RTOL, atol=ATOL)
        ref_z.grad = None
        logitnorm_reference(ref_z, target, reduction="none").sum().backward()
        loss = ef.logitnorm_loss(column_major, target, reduction="none", backend="triton")
        (grad_z,) = torch.autograd.grad(loss.sum(), column_major)
        torch.testing.assert_close(grad_z.double(), ref_z.grad, rtol=RTOL, atol=ATOL)

    def test_caller_logits_are_not_modified():
        logits, weight, target = make_case(8, 5, 4, dtype=torch.float32)
        before = logits.detach().clone()
        ef.elogitnorm_loss(logits, weight, target, backend="triton").backward()
        ef.logitnorm_loss(logits, target, backend="triton").backward()
        assert torch.equal(logits.detach(), before)

    def test_second_backward_with_retained_graph_is_unchanged():
        logits, weight, target = make_case(8, 5, 4, dtype=torch.float32)
        loss = ef.elogitnorm_loss(logits, weight, target, reduction="none", backend="triton")
        first = torch.autograd.grad(loss.sum() * 2, (logits, weight), retain_graph=True)
        second = torch.autograd.grad(loss.sum(), (logits, weight))
        for a, b in zip(first, second, strict=True):
            torch.testing.assert_close(a, 2 * b)

    def test_only_the_inputs_that_need_it_get_a_gradient():
        logits, weight, target = make_case(10, 7, 4, dtype=torch.float32)
        ref_z = logits.detach().double().requires_grad_(True)
        ref_w = weight.detach().double().requires_grad_(True)
        ref_gz, ref_gw = torch.autograd.grad(elogitnorm_reference(ref_z, ref_w, target),
                                             (ref_z, ref_w))
        loss = ef.elogitnorm_loss(logits, weight.detach(), target, backend="triton")
        (grad_z,) = torch.autograd.grad(loss, logits)
        torch.testing.assert_close(grad_z.double(), ref_gz, rtol=RTOL, atol=ATOL)
        loss = ef.elogitnorm_loss(logits.detach(), weight, target, backend="triton")
        (grad_w,) = torch.autograd.grad(loss, weight)
        torch.testing.assert_close(grad_w.double(), ref_gw, rtol=RTOL, atol=ATOL)
        with torch.no_grad():
            loss = ef.elogitnorm_loss(logits, weight, target, backend="triton")
        torch.testing.assert_close(loss.double(), elogitnorm_reference(ref_z, ref_w, target)
                                   .detach(), rtol=RTOL, atol=ATOL)

    def test_nan_logits_propagate_to_their_row_only():
        logits, weight, target = make_case(6, 5, 4, dtype=torch.float32)
        logits = logits.detach().clone()
        logits[2, 3] = float("nan")
        for loss in (ef.elogitnorm_loss(logits, weight.detach(), target, reduction="none",
                                        backend="triton"),
                     ef.logitnorm_loss(logits, target, reduction="none", backend="triton")):
            assert torch.isnan(loss[2])
            assert torch.isfinite(loss[[0, 1, 3, 4, 5]]).all()

    def test_float64_runs_the_torch_closed_form():
        logits, weight, target = make_case(7, 5, 3)
        check_elogitnorm("triton", logits, weight, target, "mean", rtol=1e-9, atol=1e-11)
        check_logitnorm("triton", logits, target, "sum", rtol=1e-9, atol=1e-11)

    def test_block_override_rejects_non_powers_of_two():
        with pytest.raises(ValueError, match="block_cols"):
            _rows_module().launch_config(10, block_cols=12)
