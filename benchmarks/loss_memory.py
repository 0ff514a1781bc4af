"""Peak extra memory and time of one loss fwd+bwd per backend, each in a fresh process.

Usage: ``python benchmarks/loss_memory.py [--device cpu] [--cap-gib 14] [--out FILE]``.
Writes JSON (machine, versions, one record per backend and size; a baseline that exhausts the
memory cap or the time limit is recorded as ``OOM`` / ``timeout``, not dropped).
"""

from __future__ import annotations

import argparse
import json
import os

import elogitnorm_fast as ef

from peak_memory import machine_info, measure

SIZES = [(128, 10, 512), (128, 100, 512), (256, 1000, 512), (256, 1000, 2048)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cap-gib", type=float, default=14.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    backends = ef.available_backends(args.device)
    records = []
    for n, c, d in SIZES:
        for backend in backends:
            record = measure("elogitnorm", backend, n, c, d, device=args.device,
                             memory_cap_bytes=int(args.cap_gib * 2**30), timeout_s=args.timeout)
            records.append(record)
            extra = record.get("peak_extra_bytes")
            shown = f"{extra / 2**20:10.1f} MiB" if extra is not None else f"{record['status']:>14}"
            print(f"N={n:<5} C={c:<6} D={d:<5} {backend:<10} {shown}", flush=True)
    out = args.out or os.path.join(
        os.path.dirname(__file__), "results", f"loss_memory_{args.device}.json"
    )
    with open(out, "w") as handle:
        json.dump({"machine": machine_info(args.device), "records": records}, handle, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
