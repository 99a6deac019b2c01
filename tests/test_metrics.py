"""Validation metrics against hand computation: top-1/5, NLL and 15-bin ECE (in %), bin edges included.

Logits are built from probabilities the test chooses (log p), so every confidence is known exactly. The bin
convention pinned here is Guo et al.'s: bin k holds k/15 < confidence <= (k+1)/15, so a confidence exactly on an
edge k/15 belongs to the bin below it, and a confidence of 1 to the last bin.
"""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from timm_tfkd.train.metrics import ClassificationMetrics

BINS = 15
CLASSES = 20
NEG_INF = float('-inf')
TARGET_RANKS = (0, 4, 0, 5, 0, 1, 0, 19, 0, 2, 0, 3, 6)


def _feed(metrics, logits, target, sizes):
    """Feed ``logits`` / ``target`` in consecutive batches of the given (uneven) sizes."""
    assert sum(sizes) == len(target)
    start = 0
    for size in sizes:
        metrics.update(logits[start:start + size], target[start:start + size])
        start += size


def test_hand_computed_example():
    # Two real classes, five padding classes that can never be predicted.
    confidence_correct = [(Fraction(1), True), (Fraction(10, 15), False), (Fraction(62, 100), True),
                          (Fraction(7, 10), True), (Fraction(12, 15), False), (Fraction(78, 100), True)]
    logits, target = [], []
    for confidence, correct in confidence_correct:
        c = float(confidence)
        first = 0.0 if c == 1 else math.log(c / (1 - c))  # softmax([log(c/(1-c)), 0]) = [c, 1-c]
        logits.append([first, NEG_INF if c == 1 else 0.0] + [NEG_INF] * 5)
        target.append(0 if correct else 1)
    metrics = ClassificationMetrics(torch.device('cpu'))
    _feed(metrics, torch.tensor(logits, dtype=torch.float64), torch.tensor(target), [1, 3, 2])
    result = metrics.compute()

    # Bins (k/15, (k+1)/15]: bin 9 = (0.6, 0.667] holds 0.62 (right) and the edge 10/15 (wrong); bin 10 holds 0.7
    # (right); bin 11 = (0.733, 0.8] holds 0.78 (right) and the edge 12/15 (wrong); bin 14 holds 1.0 (right).
    # ECE = sum over bins |correct - sum of confidences| / N.
    ece = 100 * (abs(1 - (0.62 + 10 / 15)) + abs(1 - 0.7) + abs(1 - (0.78 + 12 / 15)) + abs(1 - 1.0)) / 6
    assert ece == pytest.approx(19.444444444444, rel=1e-11)
    # NLL = mean of -log p(target): 1, 1/3, 0.62, 0.7, 1/5, 0.78.
    nll = (0 + math.log(3) - math.log(0.62) - math.log(0.7) + math.log(5) - math.log(0.78)) / 6
    assert result['ece'] == pytest.approx(ece, rel=1e-12)
    assert result['nll'] == pytest.approx(nll, rel=1e-12)
    assert result['loss'] == result['nll']
    assert result['top1'] == pytest.approx(100 * 4 / 6, rel=1e-15)
    assert result['top5'] == 100.0


def _row(confidence: Fraction, target_rank: int, order: np.ndarray):
    """Logits whose softmax gives ``confidence`` to class ``order[0]``, and the target at ``target_rank``.

    The other classes share ``1 - confidence`` with distinct weights (no ties: top-5 is well defined), in
    descending order ``order[1:]``; rank 0 is a correct prediction, ranks 1-4 top-5 only.
    """
    top = float(confidence)
    weights = [1.0 + j / 100 for j in range(CLASSES - 1, 0, -1)]
    rest = [(1 - top) * w / sum(weights) for w in weights]
    probabilities = [top, *rest]
    assert all(top > p for p in rest)
    logits = [NEG_INF] * CLASSES
    for position, cls in enumerate(order):
        logits[cls] = math.log(probabilities[position]) if probabilities[position] > 0 else NEG_INF
    return logits, int(order[target_rank]), probabilities[target_rank]


def _cases(seed=0):
    """Every edge k/15 (k = 1..15, 15 being confidence 1) and a point inside every bin, three times, shuffled."""
    rng = np.random.default_rng(seed)
    # Bin 0's middle (1/30) is below 1/20, the least confidence of 20 classes; 0.06 is inside it.
    inside = [Fraction(6, 100)] + [Fraction(2 * k + 1, 2 * BINS) for k in range(1, BINS)]
    confidences = [Fraction(k, BINS) for k in range(1, BINS + 1)] + inside
    cases = []
    for index, confidence in enumerate(confidences * 3):
        # Right about half the time; the wrong ones on both sides of the top-5 boundary (ranks 4 and 5).
        rank = 0 if confidence == 1 else TARGET_RANKS[index % len(TARGET_RANKS)]
        cases.append((confidence, rank, rng.permutation(CLASSES)))
    return [cases[i] for i in rng.permutation(len(cases))]


