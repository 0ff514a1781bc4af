"""The ``triton`` backend on the CPU, through the Triton interpreter (docs/design.md).

The interpreter is chosen when triton's kernels are defined, from ``TRITON_INTERPRET`` in the
environment. Another test module of the same pytest process may already have imported triton
without it, so the parity tests of this file run in a child pytest process with
``TRITON_INTERPRET=1`` (the ``INNER`` half below); the parent process only checks availability and
reports the child's failures. Run the child half directly with::

    TRITON_INTERPRET=1 ELOGITNORM_FAST_TRITON_INNER=1 python -m pytest tests/test_triton_backend.py
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
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

    def _elogitnorm_module():
        import elogitnorm_fast.kernels.elogitnorm as elogitnorm

        return elogitnorm

    def _logitnorm_module():
        import elogitnorm_fast.kernels.logitnorm as logitnorm

        return logitnorm

    def _class_gradient_module():
        import elogitnorm_fast.kernels.class_gradient as class_gradient

        return class_gradient

    @pytest.fixture(params=["fused", "gemm", "streaming"])
    def block_mode(request, monkeypatch):
        """Small C: the fused kernel (argmax and distances inside); rows on chip in one block
        with GEMM distances; or GEMM distances and rows streamed over column blocks of 4."""
        if request.param != "fused":
            monkeypatch.setattr(_elogitnorm_module(), "FUSED_MAX_CLASSES", 0)
        if request.param == "streaming":
            _stream(monkeypatch, 4)
        return request.param

    @pytest.fixture(params=["one program", "one program, Python backward", "blocks", "host"])
    def logitnorm_reduced_in(request, monkeypatch):
        """Where eager LogitNorm reduces a sum / mean: in the kernel by one program (small
        batches; the loss comes back through the C++ node, or with NATIVE_BACKWARD off through
        the Python Function), in the kernel by a block of rows per program (larger batches, and
        what a CUDA graph capture, faked here, takes: the Python Function), or on the host from
        per-row losses."""
        monkeypatch.setattr(triton_backend, "REDUCE_IN_KERNEL", request.param != "host")
        monkeypatch.setattr(triton_backend, "NATIVE_BACKWARD", request.param == "one program")
        if request.param == "blocks":
            monkeypatch.setattr(triton_backend, "_capturing", lambda logits: True)
        return request.param

    def _node(loss) -> str:
        """Which eager path returned ``loss``: ``"native"`` (the C++ node of the kernels' unit
        gradients), ``"python"`` (a Function around a kernel that reduced the loss) or
        ``"host"`` (per-row losses reduced by torch ops)."""
        name = loss.grad_fn.name()
        if "UnitGradientNode" in name:
            return "native"
        if "ReducedLogitNorm" in name or "EagerELogitNorm" in name:
            return "python"
        return "host"

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
    @pytest.mark.parametrize("c", [1, 3, 10, 128, 129, 257, 1000])
    @pytest.mark.parametrize("n", [1, 5, 64])
    def test_elogitnorm_matches_reference(n, c, reduction):
        logits, weight, target = make_case(n, c, 6, dtype=torch.float32)
        check_elogitnorm("triton", logits, weight, target, reduction, rtol=RTOL, atol=ATOL)

    @pytest.mark.parametrize("reduction", REDUCTIONS)
    @pytest.mark.parametrize("c", [1, 3, 10, 257, 1000])
    @pytest.mark.parametrize("n", [1, 5, 64])
    def test_logitnorm_matches_reference(n, c, reduction, logitnorm_reduced_in):
        logits, _, target = make_case(n, c, 1, dtype=torch.float32)
        target[::4] = -100
        check_logitnorm("triton", logits, target, reduction, rtol=RTOL, atol=ATOL)

    @pytest.mark.parametrize("reduction", ["mean", "sum"])
    @pytest.mark.parametrize("n,c,d", [(5, 10, 6), (64, 10, 6), (5, 257, 6), (64, 257, 6)])
    def test_elogitnorm_reduction_in_kernel_and_on_host_match(n, c, d, reduction, monkeypatch):
        """Eager ELogitNorm's sum / mean: the kernels' row shares through the C++ node (the
        default) or the Python Function (NATIVE_BACKWARD off), and the host's reduction of
        per-row losses (REDUCE_IN_KERNEL off) all match the reference, fused (C = 10) and GEMM
        (C = 257) paths, with ignored rows."""
        logits, weight, target = make_case(n, c, d, "some_ignored", dtype=torch.float32)
        for path in ("native", "python", "host"):
            monkeypatch.setattr(triton_backend, "REDUCE_IN_KERNEL", path != "host")
            monkeypatch.setattr(triton_backend, "NATIVE_BACKWARD", path == "native")
            loss = ef.elogitnorm_loss(logits, weight, target, reduction=reduction,
                                      backend="triton")
            assert _node(loss) == path
            check_elogitnorm("triton", logits, weight, target, reduction, rtol=RTOL, atol=ATOL)

    def test_elogitnorm_mean_beyond_the_target_budget_reduces_on_the_host(monkeypatch):
        """Where every program counting all N targets would read more than COUNTED_TARGETS, the
        mean is taken on the host from per-row losses (and still matches)."""
        logits, weight, target = make_case(64, 10, 6, "some_ignored", dtype=torch.float32)
        rows_per_program = _elogitnorm_module().rows_per_program(10, 6)
        assert _rows_module().counts_within_budget(64, rows_per_program, "mean")
        monkeypatch.setattr(_rows_module(), "COUNTED_TARGETS", 64)
        assert not _rows_module().counts_within_budget(64, rows_per_program, "mean")
        loss = ef.elogitnorm_loss(logits, weight, target, backend="triton")
        assert _node(loss) == "host", loss.grad_fn.name()
        check_elogitnorm("triton", logits, weight, target, "mean", rtol=RTOL, atol=ATOL)

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

    def test_all_ignored_mean_gives_nan_loss_and_zero_gradient(logitnorm_reduced_in):
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

    #: Fused kernel with one dW row per class (N = 9 >= C) and per sample (coefficient rows
    #: summing to zero), GEMM distances.
    @pytest.mark.parametrize("c", [7, 12, 130])
    @pytest.mark.parametrize("reduction", REDUCTIONS)
    def test_triton_op_path_matches_reference(reduction, c, monkeypatch):
        """The torch.library.triton_op path (what torch.compile traces), run eagerly."""
        monkeypatch.setattr(triton_backend, "EAGER_FAST_PATH", False)
        logits, weight, target = make_case(9, c, 5, "some_ignored", dtype=torch.float32)
        check_elogitnorm("triton", logits, weight, target, reduction, rtol=RTOL, atol=ATOL)
        rows = ef.elogitnorm_loss(logits, weight, target, reduction="none", backend="triton")
        assert "triton_elogitnorm_rows" in type(rows.grad_fn).__name__
        check_logitnorm("triton", logits, target, reduction, rtol=RTOL, atol=ATOL)

    def test_op_path_launches_directly_where_torch_refuses_interpreted_kernels(monkeypatch):
        """torch 2.11 wraps only ``triton.jit`` functions (``wrap_triton`` raises on the
        interpreter's kernels): the op path then launches them itself (that torch simulated)."""
        from triton.runtime.jit import JITFunction

        wrap_triton = torch.library.wrap_triton
        refused = []

        def older_wrap_triton(kernel):
            if not isinstance(kernel, JITFunction):
                refused.append(kernel)
                raise RuntimeError("wrap_triton only works on functions annotated with "
                                   "triton.jit or triton.autotune")
            return wrap_triton(kernel)

        monkeypatch.setattr(torch.library, "wrap_triton", older_wrap_triton)
        monkeypatch.setattr(_rows_module(), "_WRAPS_INTERPRETED", [])
        monkeypatch.setattr(triton_backend, "EAGER_FAST_PATH", False)
        logits, weight, target = make_case(9, 7, 5, "some_ignored", dtype=torch.float32)
        check_elogitnorm("triton", logits, weight, target, "mean", rtol=RTOL, atol=ATOL)
        check_logitnorm("triton", logits, target, "sum", rtol=RTOL, atol=ATOL)
        assert len(refused) == 1  # asked once, then launched directly

    @pytest.mark.parametrize("c", [10, 100])
    def test_fused_kernel_with_four_rows_per_program(c, monkeypatch):
        """The fused small-C ELogitNorm kernel on 4 rows per program (the variant gpu_losses
        times against the default of one row) matches the reference."""
        elogitnorm = _elogitnorm_module()
        monkeypatch.setattr(elogitnorm, "FUSED_ROWS", 4)
        assert elogitnorm.fused_config(c, 40)["ROWS"] == 4
        logits, weight, target = make_case(7, c, 40, "some_ignored", dtype=torch.float32)
        check_elogitnorm("triton", logits, weight, target, "mean", rtol=RTOL, atol=ATOL)

    @pytest.mark.parametrize("tile", [16384, 4096])
    @pytest.mark.parametrize("deferred", [True, False])
    @pytest.mark.parametrize("c", [10, 100])
    def test_fused_kernel_with_either_summation_and_pooled_products(c, deferred, tile,
                                                                    monkeypatch):
        """The fused kernel's distance loop, summed once after the loop (the default) or at
        every step (the variant gpu_losses times), on the default tile and on the 4096 of the
        ``fused tiles of 4096`` variant, and the pooled weight gradient's products (C = 10: one
        block of classes; C = 100: seven, the last one partial) match the reference, with the
        eager node (pooled in the forward) and the Python backward. D takes several feature
        tiles, the last one partial (default tile, C = 10: 2 of 1024 for D = 1100; C = 100: 3
        of 128 for D = 300)."""
        from elogitnorm_fast.kernels import class_gradient

        elogitnorm = _elogitnorm_module()
        monkeypatch.setattr(elogitnorm, "DEFERRED_SUMS", deferred)
        monkeypatch.setattr(elogitnorm, "FUSED_TILE", tile)
        d = 1100 if c == 10 else 300
        features = elogitnorm.fused_config(c, d)["FEATURES"]
        assert d // features >= (1 if c == 10 else 2) and d % features
        logits, weight, target = make_case(37, c, d, "some_ignored", dtype=torch.float32)
        assert elogitnorm.fuses_distances(c, d) and class_gradient.pools(37, c)
        for native in (True, False):
            monkeypatch.setattr(triton_backend, "NATIVE_BACKWARD", native)
            check_elogitnorm("triton", logits, weight, target, "mean", rtol=RTOL, atol=ATOL)

    def _reductions_taken(monkeypatch):
        """Records ``one_program`` of every ``logitnorm_reduced`` call."""
        kernels, taken = _logitnorm_module(), []
        reduced = kernels.logitnorm_reduced

        def spy(*args, **kwargs):
            taken.append(kwargs["one_program"])
            return reduced(*args, **kwargs)

        monkeypatch.setattr(kernels, "logitnorm_reduced", spy)
        return taken

    @pytest.mark.parametrize("capturing", [False, True])
    def test_logitnorm_small_batch_reduces_in_one_program_only_when_not_capturing(capturing,
                                                                                monkeypatch):
        """Under CUDA-graph capture (faked here) a small batch is reduced by a block of rows per
        program, which replays faster than one program walking every row; eager, by one
        program."""
        monkeypatch.setattr(triton_backend, "_capturing", lambda logits: capturing)
        taken = _reductions_taken(monkeypatch)
        logits, _, target = make_case(12, 10, 1, "some_ignored", dtype=torch.float32)
        logits.requires_grad_(True)
        loss = ef.logitnorm_loss(logits, target, backend="triton")
        # Eager through the C++ node; captured, the Python Function (no extra kernels replayed).
        assert _node(loss) == ("python" if capturing else "native"), loss.grad_fn.name()
        assert taken == [not capturing]
        check_logitnorm("triton", logits, target, "mean", rtol=RTOL, atol=ATOL)

    @pytest.mark.parametrize("budget", [1 << 21, 100])
    def test_logitnorm_mean_counts_in_blocks_within_the_target_budget(budget, monkeypatch):
        """A batch too large for one program is reduced by a block of rows per program while
        programs x N stays within COUNTED_TARGETS; beyond it, the mean is taken on the host."""
        kernels = _logitnorm_module()
        monkeypatch.setattr(_rows_module(), "COUNTED_TARGETS", budget)
        taken = _reductions_taken(monkeypatch)
        logits, _, target = make_case(40, 1000, 1, "some_ignored", dtype=torch.float32)
        assert not kernels.reduces_in_one_program(40, 1000)
        logits.requires_grad_(True)
        loss = ef.logitnorm_loss(logits, target, backend="triton")
        assert taken == ([False] if budget > 100 else [])
        assert _node(loss) == ("native" if budget > 100 else "host"), loss.grad_fn.name()
        assert kernels.reduces_in_blocks(40, 1000, "sum")  # sum counts nothing
        check_logitnorm("triton", logits, target, "mean", rtol=RTOL, atol=ATOL)

    def test_mean_counted_over_several_count_blocks(monkeypatch):
        """N = 1100 > COUNT_BLOCK: each program's count of the valid rows takes two blocks of
        targets (the second partial; the helper every kernel's count shares, here LogitNorm's by
        blocks of rows), and the mean and the gradient match the reference."""
        from elogitnorm_fast.kernels import rows

        assert rows.COUNT_BLOCK < 1100 < 2 * rows.COUNT_BLOCK
        taken = _reductions_taken(monkeypatch)
        logits, _, target = make_case(1100, 32, 1, "some_ignored", dtype=torch.float32)
        target[1050:] = -100  # ignored rows in the second block of targets too
        assert not _logitnorm_module().reduces_in_one_program(1100, 32)
        check_logitnorm("triton", logits, target, "mean", rtol=RTOL, atol=ATOL)
        assert taken and not any(taken)  # by blocks of rows, counted in the kernel

    @pytest.mark.parametrize("expected", [None, 0.25, "tensor"])
    def test_logitnorm_rows_writes_every_statistic(expected):
        """stats[0] is the expected upstream gradient (1 when none is given), not left as the
        allocator found it: opcheck compares every element of an op's outputs."""
        kernels = _logitnorm_module()
        logits, _, target = make_case(70, 9, 1, "some_ignored", dtype=torch.float32)
        upstream = torch.tensor(0.125) if expected == "tensor" else expected
        for block_cols in (None, 4):  # rows on chip, rows streamed
            stats = kernels.logitnorm_rows(logits.detach(), target, inv_tau=25.0,
                                           ignore_index=-100, block_cols=block_cols,
                                           expected_upstream=upstream, traced=False)[1]
            assert stats[0].item() == {None: 1.0, 0.25: 0.25, "tensor": 0.125}[expected]

    def _logitnorm_gradient(logits, target, reduction, after_forward=None, weight=1.0):
        """d(weight * loss)/dlogits from the triton backend; ``after_forward(logits)`` runs
        between the forward and the backward."""
        logits = logits.detach().clone().requires_grad_(True)
        loss = ef.logitnorm_loss(logits, target, reduction=reduction, backend="triton")
        if after_forward is not None:
            after_forward(logits)
        (grad,) = torch.autograd.grad((loss.sum() if reduction == "none" else loss) * weight,
                                      logits)
        return grad

    def _scramble(logits):
        """Overwrites the logits behind autograd's back (``.data`` keeps the version counter):
        a backward that reads them again computes a different gradient."""
        logits.data.copy_(torch.randn_like(logits) * 50)

    @pytest.mark.parametrize("reduction", REDUCTIONS)
    @pytest.mark.parametrize("c", [10, 257])
    def test_logitnorm_backward_does_not_reread_logits_for_the_expected_upstream(
            c, reduction, logitnorm_reduced_in):
        """The forward's gradient for the upstream gradient the reduction gives (1, or 1 / count
        for mean) completes the backward: scrambling the logits in between changes nothing. The
        result is bitwise the gradient the recomputing op path gives."""
        logits, _, target = make_case(12, c, 1, "some_ignored", dtype=torch.float32)
        plain = _logitnorm_gradient(logits, target, reduction)
        scrambled = _logitnorm_gradient(logits, target, reduction, after_forward=_scramble)
        assert torch.equal(scrambled, plain)
        triton_backend.EAGER_FAST_PATH = False
        try:
            recomputed = _logitnorm_gradient(logits, target, reduction)
        finally:
            triton_backend.EAGER_FAST_PATH = True
        assert torch.equal(plain, recomputed)
        ref = logits.detach().double().requires_grad_(True)
        loss = logitnorm_reference(ref, target, reduction=reduction)
        (expected,) = torch.autograd.grad(loss.sum() if reduction == "none" else loss, ref)
        torch.testing.assert_close(plain.double(), expected, rtol=RTOL, atol=ATOL)

    @pytest.mark.parametrize("weight", [1.0, 3.0])
    def test_logitnorm_backward_groups_column_tiles(weight, monkeypatch):
        """Several column tiles of the same rows in one backward program (rows.
        grouped_tile_grid; CHECK_PROGRAMS = 1 forces all 3 tiles of C = 5000 into one): the
        expected upstream still skips every tile, another still recomputes every one, bitwise as
        with one tile per program. (The Python backward: the C++ node never reads the logits.)"""
        monkeypatch.setattr(triton_backend, "NATIVE_BACKWARD", False)
        rows = _rows_module()
        logits, _, target = make_case(5, 5000, 1, "some_ignored", dtype=torch.float32)
        assert rows.grouped_tile_grid(5, 5000)[3] == 1
        per_tile = _logitnorm_gradient(logits, target, "mean", weight=weight)
        monkeypatch.setattr(rows, "CHECK_PROGRAMS", 1)
        assert rows.grouped_tile_grid(5, 5000) == (1, 2048, (5,), 3)
        grouped = _logitnorm_gradient(logits, target, "mean", weight=weight)
        assert torch.equal(grouped, per_tile)
        scrambled = _logitnorm_gradient(logits, target, "mean", after_forward=_scramble,
                                        weight=weight)
        assert torch.equal(scrambled, grouped) == (weight == 1.0)
        ref = logits.detach().double().requires_grad_(True)
        (expected,) = torch.autograd.grad(weight * logitnorm_reference(ref, target), ref)
        torch.testing.assert_close(grouped.double(), expected, rtol=RTOL, atol=ATOL)

    def test_logitnorm_without_upstream_prediction_recomputes(monkeypatch, logitnorm_reduced_in):
        """PREDICT_UPSTREAM off: no gradient in the forward, the backward reads the logits."""
        monkeypatch.setattr(triton_backend, "PREDICT_UPSTREAM", False)
        logits, _, target = make_case(9, 10, 1, "some_ignored", dtype=torch.float32)
        plain = _logitnorm_gradient(logits, target, "mean")
        assert not torch.allclose(
            _logitnorm_gradient(logits, target, "mean", after_forward=_scramble), plain)
        monkeypatch.setattr(triton_backend, "PREDICT_UPSTREAM", True)
        assert torch.equal(_logitnorm_gradient(logits, target, "mean"), plain)

    @pytest.mark.parametrize("weight", [3.0, float("nan")])
    def test_logitnorm_other_upstream_recomputes(weight, logitnorm_reduced_in):
        """Another upstream gradient (a loss weight, a NaN): the Python backward recomputes from
        the logits, the C++ node scales the forward's gradient (and never reads the logits)."""
        native = logitnorm_reduced_in == "one program"
        logits, _, target = make_case(9, 10, 1, "some_ignored", dtype=torch.float32)
        grad = _logitnorm_gradient(logits, target, "mean", weight=weight)
        scrambled = _logitnorm_gradient(logits, target, "mean", after_forward=_scramble,
                                        weight=weight)
        valid = target != -100
        if weight != weight:
            assert torch.isnan(grad[valid]).all()
            # The Python backward gives ignored rows 0 whatever the upstream gradient; the
            # node's multiply gives them 0 x NaN = NaN (IEEE), as plain autograd would.
            assert torch.equal(grad[~valid], torch.zeros_like(grad[~valid])) != native
            return
        assert torch.equal(scrambled, grad) == native
        ref = logits.detach().double().requires_grad_(True)
        (expected,) = torch.autograd.grad(logitnorm_reference(ref, target) * weight, ref)
        torch.testing.assert_close(grad.double(), expected, rtol=RTOL, atol=ATOL)

    def test_logitnorm_retained_graph_never_rewrites_a_handed_out_gradient(
            logitnorm_reduced_in):
        logits, _, target = make_case(8, 6, 1, dtype=torch.float32)
        loss = ef.logitnorm_loss(logits, target, backend="triton")
        (first,) = torch.autograd.grad(loss, logits, retain_graph=True)
        kept = first.clone()
        (second,) = torch.autograd.grad(loss * 2, logits, retain_graph=True)
        (third,) = torch.autograd.grad(loss, logits)
        assert torch.equal(first, kept)
        torch.testing.assert_close(second, 2 * kept)
        assert torch.equal(third, kept)

    @pytest.mark.parametrize("native", [True, False])
    def test_create_graph_is_refused(native, monkeypatch):
        """No second derivative: a gradient penalty would be silently wrong, so it raises (the
        C++ node and the Python Functions alike)."""
        monkeypatch.setattr(triton_backend, "NATIVE_BACKWARD", native)
        logits, weight, target = make_case(6, 5, 4, dtype=torch.float32)
        for loss in (ef.logitnorm_loss(logits, target, backend="triton"),
                     ef.elogitnorm_loss(logits, weight, target, backend="triton")):
            with pytest.raises(RuntimeError, match="first derivatives.*backend='reference'"):
                torch.autograd.grad(loss, logits, create_graph=True)

    @pytest.mark.parametrize("c", [10, 257])  # pooled dW (fused path), GEMM dW
    def test_elogitnorm_node_forward_records_no_autograd_history(c, monkeypatch):
        """Through the C++ node, the forward's host ops (argmax, gather, GEMMs of the distances
        and of the weight gradient) run without autograd: the gradients the node keeps carry no
        graph, so nothing (the coefficients, the gathered rows) stays alive for the backward
        beyond them, and no op pays for recording."""
        handed = {}
        node = triton_backend._unit_gradient_node

        def spy(loss, logits, weight, logits_grad, weight_grad, loss_name):
            # As handed over: the node returns the loss itself as its output (marked dirty).
            handed.update({name: (tensor.grad_fn, tensor.requires_grad) for name, tensor in
                           (("loss", loss), ("logits_grad", logits_grad),
                            ("weight_grad", weight_grad))})
            return node(loss, logits, weight, logits_grad, weight_grad, loss_name)

        monkeypatch.setattr(triton_backend, "_unit_gradient_node", spy)
        logits, weight, target = make_case(12, c, 6, "some_ignored", dtype=torch.float32)
        loss = ef.elogitnorm_loss(logits, weight, target, backend="triton")
        assert _node(loss) == "native" and set(handed) == {"loss", "logits_grad", "weight_grad"}
        for name, (grad_fn, requires_grad) in handed.items():
            assert grad_fn is None and not requires_grad, name

    @pytest.mark.parametrize("needs", ["both", "logits", "weight"])
    @pytest.mark.parametrize("c", [10, 257])  # pooled dW (fused path), GEMM dW
    def test_elogitnorm_node_scales_the_forward_gradients_by_any_upstream(c, needs):
        """The C++ node: the forward's unit gradients times the upstream gradient, for a loss
        weight and again through the retained graph with another, for either input alone; the
        logits are never read again (scrambled in between)."""
        logits, weight, target = make_case(12, c, 6, "some_ignored", dtype=torch.float32)
        logits = logits.detach().requires_grad_(needs != "weight")
        weight = weight.detach().requires_grad_(needs != "logits")
        inputs = [t for t in (logits, weight) if t.requires_grad]
        ref = [t.detach().double().requires_grad_(t.requires_grad) for t in (logits, weight)]
        expected = torch.autograd.grad(elogitnorm_reference(*ref, target, reduction="sum"),
                                       [t for t in ref if t.requires_grad])
        loss = ef.elogitnorm_loss(logits, weight, target, reduction="sum", backend="triton")
        assert _node(loss) == "native", loss.grad_fn.name()
        _scramble(logits)
        weighted = torch.autograd.grad(loss * 2.5, inputs, retain_graph=True)
        plain = torch.autograd.grad(loss, inputs)
        for got, half, want in zip(weighted, plain, expected, strict=True):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), 2.5 * want, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(half.double(), want, rtol=RTOL, atol=ATOL)

    @pytest.mark.parametrize("c", [10, 257])
    def test_node_and_python_backward_are_bitwise_equal_for_a_plain_backward(c, monkeypatch):
        """Upstream gradient 1 (``loss.backward()`` of a mean): the node's multiply by 1 and
        the Python backward give the same bits, for both losses and both ELogitNorm paths."""
        logits, weight, target = make_case(20, c, 6, "some_ignored", dtype=torch.float32)
        grads = {}
        for native in (True, False):
            monkeypatch.setattr(triton_backend, "NATIVE_BACKWARD", native)
            z, w = logits.detach().requires_grad_(True), weight.detach().requires_grad_(True)
            elogitnorm = ef.elogitnorm_loss(z, w, target, backend="triton")
            logitnorm = ef.logitnorm_loss(z, target, backend="triton")
            assert {_node(elogitnorm), _node(logitnorm)} == {"native" if native else "python"}
            grads[native] = (*torch.autograd.grad(elogitnorm, (z, w)),
                             *torch.autograd.grad(logitnorm, z))
        for ours, theirs in zip(grads[True], grads[False], strict=True):
            assert torch.equal(ours, theirs)

    def test_node_needs_the_extension_and_no_capture(monkeypatch):
        """Without the compiled node (an extension built before it) or while a CUDA graph is
        captured (faked), the eager sum / mean goes through the Python Functions, and matches."""
        logits, weight, target = make_case(9, 10, 6, "some_ignored", dtype=torch.float32)
        for missing, capturing in ((True, False), (False, True)):
            monkeypatch.setattr(triton_backend, "_HAS_NODE", [not missing])
            monkeypatch.setattr(triton_backend, "_capturing",
                                lambda logits, capturing=capturing: capturing)
            for loss in (ef.elogitnorm_loss(logits, weight, target, backend="triton"),
                         ef.logitnorm_loss(logits, target, backend="triton")):
                assert _node(loss) == "python", loss.grad_fn.name()
            check_elogitnorm("triton", logits, weight, target, "mean", rtol=RTOL, atol=ATOL)
            check_logitnorm("triton", logits, target, "mean", rtol=RTOL, atol=ATOL)

    def test_logitnorm_node_only_up_to_its_size(monkeypatch):
        """Above NATIVE_MAX_ELEMENTS the node's multiply would cost a pass over N x C that the
        Python backward skips: the Python Function takes over."""
        logits, _, target = make_case(12, 10, 1, "some_ignored", dtype=torch.float32)
        assert _node(ef.logitnorm_loss(logits, target, backend="triton")) == "native"
        monkeypatch.setattr(triton_backend, "NATIVE_MAX_ELEMENTS", 119)
        assert _node(ef.logitnorm_loss(logits, target, backend="triton")) == "python"
        check_logitnorm("triton", logits, target, "sum", rtol=RTOL, atol=ATOL)

    @pytest.mark.parametrize("n,c,d", [(1, 1, 3), (7, 5, 70), (64, 10, 512), (40, 128, 9),
                                       (20, 100, 70), (3, 100, 1000), (130, 37, 20)])
    def test_pooled_weight_gradient_matches_the_torch_form(n, c, d, monkeypatch):
        """The one-launch class-pooled dW against geometry.weight_gradient (float64) on random
        coefficients, predicted classes, upstream gradients and ignored rows; W transposed
        (strided). Blocks of 16 classes, the last one partial (C = 5, 37, 100); D split between
        the programs of a block: 8 runs of one tile (C = 10, D = 512), 3 runs of one tile, the
        last partial (C = 100, D = 70), 18 runs of two tiles, the 16th partial and the last two
        empty (C = 100, D = 1000); rows in several scan steps, the last partial (N = 130,
        C = 37)."""
        from elogitnorm_fast.geometry import weight_gradient

        kernels = _class_gradient_module()
        generator = torch.Generator().manual_seed(n * 1000 + c)
        weight = torch.randn(d, c, generator=generator).t()
        coefficients = torch.randn(n, c, generator=generator)
        predicted = torch.randint(0, c, (n,), generator=generator)
        target = torch.randint(0, c, (n,), generator=generator)
        target[::3] = -100
        upstream = torch.randn(n, generator=generator)
        grad, none = kernels.pooled_gradients(weight, coefficients, predicted, upstream, target,
                                              ignore_index=-100)
        assert none is None
        g = torch.where(target != -100, upstream, torch.zeros(())).double()
        expected = weight_gradient(weight.double(), weight.double(), False, predicted,
                                   coefficients.double() * g[:, None])
        torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-5)
        # The logits gradient riding along: rows.scale_rows' result, bitwise, and dW unchanged.
        unit = torch.randn(n, c, generator=generator)
        both, scaled = kernels.pooled_gradients(weight, coefficients, predicted, upstream,
                                                target, ignore_index=-100, logits_unit=unit)
        alone, _ = _rows_module().scale_rows(unit, None, upstream, target, ignore_index=-100)
        assert torch.equal(both, grad) and torch.equal(scaled, alone)
        # upstream None: the forward's unit upstream gradient, 1 on every valid row.
        unit_grad, _ = kernels.pooled_gradients(weight, coefficients, predicted, None, target,
                                                ignore_index=-100)
        ones, _ = kernels.pooled_gradients(weight, coefficients, predicted, torch.ones(n),
                                           target, ignore_index=-100)
        assert torch.equal(unit_grad, ones)
        with pytest.raises(ValueError, match="upstream=None"):
            kernels.pooled_gradients(weight, coefficients, predicted, None, target,
                                     ignore_index=-100, logits_unit=unit)
        assert torch.equal(scaled, unit * g.float()[:, None])  # one fp32 product per element
        assert torch.equal(scaled[target == -100], torch.zeros_like(scaled[target == -100]))
        # The loss riding along: the sum of the rows' shares (in blocks of 64 here: three at
        # N = 130, the last partial), and dW unchanged.
        monkeypatch.setattr(kernels, "SHARES_BLOCK", 64)
        shares = torch.randn(n, generator=generator)
        loss = torch.full((), float("nan"))
        kernels_sum, _ = kernels.pooled_gradients(weight, coefficients, predicted, None, target,
                                                  ignore_index=-100, shares=shares, loss_out=loss)
        assert torch.equal(kernels_sum, unit_grad)
        torch.testing.assert_close(loss.double(), shares.double().sum(), rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="give both or neither"):
            kernels.pooled_gradients(weight, coefficients, predicted, None, target,
                                     ignore_index=-100, shares=shares)

    def test_pooled_weight_gradient_refuses_large_c():
        with pytest.raises(ValueError, match="C <= 128"):
            _class_gradient_module().pooled_gradients(
                torch.zeros(129, 2), torch.zeros(3, 129), torch.zeros(3, dtype=torch.int64),
                torch.ones(3), torch.zeros(3, dtype=torch.int64), ignore_index=-100)

    class _HostWork(TorchDispatchMode):
        """Counts the torch ops dispatched and the Triton launches (ops the interpreter itself
        dispatches while it runs a kernel are not counted)."""

        def __init__(self, monkeypatch):
            super().__init__()
            self.ops, self.launches, self._in_kernel = [], [], False
            for module in (_rows_module(), _elogitnorm_module(), _class_gradient_module(),
                           _logitnorm_module()):
                monkeypatch.setattr(module, "launcher", self._launcher(module.launcher))

        def _launcher(self, launch):
            def counted(kernel, grid, traced):
                run = launch(kernel, grid, traced)

                def call(*args, **kwargs):
                    self.launches.append(kernel.__name__)
                    self._in_kernel = True
                    try:
                        return run(*args, **kwargs)
                    finally:
                        self._in_kernel = False

                return call

            return counted

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not self._in_kernel:
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

        def take(self):
            counts = (list(self.ops), list(self.launches))
            self.ops.clear()
            self.launches.clear()
            return counts

    def _training_step_host_work(monkeypatch, n, c, d):
        """Ops and launches of one eager ELogitNorm forward and backward (mean, both inputs
        requiring gradients): ``(forward_ops, forward_launches, backward_ops,
        backward_launches)``."""
        logits, weight, target = make_case(n, c, d, dtype=torch.float32)
        options = {"reduction": "mean", "ignore_index": -100, "eps": 1e-6, "divisor": c}
        work = _HostWork(monkeypatch)
        with work:
            loss = triton_backend.elogitnorm_loss(logits, weight, target, **options)
            forward_ops, forward_launches = work.take()
            loss.backward()
            backward_ops, backward_launches = work.take()
        return forward_ops, forward_launches, backward_ops, backward_launches

    #: Host work of the fused small-C path at the CIFAR-10 size (N=128, C=10, D=512), eager,
    #: mean, the loss through the Python Function: forward = 4 output allocations + the sum of
    #: the rows' shares and 1 launch (was 24 ops: argmax, the distance GEMM and norms, ...; then
    #: 8 with the mean as ne, 2 sums, div); backward = autograd's seed, 2 allocations (logits
    #: and weight gradients), 2 leaf-gradient detaches and 1 launch (dW, and the logits gradient
    #: on the way; it reads the loss's gradient with row stride 0) (was 23 ops: 3 zero gradients
    #: of unused outputs, two GEMMs; then 16 with an arange and an unsqueeze; then 14 + 1 launch
    #: with the per-class weight gradient as seven torch ops: zeros, index_add_, t, add, sum,
    #: mul, addmm; then 7 + 2 launches with the mean's autograd and the rescale's own launch).
    #: Through the C++ node (the default): the forward also allocates dW and launches its
    #: pooled kernel, which also adds the rows' shares into the loss (an allocation where the
    #: host ran a sum), and the node returns a view of the loss (7 ops + 2 launches); the
    #: backward is the seed, one foreach multiply of both gradients and the detaches, no Python
    #: and no launch (4 ops; was 5 with a multiply each).
    FUSED_HOST_WORK = {
        "python": (5, ["_elogitnorm_fused_kernel"], 5, ["_pooled_weight_gradient_kernel"]),
        "native": (7, ["_elogitnorm_fused_kernel", "_pooled_weight_gradient_kernel"], 4, []),
    }

    @pytest.mark.parametrize("path", ["python", "native"])
    def test_small_c_host_work_does_not_grow(path, monkeypatch):
        monkeypatch.setattr(triton_backend, "NATIVE_BACKWARD", path == "native")
        forward_ops, forward_launches, backward_ops, backward_launches = (
            _training_step_host_work(monkeypatch, 128, 10, 512))
        most_forward, launched_forward, most_backward, launched_backward = FUSED_HOST_WORK[path]
        assert forward_launches == launched_forward
        assert len(forward_ops) <= most_forward, forward_ops
        assert backward_launches == launched_backward
        assert len(backward_ops) <= most_backward, backward_ops
        if path == "native":
            assert not any("sum" in op for op in forward_ops), forward_ops
            assert backward_ops.count("aten._foreach_mul.Tensor") == 1, backward_ops
            assert "aten.mul.Tensor" not in backward_ops, backward_ops

    @pytest.mark.parametrize("path", ["python", "native"])
    @pytest.mark.parametrize("reduction", ["mean", "sum"])
    @pytest.mark.parametrize("n,c,forward_ops_at_most", [(128, 10, 3), (40, 1000, 4)])
    def test_logitnorm_reduced_in_the_kernel_host_work(n, c, forward_ops_at_most, reduction,
                                                       path, monkeypatch):
        """Eager sum / mean. CIFAR-10 size (one program): the forward is 3 allocations (loss,
        statistics, gradient) and 1 launch. Beyond one program (N=40, C=1000, blocks of rows):
        the same and the sum of the rows' shares. The Python Function's backward is 1 launch
        (and autograd's seed and the leaf's detach); the C++ node's (the default) is one
        multiply and no launch, and its forward allocates no statistics (which only the Python
        backward reads) for one view of the loss (was 4 / 5 ops). The per-row path runs
        the count, its reciprocal and the division too (7-8 ops + 1 launch), and their autograd
        (3 + 1)."""
        monkeypatch.setattr(triton_backend, "NATIVE_BACKWARD", path == "native")
        logits, _, target = make_case(n, c, 1, dtype=torch.float32)
        work = _HostWork(monkeypatch)
        with work:
            loss = triton_backend.logitnorm_loss(logits, target, tau=0.04, reduction=reduction,
                                                 ignore_index=-100)
            forward_ops, forward_launches = work.take()
            (grad,) = torch.autograd.grad(loss, logits)
            backward_ops, backward_launches = work.take()
        native = path == "native"
        assert loss.shape == () and forward_launches == ["_logitnorm_kernel"]
        assert len(forward_ops) <= forward_ops_at_most, forward_ops
        assert forward_ops.count("aten.empty.memory_format") == 1 + (not native), forward_ops
        assert backward_launches == ([] if native else ["_logitnorm_backward_kernel"])
        # The seed (ones_like) and a detach at most, or the seed and the multiply.
        assert len(backward_ops) <= 2, backward_ops
        check_logitnorm("triton", logits, target, reduction, rtol=RTOL, atol=ATOL)

    #: Host work of the GEMM path (eager, mean), N=256, C=1000 (one distance row per sample) and
    #: N=300, C=200 (one per class), D=64, through the Python Function. Forward: argmax,
    #: index_select of the rows (N < C only), t + mm (raw inner products), the row norms (one
    #: reduction), 3 output allocations, the sum of the rows' shares and 1 launch: 9 / 8 (was
    #: 22: norms gathered and broadcast, addmm, clamp, sqrt and scatter of the self-distance on
    #: the host; then 13 / 12 with the mean as 4 ops; then 10 / 9 with squared norms as mul +
    #: sum). Backward: autograd's seed, 2 allocations, the weight gradient from the forward's
    #: saved rows (per sample: sum, mul, t, addmm, mm, index_add_, the coefficient rows summing
    #: to zero; per class: zeros, index_add_, t, add, sum, mul, addmm), 2 detaches and 1 launch:
    #: 11 / 12 (was 18 / 16: the rows gathered again, an arange, 2 unsqueezes; then 15 / 14 with
    #: the mean's autograd; then 13 / 12 with the row sums). Through the C++ node (the default)
    #: the weight gradient's ops move to the forward (from the unit coefficients, no rescale
    #: launch) with the node's view: 16 / 16 (was 19 / 17); the backward is the seed, one
    #: foreach multiply of both gradients and the detaches: 4, no launch (was 5).
    GEMM_HOST_WORK = {"python": (9, 12, ["_scale_rows_kernel"]), "native": (16, 4, [])}

    @pytest.mark.parametrize("path", ["python", "native"])
    @pytest.mark.parametrize("n,c", [(256, 1000), (300, 200)])
    def test_gemm_path_host_work_does_not_grow(n, c, path, monkeypatch):
        monkeypatch.setattr(triton_backend, "NATIVE_BACKWARD", path == "native")
        forward_ops, forward_launches, backward_ops, backward_launches = (
            _training_step_host_work(monkeypatch, n, c, 64))
        most_forward, most_backward, launched_backward = GEMM_HOST_WORK[path]
        assert forward_launches == ["_elogitnorm_kernel"]
        assert len(forward_ops) <= most_forward, forward_ops
        # The distances are formed in the kernel: one GEMM, no host-side clamp, root or scatter
        # (the node's forward has the weight gradient's GEMMs: an addmm, and per sample an mm).
        native = path == "native"
        assert forward_ops.count("aten.mm.default") == 1 + (native and n < c), forward_ops
        assert not any(name in op for op in forward_ops
                       for name in ("clamp", "sqrt", "scatter")), forward_ops
        assert forward_ops.count("aten.addmm_.default") == native, forward_ops
        # In place: an out-of-place addmm would copy its input into the result first.
        assert "aten.addmm.default" not in forward_ops + backward_ops
        assert backward_launches == launched_backward
        assert len(backward_ops) <= most_backward, backward_ops
        # The rows were kept: never gathered twice.
        assert (forward_ops + backward_ops).count("aten.index_select.default") == (n < c)

    #: (C, D, fused?) around the thresholds C <= 128 and C * D <= 2^17.
    THRESHOLD_CASES = [(1, 4, True), (3, 4, True), (10, 512, True), (100, 512, True),
                       (100, 300, True), (128, 1024, True), (129, 4, False), (64, 2048, True),
                       (64, 2049, False)]

    @pytest.mark.parametrize("c,d,fused", THRESHOLD_CASES)
    def test_fused_threshold_and_parity(c, d, fused, monkeypatch):
        assert _elogitnorm_module().fuses_distances(c, d) == fused
        logits, weight, target = make_case(6, c, d, dtype=torch.float32)
        target[::4] = -100
        work = _HostWork(monkeypatch)
        with work:
            ef.elogitnorm_loss(logits.detach(), weight.detach(), target, backend="triton")
        expected = "_elogitnorm_fused_kernel" if fused else "_elogitnorm_kernel"
        assert work.launches == [expected]
        check_elogitnorm("triton", logits, weight, target, "mean", rtol=RTOL, atol=ATOL)

    def test_fused_argmax_and_predicted_match_torch():
        """First index on ties, NaN counts as the maximum, +-inf; ``predicted`` as argmax."""
        nan, inf = float("nan"), float("inf")
        logits = torch.tensor([[1.0, nan, 5.0, nan], [-inf, -inf, -inf, -inf],
                               [2.0, inf, inf, 1.0], [3.0, 3.0, 3.0, 3.0],
                               [0.0, 2.0, -1.0, 2.0], [-inf, 1.0, -inf, 0.5]])
        logits = torch.cat([logits, torch.randint(-1, 2, (7, 4)).float()])
        weight = torch.randn(4, 3)
        target = torch.tensor([0, 1, 2, 3, 1, -100, 0, 1, 2, 3, 0, 1, 2])
        losses, grad, coefficients, predicted = _elogitnorm_module().elogitnorm_rows_fused(
            logits, target, weight, eps=1e-6, divisor=4, ignore_index=-100, write_grad=True,
            write_coefficients=True, traced=False)
        assert predicted.dtype == torch.int64
        assert torch.equal(predicted, logits.argmax(dim=1))
        assert torch.isnan(losses[0]) and losses[5] == 0
        assert torch.isfinite(losses[[3, 4, *range(6, 13)]]).all()
        assert grad.shape == coefficients.shape == logits.shape

    def test_fused_duplicate_weight_rows_are_exact():
        """Distance 0 from the difference form (clamped at eps, no gradient through it), where
        the GEMM form would leave ~1e-3 |w| (large D, large norms)."""
        logits, weight, target = make_case(16, 5, 512, "duplicate_weights", dtype=torch.float32)
        with torch.no_grad():
            weight.mul_(30.0)
            weight[3] = weight[1]
        for reduction in REDUCTIONS:
            check_elogitnorm("triton", logits, weight, target, reduction, rtol=RTOL, atol=ATOL)

    @pytest.mark.parametrize("mode", ["gemm", "streaming"])
    @pytest.mark.parametrize("n", [12, 41])  # C = 40: one row per sample; one row per class
    def test_gemm_duplicate_weight_rows_are_exact(n, mode, monkeypatch):
        """GEMM path: ``|a|^2 + |b|^2 - 2 a.b`` from the raw inner products cancels for
        (near-)duplicate weight rows (~1e-3 |w|^2 in fp32 at large norms); the kernel recomputes
        those entries from ``W``, so a duplicate's distance is 0 (clamped at eps, no gradient
        through it) and a near duplicate's is its true small value, in both layouts."""
        monkeypatch.setattr(_elogitnorm_module(), "FUSED_MAX_CLASSES", 0)
        if mode == "streaming":
            _stream(monkeypatch, 16)
        c, d = 40, 64
        logits, weight, target = make_case(n, c, d, "duplicate_weights", dtype=torch.float32)
        with torch.no_grad():
            weight.mul_(30.0)
            weight[7] = weight[3]
            for rows, cls in ((slice(0, 3), 3), (slice(3, 6), 7), (slice(6, 9), 5),
                              (slice(9, 12), 11)):
                logits[rows, cls] += 10.0  # these rows predict the duplicated classes
        target[1] = -100
        for reduction in REDUCTIONS:
            check_elogitnorm("triton", logits, weight, target, reduction, rtol=RTOL, atol=ATOL)
        # A near duplicate (0.008 apart, where the GEMM form is off by ~0.1): its distance
        # drives the loss and the logits gradient. (The weight gradient's own GEMM form,
        # c (w_m - w_j) as c w_m - c w_j, loses digits there in every fp32 backend.)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(5)
            weight[11] = weight[5] + 1e-3 * torch.randn(d, generator=generator)
        loss = ef.elogitnorm_loss(logits, weight.detach(), target, reduction="none",
                                  backend="triton")
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        ref_z = logits.detach().double().requires_grad_(True)
        expected = elogitnorm_reference(ref_z, weight.detach().double(), target,
                                        reduction="none")
        (ref_grad,) = torch.autograd.grad(expected.sum(), ref_z)
        torch.testing.assert_close(loss.double(), expected, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=RTOL, atol=ATOL)

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
        rest = [0, 1, 3, 4, 5]
        cases = (
            (ef.elogitnorm_loss(logits, weight.detach(), target, reduction="none",
                                backend="triton"),
             elogitnorm_reference(logits.double(), weight.detach().double(), target,
                                  reduction="none")),
            (ef.logitnorm_loss(logits, target, reduction="none", backend="triton"),
             logitnorm_reference(logits.double(), target, reduction="none")),
        )
        for loss, expected in cases:
            assert torch.isnan(loss[2])
            torch.testing.assert_close(loss[rest].double(), expected[rest], rtol=RTOL,
                                       atol=ATOL)

    def test_float64_runs_the_torch_closed_form():
        logits, weight, target = make_case(7, 5, 3)
        check_elogitnorm("triton", logits, weight, target, "mean", rtol=1e-9, atol=1e-11)
        check_logitnorm("triton", logits, target, "sum", rtol=1e-9, atol=1e-11)

    def test_block_override_rejects_non_powers_of_two():
        with pytest.raises(ValueError, match="block_cols"):
            _rows_module().launch_config(10, block_cols=12)

    # ------------- extremes and property-based parity, every kernel path (issue 22) -------------
    # The paths are chosen through triton_backend's block_cols argument (no module settings):
    # None takes the fused kernel at small C, a block >= C the GEMM distances with rows on
    # chip, a smaller block streams the rows.

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from parity import assert_close_to_scale, elogitnorm_oracle, logitnorm_oracle

    KERNEL_PATHS = ("fused", "gemm", "streaming")
    INTERPRETER_SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                                    suppress_health_check=[HealthCheck.too_slow])

    def _block_cols(path, n_cols):
        if path == "fused":
            return None
        single = 1 << max(n_cols - 1, 1).bit_length()
        return single if path == "gemm" else max(4, single // 4)

    def _triton_elogitnorm(logits, weight, target, reduction, path, eps=1e-6):
        return triton_backend.elogitnorm_loss(
            logits, weight, target, reduction=reduction, ignore_index=-100, eps=eps,
            divisor=logits.shape[1], block_cols=_block_cols(path, logits.shape[1]))

    def _check_against_oracle(logits, weight, target, reduction, path, rtol=2e-5,
                              weight_rtol=2e-4):
        """Loss and both gradients against the float64 oracle on the same fp32 values."""
        loss = _triton_elogitnorm(logits, weight, target, reduction, path)
        grad = (torch.rand(loss.shape, dtype=torch.float64) + 0.5).float()
        grad_logits, grad_weight = torch.autograd.grad(loss, (logits, weight), grad)
        expected = elogitnorm_oracle(logits, weight, target, reduction, grad)
        assert_close_to_scale("loss", loss, expected[0], rtol=rtol, floor=1e-6)
        assert_close_to_scale("grad_logits", grad_logits, expected[1], rtol=rtol, floor=1e-36,
                              per_row=True, terms=expected[3])
        assert_close_to_scale("grad_weight", grad_weight, expected[2], rtol=weight_rtol,
                              floor=1e-36)
        return loss, grad_logits, grad_weight

    @pytest.mark.parametrize("path", KERNEL_PATHS)
    @pytest.mark.parametrize("value", [100.0, 1e30, 3e38])
    def test_rows_of_equal_logits_give_log_c(path, value):
        """All margins 0: s is clamped, every class equally likely, log C per row."""
        weight = torch.randn(10, 8, requires_grad=True)
        logits = torch.full((4, 10), value, requires_grad=True)
        target = torch.tensor([0, 3, 9, 5])
        loss = _triton_elogitnorm(logits, weight, target, "sum", path)
        torch.testing.assert_close(loss, torch.tensor(4 * math.log(10)))
        grad_logits, _ = torch.autograd.grad(loss, (logits, weight))
        expected = (0.1 - torch.nn.functional.one_hot(target, 10)) / 1e-6
        torch.testing.assert_close(grad_logits, expected.float(), rtol=1e-5, atol=1e-2)

    @pytest.mark.parametrize("path", KERNEL_PATHS)
    def test_small_margins_large_logits_and_large_weights(path):
        """3 + 1e-3 randn (C = 3 and 40); logits near 1e30 (s^2 overflowed, zeroing dW);
        weights near 1e19 and 1e20 (|w|^2, or an inner product's partial sums, overflowed:
        NaN or wrong distances)."""
        generator = torch.Generator().manual_seed(11)
        for c, logit_scale, offset, weight_scale in ((3, 1e-3, 3.0, 1.0), (40, 1e-3, 3.0, 1.0),
                                                     (40, 1e30, 0.0, 1.0),
                                                     (40, 1e20, 0.0, 1e19),
                                                     (40, 1e20, 0.0, 1e20)):
            logits = (offset + logit_scale * torch.randn(12, c, generator=generator))
            weight = weight_scale * torch.randn(c, 6, generator=generator)
            target = torch.randint(0, c, (12,), generator=generator)
            _check_against_oracle(logits.requires_grad_(True), weight.requires_grad_(True),
                                  target, "mean", path)

    @pytest.mark.parametrize("streamed", [False, True])
    @pytest.mark.parametrize("magnitude", [1e20, 1e37])
    def test_logitnorm_is_scale_invariant(streamed, magnitude):
        """LogitNorm at 1e20 and 1e37 is LogitNorm at 1 (||z||^2 overflowed: log C)."""
        generator = torch.Generator().manual_seed(12)
        base = torch.randn(6, 40, generator=generator, dtype=torch.float64)
        target = torch.randint(0, 40, (6,), generator=generator)
        logits = (base * magnitude).float().requires_grad_(True)
        for reduction in REDUCTIONS:
            loss = triton_backend.logitnorm_loss(
                logits, target, tau=0.04, reduction=reduction, ignore_index=-100,
                block_cols=8 if streamed else None)
            grad = torch.ones_like(loss) * 1.5
            (grad_logits,) = torch.autograd.grad(loss, logits, grad)
            expected, expected_grad, terms = logitnorm_oracle(logits, target, reduction, grad)
            at_one = logitnorm_reference(base, target, reduction=reduction)
            assert_close_to_scale("loss", loss, at_one, rtol=2e-5, floor=1e-6)
            assert_close_to_scale("loss", loss, expected, rtol=2e-5, floor=1e-6)
            assert_close_to_scale("grad", grad_logits, expected_grad, rtol=2e-5, floor=1e-36,
                                  per_row=True, terms=terms)

    @INTERPRETER_SETTINGS
    @given(st.integers(1, 12), st.integers(1, 160), st.integers(4, 12), st.integers(0, 2**31 - 1),
           st.sampled_from([1e4, 3.0, -7.5, 0.0]), st.integers(-4, 1), st.integers(-20, 37),
           st.sampled_from(KERNEL_PATHS), st.sampled_from(REDUCTIONS),
           st.sampled_from(["gauss", "ties", "equal_rows"]))
    def test_elogitnorm_kernels_match_float64_oracle(n, c, d, seed, offset, spread, magnitude,
                                                     path, reduction, pattern):
        """Random shapes, offsets and spreads (small margins on large logits), overall
        magnitudes up to 1e37, ties, equal rows, ignored rows, every reduction and path.
        D >= 4 keeps random weight rows apart: the weight gradient's GEMMs lose digits in
        ``c w_m - c w_j`` for rows much closer than their norms (as every fp32 GEMM form)."""
        generator = torch.Generator().manual_seed(seed)
        scale = 10.0 ** magnitude if offset == 0.0 else 1.0
        logits = offset + 10.0 ** spread * torch.randn(n, c, generator=generator,
                                                       dtype=torch.float64)
        if pattern == "ties":
            logits = offset + torch.randint(-2, 3, (n, c), generator=generator).double()
        elif pattern == "equal_rows":
            logits[::2] = offset
        logits = (logits * scale).float().requires_grad_(True)
        weight = torch.randn(c, d, generator=generator).requires_grad_(True)
        target = torch.randint(0, c, (n,), generator=generator)
        target[1::3] = -100
        _check_against_oracle(logits, weight, target, reduction, path)

    @INTERPRETER_SETTINGS
    @given(st.integers(1, 12), st.integers(1, 160), st.integers(0, 2**31 - 1),
           st.sampled_from([0.0, 3.0, 1e4]), st.integers(-30, 37), st.booleans(),
           st.sampled_from(REDUCTIONS))
    def test_logitnorm_kernels_match_float64_oracle(n, c, seed, offset, exponent, streamed,
                                                    reduction):
        generator = torch.Generator().manual_seed(seed)
        magnitude = 10.0 ** exponent / (1.0 + abs(offset))  # finite in fp32 up to 1e37
        logits = (magnitude * (offset + torch.randn(n, c, generator=generator,
                                                    dtype=torch.float64)))
        logits = logits.float().requires_grad_(True)
        target = torch.randint(0, c, (n,), generator=generator)
        target[::4] = -100
        loss = triton_backend.logitnorm_loss(logits, target, tau=0.04, reduction=reduction,
                                             ignore_index=-100,
                                             block_cols=4 if streamed else None)
        grad = (torch.rand(loss.shape, dtype=torch.float64) + 0.5).float()
        (grad_logits,) = torch.autograd.grad(loss, logits, grad)
        expected, expected_grad, terms = logitnorm_oracle(logits, target, reduction, grad)
        assert_close_to_scale("loss", loss, expected, rtol=2e-5, floor=1e-6)
        assert_close_to_scale("grad", grad_logits, expected_grad, rtol=2e-5, floor=1e-36,
                              per_row=True, terms=terms)
