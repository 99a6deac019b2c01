"""Every loss against an independent float64 formula written here: values and gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from timm.loss import LabelSmoothingCrossEntropy
from timm_tfkd import (
    LabelSmoothingLoss, SelfDistillLoss, VirtualTeacherLoss, effective_smoothing,
)

B, K = 6, 10


def _logits(seed=0, batch=B, classes=K, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, classes, generator=g, dtype=torch.float64) * scale).requires_grad_()


def _labels(seed=0, batch=B, classes=K):
    return torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed + 100))


def _mixed_targets(seed=0, batch=B, classes=K, lam=0.7):
    """Mixup-style soft targets and the two label sets they mix."""
    y1, y2 = _labels(seed, batch, classes), _labels(seed + 1, batch, classes)
    q = lam * F.one_hot(y1, classes).double() + (1 - lam) * F.one_hot(y2, classes).double()
    return q, y1, y2


def _virtual_teacher(labels, classes, a):
    """Per-class virtual teacher p^d written as in the paper: a on y, (1 - a) / (K - 1) elsewhere."""
    teacher = torch.full((labels.shape[0], classes), (1 - a) / (classes - 1), dtype=torch.float64)
    teacher[torch.arange(labels.shape[0]), labels] = a
    return teacher


def _kl_rows(t, log_s):
    """sum_k t_k (log t_k - log s_k), with 0 log 0 = 0."""
    return torch.where(t > 0, t * (torch.log(t.clamp_min(1e-300)) - log_s), torch.zeros_like(t)).sum(1)


def _ce(z, q):
    return -(q * torch.log_softmax(z, 1)).sum(1).mean()


def reference_official_reg(z, teacher_probs, q, alpha, T, m):
    """The reference code's loss_kd_regularization, transcribed: KLDivLoss 'mean' = sum / (B * K)."""
    t = torch.softmax(teacher_probs / T, 1)
    kl_mean = _kl_rows(t, torch.log_softmax(z, 1)).sum() / z.numel()
    return (1 - alpha) * _ce(z, q) + alpha * kl_mean * m


def paper_reg(z, teacher_probs, q, alpha, tau, m):
    """Eq. 9: teacher softmax(log p^d / tau), student softmax(z / tau), batch-mean KL, times tau^2."""
    t = torch.softmax(torch.log(teacher_probs) / tau, 1)
    kl = _kl_rows(t, torch.log_softmax(z / tau, 1)).mean()
    return (1 - alpha) * _ce(z, q) + alpha * tau ** 2 * m * kl


def _check(ours_fn, ref_fn, z, atol=1e-10):
    ours = ours_fn(z)
    grad_ours, = torch.autograd.grad(ours, z)
    ref = ref_fn(z)
    grad_ref, = torch.autograd.grad(ref, z)
    torch.testing.assert_close(ours, ref, rtol=0, atol=atol)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=0, atol=atol)


@pytest.mark.parametrize('formula', ['paper', 'official'])
@pytest.mark.parametrize('alpha,tau,a,m', [(0.1, 20.0, 0.99, 100.0), (0.95, 40.0, 0.9, 1.0), (0.5, 1.0, 0.5, 3.0),
                                            (0.3, 4.0, 1.0, 1.0)])
def test_virtual_teacher_hard_targets(formula, alpha, tau, a, m):
    loss = VirtualTeacherLoss(alpha, tau, a, formula, m)
    for seed in range(3):
        z, y = _logits(seed), _labels(seed)
        q = F.one_hot(y, K).double()
        ref = reference_official_reg if formula == 'official' else paper_reg
        _check(lambda x: loss(x, y), lambda x: ref(x, _virtual_teacher(y, K, a), q, alpha, tau, m), z)


@pytest.mark.parametrize('formula', ['paper', 'official'])
@pytest.mark.parametrize('a', [0.99, 0.9, 1.0])
def test_virtual_teacher_soft_targets_are_the_mix_of_class_teachers(formula, a):
    alpha, tau, m, lam = 0.4, 6.0, 2.0, 0.7
    loss = VirtualTeacherLoss(alpha, tau, a, formula, m)
    for seed in range(3):
        z = _logits(seed)
        q, y1, y2 = _mixed_targets(seed, lam=lam)
        mixed_teacher = lam * _virtual_teacher(y1, K, a) + (1 - lam) * _virtual_teacher(y2, K, a)
        ref = reference_official_reg if formula == 'official' else paper_reg
        _check(lambda x: loss(x, q), lambda x: ref(x, mixed_teacher, q, alpha, tau, m), z)


