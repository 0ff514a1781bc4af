"""The GPU benchmark scripts stay runnable where no GPU is: GPU time is scarce, so a script that
fails at import or argument parsing must fail here, not on the device machine."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _benchmark(name: str):
    """A module of benchmarks/ (the scripts import their helpers by plain name)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("gpu_*.py") if p.name != "gpu_summary.py")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_gpu_script_imports_and_parses_arguments(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--out" in done.stdout


def test_gpu_check_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_gpu_summary_renders_the_committed_results(tmp_path):
    results = sorted((ROOT / "benchmarks" / "results").glob("gpu_*.json"))
    if not results:
        pytest.skip("no GPU results committed")
    for path in results:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_summary.py"),
                           str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    for path in results:
        assert path.stem in done.stdout
    assert "|---|" in done.stdout


def test_gpu_tables_keep_one_row_per_line_and_every_column(tmp_path):
    """Error messages (multi-line, with pipes) stay inside their cell."""
    from report import gpu_tables

    rows = [{"loss": "logitnorm", "impl": "triton", "fwd_bwd_ms": 0.5, "status": "ok"},
            {"loss": "logitnorm", "impl": "baseline",
             "status": "error: A | B\nline two " + "x" * 200}]
    (tmp_path / "gpu_fake.json").write_text(json.dumps({"card": "GPU", "rows": rows}))
    table = [line for line in gpu_tables(tmp_path) if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    columns = {len(line.replace("\\|", "").split("|")) for line in table}
    assert columns == {len(table[0].split("|"))}
    assert "line two" in table[-1]


def test_gpu_table_heading_says_how_the_run_differed(tmp_path):
    """A run's ``extension`` note (a run without the usual build) reaches its table's heading."""
    from report import gpu_tables

    rows = [{"loss": "logitnorm", "impl": "triton", "fwd_bwd_ms": 0.5, "status": "ok"}]
    payload = {"card": "GPU", "date": "2026-11-27", "commit": "abc1234", "rows": rows}
    (tmp_path / "gpu_plain.json").write_text(json.dumps(payload))
    (tmp_path / "gpu_unbuilt.json").write_text(json.dumps({**payload, "extension": "not built"}))
    headings = [line for line in gpu_tables(tmp_path) if line.startswith("####")]
    assert headings == ["#### gpu_plain (GPU, torch ?, 2026-11-27, abc1234)",
                        "#### gpu_unbuilt (GPU, torch ?, 2026-11-27, abc1234; extension not built)"]


def test_losses_summary_reports_the_single_block_decision():
    """gpu_losses.summary turns the rows into the targets' ratios, including the comparisons
    that decided the single block and the in-kernel reduction (synthetic rows: no GPU
    needed)."""
    gpu_losses = _benchmark("gpu_losses")

    def row(loss, n, c, impl, ms, **extra):
        return {"loss": loss, "N": n, "C": c, "impl": impl, "fwd_bwd_ms": ms, **extra}

    rows = [
        row("elogitnorm", 256, 1000, "triton", 1.25, fwd_bwd_graph_ms=0.125),
        row("elogitnorm", 256, 1000, "reference eager", 40.0, fwd_bwd_graph_ms=40.0),
        row("elogitnorm", 256, 1000, "reference compiled", 3.0),
        row("elogitnorm", 256, 1000, "triton compiled", 0.5),
        row("elogitnorm", 256, 1000, "F.cross_entropy (pre-scaled)", 0.3),
        row("elogitnorm", 1024, 10000, "triton", 0.5),
        row("elogitnorm", 1024, 10000, "triton streamed", 0.4),
        row("logitnorm", 4096, 32768, "triton", 0.5, fwd_bwd_floor_fraction=0.8,
            fwd_bwd_graph_floor_fraction=0.9),
        row("logitnorm", 4096, 32768, "triton streamed", 1.0),
        row("logitnorm", 4096, 32768, "triton, a program per tile", 0.75),
        row("logitnorm", 4096, 32768, "triton, counted in blocks", 0.45,
            fwd_bwd_floor_fraction=0.85, fwd_bwd_graph_ms=0.44, fwd_bwd_graph_floor_fraction=0.87),
        row("logitnorm", 4096, 32768, "triton, direct launch", 0.48, fwd_bwd_floor_fraction=0.82),
        row("logitnorm", 128, 10, "triton", 0.3, fwd_bwd_graph_ms=0.008),
        row("logitnorm", 128, 10, "triton host reduction", 0.45, fwd_bwd_graph_ms=0.016),
        row("logitnorm", 128, 10, "triton, reduced in blocks", 0.36, fwd_bwd_graph_ms=0.01),
        row("logitnorm", 128, 10, "triton, Python backward", 0.42, fwd_bwd_graph_ms=0.008),
        row("logitnorm", 128, 10, "triton, direct launch", 0.24, fwd_bwd_graph_ms=0.008),
        row("logitnorm", 128, 10, "F.cross_entropy (pre-scaled)", 0.2),
        row("elogitnorm", 128, 100, "triton", 0.6, fwd_bwd_graph_ms=0.08),
        row("elogitnorm", 128, 100, "triton, fused rows of 4", 0.6, fwd_bwd_graph_ms=0.04),
        row("elogitnorm", 128, 100, "triton, fused tiles of 4096", 0.6, fwd_bwd_graph_ms=0.2),
        row("elogitnorm", 128, 100, "triton, summed per step", 0.6, fwd_bwd_graph_ms=0.1),
        row("elogitnorm", 128, 100, "triton, GEMM distances", 0.7, fwd_bwd_graph_ms=0.16),
        row("elogitnorm", 128, 100, "triton, dW unsplit", 0.6, fwd_bwd_graph_ms=0.12),
    ]
    variants = _benchmark("_loss_variants")
    out = gpu_losses.summary(rows)
    assert out["elogitnorm imagenet-1k speedup vs reference eager"] == 32.0
    assert out["elogitnorm imagenet-1k speedup vs reference eager (CUDA graph)"] == 320.0
    assert out["elogitnorm imagenet-1k speedup vs reference compiled"] == 3.0 / 1.25
    assert out["elogitnorm imagenet-1k triton compiled speedup vs reference compiled"] == 6.0
    assert out["elogitnorm imagenet-1k cross_entropy eager / 100x budget"] == 0.3 / 0.4
    assert out["elogitnorm 1024x10000 triton streamed / one block (fwd+bwd)"] == 0.4 / 0.5
    assert out["logitnorm 4096x32768 triton streamed / one block (fwd+bwd)"] == 2.0
    assert out["logitnorm 4096x32768 fwd_bwd floor fraction"] == 0.8
    assert out["logitnorm 4096x32768 fwd_bwd floor fraction (CUDA graph)"] == 0.9
    assert out["logitnorm 128x10 triton / cross_entropy (eager)"] == 0.3 / 0.2
    assert out["logitnorm 128x10 triton host / kernel reduction (fwd+bwd)"] == 0.45 / 0.3
    assert out["logitnorm 128x10 triton blocks / one-program reduction (fwd+bwd)"] == 0.36 / 0.3
    assert out["logitnorm 128x10 triton host reduction / default (CUDA graph, fwd+bwd)"] == 2.0
    # Captured, these two variants are the default path: no graph ratio for them.
    assert not any("reduced in blocks / default" in key for key in out)
    assert out["logitnorm 128x10 triton Python backward / C++ node (fwd+bwd)"] == 0.42 / 0.3
    assert not any("Python backward / default" in key for key in out)
    assert out["logitnorm 128x10 triton direct / JIT launch (fwd+bwd)"] == 0.24 / 0.3
    assert not any("direct launch / default" in key for key in out)
    assert "triton, direct launch" in variants.triton_variants("elogitnorm", 256, 1000, 2048)
    assert "triton, direct launch" not in variants.triton_variants("logitnorm", 1024, 10000, 0)
    assert out["logitnorm 4096x32768 triton per-tile / grouped check (fwd+bwd)"] == 1.5
    assert out["logitnorm 4096x32768 triton kernel count / host count (fwd+bwd)"] == 0.45 / 0.5
    assert out["logitnorm 4096x32768 fwd_bwd floor fraction, counted in blocks"] == 0.85
    assert out["logitnorm 4096x32768 fwd_bwd floor fraction, counted in blocks (CUDA graph)"] \
        == 0.87
    assert out["logitnorm 4096x32768 fwd_bwd floor fraction, direct launch"] == 0.82
    assert "triton, counted in blocks" in variants.triton_variants("logitnorm", 4096, 32768, 0)
    assert "triton, counted in blocks" not in variants.triton_variants("logitnorm", 1024, 10000, 0)
    assert "triton, direct launch" in variants.triton_variants("logitnorm", 4096, 32768, 0)
    assert variants.groups_check_tiles(4096, 32768)
    assert not variants.groups_check_tiles(128, 10)
    assert out["elogitnorm 128x100 triton fused rows of 4 / default (CUDA graph, fwd+bwd)"] == 0.5
    assert out["elogitnorm 128x100 triton summed per step / default (CUDA graph, fwd+bwd)"] == 1.25
    assert out["elogitnorm 128x100 triton fused tiles of 4096 / default (CUDA graph, "
               "fwd+bwd)"] == 2.5
    assert "triton, summed per step" in variants.triton_variants("elogitnorm", 128, 10, 512)
    assert "triton, summed per step" not in variants.triton_variants("elogitnorm", 256, 1000, 512)
    assert out["elogitnorm 128x100 triton GEMM distances / default (CUDA graph, fwd+bwd)"] == 2.0
    assert out["elogitnorm 128x100 triton dW unsplit / default (CUDA graph, fwd+bwd)"] == 1.5
    assert "triton, dW unsplit" in variants.triton_variants("elogitnorm", 128, 100, 512)
    assert "triton, dW unsplit" not in variants.triton_variants("elogitnorm", 4096, 100, 512)
    assert variants.fuses_distances(100, 512) and not variants.fuses_distances(1000, 512)
    # The C++-node comparison where an eager mean takes the node, up to ImageNet-1k's size.
    for loss, n, c, timed in (("logitnorm", 128, 10, True), ("elogitnorm", 256, 1000, True),
                              ("logitnorm", 1024, 10000, False),
                              ("elogitnorm", 1024, 10000, False)):
        assert ("triton, Python backward" in variants.triton_variants(loss, n, c, 512)) == timed


def test_graph_timing_covers_small_sizes_and_the_bandwidth_case():
    """Which rows ``gpu_losses`` also replays from a CUDA graph: small sizes (not compiled, not
    eager-only variants) and, at the bandwidth case, the default, the cross-entropy floor and
    the variant that counts in the kernel (whose device time is the question) only (a graph per
    variant there would eat the time budget of the CIFAR rows after it)."""
    times_graph = _benchmark("gpu_losses").times_graph
    assert times_graph("logitnorm", 128, 10, "triton", 0.3)
    assert times_graph("elogitnorm", 1024, 10000, "triton", 0.03)  # under 50 us
    assert not times_graph("logitnorm", 128, 10, "triton compiled", 0.3)
    assert not times_graph("logitnorm", 128, 10, "triton, Python backward", 0.3)
    assert not times_graph("elogitnorm", 1024, 10000, "triton", 0.5)
    for impl, timed in (("triton", True), ("F.cross_entropy (pre-scaled)", True),
                        ("triton streamed", False), ("torch", False),
                        ("triton, counted in blocks", True)):
        assert times_graph("logitnorm", 4096, 32768, impl, 0.5) == timed


def test_counted_variant_reduces_the_bandwidth_case_in_the_kernel():
    """``triton, counted in blocks``: the 4096 x 32768 mean, counted on the host by default, is
    reduced by blocks of rows in the kernel in the variant's configuration."""
    from elogitnorm_fast.kernels import logitnorm

    variants = _benchmark("_loss_variants")
    default = logitnorm.config_for(4096, 32768, "mean")
    assert default.reduce is None
    changed = variants.kernel_counted_triton().change(default, 32768, 0)
    assert changed.reduce == "blocks" and changed.blocks == default.blocks


def test_blockwise_variant_changes_only_the_reduction():
    """``triton, reduced in blocks`` reduces a CIFAR-sized LogitNorm by blocks of rows, and the
    step still returns through the C++ node (where the default does)."""
    import dataclasses

    from elogitnorm_fast.kernels import logitnorm

    variants = _benchmark("_loss_variants")
    default = logitnorm.config_for(128, 10, "mean")
    assert default.reduce == "one program"
    changed = variants.blockwise_reduced_triton().change(default, 10, 0)
    assert changed == dataclasses.replace(default, reduce="blocks")


def test_fused_and_pooled_variants_change_their_configuration():
    """``triton, summed per step`` turns the fused kernel's deferred sums off, ``triton, fused
    tiles of 4096`` gives it the tile and warps it had before the tile grew, ``triton, fused
    rows of 4`` four rows per program, ``triton, dW unsplit`` removes the pooled weight
    gradient's split of D (one program per block of classes), ``triton, a program per tile``
    the backward check's grouping, ``triton, Python backward`` the C++ node; the default
    configuration is the function's own."""
    import dataclasses

    from elogitnorm_fast.kernels import class_gradient, elogitnorm, logitnorm

    variants = _benchmark("_loss_variants")
    default = elogitnorm.config_for(128, 100, 512, "mean")
    assert default.fused == elogitnorm.FusedBlocks(rows=1, block=128, features=128,
                                                   num_warps=16, deferred_sums=True)
    summed = variants.per_step_sums_triton().change(default, 100, 512)
    assert summed.fused == dataclasses.replace(default.fused, deferred_sums=False)
    small = variants.small_tile_fused_triton().change(default, 100, 512)
    assert small.fused == elogitnorm.FusedBlocks(rows=1, block=128, features=32, num_warps=4)
    small_10 = variants.small_tile_fused_triton().change(
        elogitnorm.config_for(128, 10, 512, "mean"), 10, 512)
    assert small_10.fused.features == 256
    assert variants.four_rows_fused_triton().change(default, 100, 512).fused.rows == 4
    assert class_gradient.feature_runs(7, 512, 32) == (16, 32)
    unsplit = variants.unsplit_pooled_triton().change(default, 100, 512).pooled
    assert class_gradient.feature_runs(7, 512, 32, unsplit.target_programs) == (1, 512)
    assert variants.gemm_distances_triton().change(default, 100, 512).fused is None
    logitnorm_default = logitnorm.config_for(4096, 32768, "mean")
    per_tile = variants.per_tile_check_triton().change(logitnorm_default, 32768, 0)
    assert per_tile.check_programs > logitnorm_default.check_programs
    for loss, config in (("elogitnorm", default), ("logitnorm", logitnorm_default)):
        python = variants.python_backward_triton(loss).change(config, 100, 512)
        assert python == dataclasses.replace(config, node=False)


def test_host_profile_records_each_triton_launch():
    """gpu_host.record_launch (the profiled step's configured ``launch``) makes every kernel
    launch a profiler event and launches it (no GPU: the kernel is a stand-in)."""
    gpu_host = _benchmark("gpu_host")
    launched = []

    class Kernel:
        fn = types.SimpleNamespace(__name__="_some_kernel")

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((grid, args))

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        gpu_host.record_launch(Kernel(), (3,), 1, 2)
    assert launched == [((3,), (1, 2))]
    assert any(event.key == "launch _some_kernel" for event in prof.key_averages())


def test_device_kernel_breakdown_is_per_step_and_sorted():
    """gpu_host.top_device_kernels (profiled here with CPU activity, the GPU run's device
    activity aside): each entry is one op's time and count per step, longest first."""
    gpu_host = _benchmark("gpu_host")
    z = torch.randn(64, 10, requires_grad=True)
    y = torch.randint(0, 10, (64,))

    def step():
        torch.autograd.grad(torch.nn.functional.cross_entropy(z, y), [z])

    kernels = gpu_host.top_device_kernels(step, steps=4, top=50, device_type="cpu")
    times = [k["device_us_per_step"] for k in kernels]
    assert times == sorted(times, reverse=True) and times[-1] > 0
    by_name = {k["kernel"]: k for k in kernels}
    assert by_name["aten::_log_softmax"]["per_step"] == 1
    assert by_name["aten::_log_softmax_backward_data"]["per_step"] == 1


def test_device_kernels_profile_only_the_ok_triton_and_cross_entropy_rows(monkeypatch):
    """gpu_host.add_device_kernels (run after every host timing) profiles the ``triton`` and
    ``F.cross_entropy`` rows that timed, and records a failed profile without dropping the
    row's host times."""
    gpu_host = _benchmark("gpu_host")
    profiled = []

    def fake_profile(step):
        if step == ("elogitnorm", "F.cross_entropy"):
            raise RuntimeError("no CUPTI")
        profiled.append(step)
        return [{"kernel": "k", "per_step": 1.0, "device_us_per_step": 2.0}]

    monkeypatch.setattr(gpu_host, "make_step", lambda loss, backend, *_: (loss, backend))
    monkeypatch.setattr(gpu_host, "top_device_kernels", fake_profile)

    def row(loss, backend, status="ok"):
        return {"loss": loss, "N": 4, "C": 3, "D": 2, "backend": backend, "status": status,
                "host_us_fwd_bwd": 1.0}

    rows = [row("logitnorm", "triton"), row("logitnorm", "cuda"),
            row("logitnorm", "F.cross_entropy"), row("elogitnorm", "triton", "error: x"),
            row("elogitnorm", "F.cross_entropy"), {"op": "torch.empty(16)", "launch_us": 1.0}]
    gpu_host.add_device_kernels(rows)
    assert profiled == [("logitnorm", "triton"), ("logitnorm", "F.cross_entropy")]
    assert rows[0]["top_device_kernels"][0]["device_us_per_step"] == 2.0
    assert "top_device_kernels" not in rows[1] and "top_device_kernels" not in rows[3]
    assert rows[4]["device_kernels_error"] == "RuntimeError: no CUPTI"
    assert rows[4]["host_us_fwd_bwd"] == 1.0


def test_cpu_host_path_counts_each_paths_work(tmp_path):
    """benchmarks/cpu_host_path.py (quick, in its own process: it sets TRITON_INTERPRET before
    importing triton): per case the node path, the Python Functions and F.cross_entropy, each
    with its ops and stand-in launches; the C++ node's backward launches nothing and multiplies,
    the Python backward launches once (twice for ELogitNorm's pooled weight gradient and the
    logits gradient's rescale: one job a kernel), and no CPU-only target check is counted."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_host_path.py"),
                           "--quick", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((tmp_path / "cpu_host_path.json").read_text())["rows"]
    by_path = {}
    for row in rows:
        by_path.setdefault(row["path"], []).append(row)
        assert len(row["us_per_step"]) == 1 and row["us_per_step"][0] > 0
        assert not any("aminmax" in op for op in row["forward_ops"]), row["forward_ops"]
    assert {len(group) for group in by_path.values()} == {6}
    for row in by_path["triton"]:
        assert row["forward_launches"] and row["backward_launches"] == []
        # The node's multiply of each gradient (the logits' into its own dtype).
        assert {"aten.mul.Tensor", "aten.mul.out"} & set(row["backward_ops"])
    for row in by_path["triton, Python backward"]:
        expected = 2 if row["loss"] == "elogitnorm" and row["C"] <= 128 else 1
        assert len(row["backward_launches"]) == expected, row["backward_launches"]
    for row in by_path["F.cross_entropy"]:
        assert row["forward_launches"] == row["backward_launches"] == []


def test_training_step_rows_time_every_loss_against_cross_entropy():
    """gpu_host.training_step_rows on the CPU at a tiny width: one row per loss and C, each
    step timed and compared with the cross-entropy step; the model has ResNet-18's 17
    convolutions."""
    gpu_host = _benchmark("gpu_host")
    model = gpu_host.cifar_cnn(10, width=2)
    assert sum(isinstance(layer, torch.nn.Conv2d) for layer in model) == 17
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    rows = gpu_host.training_step_rows(["torch"], device="cpu", batch=4, classes=(10,),
                                       width=2, steps=1, rounds=3)
    assert [row["loss"] for row in rows] == ["F.cross_entropy", "logitnorm torch",
                                             "elogitnorm torch", "elogitnorm reference",
                                             "F.cross_entropy, again"]
    assert all(row["status"] == "ok" and len(row["step_ms_rounds"]) == 3 for row in rows), rows
    assert all(row["step_ms"] == sorted(row["step_ms_rounds"])[1] > 0 for row in rows)
    assert rows[0]["vs_cross_entropy"] == 1.0
    ratios = [mine / base for mine, base in zip(rows[2]["step_ms_rounds"],
                                                 rows[0]["step_ms_rounds"], strict=True)]
    assert rows[2]["vs_cross_entropy"] == sorted(ratios)[1]
    # Of the default profiled steps only cross-entropy's is here (no triton backend).
    assert [row["loss"] for row in rows if "_step" in row] == ["F.cross_entropy"]


def test_training_step_rows_record_a_failing_loss_once(monkeypatch):
    """A loss that raises gets its error in its row, is not timed again in later rounds, and
    the other losses' rows are whole."""
    gpu_host = _benchmark("gpu_host")
    calls = []

    def broken(logits, weight, target):
        calls.append(1)
        raise RuntimeError("no kernel for this")

    def losses(_backends):
        return {"F.cross_entropy": gpu_host.loss_fn("", "F.cross_entropy"), "broken": broken}

    monkeypatch.setattr(gpu_host, "step_losses", losses)
    rows = gpu_host.training_step_rows(["torch"], device="cpu", batch=4, classes=(10,),
                                       width=2, steps=1, rounds=3)
    assert [row["loss"] for row in rows] == ["F.cross_entropy", "broken"]
    assert rows[0]["status"] == "ok" and len(rows[0]["step_ms_rounds"]) == 3
    assert rows[1]["status"] == "error: RuntimeError: no kernel for this"
    assert "step_ms" not in rows[1] and len(calls) == 1


def test_step_device_time_profiles_the_chosen_steps_and_drops_them():
    """The profiled rows (first C only) get the summed op time and count per step (CPU
    activity here), and lose the step callable that would not serialise."""
    gpu_host = _benchmark("gpu_host")
    rows = gpu_host.training_step_rows(["torch"], device="cpu", batch=4, classes=(10, 3),
                                       width=2, steps=1, rounds=1,
                                       profiled=("F.cross_entropy", "elogitnorm torch"))
    marked = [(row["loss"], row["C"]) for row in rows if "_step" in row]
    assert marked == [("F.cross_entropy", 10), ("elogitnorm torch", 10)]
    gpu_host.add_step_device_time(rows, device_type="cpu", steps=1)
    assert not any("_step" in row for row in rows)
    profiled = [row for row in rows if "device_ms_per_step" in row]
    assert [(row["loss"], row["C"]) for row in profiled] == marked
    # 17 convolutions forward and backward at least, and more ops with ELogitNorm than with
    # cross-entropy.
    assert all(row["device_ms_per_step"] > 0 and row["kernels_per_step"] >= 34
               for row in profiled)
    assert profiled[1]["kernels_per_step"] > profiled[0]["kernels_per_step"]


def test_python_backward_variant_turns_the_node_off():
    """gpu_host's ``triton, Python backward`` is the variant whose configuration has no C++
    node; the ``triton`` row is the public API's default."""
    from elogitnorm_fast.kernels import logitnorm

    gpu_host = _benchmark("gpu_host")
    loss = gpu_host.loss_fn("logitnorm", gpu_host.PYTHON_BACKWARD)
    config = logitnorm.config_for(128, 10, "mean")
    assert not loss.change(config, 10, 0).node


def test_loss_matrix_times_the_targets_first():
    """The budget cuts the last cases: the issue's target sizes come first, the rest after in
    their given order."""
    gpu_losses = _benchmark("gpu_losses")
    cases = [("elogitnorm", s) for s in gpu_losses.ELOGITNORM_SIZES]
    cases += [("logitnorm", s) for s in gpu_losses.LOGITNORM_SIZES]
    ordered = gpu_losses.ordered_cases(cases)
    assert sorted(ordered) == sorted(cases)
    head = [(loss, n, c) for loss, (n, c, _) in ordered[:len(gpu_losses.TARGETS_FIRST)]]
    assert head == gpu_losses.TARGETS_FIRST
    rest = [case for case in cases if case not in ordered[:len(head)]]
    assert ordered[len(head):] == rest


def test_gpu_host_writes_what_it_measured_when_stopped(tmp_path, monkeypatch):
    """gpu_check.sh stops a benchmark with SIGTERM at its time limit: gpu_host.py still writes
    the rows measured until then, and names the stage that did not finish (faked here: the host
    timings measure one row, then the signal arrives)."""
    import os
    import signal

    gpu_host = _benchmark("gpu_host")
    path = tmp_path / "gpu_host.json"
    monkeypatch.setattr(gpu_host, "begin", lambda *args, **kwargs: (None, str(path), {}))

    def host_rows(rows, backends):
        rows.append({"loss": "logitnorm", "N": 1, "C": 2, "backend": "triton", "status": "ok",
                     "_step": object()})  # a live object stays out of the file
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(gpu_host, "host_rows", host_rows)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit):
            gpu_host.main()
    finally:
        signal.signal(signal.SIGTERM, previous)
    written = json.loads(path.read_text())
    assert written["machine"]["unfinished_stage"] == "host timings"
    assert written["rows"] == [{"loss": "logitnorm", "N": 1, "C": 2, "backend": "triton",
                                "status": "ok"}]


def test_gpu_losses_writes_the_cases_timed_when_stopped(tmp_path, monkeypatch):
    """gpu_losses.py stopped by SIGTERM (gpu_check.sh's limit) still writes the cases timed
    until then, with their summary, and says it was stopped (the GPU faked: one case timed,
    then the signal)."""
    import os
    import signal

    gpu_losses = _benchmark("gpu_losses")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "fake GPU")
    monkeypatch.setattr(gpu_losses, "copy_bandwidth", lambda *args: 1e12)
    timed = []

    def bench_case(loss, n, c, d, *args):
        timed.append((loss, n, c))
        if len(timed) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return [{"loss": loss, "N": n, "C": c, "D": d, "impl": "triton", "fwd_bwd_ms": 1.0,
                 "status": "ok"}]

    monkeypatch.setattr(gpu_losses, "bench_case", bench_case)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit):
            gpu_losses.main(["--out", str(tmp_path), "--quick"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    written = json.loads((tmp_path / "gpu_losses.json").read_text())
    assert written["unfinished"] == "stopped before every case was timed"
    assert [(r["loss"], r["N"], r["C"]) for r in written["rows"]] == timed[:1]
    assert "summary" in written


def test_linear_variants_compute_the_same_loss_on_the_cpu():
    """Each variant of gpu_linear.py builds its step; on CPU tensors with the torch rows, the
    fused and unfused forms of a loss agree, and a missing Liger-Kernel is a row, not a crash."""
    gpu_linear = _benchmark("gpu_linear")
    inputs = gpu_linear.make_inputs(6, 11, 4, "cpu", torch.float32)
    values = {}
    for name, backend in gpu_linear.VARIANTS:
        if name.startswith("liger"):
            continue
        loss = gpu_linear.loss_function(name, "torch" if backend != "-" else backend)
        value, grads = gpu_linear.training_step(loss, *inputs)
        assert [g.shape for g in grads] == [t.shape for t in inputs[:3]]
        values[name] = value
    for kind in ("elogitnorm", "logitnorm"):
        torch.testing.assert_close(values[f"fused_{kind}"], values[f"unfused_{kind}"])
    torch.testing.assert_close(values["unfused_cross_entropy"], torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(*inputs[:3]), inputs[3]))
    if importlib.util.find_spec("liger_kernel") is None:
        row = gpu_linear.measure("liger_fused_linear_cross_entropy", "-", inputs, None)
        assert row["status"] == "not installed"
