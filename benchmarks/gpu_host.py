"""Where an eager training step's host time goes, on the GPU machine (one JSON, ~1 min).

The H100 runs showed small and mid-size eager steps bound by the host (ImageNet-1k ELogitNorm
forward with ``triton``: 0.60 ms eager, 0.07 ms of device time replayed from a CUDA graph). Rows:

* ``host_us``: host time per forward+backward step (and per forward) of each backend, of
  ``triton, Python backward`` (the Python Functions instead of the C++ node) and of ``triton,
  direct launch`` (``direct_launch.py``: launches past the JIT's dispatch), the wall time of
  ``CALLS`` steps enqueued back to back before one synchronize (few enough that the launch queue
  does not fill, so this is the host's rate); ``TRITON_ONLY_CASES`` (LogitNorm 4096 x 32768)
  with ``triton`` and ``F.cross_entropy`` only;
* for ``triton``, the step's top host events by CPU self time per step (torch.profiler; each
  Triton launch recorded as ``launch <kernel>``);
* for ``triton`` and ``F.cross_entropy``, the step's kernels by device time per step;
* ``launch_us``: a bare launch of an empty Triton kernel and of the LogitNorm forward kernel with
  its arguments (through the JIT, and direct), one ``torch.empty`` for scale, and the multiply
  the C++ node runs instead of a Triton launch;
* ``step_ms``: an eager training step (forward, loss, backward) of a ResNet-18-sized CNN on a
  CIFAR batch (128 x 3 x 32 x 32, C = 10 and 100) with each loss, and its ratio to the same step
  with ``F.cross_entropy``, medians of 3 rounds that take the losses in turn: what a loss costs
  inside training, where the host runs ahead of the device while the model computes (the loss
  benchmarks time the loss alone); for ``PROFILED_STEPS`` also the step's device time and
  kernels.

Usage: ``python benchmarks/gpu_host.py --out DIR [--quick]``
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import elogitnorm_fast as ef

from _gpu_common import begin, stop_on_sigterm, write_rows

CALLS = 50
#: ELogitNorm at CIFAR-100 is here for its kernels' device time (the fused forward and pooled
#: weight gradient took 18.4 and 20.0 us there in an earlier profile, since reworked).
CASES = [("logitnorm", 128, 10, 0), ("logitnorm", 256, 1000, 0), ("elogitnorm", 128, 10, 512),
         ("elogitnorm", 128, 100, 512), ("elogitnorm", 256, 1000, 2048)]
#: Cases timed with ``triton`` and ``F.cross_entropy`` only. LogitNorm 4096 x 32768 reached 0.65
#: of the bandwidth floor on the H100 where its forward alone ran at 0.83: are the 0.12 ms
#: between forward and fwd+bwd the backward's host work or device work?
TRITON_ONLY_CASES = [("logitnorm", 4096, 32768, 0)]


def host_us(step, calls: int = CALLS) -> float:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    enqueued = time.perf_counter() - start
    torch.cuda.synchronize()
    return enqueued / calls * 1e6


#: The triton backend with its eager sum / mean through the Python Functions instead of the C++
#: node (a configuration with ``node=False``), beside the default in the host rows and the
#: training steps.
PYTHON_BACKWARD = "triton, Python backward"
#: The triton backend with its eager launches straight to the compiled kernels' launchers
#: (``direct_launch.launch`` as the configuration's ``launch``), beside the default in the host
#: rows.
DIRECT_LAUNCH = "triton, direct launch"


def loss_fn(loss: str, backend: str):
    """``(logits, weight, target) -> loss`` of ``loss`` on ``backend`` ("F.cross_entropy": the
    baseline on the raw logits; :data:`PYTHON_BACKWARD`, :data:`DIRECT_LAUNCH`: the variants'
    configurations, passed to the kernel module)."""
    if backend == "F.cross_entropy":
        return lambda z, w, y: F.cross_entropy(z, y)
    if backend in (PYTHON_BACKWARD, DIRECT_LAUNCH):
        from _loss_variants import direct_launch_triton, python_backward_triton

        return (python_backward_triton if backend == PYTHON_BACKWARD
                else direct_launch_triton)(loss)
    if loss == "elogitnorm":
        return lambda z, w, y: ef.elogitnorm_loss(z, w, y, backend=backend)
    return lambda z, w, y: ef.logitnorm_loss(z, y, backend=backend)


def make_inputs(loss: str, n: int, c: int, d: int, device: str = "cuda"):
    """``(logits, weight or None, target, leaves)``: fixed random inputs of one case, the
    logits (and ELogitNorm's weight) requiring gradients."""
    generator = torch.Generator(device=device)
    generator.manual_seed(n + c)
    z = torch.randn(n, c, device=device, generator=generator).requires_grad_(True)
    w = (torch.randn(c, d, device=device, generator=generator) / d ** 0.5).requires_grad_(True) \
        if loss == "elogitnorm" else None
    y = torch.randint(0, c, (n,), device=device, generator=generator)
    return z, w, y, [t for t in (z, w) if t is not None]


def make_step(loss: str, backend: str, n: int, c: int, d: int, backward: bool):
    z, w, y, leaves = make_inputs(loss, n, c, d)
    fn = loss_fn(loss, backend)

    def step():
        value = fn(z, w, y)
        if backward:
            torch.autograd.grad(value, leaves, allow_unused=True)

    return step


def record_launch(kernel, grid, *args, **kwargs):
    """A configuration's ``launch`` that makes each Triton launch a profiler event
    ``launch <kernel>`` (then launches it through the JIT, as the default does)."""
    with torch.profiler.record_function(f"launch {kernel.fn.__name__}"):
        return kernel[grid](*args, **kwargs)


def recorded_step(loss: str, n: int, c: int, d: int):
    """The ``triton`` step (forward and backward) with its launches recorded: the default
    configuration with :func:`record_launch` as its ``launch``."""
    from _loss_variants import launch_triton

    z, w, y, leaves = make_inputs(loss, n, c, d)
    fn = launch_triton(loss, record_launch)

    def step():
        torch.autograd.grad(fn(z, w, y), leaves, allow_unused=True)

    return step


def top_host_events(step, steps: int = 20, top: int = 12) -> list[dict]:
    """The step's top host events by CPU self time (``step``: :func:`recorded_step`'s, so that
    each launch is an event)."""
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"event": e.key, "per_step": e.count / steps,
             "self_us_per_step": e.self_cpu_time_total / steps} for e in events[:top]]


