"""``elogitnorm-fast score``: score a user's own features or logits from ``.npy`` / ``.pt`` files.

Every argument and input file is checked before any scoring starts (:class:`UsageError`, one
line naming the argument and the value); outputs are written all or nothing
(:func:`elogitnorm_fast.cli_support.write_files`). The text users see is :data:`DESCRIPTION`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import unicodedata
from dataclasses import dataclass

import numpy as np
import torch

from .cli_support import (
    UsageError,
    check_device,
    check_output_dir,
    one_line,
    resolve_progress,
    write_files,
)
from .knn.bank import NpyFile, as_array_like

LOGIT_SCORERS = ("msp", "max_logit", "energy", "gen", "entropy")
FEATURE_SCORERS = ("knn", "react", "ash", "scale")
ALL_SCORERS = LOGIT_SCORERS + FEATURE_SCORERS
#: Split names the command uses itself; an OOD set may not take them.
RESERVED_SPLITS = ("id",)
#: Characters an OOD name may not hold: path separators, and what some file systems refuse
#: (the name becomes part of a file name with --format npy).
FORBIDDEN_NAME_CHARACTERS = '/\\:*?"<>|'
MAX_NAME_BYTES = 100

DESCRIPTION = """\
Score ID and OOD test data with post-hoc OOD scorers, and report AUROC, AUPR-In, AUPR-Out and
FPR@95TPR for every OOD set and scorer.

Inputs are 2-D arrays (one row per sample) in .npy or .pt files:
  --id PATH           ID test data: penultimate features, or logits with --inputs logits
  --ood [NAME=]PATH   an OOD test set (repeatable). The text before the first '=' is its
                      name; without '=', the file name without its extension. Names must be
                      distinct (ignoring case), must not be 'id', start with '.', or hold
                      / \\ : * ? " < > | or control characters.
  --bank PATH         ID training features, for knn and react (.npy files are read in chunks)
  --head PATH         the classifier head: a .pt holding a dict with 'weight' (C x D) and
                      optionally 'bias' (C,), as torch.save(model.fc.state_dict(), PATH)
                      writes; a .npz with those keys; or the weight alone (.npy or .pt).
                      Needed for logit scorers on features, for react / ash / scale, and for
                      --divide-by-scale.

Models trained with ELogitNorm: --divide-by-scale scores the logit scorers on z / s, where s
is ELogitNorm's per-row scale computed from the logits and the head's weight (the logits the
model was trained on); without it they score the raw logits z.

Outputs in --out: scores.csv (or one .npy per split and scorer with --format npy) and
report.json. They are written only when the whole run succeeds, replacing files of the same
name; a failed or interrupted run leaves the folder as it was. Other files are left alone.

