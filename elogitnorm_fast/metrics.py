"""OOD detection metrics: AUROC, AUPR-In, AUPR-Out, FPR@TPR and ECE, exact with ties.

Conventions: inputs are explicit ``(id_scores, ood_scores)`` and a score
is an ID confidence, **higher = more in-distribution**. Everything is computed with torch on the
scores' device (CPU or GPU), sort-based in ``O(n log n)`` (``fpr_at_tpr``: ``O(n)``), with no
Python loop over samples, so 10^7 scores are fine.

Thresholds and ties. A threshold ``t`` *accepts* (predicts "positive" for) every sample with
``score >= t``; the ROC / PR curves have one point per **distinct** score value (plus the origin),
exactly like scikit-learn's ``roc_curve(..., drop_intermediate=False)`` and
``precision_recall_curve``. Tied scores therefore always move together: a tie between an ID and
an OOD sample becomes a diagonal segment of the ROC curve, which the trapezoidal rule credits
with one half, so ``auroc = P(s_id > s_ood) + 0.5 * P(s_id == s_ood)`` exactly.

Scores are 1-D tensors or array-likes (numpy arrays, lists), one score per sample; anything
else (an (N, K) array, a scalar) raises ``ValueError`` naming the argument and its shape, as do
NaN, inf and empty inputs. Scores of dtype float16 / bfloat16 are widened to float32 (exact)
before sorting; counts are int64 and the final ratios float64. Integer scores are compared as
int64 (exact at any size); integer scores against float ones are compared in float64.

Example::

    from elogitnorm_fast.metrics import ood_report
    report = ood_report(msp_id, msp_ood)   # {"auroc": ..., "aupr_in": ..., ...}
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .validation import check_count

__all__ = ["auroc", "aupr_in", "aupr_out", "fpr_at_tpr", "ece", "ood_report", "FPR_CONVENTIONS"]

FPR_CONVENTIONS = ("classical", "openood")


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _as_tensor(values: object, name: str) -> torch.Tensor:
    """``values`` as a tensor (numpy arrays and nested sequences converted, no copy of
    tensors); ``ValueError`` naming ``name`` when it cannot be."""
    if isinstance(values, torch.Tensor):
        return values
    try:
        return torch.as_tensor(np.asarray(values))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{name} must be a tensor or array-like of numbers, got {type(values).__name__}"
        ) from exc


def _check_scores(scores: torch.Tensor, name: str) -> torch.Tensor:
    scores = _as_tensor(scores, name)
    if scores.dtype == torch.bool or scores.is_complex():
        raise ValueError(f"{name} must hold real scores, got dtype {scores.dtype}")
    if scores.dim() != 1:
        # a flattened (N, K) array would pair scores of different samples or scorers
        raise ValueError(f"{name} must be 1-D (one score per sample), got shape "
                         f"{tuple(scores.shape)}")
    if scores.numel() == 0:
        raise ValueError(f"{name} is empty: need at least one score on each side (ID and OOD)")
    if not scores.is_floating_point():
        # int64 keeps every integer distinct (float64 would merge those above 2^53)
        scores = scores.to(torch.int64)
    elif scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.to(torch.float32)
    if not bool(torch.isfinite(scores).all()):  # one pass; details only on failure
        if torch.isnan(scores).any():
            count = int(torch.isnan(scores).sum())
            raise ValueError(f"{name} contains NaN ({count} of {scores.numel()})")
        count = int(torch.isinf(scores).sum())
        raise ValueError(f"{name} contains inf ({count} of {scores.numel()})")
    return scores


def _check_pair(id_scores, ood_scores) -> tuple[torch.Tensor, torch.Tensor]:
    id_scores = _check_scores(id_scores, "id_scores")
    ood_scores = _check_scores(ood_scores, "ood_scores")
    if id_scores.device != ood_scores.device:
        raise ValueError(
            f"id_scores and ood_scores must be on one device, got {id_scores.device} and "
            f"{ood_scores.device}"
        )
    if id_scores.is_floating_point() != ood_scores.is_floating_point():
        dtype = torch.float64  # integers against floats: compare both in float64
    else:
        dtype = torch.promote_types(id_scores.dtype, ood_scores.dtype)
    return id_scores.to(dtype), ood_scores.to(dtype)


def _reversed(scores: torch.Tensor) -> torch.Tensor:
    """Scores in reversed order: ``-x`` for floats, ``~x = -x - 1`` for int64 (no overflow at
    the smallest int64, whose negation is itself)."""
    return scores.neg() if scores.is_floating_point() else torch.bitwise_not(scores)


def _check_rate(value: float, name: str) -> float:
    value = float(value)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


# --------------------------------------------------------------------------------------------
# the binary curve shared by every ranking metric
# --------------------------------------------------------------------------------------------


def _order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Integers with the same order (and the same ties) as the float scores.

    IEEE bits read as a signed integer are ordered for non-negative floats; for negative ones
    the magnitude bits are flipped. ``-0.0`` is first canonicalised to ``+0.0`` so the two tie.
    Integer keys let torch sort with its radix sort, which beats a float sort on the CPU.
    """
    if scores.dtype == torch.float32:
        int_type, flip = torch.int32, 0x7FFFFFFF
    elif scores.dtype == torch.float64:
        int_type, flip = torch.int64, 0x7FFFFFFFFFFFFFFF
    else:  # int64 scores (validation made every integer dtype int64) are their own keys
        return scores
    bits = (scores + 0.0).view(int_type)
    return torch.where(bits < 0, bits ^ flip, bits)


