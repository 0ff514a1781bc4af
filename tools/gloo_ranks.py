"""Run a worker script as several gloo ranks on the loopback address, with a hard time limit.

Each rank is a fresh ``python`` subprocess with ``RANK`` / ``WORLD_SIZE`` / ``MASTER_*`` set, so
a rank that hangs (or dies) fails the test after ``timeout`` seconds instead of hanging the run.
Workers should call :data:`FINISH` at the end: a barrier first, so that no rank leaves (taking
the rendezvous store with it, when it is rank 0) while another still needs it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

#: Code for the end of a worker: wait for every rank, then tear the group down.
FINISH = "dist.barrier()\ndist.destroy_process_group()\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(script: Path, args: list[str], *, world: int = 2, timeout: float = 120.0) -> None:
    """Start ``world`` ranks of ``script`` (argv: ``args`` + the rank) and wait for all."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, str(script), *args, str(rank)],
                         env=dict(env, RANK=str(rank)), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
        for rank in range(world)
    ]
    outputs = []
    try:
        for proc in procs:
            try:
                output, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"a gloo rank did not finish within {timeout} s") from None
            outputs.append(output.decode(errors="replace"))
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{output[-3000:]}"
