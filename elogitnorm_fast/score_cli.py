"""``elogitnorm-fast score``: score a user's own features or logits from ``.npy`` / ``.pt`` files.

Inputs (all 2-D arrays, rows = samples):

* ``--id PATH`` ID test data and ``--ood [NAME=]PATH`` (repeatable) OOD test data: penultimate
  features (default) or logits (``--inputs logits``);
* ``--bank PATH`` ID training features (``.npy`` is memory-mapped and streamed): needed by KNN
  and to fit ReAct's threshold;
* ``--head PATH`` the classifier head: a ``.pt`` holding a dict with ``weight`` (C x D) and
  optionally ``bias`` (C,) (e.g. ``torch.save(model.fc.state_dict(), "head.pt")``), or a
  ``.npz`` with the same keys. Needed by the logit scorers on features and by the shaping
  scorers.

Writes per-sample scores (``scores.csv``, or one ``.npy`` per split and scorer with
``--format npy``) and ``report.json`` (AUROC, AUPR-In/Out, FPR@95TPR per OOD set and scorer) to
``--out``, and prints the report.
"""

from __future__ import annotations

import argparse
import csv
import json
import os

import numpy as np
import torch

LOGIT_SCORERS = ("msp", "max_logit", "energy", "gen", "entropy")
FEATURE_SCORERS = ("knn", "react", "ash", "scale")
ALL_SCORERS = LOGIT_SCORERS + FEATURE_SCORERS


def load_array(path: str, name: str) -> torch.Tensor:
    """A 2-D float tensor read from ``.npy`` or ``.pt`` into memory; clear errors otherwise."""
    if not os.path.exists(path):
        raise SystemExit(f"error: {name}: file not found: {path}")
    if path.endswith(".npy"):
        tensor = torch.from_numpy(np.load(path))
    elif path.endswith((".pt", ".pth")):
        tensor = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(tensor, torch.Tensor):
            raise SystemExit(f"error: {name}: {path} holds a {type(tensor).__name__}, "
                             "expected a tensor")
    else:
        raise SystemExit(f"error: {name}: expected a .npy or .pt file, got {path}")
    if tensor.dim() != 2:
        raise SystemExit(f"error: {name}: expected a 2-D array (rows, dim), got shape "
                         f"{tuple(tensor.shape)} in {path}")
    return tensor.float()


def load_head(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not os.path.exists(path):
        raise SystemExit(f"error: --head: file not found: {path}")
    if path.endswith(".npz"):
        data = dict(np.load(path))
        data = {key: torch.from_numpy(value) for key, value in data.items()}
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "weight" not in data:
        raise SystemExit(f"error: --head: {path} must hold a dict with 'weight' (and 'bias')")
    weight = data["weight"].float()
    bias = data.get("bias")
    if weight.dim() != 2:
        raise SystemExit(f"error: --head: weight must be 2-D (C, D), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise SystemExit(f"error: --head: bias must have shape ({weight.shape[0]},), got "
                         f"{tuple(bias.shape)}")
    return weight, None if bias is None else bias.float()


def _parse_ood(values: list[str]) -> dict[str, str]:
    named = {}
    for value in values:
        name, _, path = value.rpartition("=")
        name = name or os.path.splitext(os.path.basename(path))[0]
        if name in named:
            raise SystemExit(f"error: --ood: the name {name!r} is used twice; use NAME=PATH")
        named[name] = path
    return named


def _scorers(text: str) -> list[str]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ALL_SCORERS]
    if unknown or not names:
        raise SystemExit(f"error: --scorers: unknown scorer(s) {unknown}; choose from "
                         f"{', '.join(ALL_SCORERS)}")
    return names


