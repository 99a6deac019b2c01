"""Class-weighted losses (``class_weight``, what ``--class-stats`` / ``--loss-class-weight`` give the Tf-KD modes)
against independent float64 formulas written here: values and gradients, class indices and Mixup targets.

The weighted cross-entropy is the plain batch mean of ``sum_k w_k t_k (-log p_k)`` (``w_y * CE`` per sample for class
indices); the KD term is never weighted. The closed form for class indices must equal the dense path on one-hot
targets, and a loss without weights must equal one with all weights 1.
"""
import pytest
import torch
import torch.nn.functional as F

from timm_tfkd import LabelSmoothingLoss, SelfDistillLoss, VirtualTeacherLoss

B, K = 7, 6
SEEDS = (0, 1, 2)


def _logits(seed, batch=B, classes=K):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, classes, generator=g, dtype=torch.float64) * 3).requires_grad_()


def _labels(seed, batch=B, classes=K):
    return torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed + 100))


def _weights(seed, classes=K):
    """Uneven positive weights, one exactly zero (a class that must not count at all)."""
    g = torch.Generator().manual_seed(seed + 200)
    w = torch.rand(classes, generator=g, dtype=torch.float64) * 3 + 0.1
    w[seed % classes] = 0.0
    return w


def _mixed(seed, lam=0.65, batch=B, classes=K):
    y1, y2 = _labels(seed, batch, classes), _labels(seed + 7, batch, classes)
    return lam * F.one_hot(y1, classes).double() + (1 - lam) * F.one_hot(y2, classes).double()


def weighted_ce(z, t, w):
    """mean over the batch of sum_k w_k t_k (-log softmax(z)_k)."""
    return -(w * t * torch.log_softmax(z, 1)).sum(1).mean()


def kl_batchmean(t, log_s):
    return (torch.xlogy(t, t) - t * log_s).sum(1).mean()


def virtual_teacher(q, a):
    """The reg teacher for (soft) labels q: a on the label, (1 - a) / (K - 1) on the others."""
    return a * q + (1 - a) / (q.shape[1] - 1) * (1 - q)


def reg_oracle(z, q, w, alpha, tau, a, m, formula):
    p_d = virtual_teacher(q, a)
    if formula == 'paper':
        kd = tau ** 2 * m * kl_batchmean(torch.softmax(p_d.log() / tau, 1), torch.log_softmax(z / tau, 1))
    else:
        kd = m * kl_batchmean(torch.softmax(p_d / tau, 1), torch.log_softmax(z, 1)) / z.shape[1]
    return (1 - alpha) * weighted_ce(z, q, w) + alpha * kd, weighted_ce(z, q, w), kd


def self_oracle(z, zt, q, w, alpha, tau, m, formula):
    kd = tau ** 2 * m * kl_batchmean(torch.softmax(zt / tau, 1), torch.log_softmax(z / tau, 1))
    if formula == 'official':
        kd = kd / z.shape[1]
    return (1 - alpha) * weighted_ce(z, q, w) + alpha * kd, weighted_ce(z, q, w), kd


def lsr_oracle(z, q, w, eps, convention):
    classes = q.shape[1]
    if convention == 'timm':
        t = (1 - eps) * q + eps / classes
    else:
        t = (1 - eps) * q + eps / (classes - 1) * (1 - q)
    return weighted_ce(z, t, w)


def _close(ours, ref, z):
    grad_ours, = torch.autograd.grad(ours, z, retain_graph=True)
    grad_ref, = torch.autograd.grad(ref, z, retain_graph=True)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=0, atol=1e-10)


def _target(seed, soft):
    """The target the loss gets and its dense form for the oracle."""
    if soft:
        q = _mixed(seed)
        return q, q
    y = _labels(seed)
    return y, F.one_hot(y, K).double()


@pytest.mark.parametrize('soft', [False, True], ids=['indices', 'mixup'])
@pytest.mark.parametrize('formula,alpha,tau,a,m', [('paper', 0.3, 4.0, 0.9, 2.0), ('official', 0.6, 2.0, 0.7, 30.0),
                                                   ('paper', 0.5, 1.0, 1.0, 1.0)])
def test_virtual_teacher_weights_the_cross_entropy_only(soft, formula, alpha, tau, a, m):
    for seed in SEEDS:
        z, w = _logits(seed), _weights(seed)
        target, q = _target(seed, soft)
        terms = VirtualTeacherLoss(alpha, tau, a, formula, m, class_weight=w).terms(z, target)
        loss, ce, kd = reg_oracle(z, q, w, alpha, tau, a, m, formula)
        _close(terms.loss, loss, z)
        torch.testing.assert_close(terms.task, ce.detach(), rtol=0, atol=1e-10)
        torch.testing.assert_close(terms.kd, kd.detach(), rtol=0, atol=1e-10)


@pytest.mark.parametrize('soft', [False, True], ids=['indices', 'mixup'])
@pytest.mark.parametrize('formula,alpha,tau,m', [('paper', 0.7, 3.0, 2.0), ('official', 0.35, 4.0, 7.0)])
def test_self_distill_weights_the_cross_entropy_only(soft, formula, alpha, tau, m):
    for seed in SEEDS:
        z, zt, w = _logits(seed), _logits(seed + 50).detach(), _weights(seed)
        target, q = _target(seed, soft)
        terms = SelfDistillLoss(alpha, tau, formula, m, class_weight=w).terms(z, zt, target)
        loss, ce, kd = self_oracle(z, zt, q, w, alpha, tau, m, formula)
        _close(terms.loss, loss, z)
        torch.testing.assert_close(terms.task, ce.detach(), rtol=0, atol=1e-10)
        torch.testing.assert_close(terms.kd, kd.detach(), rtol=0, atol=1e-10)