def top_device_kernels(step, steps: int = 20, top: int = 8, device_type: str = "cuda"
                       ) -> list[dict]:
    """The step's kernels by device time per step (torch.profiler with device activity only, so
    no host tracing perturbs it): where a CUDA-graph step's microseconds go. ``device_type``
    "cpu" profiles CPU activity instead (the tests run it without a GPU)."""
    activity = (torch.profiler.ProfilerActivity.CUDA if device_type == "cuda"
                else torch.profiler.ProfilerActivity.CPU)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    step()
    sync()
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(steps):
            step()
        sync()
    key = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [{"kernel": e.key, "per_step": e.count / steps,
             "device_us_per_step": getattr(e, key) / steps} for e in events[:top]]


def add_device_kernels(rows: list[dict]) -> None:
    """``top_device_kernels`` of the ``triton`` and ``F.cross_entropy`` host rows, added after
    every host timing: a profiler with device activity loads CUPTI, which could stay behind and
    slow the launches timed after it."""
    for row in rows:
        if row.get("status") != "ok" or row.get("backend") not in ("triton", "F.cross_entropy"):
            continue
        try:
            row["top_device_kernels"] = top_device_kernels(
                make_step(row["loss"], row["backend"], row["N"], row["C"], row["D"], True))
        except Exception as error:  # the host rows stand without it
            row["device_kernels_error"] = f"{type(error).__name__}: {str(error)[:200]}"
            continue
        print(f"{row['loss']:10s} {row['N']:5d} {row['C']:6d} {row['backend']:24s} device time")
        for kernel in row["top_device_kernels"][:6]:
            print(f"      {kernel['device_us_per_step']:8.1f} us  x{kernel['per_step']:.0f}  "
                  f"{kernel['kernel'][:66]}")