def compute_scores(args: argparse.Namespace) -> dict[str, dict[str, torch.Tensor]]:
    """{split: {scorer: (n,) scores}} for the ID split ("id") and each OOD set."""
    from .scoring import ASH, SCALE, KNNScorer, ReAct, logit_scores

    scorers = _scorers(args.scorers)
    splits = {"id": args.id, **_parse_ood(args.ood)}
    data = {name: load_array(path, f"--ood {name}" if name != "id" else "--id")
            for name, path in splits.items()}
    dims = {name: tensor.shape[1] for name, tensor in data.items()}
    if len(set(dims.values())) != 1:
        raise SystemExit(f"error: all inputs must have the same number of columns, got {dims}")
    head = load_head(args.head) if args.head else None
    features = args.inputs == "features"
    needs_bank = [s for s in scorers if s in ("knn", "react")]
    if needs_bank and not args.bank:
        raise SystemExit(f"error: scorer(s) {needs_bank} need --bank (ID training features)")
    needs_head = [s for s in scorers if s in ("react", "ash", "scale")] + (
        [s for s in scorers if s in LOGIT_SCORERS] if features else [])
    if needs_head and head is None:
        raise SystemExit(f"error: scorer(s) {needs_head} need --head on features")
    if not features and any(s in FEATURE_SCORERS for s in scorers):
        raise SystemExit("error: knn / react / ash / scale need --inputs features")
    if head is not None and features and head[0].shape[1] != next(iter(dims.values())):
        raise SystemExit(f"error: --head weight is {tuple(head[0].shape)} but the features have "
                         f"{next(iter(dims.values()))} columns")
    # A .npy bank stays on disk (memory-mapped, streamed by the KNN scorer); a .pt bank is read
    # once. ReAct's percentile needs the whole bank in memory either way.
    bank: str | torch.Tensor | None = None
    if args.bank:
        if args.bank.endswith(".npy") and os.path.exists(args.bank):
            bank = args.bank
            bank_dim = np.load(args.bank, mmap_mode="r").shape[1]
        else:
            bank = load_array(args.bank, "--bank")
            bank_dim = bank.shape[1]
        if bank_dim != next(iter(dims.values())):
            raise SystemExit(f"error: --bank has {bank_dim} columns but the inputs have "
                             f"{next(iter(dims.values()))}")

    device = torch.device(args.device)
    results: dict[str, dict[str, torch.Tensor]] = {name: {} for name in data}
    logit_names = [s for s in scorers if s in LOGIT_SCORERS]
    shapers = {"react": ReAct(90.0), "ash": ASH(90.0, "s"), "scale": SCALE(85.0)}
    knn = None
    if "knn" in scorers:
        knn = KNNScorer(k=args.k, device=device).fit(bank)
    if "react" in scorers:  # the clip percentile is taken over the whole bank, in memory
        in_memory = bank if isinstance(bank, torch.Tensor) else load_array(bank, "--bank")
        shapers["react"].fit(in_memory.to(device))
    for name, tensor in data.items():
        x = tensor.to(device)
        if logit_names:
            logits = x if not features else torch.nn.functional.linear(
                x, head[0].to(device), None if head[1] is None else head[1].to(device))
            for key, value in logit_scores(logits, logit_names).items():
                results[name][key] = value.cpu()
        for scorer in ("react", "ash", "scale"):
            if scorer in scorers:
                weight, bias = head
                results[name][scorer] = shapers[scorer].energy(
                    x, weight.to(device), None if bias is None else bias.to(device)).cpu()
        if knn is not None:
            results[name]["knn"] = knn.score(x).cpu()
    return results


def write_outputs(results: dict, out: str, fmt: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    written = []
    if fmt == "npy":
        for split, scores in results.items():
            for scorer, values in scores.items():
                path = os.path.join(out, f"{split}_{scorer}.npy")
                np.save(path, values.numpy())
                written.append(path)
    else:
        path = os.path.join(out, "scores.csv")
        scorers = list(next(iter(results.values())))
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["split", "index", *scorers])
            for split, scores in results.items():
                columns = [scores[s].tolist() for s in scorers]
                for index, row in enumerate(zip(*columns, strict=True)):
                    writer.writerow([split, index, *(f"{v:.7g}" for v in row)])
        written.append(path)
    return written


def report(results: dict) -> dict:
    from .metrics import ood_report

    id_scores = results["id"]
    return {split: {scorer: ood_report(id_scores[scorer], values)
                    for scorer, values in scores.items()}
            for split, scores in results.items() if split != "id"}


def add_parser(commands) -> None:
    parser = commands.add_parser("score", help="score your own features / logits files",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--id", required=True, help="ID test features or logits (.npy / .pt)")
    parser.add_argument("--ood", action="append", required=True, metavar="[NAME=]PATH",
                        help="OOD test features or logits (repeatable)")
    parser.add_argument("--bank", help="ID training features (.npy streamed, or .pt)")
    parser.add_argument("--head", help="classifier head: .pt / .npz with weight (and bias)")
    parser.add_argument("--inputs", choices=("features", "logits"), default="features")
    parser.add_argument("--scorers", default="msp,energy,gen,knn",
                        help=f"comma-separated, from {','.join(ALL_SCORERS)}")
    parser.add_argument("--k", type=int, default=50, help="KNN neighbour (default 50)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--format", choices=("csv", "npy"), default="csv")
    parser.add_argument("--out", default="scores_output")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    results = compute_scores(args)
    written = write_outputs(results, args.out, args.format)
    metrics = report(results)
    path = os.path.join(args.out, "report.json")
    with open(path, "w") as handle:
        json.dump(metrics, handle, indent=1)
    written.append(path)
    print(f"{'ood set':<12} {'scorer':<10} {'AUROC':>7} {'AUPR-In':>8} {'AUPR-Out':>9} "
          f"{'FPR@95':>7}")
    for split, per_scorer in metrics.items():
        for scorer, values in per_scorer.items():
            print(f"{split:<12} {scorer:<10} {100 * values['auroc']:7.2f} "
                  f"{100 * values['aupr_in']:8.2f} {100 * values['aupr_out']:9.2f} "
                  f"{100 * values['fpr_at_tpr']:7.2f}")
    print("wrote " + ", ".join(written))
    return 0
