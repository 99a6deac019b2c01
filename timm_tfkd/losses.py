"""Tf-KD losses: the virtual teacher (Tf-KD-reg), logit distillation (Tf-KD-self, KD) and label smoothing.

Every loss takes student logits (B, K) and a target that is either class indices (B,) or dense soft targets
(B, K) as timm's Mixup / CutMix produce them. All hard-target teachers here are *two-valued* (one value on the
true class, another on every other class), so their cross-entropy and KL need only the student's log-softmax,
its row sum and one gathered entry: no (B, K) teacher tensor and no loop over the batch.

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
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMULAS = ('paper', 'official')
SMOOTHING_CONVENTIONS = ('timm', 'reference')
# The defaults of the losses, which the ``--tfkd-*`` flags share: the reference ImageNet settings (alpha 0.1, T 20)
# and the reference code's virtual teacher (a = 0.99).
DEFAULT_ALPHA = 0.1
DEFAULT_TEMPERATURE = 20.0
DEFAULT_CORRECT_PROB = 0.99
# Soft targets are probability rows: a row sum farther from 1 than this is refused.
TARGET_SUM_TOLERANCE = 1e-3


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


class TwoValuedTeacher(NamedTuple):
    """A hard-target teacher: probability ``p_true`` on the target class and ``p_other`` on each other class."""
    p_true: float
    p_other: float

    def neg_entropy(self, num_classes: int) -> float:
        return _xlogx(self.p_true) + (num_classes - 1) * _xlogx(self.p_other)


def _xlogx(x: float) -> float:
    return x * math.log(x) if x > 0.0 else 0.0


def check_unit_interval(name: str, value: float) -> float:
    """``value`` in [0, 1] (NaN refused), e.g. a loss weight; ``name`` is how the message calls it."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f'{name} must be in [0, 1], got {value:g}')
    return float(value)


def check_positive(name: str, value: float) -> float:
    """``value`` > 0 (NaN refused)."""
    if not value > 0.0:
        raise ValueError(f'{name} must be > 0, got {value:g}')
    return float(value)


def check_correct_prob(name: str, value: float, num_classes: Optional[int] = None) -> float:
    """A virtual teacher's probability of the true class: in (1/K, 1], or in (0, 1] while K is not known."""
    if num_classes is not None and not 1.0 / num_classes < value <= 1.0:
        raise ValueError(f'{name} must be in (1/K, 1] = ({1.0 / num_classes:.6g}, 1] for K={num_classes}, '
                         f'got {value:g}')
    if not 0.0 < value <= 1.0:
        raise ValueError(f'{name} must be in (0, 1], got {value:g}')
    return float(value)