@pytest.mark.parametrize('formula', ['paper', 'official'])
def test_closed_form_equals_dense_path(formula):
    loss = VirtualTeacherLoss(0.3, 7.0, 0.95, formula, 2.0)
    z, y = _logits(5, batch=16, classes=100), _labels(5, batch=16, classes=100)
    _check(lambda x: loss(x, y), lambda x: loss(x, F.one_hot(y, 100).double()), z)


def test_virtual_teacher_float32_matches_float64_reference():
    loss = VirtualTeacherLoss(0.1, 20.0, 0.99, 'official', 100.0)
    z64, y = _logits(1, batch=32, classes=100), _labels(1, batch=32, classes=100)
    ref = reference_official_reg(z64, _virtual_teacher(y, 100, 0.99), F.one_hot(y, 100).double(), 0.1, 20.0, 100.0)
    ours = loss(z64.detach().float(), y)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item()))


@pytest.mark.parametrize('formula', ['paper', 'official'])
@pytest.mark.parametrize('soft', [False, True])
def test_self_distill_loss(formula, soft):
    alpha, tau, m = 0.95, 6.0, 50.0
    loss = SelfDistillLoss(alpha, tau, formula, m)
    for seed in range(3):
        z, zt = _logits(seed), _logits(seed + 50).detach()
        if soft:
            target = q = _mixed_targets(seed)[0]
        else:
            target = _labels(seed)
            q = F.one_hot(target, K).double()

        def ref(x):
            t = torch.softmax(zt / tau, 1)
            kl_rows = _kl_rows(t, torch.log_softmax(x / tau, 1))
            kl = kl_rows.sum() / x.numel() if formula == 'official' else kl_rows.mean()
            return (1 - alpha) * _ce(x, q) + alpha * tau ** 2 * m * kl

        _check(lambda x: loss(x, zt, target), ref, z)


def test_self_distill_official_with_multiplier_k_is_batchmean_kd():
    z, zt, y = _logits(0), _logits(1).detach(), _labels(0)
    official = SelfDistillLoss(0.5, 4.0, 'official', multiplier=K)
    paper = SelfDistillLoss(0.5, 4.0, 'paper')
    torch.testing.assert_close(official(z, zt, y), paper(z, zt, y), rtol=0, atol=1e-12)


def test_self_distill_teacher_gets_no_gradient():
    z, zt, y = _logits(0), _logits(1), _labels(0)
    SelfDistillLoss(0.5, 4.0)(z, zt, y).backward()
    assert zt.grad is None and z.grad is not None


@pytest.mark.parametrize('convention', ['timm', 'reference'])
@pytest.mark.parametrize('soft', [False, True])
def test_label_smoothing(convention, soft):
    eps = 0.2
    loss = LabelSmoothingLoss(eps, convention)
    for seed in range(3):
        z = _logits(seed)
        q = _mixed_targets(seed)[0] if soft else F.one_hot(_labels(seed), K).double()
        target = q if soft else _labels(seed)
        if convention == 'timm':
            smoothed = (1 - eps) * q + eps / K
        else:
            smoothed = (1 - eps) * q + eps / (K - 1) * (1 - q)
        _check(lambda x: loss(x, target), lambda x: _ce(x, smoothed), z)


def test_label_smoothing_timm_convention_equals_timm():
    z, y = _logits(3), _labels(3)
    torch.testing.assert_close(LabelSmoothingLoss(0.1, 'timm')(z, y), LabelSmoothingCrossEntropy(0.1)(z, y))


@pytest.mark.parametrize('setting,alpha,T,m,eps,scale', [
    ('ResNet18', 0.1, 20.0, 100.0, 0.10, 1.0),
    ('MobileNetV2', 0.95, 40.0, 1.0, 0.16, 0.06),
])
def test_official_reg_is_label_smoothing(setting, alpha, T, m, eps, scale):
    """The reference code's reg is scale * LS(eps_eff) up to a constant (README, "Paper and official formulas")."""
    classes = 100
    equivalent = effective_smoothing(alpha, T, classes, multiplier=m, correct_prob=0.99)
    assert round(equivalent.smoothing, 2) == eps
    assert round(equivalent.scale, 2) == scale
    assert equivalent.scale == pytest.approx((1 - alpha) + alpha * m / classes)
    reg = VirtualTeacherLoss(alpha, T, 0.99, 'official', m)
    smoothing = LabelSmoothingLoss(equivalent.smoothing, 'timm')
    offsets = []
    for seed in range(4):
        z, y = _logits(seed, batch=32, classes=classes), _labels(seed, batch=32, classes=classes)
        lhs = reg(z, y)
        rhs = equivalent.scale * smoothing(z, y)
        grad_lhs, = torch.autograd.grad(lhs, z)
        grad_rhs, = torch.autograd.grad(rhs, z)
        torch.testing.assert_close(grad_lhs, grad_rhs, rtol=0, atol=1e-12)
        offsets.append((lhs - rhs).item())
    # The offset is -alpha * m / K * H(teacher): the same for every input.
    t = torch.softmax(_virtual_teacher(torch.tensor([0]), classes, 0.99) / T, 1)
    entropy = -(t * t.log()).sum().item()
    assert offsets == pytest.approx([-alpha * m / classes * entropy] * 4, abs=1e-10)


