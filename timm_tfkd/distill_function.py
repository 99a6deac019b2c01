"""The fused autograd function every Tf-KD loss is built on: cross-entropy + KL from one softmax of the logits.

All hard-target teachers of the losses are *two-valued* (one value on the true class, another on every other
class), so their cross-entropy and KL need only the student's log-softmax row sums and one gathered entry: no
(B, K) teacher tensor and no loop over the batch. Soft (B, K) targets, as timm's Mixup / CutMix make them, take
the dense path of the same function.
"""
import math
from typing import NamedTuple, Optional

import torch

# Soft targets are probability rows: a row sum farther from 1 than this is refused.
TARGET_SUM_TOLERANCE = 1e-3


class TwoValuedTeacher(NamedTuple):
    """A hard-target teacher: probability ``p_true`` on the target class and ``p_other`` on each other class."""
    p_true: float
    p_other: float

    def neg_entropy(self, num_classes: int) -> float:
        return _xlogx(self.p_true) + (num_classes - 1) * _xlogx(self.p_other)


def _xlogx(x: float) -> float:
    return x * math.log(x) if x > 0.0 else 0.0


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


def softmax_two_valued(logit_true: float, logit_other: float, num_classes: int) -> TwoValuedTeacher:
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


class DistillFunction(torch.autograd.Function):
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