def _hand_metrics(cases, edge_bin):
    """Top-1/5, NLL and ECE of the cases by the definitions, the confidences exact (fractions)."""
    n = len(cases)
    nll = sum(-math.log(_row(*case)[2]) for case in cases) / n
    gaps = {}
    for confidence, rank, _ in cases:
        b = edge_bin(confidence)
        gaps[b] = gaps.get(b, 0) + (1 if rank == 0 else 0) - confidence
    return {
        'top1': 100 * sum(rank == 0 for _, rank, _ in cases) / n,
        'top5': 100 * sum(rank < 5 for _, rank, _ in cases) / n,
        'nll': nll,
        'ece': float(100 * sum(abs(g) for g in gaps.values()) / n),
    }


def _guo_bin(confidence):
    return math.ceil(confidence * BINS) - 1  # (k/15, (k+1)/15]


def _left_closed_bin(confidence):
    return min(math.floor(confidence * BINS), BINS - 1)  # [k/15, (k+1)/15), 1.0 in the last


@pytest.mark.parametrize('sizes', [[90], [1, 7, 3, 13, 66], [4] * 22 + [2]])
def test_every_bin_edge_and_uneven_batches_against_hand_computation(sizes):
    cases = _cases()
    rows = [_row(*case) for case in cases]
    logits = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    target = torch.tensor([r[1] for r in rows])
    metrics = ClassificationMetrics(torch.device('cpu'))
    _feed(metrics, logits, target, sizes)
    result = metrics.compute()
    expected = _hand_metrics(cases, _guo_bin)
    # The edges decide the result: binning them the other way gives another ECE.
    assert abs(_hand_metrics(cases, _left_closed_bin)['ece'] - expected['ece']) > 0.1
    assert result['top1'] == pytest.approx(expected['top1'], rel=1e-15)
    assert result['top5'] == pytest.approx(expected['top5'], rel=1e-15)
    assert result['nll'] == pytest.approx(expected['nll'], rel=1e-12)
    assert result['ece'] == pytest.approx(expected['ece'], rel=1e-10, abs=1e-10)


def test_float32_logits_on_an_edge_keep_their_bin():
    """The trainer feeds float32 logits: three tied logits give 1/3 = 5/15, which must stay in (4/15, 5/15]."""
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [math.log(0.37), math.log(0.33), math.log(0.30)],
                           [10.0, 0.0, 0.0]], dtype=torch.float32)
    target = torch.tensor([0, 1, 1, 0])
    metrics = ClassificationMetrics(torch.device('cpu'))
    metrics.update(logits, target)
    # Which of the tied classes wins is torch's choice; at most one of the two tied rows is right.
    tied_correct = int((logits[:2].argmax(dim=1) == target[:2]).sum())
    high = 1 / (1 + 2 * math.exp(-10))
    # Bin 4 holds the two tied rows, bin 5 = (1/3, 0.4] the wrong 0.37, bin 14 the right `high`. Were the edge
    # in bin 5, the tied rows and 0.37 would share a bin and partly cancel.
    ece = 100 * (abs(tied_correct - 2 / 3) + abs(0 - 0.37) + abs(1 - high)) / 4
    assert metrics.compute()['ece'] == pytest.approx(ece, rel=1e-6)
    assert abs(100 * (abs(tied_correct - (2 / 3 + 0.37)) + abs(1 - high)) / 4 - ece) > 1


@pytest.mark.parametrize('limit', [0, 1, 5, 9, 12])
def test_predictions_past_max_samples_are_not_counted(limit):
    """A distributed sampler pads a rank's last batches with duplicates; only the first ``limit`` count."""
    cases = _cases(seed=3)[:12]
    rows = [_row(*case) for case in cases]
    logits = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    target = torch.tensor([r[1] for r in rows])
    metrics = ClassificationMetrics(torch.device('cpu'), max_samples=limit)
    _feed(metrics, logits, target, [4, 4, 4])
    if limit == 0:
        with pytest.raises(ValueError, match='no validation samples'):
            metrics.compute()
        return
    result = metrics.compute()
    expected = _hand_metrics(cases[:limit], _guo_bin)
    for name in ('top1', 'top5', 'nll', 'ece'):
        assert result[name] == pytest.approx(expected[name], rel=1e-10, abs=1e-10), name