@pytest.mark.parametrize('make,message', [
    (lambda: VirtualTeacherLoss(alpha=1.5), 'alpha'),
    (lambda: VirtualTeacherLoss(alpha=-0.1), 'alpha'),
    (lambda: VirtualTeacherLoss(temperature=0.0), 'temperature'),
    (lambda: VirtualTeacherLoss(correct_prob=1.2), 'correct_prob'),
    (lambda: VirtualTeacherLoss(formula='textbook'), 'formula'),
    (lambda: VirtualTeacherLoss(multiplier=0.0), 'multiplier'),
    (lambda: SelfDistillLoss(alpha=2.0), 'alpha'),
    (lambda: SelfDistillLoss(temperature=-1.0), 'temperature'),
    (lambda: LabelSmoothingLoss(1.0), 'smoothing'),
    (lambda: LabelSmoothingLoss(0.1, 'other'), 'convention'),
])
def test_bad_arguments_name_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_correct_prob_must_exceed_one_over_k():
    with pytest.raises(ValueError, match=r'correct_prob must be in \(1/K, 1\]'):
        VirtualTeacherLoss(correct_prob=0.05)(_logits(0, classes=20), _labels(0, classes=20))


@pytest.mark.parametrize('target,message', [
    (torch.tensor([0, 1, 2]), 'class indices shaped'),
    (torch.tensor([0, 1, 2, 3, 4, K]), r'class index must be in \[0, 9\]'),
    (torch.tensor([0, 1, 2, 3, 4, -1]), 'class index'),
    (torch.rand(B, K + 1), 'soft target'),
    (torch.zeros(B, K, dtype=torch.long), 'soft target'),
])
def test_bad_targets(target, message):
    z = _logits(0).detach().float()
    for loss in (VirtualTeacherLoss(), LabelSmoothingLoss()):
        with pytest.raises(ValueError, match=message):
            loss(z, target)
    with pytest.raises(ValueError, match=message):
        SelfDistillLoss()(z, z, target)


def test_teacher_logits_shape_checked():
    z = _logits(0).detach()
    with pytest.raises(ValueError, match='teacher_logits'):
        SelfDistillLoss()(z, z[:, :5], _labels(0))


def test_reg_paper_with_tau_one_and_a_one_is_cross_entropy():
    """A sanity anchor: a one-hot teacher at tau 1 makes the KL term the CE itself."""
    z, y = _logits(0), _labels(0)
    loss = VirtualTeacherLoss(alpha=0.5, temperature=1.0, correct_prob=1.0)
    torch.testing.assert_close(loss(z, y), F.cross_entropy(z, y), rtol=0, atol=1e-12)
    assert math.isfinite(loss(z, y).item())


def test_one_default_for_the_losses_and_the_flags():
    import argparse
    from timm_tfkd import add_tfkd_args
    parser = argparse.ArgumentParser()
    add_tfkd_args(parser)
    flags = parser.parse_args([])
    for loss in (SelfDistillLoss(), VirtualTeacherLoss()):
        assert (loss.alpha, loss.temperature) == (flags.tfkd_alpha, flags.tfkd_temperature) == (0.1, 20.0)
    assert VirtualTeacherLoss().correct_prob == flags.tfkd_correct_prob


def test_forwards_say_what_they_take():
    for loss in (VirtualTeacherLoss, SelfDistillLoss, LabelSmoothingLoss):
        assert 'soft targets (B, K) whose rows sum to 1' in loss.forward.__doc__


@pytest.mark.parametrize('scale', [0.5, 1.01])
def test_soft_targets_must_be_distributions(scale):
    z = _logits(0).detach()
    q = _mixed_targets(0)[0] * scale
    for loss in (VirtualTeacherLoss(), LabelSmoothingLoss()):
        with pytest.raises(ValueError, match='rows must sum to 1'):
            loss(z, q)
    with pytest.raises(ValueError, match='rows must sum to 1'):
        SelfDistillLoss()(z, z, q)
    VirtualTeacherLoss()(z, q / scale * (1 + 1e-4))  # float rounding of a distribution is fine