def launch_costs() -> list[dict]:
    import triton
    from direct_launch import launch

    from elogitnorm_fast.kernels import logitnorm

    # No constexpr: under ``from __future__ import annotations`` triton 3.6 looks a parameter's
    # annotation up in the module's globals, where a ``tl`` imported here is not.
    @triton.jit
    def _empty_kernel(x_ptr, n):
        pass

    x = torch.empty(16, device="cuda")
    z = torch.randn(128, 10, device="cuda")
    y = torch.randint(0, 10, (128,), device="cuda")
    scale = torch.ones((), device="cuda")
    def forward(direct=None):
        return logitnorm.logitnorm_rows(z, y, inv_tau=25.0, ignore_index=-100, traced=False,
                                        launch=direct)

    empty_us, jit_us = host_us(lambda: _empty_kernel[(1,)](x, 16), 200), host_us(forward, 200)
    direct_us = host_us(lambda: forward(launch), 200)
    rows = [
        {"op": "empty triton kernel launch", "launch_us": empty_us},
        {"op": "LogitNorm forward launch, 128 x 10 (logitnorm_rows, eager)", "launch_us": jit_us},
        {"op": "LogitNorm forward launch, 128 x 10 (logitnorm_rows, eager), direct launch",
         "launch_us": direct_us},
        {"op": "torch.empty(16)", "launch_us": host_us(lambda: torch.empty(16, device="cuda"),
                                                        200)},
        # What the C++ node's backward launches per input instead of a Triton kernel.
        {"op": "torch.mul, 128 x 10 by a 0-d tensor (the C++ node's multiply)",
         "launch_us": host_us(lambda: z.mul(scale), 200)},
    ]
    return rows


STEP_BATCH, STEP_CLASSES, STEP_STEPS = 128, (10, 100), 30
STEP_ROUNDS = 3


def cifar_cnn(num_classes: int, width: int = 64) -> torch.nn.Sequential:
    """ResNet-18's 17 convolutions for 32 x 32 inputs without its skips (3x3 conv + batch norm +
    ReLU: a 64-channel stem, then 4 layers each of 64, 128, 256 and 512 channels, stride 2 at
    each widening; global average pool; a linear head). Defined here: torchvision is not on the
    GPU machine."""
    layers, channels = [], 3
    for index, out in enumerate((1,) + (1,) * 4 + (2,) * 4 + (4,) * 4 + (8,) * 4):
        out *= width
        stride = 2 if out != channels and index > 0 else 1
        layers += [torch.nn.Conv2d(channels, out, 3, stride, 1, bias=False),
                   torch.nn.BatchNorm2d(out), torch.nn.ReLU(inplace=True)]
        channels = out
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(channels,
                                                                                  num_classes)]
    return torch.nn.Sequential(*layers)


def step_losses(backends: list[str]) -> dict:
    """name -> loss(logits, head_weight, target) timed inside the training step."""
    from elogitnorm_fast.reference import elogitnorm_reference

    losses = {"F.cross_entropy": loss_fn("", "F.cross_entropy")}
    for backend in backends:
        for loss in ("logitnorm", "elogitnorm"):
            losses[f"{loss} {backend}"] = loss_fn(loss, backend)
    if "triton" in backends:  # one program (the eager default) or blocks: which wins in a step
        from _loss_variants import blockwise_reduced_triton

        losses["logitnorm triton, reduced in blocks"] = blockwise_reduced_triton()
        for loss in ("logitnorm", "elogitnorm"):  # the C++ node (default) or Python Functions
            losses[f"{loss} {PYTHON_BACKWARD}"] = loss_fn(loss, PYTHON_BACKWARD)
    losses["elogitnorm reference"] = elogitnorm_reference
    # Cross-entropy again last: the two agree unless the machine drifted during the run.
    losses["F.cross_entropy, again"] = losses["F.cross_entropy"]
    return losses