@pytest.mark.parametrize('soft', [False, True], ids=['indices', 'mixup'])
@pytest.mark.parametrize('convention,eps', [('timm', 0.2), ('reference', 0.3), ('timm', 0.0)])
def test_label_smoothing_weighted(soft, convention, eps):
    for seed in SEEDS:
        z, w = _logits(seed), _weights(seed)
        target, q = _target(seed, soft)
        _close(LabelSmoothingLoss(eps, convention, class_weight=w)(z, target), lsr_oracle(z, q, w, eps, convention), z)


@pytest.mark.parametrize('make', [
    lambda w: (lambda z, t: VirtualTeacherLoss(0.3, 7.0, 0.95, 'paper', 2.0, class_weight=w)(z, t)),
    lambda w: (lambda z, t: VirtualTeacherLoss(0.3, 7.0, 0.95, 'official', 2.0, class_weight=w)(z, t)),
    lambda w: (lambda z, t: SelfDistillLoss(0.4, 3.0, class_weight=w)(z, _logits(9, 16, 40).detach(), t)),
    lambda w: (lambda z, t: LabelSmoothingLoss(0.25, 'reference', class_weight=w)(z, t)),
    lambda w: (lambda z, t: LabelSmoothingLoss(0.25, 'timm', class_weight=w)(z, t)),
], ids=['reg-paper', 'reg-official', 'self', 'lsr-reference', 'lsr-timm'])
def test_closed_form_for_indices_equals_the_dense_path(make):
    classes = 40
    for seed in SEEDS:
        loss = make(_weights(seed, classes))
        z, y = _logits(seed, 16, classes), _labels(seed, 16, classes)
        _close(loss(z, y), loss(z, F.one_hot(y, classes).double()), z)


@pytest.mark.parametrize('make', [
    lambda w: VirtualTeacherLoss(0.3, 4.0, 0.9, 'paper', 2.0, class_weight=w),
    lambda w: LabelSmoothingLoss(0.2, 'timm', class_weight=w),
], ids=['reg', 'lsr'])
def test_weights_of_one_are_no_weights(make):
    z, y = _logits(4), _labels(4)
    _close(make(torch.ones(K, dtype=torch.float64))(z, y), make(None)(z, y), z)


def test_float32_logits_with_float64_weights_stay_float32():
    z, y, w = _logits(0).detach().float().requires_grad_(), _labels(0), _weights(0)
    loss = VirtualTeacherLoss(0.1, 20.0, 0.99, class_weight=w)(z, y)
    assert loss.dtype == torch.float32
    loss.backward()
    assert z.grad.dtype == torch.float32
    ref = reg_oracle(z.detach().double(), F.one_hot(y, K).double(), w, 0.1, 20.0, 0.99, 1.0, 'paper')[0]
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())


def test_weights_move_with_the_loss():
    loss = SelfDistillLoss(class_weight=_weights(0))
    assert 'class_weight' in dict(loss.named_buffers())
    assert loss.to(torch.float32).class_weight.dtype == torch.float32


@pytest.mark.parametrize('weight,message', [
    (torch.ones(K + 1), f'{K + 1} entries but the logits have {K} classes'),
    (torch.ones(2, K), '1-D'),
    (torch.tensor([1.0] * (K - 1) + [-1.0]), 'non-negative'),
    (torch.tensor([1.0] * (K - 1) + [float('nan')]), 'finite'),
])
def test_bad_weights_are_refused(weight, message):
    z, y = _logits(0).detach(), _labels(0)
    with pytest.raises(ValueError, match=message):
        for loss in (VirtualTeacherLoss(class_weight=weight), LabelSmoothingLoss(class_weight=weight)):
            loss(z, y)


@pytest.mark.parametrize('soft', [False, True], ids=['indices', 'mixup'])
@pytest.mark.parametrize('splits', [2, 3])
def test_augmix_splits_weight_the_cross_entropy_of_every_view_and_not_the_clean_kd(soft, splits):
    """AugMix: (1 - alpha) * weighted CE over all N x B views + alpha * unweighted KD over the B clean views."""
    alpha, tau, a, m = 0.4, 3.0, 0.8, 2.0
    for seed in SEEDS:
        z, w = _logits(seed, batch=B * splits), _weights(seed)
        target, q = _target(seed, soft)
        target, q = target.repeat(splits, *[1] * (target.ndim - 1)), q.repeat(splits, 1)
        zt = _logits(seed + 50).detach()
        reg = VirtualTeacherLoss(alpha, tau, a, 'paper', m, class_weight=w).terms(z, target, num_splits=splits)
        self_kd = SelfDistillLoss(alpha, tau, 'paper', m, class_weight=w).terms(z, zt, target, num_splits=splits)
        _, _, reg_kd = reg_oracle(z[:B], q[:B], w, alpha, tau, a, m, 'paper')
        _, _, self_kd_term = self_oracle(z[:B], zt, q[:B], w, alpha, tau, m, 'paper')
        for terms, kd in ((reg, reg_kd), (self_kd, self_kd_term)):
            _close(terms.loss, (1 - alpha) * weighted_ce(z, q, w) + alpha * kd, z)
            torch.testing.assert_close(terms.task, weighted_ce(z, q, w).detach(), rtol=0, atol=1e-10)