def check_smoothing(name: str, value: float) -> float:
    """A label smoothing epsilon, in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f'{name} must be in [0, 1), got {value:g}')
    return float(value)


def check_choice(name: str, value: str, choices: Tuple[str, ...]) -> str:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got '{value}'")
    return value


def check_target(logits: torch.Tensor, target: torch.Tensor) -> bool:
    """Validate a (logits, target) pair and tell whether the target is dense.

    Args:
        logits: Student logits shaped (B, K).
        target: Class indices (B,) or soft targets (B, K).

    Returns:
        True for dense soft targets, False for class indices.

    Raises:
        ValueError: Shapes or class indices do not fit the logits, or soft target rows do not sum to 1.
    """
    if logits.ndim != 2:
        raise ValueError(f'logits must be shaped (batch, classes), got {tuple(logits.shape)}')
    batch, num_classes = logits.shape
    if target.ndim == 2:
        if tuple(target.shape) != (batch, num_classes) or not target.is_floating_point():
            raise ValueError(
                f'soft target must be a float tensor shaped {(batch, num_classes)}, '
                f'got {target.dtype} {tuple(target.shape)}')
        # The virtual teacher and the smoothing maps are affine in q: they assume q is a distribution.
        off = (target.sum(dim=-1) - 1.0).abs().max() if batch else target.new_zeros(())
        if target.device.type == 'cpu':
            if off > TARGET_SUM_TOLERANCE:
                raise ValueError(f'soft target rows must sum to 1 (probabilities), a row is off by {float(off):.3g}')
        else:
            torch._assert_async(off <= TARGET_SUM_TOLERANCE, 'soft target rows must sum to 1')
        return True
    if target.ndim != 1 or target.shape[0] != batch or target.is_floating_point():
        raise ValueError(
            f'target must be class indices shaped ({batch},) or soft targets shaped {(batch, num_classes)}, '
            f'got {target.dtype} {tuple(target.shape)}')
    if target.device.type == 'cpu':
        if batch and (int(target.min()) < 0 or int(target.max()) >= num_classes):
            raise ValueError(
                f'target class index must be in [0, {num_classes - 1}], got values in '
                f'[{int(target.min())}, {int(target.max())}]')
    else:
        # A host-side check would synchronize the device every step; the async assert does not.
        torch._assert_async(((target >= 0) & (target < num_classes)).all(), 'target class index out of range')
    return False


def _softmax_two_valued(logit_true: float, logit_other: float, num_classes: int) -> TwoValuedTeacher:
    """Softmax of a K-vector holding ``logit_true`` once and ``logit_other`` K - 1 times."""
    if logit_other == -math.inf:
        return TwoValuedTeacher(1.0, 0.0)
    top = max(logit_true, logit_other)
    log_norm = top + math.log(math.exp(logit_true - top) + (num_classes - 1) * math.exp(logit_other - top))
    return TwoValuedTeacher(math.exp(logit_true - log_norm), math.exp(logit_other - log_norm))


IDENTITY_TARGET = TwoValuedTeacher(1.0, 0.0)  # the cross-entropy target is the label itself


def check_class_weight(class_weight: Optional[torch.Tensor],
                       num_classes: Optional[int] = None) -> Optional[torch.Tensor]:
    """Per-class weights of the cross-entropy part: a finite, non-negative 1-D tensor (one value per class).

    Args:
        class_weight: The weights, or None (every class weighs 1).
        num_classes: K, once known: the weights must have K entries.

    Returns:
        The weights as a detached float tensor, or None.

    Raises:
        ValueError: Not 1-D, empty, negative, not finite, or not K entries.
    """
    if class_weight is None:
        return None
    weight = torch.as_tensor(class_weight).detach()
    if not weight.is_floating_point():
        weight = weight.float()
    if weight.ndim != 1 or not weight.numel():
        raise ValueError(f'class_weight must be a 1-D tensor with one weight per class, got shape '
                         f'{tuple(weight.shape)}')
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ValueError('class_weight must be finite and non-negative')
    if num_classes is not None and weight.numel() != num_classes:
        raise ValueError(f'class_weight has {weight.numel()} entries but the logits have {num_classes} classes')
    return weight


class _DistillFunction(torch.autograd.Function):
    """(1 - alpha) * CE_w(t, z) + alpha * kd_scale * KL(teacher || softmax(z / tau)), with a hand-written backward.

    The cross-entropy part is weighted per class, ``CE_w(t, z) = mean_i sum_k w_k t_ik (-log p_ik)`` (w = 1 without
    ``class_weight``), against ``t = low + (high - low) * q`` for the label q (class indices or soft targets; ``low``
    and ``high`` are ``task_target``, the label itself by default, smoothed labels for label smoothing). The KD term
    is never weighted.

    Cross-entropy costs two exponential passes over (B, K) (softmax forward and backward); so does this whole loss,
    because the forward keeps exp(z - max) and exp((z - max) / tau) and the backward reuses them, and the log-softmax
    itself is never written out: the closed forms need only its row sums (weighted sums with w) and target entries.
    One autograd node instead of a dozen is the rest of the saving (benchmarks/overhead.py). With a = w * t, the
    gradient is (1 - alpha) * (p * sum(a) - a) + alpha * kd_scale / tau * (p_tau - teacher), averaged over the batch.

    ``teacher`` is a :class:`TwoValuedTeacher` (then ``target`` holds class indices), dense (B, K) probabilities, or
    None (no KD term; ``alpha`` must be 0). Returns the loss, then the CE and the scaled KL as non-differentiable
    values for logging.
    """

    @staticmethod
    def forward(ctx, logits, target, teacher, alpha, kd_scale, temperature, class_weight=None,
                task_target=IDENTITY_TARGET):
        # Half-precision logits (autocast) are upcast, as timm's cross-entropy is under autocast.
        z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        weight = None if class_weight is None else class_weight.to(device=z.device, dtype=z.dtype)
        low, spread = task_target.p_other, task_target.p_true - task_target.p_other
        shifted = z - z.amax(dim=-1, keepdim=True)
        exp_shifted = shifted.exp()
        exp_shifted_tau = exp_shifted if temperature == 1.0 else (shifted / temperature).exp_()
        log_norm = exp_shifted.sum(dim=-1, keepdim=True).log_()
        log_norm_tau = log_norm if temperature == 1.0 else exp_shifted_tau.sum(dim=-1, keepdim=True).log_()
        # log p = shifted - log_norm and log p_tau = shifted / tau - log_norm_tau, never materialized.
        if target.ndim == 2:
            # a = w * t, dense; the CE row is log_norm * sum(a) - <a, shifted>.
            task_mass = target.to(z.dtype)
            if (low, spread) != (0.0, 1.0):
                task_mass = low + spread * task_mass
            if weight is not None:
                task_mass = task_mass * weight
            task_rows = log_norm.squeeze(1) * task_mass.sum(dim=-1) - (task_mass * shifted).sum(dim=-1)
            saved_task = task_mass
        else:
            # a = low * w + spread * w_y * e_y, never written out.
            shifted_true = shifted.gather(1, target.unsqueeze(1)).squeeze(1)
            weight_true = 1.0 if weight is None else weight[target]
            task_rows = spread * weight_true * (log_norm.squeeze(1) - shifted_true)
            if low > 0.0:
                weighted_sum = shifted.sum(dim=-1) if weight is None else shifted @ weight
                total_weight = z.shape[-1] if weight is None else weight.sum()
                task_rows = task_rows + low * (total_weight * log_norm.squeeze(1) - weighted_sum)
            saved_task = target
        if teacher is None:
            kl_rows = torch.zeros_like(task_rows)
            ctx.teacher, dense_teacher = None, None
        elif isinstance(teacher, TwoValuedTeacher):
            log_prob_tau_true = shifted_true / temperature - log_norm_tau.squeeze(1)
            kl_rows = teacher.neg_entropy(z.shape[-1]) - (teacher.p_true - teacher.p_other) * log_prob_tau_true
            if teacher.p_other > 0.0:
                sum_log_probs_tau = shifted.sum(dim=-1) / temperature - z.shape[-1] * log_norm_tau.squeeze(1)
                kl_rows = kl_rows - teacher.p_other * sum_log_probs_tau
            ctx.teacher, dense_teacher = teacher, None
        else:
            dense_teacher = teacher.to(z.dtype)
            cross_rows = log_norm_tau.squeeze(1) * dense_teacher.sum(dim=-1) - (
                dense_teacher * shifted).sum(dim=-1) / temperature
            kl_rows = torch.xlogy(dense_teacher, dense_teacher).sum(dim=-1) + cross_rows
            ctx.teacher = None
        task_loss = task_rows.mean()
        kd_loss = kd_scale * kl_rows.mean()
        same = temperature == 1.0
        ctx.save_for_backward(exp_shifted, log_norm, None if same else exp_shifted_tau, None if same else log_norm_tau,
                              saved_task, dense_teacher, weight)
        ctx.coefs = (1.0 - alpha, 0.0 if teacher is None else alpha * kd_scale / temperature, logits.dtype)
        ctx.task_target = (low, spread)
        ctx.mark_non_differentiable(task_loss, kd_loss)
        loss = (1.0 - alpha) * task_loss + alpha * kd_loss
        return loss.to(logits.dtype), task_loss, kd_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_task, _grad_kd):
        exp_shifted, log_norm, exp_shifted_tau, log_norm_tau, task, dense_teacher, weight = ctx.saved_tensors
        task_coef, kd_coef, dtype = ctx.coefs
        low, spread = ctx.task_target
        scale = grad_loss.to(exp_shifted.dtype) / exp_shifted.shape[0]
        task_coef, kd_coef = task_coef * scale, kd_coef * scale
        inv_norm = log_norm.neg().exp_()
        # p = exp_shifted * inv_norm, weighed by sum(a) per row.
        if task.ndim == 2:
            task_weight = inv_norm * (task_coef * task.sum(-1, True))
        else:
            weight_true = 1.0 if weight is None else weight[task].unsqueeze(1)
            mass = spread * weight_true
            if low > 0.0:
                mass = mass + low * (exp_shifted.shape[-1] if weight is None else weight.sum())
            task_weight = inv_norm * (task_coef * mass)
        if exp_shifted_tau is None:
            grad = exp_shifted * (task_weight + inv_norm * kd_coef)
        else:
            grad = (exp_shifted * task_weight).addcmul_(exp_shifted_tau, log_norm_tau.neg().exp_() * kd_coef)
        if dense_teacher is not None:
            grad.sub_(dense_teacher * kd_coef)
        elif ctx.teacher is not None and ctx.teacher.p_other > 0.0:
            grad.sub_(kd_coef * ctx.teacher.p_other)
        if task.ndim == 2:
            grad.sub_(task * task_coef)
        else:
            if low > 0.0:
                grad.sub_(task_coef * low if weight is None else weight * (task_coef * low))
            on_target = task_coef * spread * weight_true
            if ctx.teacher is not None:
                on_target = on_target + kd_coef * (ctx.teacher.p_true - ctx.teacher.p_other)
            if not isinstance(on_target, torch.Tensor) or on_target.ndim == 0:
                on_target = torch.as_tensor(on_target, dtype=grad.dtype, device=grad.device).expand(grad.shape[0], 1)
            grad.scatter_add_(1, task.unsqueeze(1), -on_target)
        return grad.to(dtype), None, None, None, None, None, None, None


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
            return _softmax_two_valued(self.correct_prob / self.temperature, other_prob / self.temperature, num_classes)
        log_other = math.log(other_prob) if other_prob > 0.0 else -math.inf
        return _softmax_two_valued(
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
        return LossTerms(*_DistillFunction.apply(logits, target, teacher, alpha, kd_scale, student_temperature,
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
            kd = LossTerms(*_DistillFunction.apply(logits[:clean], target[:clean], teacher, 1.0, kd_scale,
                                                   self.temperature))
            return clean_split_terms(kd, logits, target, self.alpha, _class_weight_for(self, logits))
        return LossTerms(*_DistillFunction.apply(logits, target, teacher, self.alpha, kd_scale, self.temperature,
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
        loss, _, _ = _DistillFunction.apply(logits, target, None, 0.0, 1.0, 1.0, _class_weight_for(self, logits),
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