def train_step(model, loss, x, y):
    """One eager training step (forward, loss, backward) as a callable."""
    head = model[-1].weight

    def step():
        model.zero_grad(set_to_none=True)
        loss(model(x), head, y).backward()

    return step


def step_ms(model, loss, x, y, steps: int = STEP_STEPS) -> float:
    """Milliseconds per eager training step (:func:`train_step`), ``steps`` enqueued back to back
    between two synchronizations, after 3 warm-up steps."""
    step = train_step(model, loss, x, y)

    def sync():
        if x.is_cuda:
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps * 1e3


#: Training steps whose device time :func:`add_step_device_time` measures (at the first C): are
#: the 1.8-2.3 ms that ELogitNorm (triton) added to a 9.7 ms CIFAR-10 step on the H100 device
#: work, or host work the device waits for? (Its own eager fwd+bwd took about 0.4 ms.)
PROFILED_STEPS = ("F.cross_entropy", "logitnorm triton", "elogitnorm triton")


def training_step_rows(backends: list[str], device: str = "cuda", batch: int = STEP_BATCH,
                       classes=STEP_CLASSES, width: int = 64, steps: int = STEP_STEPS,
                       profiled=PROFILED_STEPS, rounds: int = STEP_ROUNDS):
    """One row per (C, loss). The losses are timed in turn, ``rounds`` times over, so that a
    drift of the machine reaches all of them alike: ``step_ms`` is the median of the rounds'
    :func:`step_ms` (each in ``step_ms_rounds``), ``vs_cross_entropy`` the median of each
    round's ratio to that round's cross-entropy step. A loss that fails is recorded with its
    error and not timed again; the rest go on. The rows of ``profiled`` losses at the first C
    carry their step as ``_step`` for :func:`add_step_device_time`."""
    rows = []
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    for num_classes in classes:
        torch.manual_seed(num_classes)
        model = cifar_cnn(num_classes, width).to(device)
        x = torch.randn(batch, 3, 32, 32, device=device, generator=generator)
        y = torch.randint(0, num_classes, (batch,), device=device, generator=generator)
        losses = step_losses(backends)
        case = {name: {"op": "training step, ResNet-18-sized CNN", "loss": name, "N": batch,
                       "C": num_classes, "step_ms_rounds": [], "status": "ok"}
                for name in losses}
        for _ in range(rounds):
            for name, loss in losses.items():
                row = case[name]
                if row["status"] != "ok":
                    continue
                try:
                    row["step_ms_rounds"].append(step_ms(model, loss, x, y, steps))
                except Exception as error:  # recorded, the rest goes on
                    row["status"] = f"error: {type(error).__name__}: {str(error)[:200]}"
        base = case["F.cross_entropy"]["step_ms_rounds"]
        for name, row in case.items():
            times = row["step_ms_rounds"]
            if row["status"] == "ok":
                row["step_ms"] = statistics.median(times)
                if len(base) == len(times):
                    row["vs_cross_entropy"] = statistics.median(
                        time_ / first for time_, first in zip(times, base, strict=True))
                if name in profiled and num_classes == classes[0]:
                    row["_step"] = train_step(model, losses[name], x, y)
            rows.append(row)
            print(f"step C={num_classes:4d} {name:36s} {row.get('step_ms', float('nan')):8.3f} ms"
                  f"  x{row.get('vs_cross_entropy', float('nan')):.3f}  {row['status'][:60]}")
    return rows