Exit status: 0 success, 2 a user error (one line on stderr), 130 interrupted.
"""


@dataclass
class Inputs:
    """Everything ``score`` reads, checked: test data per split, head, bank."""

    data: dict[str, torch.Tensor]
    head: tuple[torch.Tensor, torch.Tensor | None] | None
    bank: str | torch.Tensor | None
    bank_rows: int


def _cannot_read(label: str, path: str, error: BaseException) -> UsageError:
    return UsageError(f"{label}: cannot read {path!r}: {one_line(error)}")


def _torch_load(path: str, label: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a user's file: any failure to unpickle it is theirs to fix
        raise _cannot_read(label, path, error) from None


def _check_file(path: str, label: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{label}: file not found: {path!r}")
    if os.path.isdir(path):
        raise UsageError(f"{label}: {path!r} is a folder, expected a file")


def _check_matrix(tensor: torch.Tensor, label: str, path: str) -> torch.Tensor:
    """``tensor`` as float32 when it is a non-empty, finite 2-D array of numbers."""
    if tensor.dim() != 2:
        raise UsageError(f"{label}: {path!r} must hold a 2-D array (rows, dim), got shape "
                         f"{tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise UsageError(f"{label}: {path!r} is empty (shape {tuple(tensor.shape)})")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise UsageError(f"{label}: {path!r} must hold real numbers, got dtype {tensor.dtype}")
    tensor = tensor.float()
    bad = ~torch.isfinite(tensor).all(dim=1)
    if bool(bad.any()):
        raise UsageError(f"{label}: {path!r} row {int(bad.nonzero()[0, 0])} holds NaN or inf "
                         f"(as float32; {int(bad.sum())} such rows)")
    return tensor


def load_array(path: str, label: str) -> torch.Tensor:
    """A finite, non-empty 2-D float32 tensor read from a ``.npy`` or ``.pt`` file into memory;
    :class:`UsageError` naming ``label`` and ``path`` otherwise."""
    _check_file(path, label)
    if path.endswith(".npy"):
        try:
            tensor = torch.from_numpy(NpyFile(path, label).read())
        except ValueError as error:
            raise UsageError(one_line(error)) from None
    elif path.endswith((".pt", ".pth")):
        tensor = _torch_load(path, label)
        if not isinstance(tensor, torch.Tensor):
            raise UsageError(f"{label}: {path!r} holds a {type(tensor).__name__}, expected a "
                             "tensor")
    else:
        raise UsageError(f"{label}: expected a .npy or .pt file, got {path!r}")
    return _check_matrix(tensor, label, path)


def load_head(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (C, D), bias (C,) or None)`` from ``--head``: a ``.pt`` / ``.npz`` dict with
    ``weight`` and optionally ``bias``, or a bare weight (``.npy`` / ``.pt``)."""
    label = "--head"
    _check_file(path, label)
    if path.endswith(".npy"):
        return load_array(path, label), None
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as archive:
                data = {key: torch.from_numpy(archive[key]) for key in archive.files}
        except (OSError, ValueError, EOFError) as error:
            raise _cannot_read(label, path, error) from None
    elif path.endswith((".pt", ".pth")):
        data = _torch_load(path, label)
    else:
        raise UsageError(f"{label}: expected a .pt, .npz or .npy file, got {path!r}")
    if isinstance(data, torch.Tensor):
        data = {"weight": data}
    if not isinstance(data, dict) or not isinstance(data.get("weight"), torch.Tensor):
        raise UsageError(f"{label}: {path!r} must hold a weight tensor or a dict with 'weight' "
                         "(and optionally 'bias')")
    weight = _check_matrix(data["weight"], label, path)
    bias = data.get("bias")
    if bias is None:
        return weight, None
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise UsageError(f"{label}: bias in {path!r} must have shape ({weight.shape[0]},) like "
                         f"the weight's rows, got {shape}")
    bias = bias.float()
    if not bool(torch.isfinite(bias).all()):
        raise UsageError(f"{label}: bias in {path!r} holds NaN or inf")
    return weight, bias


def check_split_name(name: str, value: str) -> None:
    """:class:`UsageError` unless ``name`` (from ``--ood value``) can name an OOD set: it ends
    up in file names inside ``--out`` and in the report."""
    problem = None
    if not name:
        problem = "is empty"
    elif name.startswith("."):
        problem = "starts with '.'"
    elif any(ch in FORBIDDEN_NAME_CHARACTERS for ch in name):
        problem = f"holds {next(ch for ch in name if ch in FORBIDDEN_NAME_CHARACTERS)!r}"
    elif any(unicodedata.category(ch)[0] == "C" for ch in name):
        problem = "holds a control or unassigned character"
    elif name != name.strip():
        problem = "starts or ends with whitespace"
    elif len(name.encode("utf-8")) > MAX_NAME_BYTES:
        problem = f"is longer than {MAX_NAME_BYTES} bytes"
    if problem is not None:
        hint = " (write NAME=PATH to name the set)" if "=" not in value else ""
        raise UsageError(f"--ood {value!r}: the name {name!r} {problem}{hint}")


def _name_key(name: str) -> str:
    # names that differ only in case or Unicode form would share a file on some file systems
    return unicodedata.normalize("NFC", name).casefold()