def _binary_curve(positive: torch.Tensor, negative: torch.Tensor):
    """Cumulative true / false positive counts at every distinct threshold, high to low.

    Returns ``(tps, fps)`` (int64, same length = number of distinct score values) where entry
    ``i`` counts the positives / negatives with ``score >= t_i`` and ``t_0 > t_1 > ...`` are the
    distinct scores. Same as scikit-learn's ``_binary_clf_curve``; the sort need not be stable
    because only the counts at the ends of tie groups are kept.
    """
    scores = _order_keys(torch.cat([positive, negative]))
    labels = torch.zeros(scores.numel(), dtype=torch.int32, device=scores.device)
    labels[: positive.numel()] = 1
    sorted_scores, order = torch.sort(scores, descending=True)
    cum_pos = torch.cumsum(labels[order], dim=0, dtype=torch.int64)
    last_of_group = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_group[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    ends = torch.nonzero(last_of_group).squeeze(1)
    tps = cum_pos[ends]
    fps = ends + 1 - tps
    return tps, fps


def _auroc_from_curve(tps: torch.Tensor, fps: torch.Tensor) -> float:
    # Trapezoids between consecutive points, starting at the origin, in exact int64:
    # 2 * area * P * N = sum_i (fps_i - fps_{i-1}) * (tps_i + tps_{i-1}).
    zero = tps.new_zeros(1)
    tp = torch.cat([zero, tps])
    fp = torch.cat([zero, fps])
    twice_area = ((fp[1:] - fp[:-1]) * (tp[1:] + tp[:-1])).sum()
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    return float(twice_area.to(torch.float64)) / (2.0 * n_pos * n_neg)


def _auroc_from_ranks(positive: torch.Tensor, negative: torch.Tensor) -> float:
    # Mann-Whitney: 2 * AUROC * P * N = sum over positives of (#neg < p) + (#neg <= p), from two
    # sorts of the halves and binary searches of the (sorted, so cache-friendly) positives.
    neg_sorted = torch.sort(_order_keys(negative)).values
    pos_sorted = torch.sort(_order_keys(positive)).values
    below = torch.searchsorted(neg_sorted, pos_sorted, side="left")
    below_or_tied = torch.searchsorted(neg_sorted, pos_sorted, side="right")
    twice = (below.sum() + below_or_tied.sum()).to(torch.float64)
    return float(twice) / (2.0 * positive.numel() * negative.numel())


def _aupr_from_curve(tps: torch.Tensor, fps: torch.Tensor) -> float:
    # scikit-learn's precision_recall_curve + auc: points (recall_i, precision_i) per distinct
    # threshold plus (recall 0, precision 1), trapezoidal rule over recall.
    tp = tps.to(torch.float64)
    precision = tp / (tps + fps).to(torch.float64)
    recall = tp / tp[-1]
    precision = torch.cat([precision.new_ones(1), precision])
    recall = torch.cat([recall.new_zeros(1), recall])
    return float(((recall[1:] - recall[:-1]) * (precision[1:] + precision[:-1])).sum() / 2.0)


def _drop_collinear(tps: torch.Tensor, fps: torch.Tensor):
    """scikit-learn's ``roc_curve(drop_intermediate=True)``: drop interior collinear points."""
    if tps.numel() <= 2:
        return tps, fps
    keep = torch.ones_like(tps, dtype=torch.bool)
    second_fp = fps[2:] - 2 * fps[1:-1] + fps[:-2]
    second_tp = tps[2:] - 2 * tps[1:-1] + tps[:-2]
    keep[1:-1] = (second_fp != 0) | (second_tp != 0)
    return tps[keep], fps[keep]


def _smallest_count_reaching(rate: float, total: int) -> int:
    """The smallest integer k with ``k / total >= rate`` in float64, as sklearn compares."""
    k = min(max(math.ceil(rate * total), 0), total)
    while k > 0 and (k - 1) / total >= rate:
        k -= 1
    while k < total and k / total < rate:
        k += 1
    return k


def _fpr_at_tpr_from_scores(positive: torch.Tensor, negative: torch.Tensor, rate: float) -> float:
    # FPR(t) and TPR(t) both fall as t rises, so the first ROC point (largest t) with TPR >= rate
    # has the smallest FPR; that t is the k-th largest positive score. O(n), no sort.
    n_pos = positive.numel()
    k = _smallest_count_reaching(rate, n_pos)
    if k == 0:  # only for rate <= 0, excluded by validation; kept for safety
        return 0.0
    threshold = (
        torch.topk(positive, k, largest=True, sorted=False).values.min()
        if k < 64
        else (torch.kthvalue(positive, n_pos - k + 1).values)
    )
    return float((negative >= threshold).sum()) / negative.numel()


def _fpr_from_curve(tps: torch.Tensor, fps: torch.Tensor, rate: float) -> float:
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    tpr = tps.to(torch.float64) / n_pos
    # argmax of a boolean = first True; a True always exists since the last tpr is 1.
    first = int(torch.argmax((tpr >= rate).to(torch.uint8)))
    return float(fps[first]) / n_neg


# --------------------------------------------------------------------------------------------
# public metrics
# --------------------------------------------------------------------------------------------


def auroc(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> float:
    """Area under the ROC curve with ID as the positive class.

    ``auroc = P(s_id > s_ood) + 0.5 * P(s_id == s_ood)`` over all ID x OOD pairs, computed from
    the ROC curve with one point per distinct score (ties are diagonal segments, trapezoidal
    rule), in exact int64 counts. Equals ``sklearn.metrics.roc_auc_score(y, s)`` with ``y = 1``
    for ID. Invariant to any strictly increasing transform of the scores.

    Example: ``auroc(energy(logits_id), energy(logits_ood))``.
    """
    pos, neg = _check_pair(id_scores, ood_scores)
    return _auroc_from_ranks(pos, neg)


def aupr_in(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> float:
    """Area under the precision-recall curve with ID as the positive class (AUPR-In).

    Definition (the one OpenOOD uses): ``sklearn.metrics.auc(recall, precision)`` over
    ``sklearn.metrics.precision_recall_curve(y, s)``, i.e. the **trapezoidal** area over the
    points ``(recall, precision)`` at every distinct threshold ``score >= t`` plus the point
    ``(0, 1)``. This is not ``average_precision_score`` (the step-wise sum), which differs
    slightly.
    """
    pos, neg = _check_pair(id_scores, ood_scores)
    return _aupr_from_curve(*_binary_curve(pos, neg))


def aupr_out(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> float:
    """AUPR with OOD as the positive class: :func:`aupr_in` of ``(-ood_scores, -id_scores)``.

    Equals ``auc(recall, precision)`` of ``precision_recall_curve(y_ood, -s)``.
    """
    pos, neg = _check_pair(id_scores, ood_scores)
    return _aupr_from_curve(*_binary_curve(_reversed(neg), _reversed(pos)))


def fpr_at_tpr(
    id_scores: torch.Tensor,
    ood_scores: torch.Tensor,
    tpr: float = 0.95,
    convention: str = "classical",
    *,
    drop_intermediate: bool | None = None,
) -> float:
    """False positive rate at a true positive rate of ``tpr`` (FPR@95TPR for the default).

    ``convention="classical"`` (Hendrycks / Liang / most papers): ID is positive, a threshold
    ``t`` keeps samples with ``score >= t``. The result is the fraction of OOD samples kept at
    the **largest** threshold ``t`` (equivalently, over all thresholds, the **smallest FPR**)
    for which the kept fraction of ID is ``>= tpr``; thresholds range over the distinct score
    values, so tied samples are kept or rejected together, and ``TPR >= tpr`` is compared in
    float64 exactly like scikit-learn. Equals
    ``fpr[np.argmax(tpr_curve >= tpr)]`` with ``fpr, tpr_curve, _ =
    roc_curve(y_id, s, drop_intermediate=False)``. Computed in ``O(n)`` (a k-th value
    selection, no sort).

    ``convention="openood"`` (OpenOOD v1.5): OOD is positive and the score is negated; the result
    is the fraction of **ID rejected** when ``tpr`` of OOD is caught. By default it reproduces
    OpenOOD exactly, including its use of ``roc_curve``'s default ``drop_intermediate=True``
    (which drops interior collinear points and can, with tied ID/OOD scores, pick a later point
    than the exact minimum). Pass ``drop_intermediate=False`` for the exact minimum instead.
    ``drop_intermediate`` defaults to ``False`` for "classical" and ``True`` for "openood".
    """
    if convention not in FPR_CONVENTIONS:
        raise ValueError(f"convention must be one of {FPR_CONVENTIONS}, got {convention!r}")
    rate = _check_rate(tpr, "tpr")
    pos, neg = _check_pair(id_scores, ood_scores)
    if convention == "openood":
        pos, neg = _reversed(neg), _reversed(pos)
    if drop_intermediate is None:
        drop_intermediate = convention == "openood"
    if not drop_intermediate:
        return _fpr_at_tpr_from_scores(pos, neg, rate)
    tps, fps = _drop_collinear(*_binary_curve(pos, neg))
    return _fpr_from_curve(tps, fps, rate)


def ood_report(
    id_scores: torch.Tensor,
    ood_scores: torch.Tensor,
    *,
    tpr: float = 0.95,
    convention: str = "classical",
) -> dict[str, float]:
    """All ranking metrics at once, sharing the sorts.

    Returns ``{"auroc", "aupr_in", "aupr_out", "fpr_at_tpr", "tpr", "convention"}`` where
    ``fpr_at_tpr`` is :func:`fpr_at_tpr` with the given ``tpr`` and ``convention``.
    """
    if convention not in FPR_CONVENTIONS:
        raise ValueError(f"convention must be one of {FPR_CONVENTIONS}, got {convention!r}")
    rate = _check_rate(tpr, "tpr")
    pos, neg = _check_pair(id_scores, ood_scores)
    tps, fps = _binary_curve(pos, neg)
    # OOD positive: AUPR-Out, OpenOOD's FPR
    out_tps, out_fps = _binary_curve(_reversed(neg), _reversed(pos))
    if convention == "classical":
        fpr = _fpr_from_curve(tps, fps, rate)
    else:
        fpr = _fpr_from_curve(*_drop_collinear(out_tps, out_fps), rate)
    return {
        "auroc": _auroc_from_curve(tps, fps),
        "aupr_in": _aupr_from_curve(tps, fps),
        "aupr_out": _aupr_from_curve(out_tps, out_fps),
        "fpr_at_tpr": fpr,
        "tpr": rate,
        "convention": convention,
    }


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------


def ece(
    logits: torch.Tensor | np.ndarray | Sequence,
    labels: torch.Tensor | np.ndarray | Sequence,
    n_bins: int = 15,
    *,
    chunk_rows: int | None = None,
) -> float:
    """Expected calibration error (Guo et al. 2017) with ``n_bins`` equal-width bins.

    ``conf_n = max_j softmax(z_n)_j`` and ``pred_n = argmax_j z_n`` (first index on ties), both
    computed in float64. Bin ``b`` (0-based) holds the rows with
    ``b / n_bins < conf <= (b + 1) / n_bins`` (the bin edges are ``torch.linspace(0, 1,
    n_bins + 1)`` in float64; a confidence of exactly 0, impossible for a finite softmax, would
    go to bin 0). Then ``ECE = sum_b |B_b| / N * |accuracy(B_b) - mean conf(B_b)|``. Rows are
    processed in chunks of ``chunk_rows`` (a positive integer; default about 4M elements) so no
    N x C float64 copy is built.

    ``logits`` (N, C) and ``labels`` (N,) integer class indices in ``[0, C)`` are tensors or
    array-likes (numpy arrays, nested lists), like the scores of the ranking metrics; drop
    ignored rows (e.g. label -100) before calling.
    """
    logits = _as_tensor(logits, "logits")
    labels = _as_tensor(labels, "labels")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must hold integer class indices, got dtype {labels.dtype}")
    n_bins = check_count("n_bins", n_bins)
    if chunk_rows is not None:
        chunk_rows = check_count("chunk_rows", chunk_rows)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    labels = labels.reshape(-1)
    if labels.numel() != logits.shape[0]:
        raise ValueError(
            f"labels must have one entry per row of logits ({logits.shape[0]}), "
            f"got {labels.numel()}"
        )
    if logits.shape[0] == 0:
        raise ValueError("logits is empty: need at least one row")
    if not torch.isfinite(logits).all():
        raise ValueError("logits contains NaN or inf")
    n_rows, n_cols = logits.shape
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= n_cols:
        # an ignore_index such as -100 would otherwise count as a wrong prediction
        bad = low if low < 0 else high
        raise ValueError(f"labels must be class indices in [0, {n_cols}), got {bad}")
    if chunk_rows is None:
        chunk_rows = max(1, (1 << 22) // max(n_cols, 1))
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=logits.device)
    count = torch.zeros(n_bins, dtype=torch.float64, device=logits.device)
    conf_sum = torch.zeros_like(count)
    correct_sum = torch.zeros_like(count)
    labels = labels.to(logits.device)
    for start in range(0, n_rows, chunk_rows):
        z = logits[start : start + chunk_rows].to(torch.float64)
        top, pred = z.max(dim=1)
        conf = torch.exp(top - torch.logsumexp(z, dim=1))
        correct = (pred == labels[start : start + chunk_rows]).to(torch.float64)
        bins = (torch.bucketize(conf, edges, right=False) - 1).clamp_(0, n_bins - 1)
        count.index_add_(0, bins, torch.ones_like(conf))
        conf_sum.index_add_(0, bins, conf)
        correct_sum.index_add_(0, bins, correct)
    gaps = torch.abs(correct_sum - conf_sum)  # = |B| * |acc - conf| per bin
    return float(gaps.sum() / n_rows)
