"""Tf-KD losses: the virtual teacher (Tf-KD-reg), logit distillation (Tf-KD-self, KD) and label smoothing.

Every loss takes student logits (B, K) and a target that is either class indices (B,) or dense soft targets
(B, K) as timm's Mixup / CutMix produce them, and is one call of the fused CE + KL function of
:mod:`timm_tfkd.distill_function` (its docstring says why it exists).

Two formulas exist because the reference code computes something other than the paper's equations:

- ``paper``: Eq. 4 / 9 of Yuan et al. (CVPR 2020): KL(p^t_tau || p_tau) averaged over the batch, times tau^2.
- ``official``: the reference implementation: ``KLDivLoss`` with reduction ``mean`` (divided by batch x K) times
  a multiplier; for reg the teacher is softmax(probability vector / T) and the student has no temperature.

Every loss takes optional per-class weights (``class_weight``, e.g. timm's class-balanced weights from
``--class-stats``) for its cross-entropy part only; the KD term stays unweighted. The weighted cross-entropy is the
plain batch mean ``mean_i sum_k w_k t_ik (-log p_ik)``, i.e. ``w_y * CE`` per sample for class indices: the
convention of torch's ``F.cross_entropy(weight=...)`` for soft targets and of timm's weighted BCE, linear in the
target (a Mixup target weighs each mixed label by its own class), so class indices and their one-hot targets give
the same loss. It is not the ``sum(w_y * CE) / sum(w_y)`` that torch uses for class indices, whose normalization
depends on which labels a batch happens to hold.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distill_function import DistillFunction, TwoValuedTeacher, check_class_weight, check_target, softmax_two_valued
from .loss_settings import (
    DEFAULT_ALPHA, DEFAULT_CORRECT_PROB, DEFAULT_TEMPERATURE, FORMULAS, SMOOTHING_CONVENTIONS, check_choice,
    check_correct_prob, check_positive, check_smoothing, check_unit_interval,
)


class LossTerms(NamedTuple):
    """A loss and, detached for logging, its two parts before their (1 - alpha) / alpha weights."""
    loss: torch.Tensor
    task: torch.Tensor
    kd: torch.Tensor


class SmoothingEquivalence(NamedTuple):
    """Label smoothing that an ``official`` reg loss equals, up to a constant: ``scale * LS(smoothing)``.

    ``smoothing`` is in timm's convention (smoothing / K on every class); the reference convention
    (smoothing / (K - 1) on wrong classes only) uses ``smoothing * (K - 1) / K``.
    """
    smoothing: float
    scale: float


def _register_class_weight(module: nn.Module, class_weight: Optional[torch.Tensor]) -> None:
    """Keep the weights as a buffer, so that ``.to(device)`` moves them with the loss."""
    module.register_buffer('class_weight', check_class_weight(class_weight), persistent=False)


def _class_weight_for(module: nn.Module, logits: torch.Tensor) -> Optional[torch.Tensor]:
    if module.class_weight is None:
        return None
    return check_class_weight(module.class_weight, logits.shape[-1])


def _weight_repr(module: nn.Module) -> str:
    return '' if module.class_weight is None else f', class_weight=({module.class_weight.numel()} classes)'


def clean_split_size(batch: int, num_splits: int) -> int:
    """Rows of the clean split of a batch of ``num_splits`` equal AugMix splits.

    Raises:
        ValueError: The batch does not divide into equal splits.
    """
    if batch % num_splits:
        raise ValueError(f'a batch of {batch} does not divide into {num_splits} equal AugMix splits')
    return batch // num_splits


def clean_split_terms(kd: LossTerms, logits: torch.Tensor, target: torch.Tensor, alpha: float,
                      class_weight: Optional[torch.Tensor] = None) -> LossTerms:
    """A Tf-KD loss on AugMix splits: ``(1 - alpha) * CE`` averaged over every split (as timm's criterion sees the
    whole batch) ``+ alpha * KD`` averaged over the clean split, whose views alone the KD term compares.

    With alpha = 0 this is timm's cross-entropy over the whole batch; the KD term keeps its weight relative to the
    cross-entropy whatever the number of splits.

    Args:
        kd: The terms of the clean split computed with alpha = 1 (``loss`` is then the differentiable KD term).
        logits: Student logits of the whole batch (N x B, K).
        target: Its class indices or soft targets.
        alpha: Weight of the KD term.
        class_weight: Per-class weights of the cross-entropy, in this module's convention (a plain batch mean of
            ``sum_k w_k t_k (-log p_k)``); None: unweighted.
    """
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    log_probs = F.log_softmax(z, dim=-1)
    soft_target = F.one_hot(target, z.shape[-1]).to(z.dtype) if target.ndim == 1 else target.to(z.dtype)
    if class_weight is not None:
        soft_target = soft_target * class_weight.to(z.dtype)
    cross_entropy = -(soft_target * log_probs).sum(dim=-1).mean()
    loss = (1.0 - alpha) * cross_entropy + alpha * kd.loss
    return LossTerms(loss.to(logits.dtype), cross_entropy.detach(), kd.kd)


class VirtualTeacherLoss(nn.Module):
    """Tf-KD-reg: (1 - alpha) * CE + alpha * KL(virtual teacher || student).

    The virtual teacher puts probability ``correct_prob`` (a) on the true class and (1 - a) / (K - 1) on each other
    class. With soft targets q it is the same affine map of q, a * q + (1 - a) / (K - 1) * (1 - q), which equals the
    mixture of the per-class virtual teachers that Mixup / CutMix mixed.

    - ``paper`` (Eq. 9): teacher softmax(log p^d / tau), student softmax(z / tau), KL batch-mean, times tau^2.
    - ``official``: teacher softmax(p^d / tau) (softmax of *probabilities*: nearly uniform), student log_softmax(z)
      without temperature or tau^2, KL summed and divided by batch x K. See :func:`effective_smoothing`.

    Both multiply the KL term by ``multiplier``.

    Args:
        alpha: Weight of the KL term, in [0, 1].
        temperature: Softmax temperature tau, > 0.
        correct_prob: Teacher probability on the true class, in (1/K, 1].
        formula: 'paper' or 'official'.
        multiplier: Extra factor on the KL term, > 0.
        class_weight: Per-class weights (K,) of the cross-entropy part (module docstring); the KL term is not
            weighted. None: every class weighs 1.
    """

    def __init__(
            self,
            alpha: float = DEFAULT_ALPHA,
            temperature: float = DEFAULT_TEMPERATURE,
            correct_prob: float = DEFAULT_CORRECT_PROB,
            formula: str = 'paper',
            multiplier: float = 1.0,
            class_weight: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        self.alpha = check_unit_interval('alpha', alpha)
        self.temperature = check_positive('temperature', temperature)
        self.correct_prob = check_correct_prob('correct_prob', correct_prob)
        self.formula = check_choice('formula', formula, FORMULAS)
        self.multiplier = check_positive('multiplier', multiplier)
        _register_class_weight(self, class_weight)

    def extra_repr(self) -> str:
        return (f'alpha={self.alpha}, temperature={self.temperature}, correct_prob={self.correct_prob}, '
                f'formula={self.formula}, multiplier={self.multiplier}{_weight_repr(self)}')

    def _other_prob(self, num_classes: int) -> float:
        check_correct_prob('correct_prob', self.correct_prob, num_classes)
        return (1.0 - self.correct_prob) / (num_classes - 1)

    def softened_teacher(self, num_classes: int) -> TwoValuedTeacher:
        """The virtual teacher after its temperature, as the KL term sees it."""
        other_prob = self._other_prob(num_classes)
        if self.formula == 'official':
            return softmax_two_valued(self.correct_prob / self.temperature, other_prob / self.temperature, num_classes)
        log_other = math.log(other_prob) if other_prob > 0.0 else -math.inf
        return softmax_two_valued(
            math.log(self.correct_prob) / self.temperature, log_other / self.temperature, num_classes)

    def _dense_teacher(self, target: torch.Tensor) -> torch.Tensor:
        other_prob = self._other_prob(target.shape[-1])
        probs = other_prob + (self.correct_prob - other_prob) * target
        teacher_logits = probs if self.formula == 'official' else probs.log()
        return F.softmax(teacher_logits / self.temperature, dim=-1)

    def terms(self, logits: torch.Tensor, target: torch.Tensor, num_splits: int = 1) -> LossTerms:
        """The loss with its CE and scaled KL parts.

        Args:
            logits: Student logits (B, K).
            target: Class indices (B,) or soft targets (B, K).
            num_splits: AugMix splits of the batch, the clean views first: the KL term is then taken over the clean
                split only and the CE over every split (see :func:`clean_split_terms`).
        """
        soft = check_target(logits, target)
        if num_splits > 1:
            clean = clean_split_size(logits.shape[0], num_splits)
            kd = self._terms(logits[:clean], target[:clean], soft, alpha=1.0)
            return clean_split_terms(kd, logits, target, self.alpha, _class_weight_for(self, logits))
        return self._terms(logits, target, soft, self.alpha)

    def _terms(self, logits: torch.Tensor, target: torch.Tensor, soft: bool, alpha: float) -> LossTerms:
        num_classes = logits.shape[-1]
        teacher = self._dense_teacher(target) if soft else self.softened_teacher(num_classes)
        if self.formula == 'official':
            kd_scale, student_temperature = self.multiplier / num_classes, 1.0
        else:
            kd_scale, student_temperature = self.multiplier * self.temperature ** 2, self.temperature
        return LossTerms(*DistillFunction.apply(logits, target, teacher, alpha, kd_scale, student_temperature,
                                                 _class_weight_for(self, logits)))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The reg loss, a scalar averaged over the batch.

        Args:
            logits: Student logits (B, K).
            target: Class indices (B,) or soft targets (B, K) whose rows sum to 1 (Mixup / CutMix).
        """
        return self.terms(logits, target).loss