def parse_ood(values: list[str]) -> dict[str, str]:
    """``{name: path}`` from the ``--ood [NAME=]PATH`` values, in order; :class:`UsageError`
    for a reserved, repeated or unusable name."""
    named: dict[str, str] = {}
    keys: dict[str, str] = {}
    for value in values:
        name, separator, path = value.partition("=")
        if not separator:
            path, name = value, os.path.splitext(os.path.basename(value))[0]
        check_split_name(name, value)
        key = _name_key(name)
        if key in RESERVED_SPLITS:
            raise UsageError(f"--ood {value!r}: the name {name!r} is reserved for the ID split "
                             "(--id); give the OOD set another name with NAME=PATH")
        if key in keys:
            raise UsageError(f"--ood {value!r}: the name {name!r} is already used by "
                             f"{keys[key]!r}; give each OOD set its own NAME=PATH")
        if not path:
            raise UsageError(f"--ood {value!r}: no path after '='")
        keys[key] = value
        named[name] = path
    return named


def parse_scorers(text: str) -> list[str]:
    """The scorer names of ``--scorers`` (comma-separated), each once, in the order given."""
    names = list(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [name for name in names if name not in ALL_SCORERS]
    if unknown or not names:
        raise UsageError(f"--scorers: unknown scorer(s) {', '.join(map(repr, unknown))} in "
                         f"{text!r}; choose from {', '.join(ALL_SCORERS)}")
    return names


def output_names(splits: list[str], scorers: list[str], fmt: str) -> list[str]:
    """The files a run writes into ``--out``, report last."""
    if fmt == "npy":
        names = [f"{split}_{scorer}.npy" for split in splits for scorer in scorers]
    else:
        names = ["scores.csv"]
    return names + ["report.json"]


def check_arguments(args: argparse.Namespace) -> tuple[list[str], dict[str, str], torch.device]:
    """Everything about the arguments that needs no file read: ``(scorers, OOD paths by
    name, device)``; :class:`UsageError` on the first problem."""
    scorers = parse_scorers(args.scorers)
    ood = parse_ood(args.ood)
    features = args.inputs == "features"
    if not features and any(s in FEATURE_SCORERS for s in scorers):
        chosen = [s for s in scorers if s in FEATURE_SCORERS]
        raise UsageError(f"--scorers: {', '.join(chosen)} need --inputs features, got "
                         f"--inputs {args.inputs}")
    needs_bank = [s for s in scorers if s in ("knn", "react")]
    if needs_bank and not args.bank:
        raise UsageError(f"--bank: scorer(s) {', '.join(needs_bank)} need --bank (ID training "
                         "features)")
    needs_head = [s for s in scorers if s in ("react", "ash", "scale")]
    needs_head += [s for s in scorers if s in LOGIT_SCORERS] if features else []
    if needs_head and not args.head:
        raise UsageError(f"--head: scorer(s) {', '.join(needs_head)} on features need --head "
                         "(the classifier head)")
    if args.divide_by_scale:
        if not args.head:
            raise UsageError("--divide-by-scale needs --head: the scale is computed from the "
                             "head's weight")
        if not any(s in LOGIT_SCORERS for s in scorers):
            raise UsageError(f"--divide-by-scale changes the logit scorers "
                             f"({', '.join(LOGIT_SCORERS)}), none of which is in --scorers "
                             f"{args.scorers!r}")
    _check_file(args.id, "--id")
    for name, path in ood.items():
        _check_file(path, f"--ood {name}")
    for label, path in (("--head", args.head), ("--bank", args.bank)):
        if path:
            _check_file(path, label)
    device = check_device(args.device, "--device")
    splits = ["id", *ood]
    check_output_dir(args.out, "--out", output_names(splits, scorers, args.format))
    return scorers, ood, device


def _load_bank(path: str, with_knn: bool) -> tuple[str | torch.Tensor, int, int]:
    """``(bank for the KNN scorer, rows, dim)``: a ``.npy`` stays a path (read in chunks),
    a ``.pt`` is read into memory."""
    _check_file(path, "--bank")
    if path.endswith(".npy"):
        try:
            header = as_array_like(path, "--bank")
        except ValueError as error:
            raise UsageError(one_line(error)) from None
        rows, dim = header.shape
        if rows == 0:
            raise UsageError(f"--bank: {path!r} has no rows")
        return (path if with_knn else load_array(path, "--bank")), rows, dim
    tensor = load_array(path, "--bank")
    return tensor, tensor.shape[0], tensor.shape[1]


def load_inputs(args: argparse.Namespace, scorers: list[str], ood: dict[str, str]) -> Inputs:
    """Read and cross-check every input file (shapes, finiteness, ``--k``) before scoring."""
    data = {"id": load_array(args.id, "--id")}
    for name, path in ood.items():
        data[name] = load_array(path, f"--ood {name}")
    columns = {name: tensor.shape[1] for name, tensor in data.items()}
    width = columns["id"]
    if len(set(columns.values())) != 1:
        raise UsageError(f"--ood: all inputs must have the same number of columns as --id "
                         f"({width}), got {columns}")
    features = args.inputs == "features"
    head = load_head(args.head) if args.head else None
    if head is not None and features and head[0].shape[1] != width:
        raise UsageError(f"--head: the weight in {args.head!r} has shape "
                         f"{tuple(head[0].shape)} but the features have {width} columns")
    if head is not None and not features and args.divide_by_scale and head[0].shape[0] != width:
        raise UsageError(f"--head: the weight in {args.head!r} has {head[0].shape[0]} rows "
                         f"(classes) but the logits have {width} columns")
    bank, rows = None, 0
    if any(s in ("knn", "react") for s in scorers):
        bank, rows, dim = _load_bank(args.bank, "knn" in scorers)
        if dim != width:
            raise UsageError(f"--bank: {args.bank!r} has {dim} columns but the inputs have "
                             f"{width}")
        if "knn" in scorers and args.k > rows:
            raise UsageError(f"--k: {args.k} is more than the {rows} rows of the bank "
                             f"{args.bank!r}")
    return Inputs(data, head, bank, rows)


def compute_scores(args: argparse.Namespace, scorers: list[str], inputs: Inputs,
                   device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """``{split: {scorer: (n,) scores}}`` for the ID split ("id") and each OOD set, scorers in
    the order asked."""
    from .scoring import ASH, SCALE, KNNScorer, ReAct, elogitnorm_scale, logit_scores

    features = args.inputs == "features"
    head = inputs.head
    results: dict[str, dict[str, torch.Tensor]] = {name: {} for name in inputs.data}
    logit_names = [s for s in scorers if s in LOGIT_SCORERS]
    shapers = {"react": ReAct(90.0), "ash": ASH(90.0, "s"), "scale": SCALE(85.0)}
    knn = None
    if "knn" in scorers:
        # asked: always; on a terminal: the scorer's own rule (long runs only); else never
        progress = args.progress if resolve_progress(args.progress) else False
        knn = KNNScorer(k=args.k, device=device, progress=progress)
        try:
            knn.fit(inputs.bank)
        except ValueError as error:  # e.g. NaN rows, or the file changed since it was checked
            raise UsageError(f"--bank {args.bank!r}: {one_line(error)}") from None
    if "react" in scorers:  # the clip percentile is taken over the whole bank, in memory
        bank = inputs.bank
        in_memory = bank if isinstance(bank, torch.Tensor) else load_array(bank, "--bank")
        shapers["react"].fit(in_memory.to(device))
    weight = None if head is None else head[0].to(device)
    bias = None if head is None or head[1] is None else head[1].to(device)
    for name, tensor in inputs.data.items():
        x = tensor.to(device)
        if logit_names:
            logits = torch.nn.functional.linear(x, weight, bias) if features else x
            if args.divide_by_scale:
                logits = logits / elogitnorm_scale(logits, weight)[:, None]
            for key, value in logit_scores(logits, logit_names).items():
                results[name][key] = value.cpu()
        for scorer in ("react", "ash", "scale"):
            if scorer in scorers:
                results[name][scorer] = shapers[scorer].energy(x, weight, bias).cpu()
        if knn is not None:
            results[name]["knn"] = knn.score(x).cpu()
    return {name: {s: per_split[s] for s in scorers} for name, per_split in results.items()}


def report(results: dict[str, dict[str, torch.Tensor]]) -> dict:
    """``{ood set: {scorer: metrics}}`` against the ID split."""
    from .metrics import ood_report

    id_scores = results["id"]
    return {split: {scorer: ood_report(id_scores[scorer], values)
                    for scorer, values in scores.items()}
            for split, scores in results.items() if split != "id"}


def _csv_writer(results: dict[str, dict[str, torch.Tensor]]):
    def write(handle) -> None:
        text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
        writer = csv.writer(text)
        scorers = list(next(iter(results.values())))
        writer.writerow(["split", "index", *scorers])
        for split, scores in results.items():
            columns = [scores[s].tolist() for s in scorers]
            for index, row in enumerate(zip(*columns, strict=True)):
                writer.writerow([split, index, *(f"{v:.7g}" for v in row)])
        text.flush()
        text.detach()  # the caller owns (syncs and closes) the binary file

    return write


def output_writers(results: dict[str, dict[str, torch.Tensor]], metrics: dict,
                   fmt: str) -> dict:
    """File name -> function writing that file's bytes, for :func:`write_files`."""
    writers = {}
    if fmt == "npy":
        for split, scores in results.items():
            for scorer, values in scores.items():
                array = values.numpy()
                writers[f"{split}_{scorer}.npy"] = (
                    lambda handle, array=array: np.save(handle, array))
    else:
        writers["scores.csv"] = _csv_writer(results)
    payload = json.dumps(metrics, indent=1, ensure_ascii=False).encode("utf-8")
    writers["report.json"] = lambda handle: handle.write(payload)
    return writers


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the ``score`` subcommand."""
    from .cli import positive_int

    parser = commands.add_parser("score", help="score your own features / logits files",
                                 description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--id", required=True, help="ID test features or logits (.npy / .pt)")
    parser.add_argument("--ood", action="append", required=True, metavar="[NAME=]PATH",
                        help="OOD test features or logits (repeatable)")
    parser.add_argument("--bank", help="ID training features (.npy read in chunks, or .pt)")
    parser.add_argument("--head",
                        help="classifier head: .pt / .npz with weight (and bias), or a weight")
    parser.add_argument("--inputs", choices=("features", "logits"), default="features")
    parser.add_argument("--scorers", default="msp,energy,gen,knn",
                        help=f"comma-separated, from {','.join(ALL_SCORERS)}")
    parser.add_argument("--divide-by-scale", action="store_true",
                        help="score the logit scorers on z / s, s = ELogitNorm's per-row scale "
                             "(needs --head)")
    parser.add_argument("--k", type=positive_int, default=50,
                        help="KNN: which neighbour's distance is the score (default 50)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--format", choices=("csv", "npy"), default="csv")
    parser.add_argument("--out", default="scores_output",
                        help="output folder (default scores_output)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: only when stderr is a terminal)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """The ``score`` subcommand: check, read, score, report, then write every output."""
    scorers, ood, device = check_arguments(args)
    inputs = load_inputs(args, scorers, ood)
    results = compute_scores(args, scorers, inputs, device)
    metrics = report(results)
    written = write_files(args.out, output_writers(results, metrics, args.format))
    print(f"{'ood set':<12} {'scorer':<10} {'AUROC':>7} {'AUPR-In':>8} {'AUPR-Out':>9} "
          f"{'FPR@95':>7}")
    for split, per_scorer in metrics.items():
        for scorer, values in per_scorer.items():
            print(f"{split:<12} {scorer:<10} {100 * values['auroc']:7.2f} "
                  f"{100 * values['aupr_in']:8.2f} {100 * values['aupr_out']:9.2f} "
                  f"{100 * values['fpr_at_tpr']:7.2f}")
    if args.divide_by_scale:
        print("logit scorers on z / s (ELogitNorm's scale)")
    print("wrote " + ", ".join(written))
    return 0
