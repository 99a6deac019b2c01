"""Validation metrics that reduce exactly across ranks: top-1/5, NLL and expected calibration error; for multi-label
training, timm's multi-label evaluator (BCE loss, mAP, micro / macro / sample F1)."""
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.task import MultiLabelClassificationEvaluator

ECE_BINS = 15
# A confidence within this many bin widths of an edge counts as on it. Softmax rounding leaves a confidence that
# is exactly an edge in exact arithmetic (1/3 from three tied logits is 5/15) an ulp either side of it, which
# would otherwise decide its bin at random.
EDGE_TOLERANCE = 1e-9


class ClassificationMetrics:
    """Running sums of loss, accuracy and per-confidence-bin calibration statistics.

    Sums (not per-batch means) are kept so that uneven last batches and several ranks reduce exactly.
    ECE follows Guo et al. (2017): |accuracy - confidence| per equal-width confidence bin, weighted by the
    bin's share of samples, reported in percent like top-1. Bins are closed on the right as theirs: bin ``k``
    holds ``k / bins < confidence <= (k + 1) / bins``, so a confidence on an edge ``k / bins`` falls in the bin
    below it, ``((k - 1) / bins, k / bins]``, and a confidence of 1 in the last bin.

    Args:
        device: Where the sums live (the device of the logits).
        bins: Number of confidence bins.
        max_samples: Ignore predictions past this many (a distributed sampler's padding, see timm's
            ``evaluation_sample_limit``); None counts every prediction.
    """

    def __init__(self, device: torch.device, bins: int = ECE_BINS, max_samples: Optional[int] = None):
        self.bins = bins
        self.max_samples = max_samples
        self.seen = 0
        # Rows: samples, NLL sum, top-1 correct, top-5 correct; then per bin: count, confidence sum, correct.
        self.totals = torch.zeros(4, dtype=torch.float64, device=device)
        self.bin_stats = torch.zeros(3, bins, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of logits (B, K) and class indices (B,)."""
        if self.max_samples is not None:
            # The padding a distributed sampler adds to even out the ranks comes last on each rank.
            keep = max(0, self.max_samples - self.seen)
            logits, target = logits[:keep], target[:keep]
        self.seen += target.shape[0]
        if not target.shape[0]:
            return
        logits = logits.double()
        log_probs = F.log_softmax(logits, dim=-1)
        nll = F.nll_loss(log_probs, target, reduction='sum')
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top == target.unsqueeze(1)
        correct1 = hits[:, 0]
        self.totals += torch.stack([
            torch.tensor(float(target.shape[0]), dtype=torch.float64, device=logits.device),
            nll, correct1.sum().double(), hits.any(dim=1).sum().double()])
        confidence = log_probs.max(dim=-1).values.exp()
        # The clamp also keeps NaN logits (diverged weights) from indexing out of range.
        bin_index = (torch.ceil(confidence * self.bins - EDGE_TOLERANCE) - 1).long().clamp_(0, self.bins - 1)
        ones = torch.ones_like(confidence)
        self.bin_stats[0].index_add_(0, bin_index, ones)
        self.bin_stats[1].index_add_(0, bin_index, confidence)
        self.bin_stats[2].index_add_(0, bin_index, correct1.double())

    def reduce(self) -> None:
        """Sum the statistics over all ranks (call on every rank)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.totals)
            dist.all_reduce(self.bin_stats)

    def running(self, reduce: bool = False) -> Dict[str, float]:
        """Mean NLL (``loss``), ``top1`` and ``top5`` of the samples so far, summed over all ranks when ``reduce``
        (every rank must call it then); the sums themselves are left as they are."""
        totals = self.totals.clone()
        if reduce:
            dist.all_reduce(totals)
        samples, nll_sum, correct1, correct5 = totals.tolist()
        samples = max(samples, 1.0)
        return {'loss': nll_sum / samples, 'top1': 100.0 * correct1 / samples, 'top5': 100.0 * correct5 / samples}

    def compute(self) -> Dict[str, float]:
        """``loss`` and ``nll`` (mean NLL), ``top1``, ``top5`` and ``ece`` (percent)."""
        samples, nll_sum, correct1, correct5 = self.totals.tolist()
        if samples == 0:
            raise ValueError('no validation samples were seen')
        count, confidence_sum, correct_sum = self.bin_stats
        gap = (correct_sum - confidence_sum).abs().sum().item()  # sum over bins of count * |acc - conf|
        nll = nll_sum / samples
        return {
            'loss': nll,
            'top1': 100.0 * correct1 / samples,
            'top5': 100.0 * correct5 / samples,
            'nll': nll,
            'ece': 100.0 * gap / samples,
        }


class MultiLabelMetrics:
    """timm's multi-label evaluator behind the interface of :class:`ClassificationMetrics`, so that multi-label
    runs report exactly what timm's ``train.py`` reports: ``loss`` (BCE with logits), ``map`` (exact macro average
    precision, classes without positives count as 0) and ``micro_f1`` / ``macro_f1`` / ``sample_f1`` at the
    sigmoid ``threshold``, all in percent but the loss. Predictions are gathered across ranks once, in
    :meth:`compute`.

    Args:
        device: Where the loss sums live.
        threshold: Sigmoid probability threshold of the F1 metrics (``--multilabel-threshold``).
        max_samples: Ignore predictions past this many (a distributed sampler's padding).
    """

    def __init__(self, device: torch.device, threshold: float = 0.5, max_samples: Optional[int] = None):
        self._evaluator = MultiLabelClassificationEvaluator(device, max_samples=max_samples, threshold=threshold)
        self._distributed = False

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of logits (B, K) and dense binary (or soft) targets (B, K)."""
        self._evaluator.update(logits, target)

    def running(self, reduce: bool = False) -> Dict[str, float]:
        """Mean BCE (``loss``) of the samples so far, over all ranks when ``reduce`` (every rank must call it then)."""
        totals = torch.stack([self._evaluator.loss_sum.double(), self._evaluator.counts[0].double()])
        if reduce:
            dist.all_reduce(totals)
        loss_sum, samples = totals.tolist()
        return {'loss': loss_sum / max(samples, 1.0)}

    def reduce(self) -> None:
        """Mark the metrics for a cross-rank :meth:`compute` (timm's evaluator gathers there)."""
        self._distributed = dist.is_available() and dist.is_initialized()

    def compute(self) -> Dict[str, float]:
        if not self._evaluator.num_samples and not self._distributed:
            raise ValueError('no validation samples were seen')
        return dict(self._evaluator.compute(distributed=self._distributed))