def add_step_device_time(rows: list[dict], device_type: str = "cuda", steps: int = 5) -> None:
    """Device time and kernels per step of the rows that carry a ``_step`` (which it removes),
    profiled after every timing (see :func:`add_device_kernels`). ``device_type`` "cpu" sums
    CPU op time instead (the tests)."""
    for row in rows:
        step = row.pop("_step", None)
        if step is None:
            continue
        try:
            kernels = top_device_kernels(step, steps=steps, top=1 << 30, device_type=device_type)
        except Exception as error:  # the step time stands without it
            row["device_time_error"] = f"{type(error).__name__}: {str(error)[:200]}"
            continue
        row["device_ms_per_step"] = sum(k["device_us_per_step"] for k in kernels) / 1e3
        row["kernels_per_step"] = sum(k["per_step"] for k in kernels)
        print(f"step C={row['C']:4d} {row['loss']:36s} device {row['device_ms_per_step']:8.3f} ms"
              f"  {row['kernels_per_step']:.0f} kernels")


def host_rows(rows: list[dict], backends: list[str]) -> None:
    """The host timings of every case (appended to ``rows`` as they are measured)."""
    variants = [PYTHON_BACKWARD, DIRECT_LAUNCH] if "triton" in backends else []
    cases = [(case, backends + variants + ["F.cross_entropy"]) for case in CASES]
    cases += [(case, [b for b in ("triton",) if b in backends] + ["F.cross_entropy"])
              for case in TRITON_ONLY_CASES]
    for (loss, n, c, d), case_backends in cases:
        for backend in case_backends:
            row = {"loss": loss, "N": n, "C": c, "D": d, "backend": backend}
            rows.append(row)
            try:
                row["host_us_fwd"] = host_us(make_step(loss, backend, n, c, d, False))
                row["host_us_fwd_bwd"] = host_us(make_step(loss, backend, n, c, d, True))
                if backend == "triton":
                    row["top_host_events"] = top_host_events(recorded_step(loss, n, c, d))
                row["status"] = "ok"
            except Exception as error:  # recorded, the rest goes on
                row["status"] = f"error: {type(error).__name__}: {str(error)[:200]}"
            print(f"{loss:10s} {n:5d} {c:6d} {backend:24s} "
                  f"fwd {row.get('host_us_fwd', float('nan')):8.1f} us  "
                  f"fwd+bwd {row.get('host_us_fwd_bwd', float('nan')):8.1f} us  "
                  f"{row['status'][:60]}")
            for event in row.get("top_host_events", [])[:8]:
                print(f"      {event['self_us_per_step']:8.1f} us  x{event['per_step']:.0f}  "
                      f"{event['event'][:70]}")


def main() -> None:
    started = begin("gpu_host", __doc__, skip_key="op")
    if started is None:
        return
    _, path, machine = started
    import triton

    machine["triton"] = triton.__version__
    torch.backends.cuda.matmul.allow_tf32 = False
    rows: list[dict] = []
    backends = [b for b in ("triton", "cuda", "torch") if b in ef.available_backends("cuda")]
    # gpu_check.sh stops a stage with SIGTERM at its time limit: the rows measured until then
    # are written all the same (and after every stage), with the stage that did not finish.
    stop_on_sigterm()
    stage = "host timings"
    try:
        host_rows(rows, backends)
        write_rows(path, machine, rows)
        stage = "launch costs"
        try:
            rows += launch_costs()
        except Exception as error:
            rows.append({"op": "launch costs",
                         "status": f"error: {type(error).__name__}: {error}"})
        for row in rows:
            if "launch_us" in row:
                print(f"{row['op']:60s} {row['launch_us']:8.1f} us")
        write_rows(path, machine, rows)
        stage = "training steps"
        try:
            rows += training_step_rows(backends)
        except Exception as error:
            rows.append({"op": "training step",
                         "status": f"error: {type(error).__name__}: {error}"})
        write_rows(path, machine, rows)
        stage = "device kernels"
        add_device_kernels(rows)
        write_rows(path, machine, rows)
        stage = "step device time"
        add_step_device_time(rows)
        stage = None
    finally:
        if stage is not None:
            machine["unfinished_stage"] = stage
        write_rows(path, machine, rows)
        print("wrote", path, "" if stage is None else f"(stopped during {stage})")


if __name__ == "__main__":
    main()