class SelfDistillLoss(nn.Module):
    """Logit distillation from a frozen teacher: (1 - alpha) * CE + alpha * tau^2 * m * KL(teacher_tau || student_tau).

    Used for Tf-KD-self (teacher: the student's own architecture, trained first) and for normal, reversed (Re-KD)
    and defective (De-KD) KD. ``paper`` averages the KL over the batch; ``official`` divides the summed KL by
    batch x K, as the reference code's ``KLDivLoss()`` does (multiplier K turns it back into the batch mean).

    Args:
        alpha: Weight of the KL term, in [0, 1].
        temperature: Softmax temperature tau, > 0.
        formula: 'paper' or 'official'.
        multiplier: Extra factor m on the KL term, > 0.
        class_weight: Per-class weights (K,) of the cross-entropy part (module docstring); the KL term is not
            weighted. None: every class weighs 1.
    """

    def __init__(self, alpha: float = DEFAULT_ALPHA, temperature: float = DEFAULT_TEMPERATURE, formula: str = 'paper',
                 multiplier: float = 1.0, class_weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.alpha = check_unit_interval('alpha', alpha)
        self.temperature = check_positive('temperature', temperature)
        self.formula = check_choice('formula', formula, FORMULAS)
        self.multiplier = check_positive('multiplier', multiplier)
        _register_class_weight(self, class_weight)

    def extra_repr(self) -> str:
        return (f'alpha={self.alpha}, temperature={self.temperature}, formula={self.formula}, '
                f'multiplier={self.multiplier}{_weight_repr(self)}')

    def terms(self, logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              num_splits: int = 1) -> LossTerms:
        """The loss with its CE and scaled KL parts.

        Args:
            logits: Student logits (B, K).
            teacher_logits: The teacher's logits of the same images, or with ``num_splits`` of the clean split only.
            target: Class indices (B,) or soft targets (B, K).
            num_splits: AugMix splits of the batch, the clean views first: the KL term is then taken over the clean
                split only and the CE over every split (see :func:`clean_split_terms`).
        """
        check_target(logits, target)
        clean = clean_split_size(logits.shape[0], num_splits) if num_splits > 1 else logits.shape[0]
        if teacher_logits.shape != logits[:clean].shape:
            which = ' of the clean split' if num_splits > 1 else ''
            raise ValueError(
                f'teacher_logits must have the student logits shape{which} {tuple(logits[:clean].shape)}, '
                f'got {tuple(teacher_logits.shape)}')
        teacher = F.softmax(teacher_logits.detach().to(torch.promote_types(logits.dtype, torch.float32))
                            / self.temperature, dim=-1)
        kd_scale = self.multiplier * self.temperature ** 2
        if self.formula == 'official':
            kd_scale /= logits.shape[-1]
        if num_splits > 1:
            kd = LossTerms(*DistillFunction.apply(logits[:clean], target[:clean], teacher, 1.0, kd_scale,
                                                   self.temperature))
            return clean_split_terms(kd, logits, target, self.alpha, _class_weight_for(self, logits))
        return LossTerms(*DistillFunction.apply(logits, target, teacher, self.alpha, kd_scale, self.temperature,
                                                 _class_weight_for(self, logits)))

    def forward(self, logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The distillation loss, a scalar averaged over the batch.

        Args:
            logits: Student logits (B, K).
            teacher_logits: The frozen teacher's logits (B, K); no gradient flows into them.
            target: Class indices (B,) or soft targets (B, K) whose rows sum to 1 (Mixup / CutMix).
        """
        return self.terms(logits, teacher_logits, target).loss


class LabelSmoothingLoss(nn.Module):
    """Cross-entropy against smoothed labels, the control Tf-KD is compared with.

    - ``timm``: 1 - eps + eps / K on the true class, eps / K on every other (timm's LabelSmoothingCrossEntropy).
    - ``reference``: 1 - eps on the true class, eps / (K - 1) on every other (the Tf-KD reference code).

    Soft targets q get the same affine map: ``low + (high - low) * q``. With ``class_weight`` the whole loss (it is
    all cross-entropy) is the weighted cross-entropy of the module docstring against the smoothed target.

    Args:
        smoothing: eps, in [0, 1).
        convention: 'timm' or 'reference'.
        class_weight: Per-class weights (K,); None: every class weighs 1.
    """

    def __init__(self, smoothing: float = 0.1, convention: str = 'timm', class_weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.smoothing = check_smoothing('smoothing', smoothing)
        self.convention = check_choice('convention', convention, SMOOTHING_CONVENTIONS)
        _register_class_weight(self, class_weight)

    def extra_repr(self) -> str:
        return f'smoothing={self.smoothing}, convention={self.convention}{_weight_repr(self)}'

    def smoothed_target(self, num_classes: int) -> TwoValuedTeacher:
        """Smoothed target probabilities (true class, each other class)."""
        if self.convention == 'timm':
            other = self.smoothing / num_classes
            return TwoValuedTeacher(1.0 - self.smoothing + other, other)
        return TwoValuedTeacher(1.0 - self.smoothing, self.smoothing / (num_classes - 1))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against the smoothed target, a scalar averaged over the batch.

        Args:
            logits: Logits (B, K).
            target: Class indices (B,) or soft targets (B, K) whose rows sum to 1 (Mixup / CutMix).
        """
        check_target(logits, target)
        smoothed = self.smoothed_target(logits.shape[-1])
        # The cross-entropy part alone (alpha 0, no KD term), against the smoothed label.
        loss, _, _ = DistillFunction.apply(logits, target, None, 0.0, 1.0, 1.0, _class_weight_for(self, logits),
                                            smoothed)
        return loss


def effective_smoothing(
        alpha: float,
        temperature: float,
        num_classes: int,
        multiplier: float = 1.0,
        correct_prob: float = 0.99,
) -> SmoothingEquivalence:
    """The label smoothing an ``official`` reg loss is, exactly, up to an additive constant.

    The reference reg loss is (1 - alpha) * CE + alpha * m / K * H(t, p) - const with a two-valued teacher t, so it
    equals ``scale * LS(smoothing)`` (timm's convention) with ``scale = (1 - alpha) + alpha * m / K`` and
    ``smoothing = alpha * m * t_other / scale``. Since t is nearly uniform (t_other ~ 1 / K), smoothing is close to
    ``(alpha * m / K) / scale``: e.g. 0.10 for the reference ResNet-18 setting, 0.16 for MobileNetV2.

    Args:
        alpha: Weight of the KL term.
        temperature: The reg temperature T.
        num_classes: K.
        multiplier: The reference multiplier m.
        correct_prob: The virtual teacher's a.

    Returns:
        The equivalent smoothing (timm convention) and loss scale.
    """
    loss = VirtualTeacherLoss(alpha, temperature, correct_prob, formula='official', multiplier=multiplier)
    p_other = loss.softened_teacher(num_classes).p_other
    scale = (1.0 - alpha) + alpha * multiplier / num_classes
    return SmoothingEquivalence(smoothing=alpha * multiplier * p_other / scale, scale=scale)
