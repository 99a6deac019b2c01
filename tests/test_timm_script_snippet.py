"""README's two lines for a copy of timm's train.py, run as that script runs them: its parser, its Mixup (which
folds --smoothing into the targets) and its criterion, then the two lines exactly as README prints them."""
import argparse
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

README = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
SNIPPET = re.search(r"two added lines\n\n```python\n(.*?)```", README, flags=re.S).group(1)
LINES = [line.split('#')[0].strip() for line in SNIPPET.splitlines() if line.startswith(('from ', 'add_', 'task ='))]
K, B = 5, 6


def _timm_script(argv, rank=0):
    """What timm's train.py has built when it reaches the task line."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--smoothing', type=float, default=0.1)  # a few of timm's flags, as timm declares them
    parser.add_argument('--mixup', type=float, default=0.0)
    parser.add_argument('--cutmix', type=float, default=0.0)
    parser.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    parser.add_argument('--model', default='test_resnet')
    namespace = {'parser': parser}
    exec(LINES[0], namespace)  # the import
    exec(LINES[1], namespace)  # 1. add_tfkd_args(parser)
    args = parser.parse_args(argv)
    args.rank = rank  # timm's init_distributed_device sets it
    torch.manual_seed(0)
    np.random.seed(0)
    mixup = Mixup(mixup_alpha=args.mixup, label_smoothing=args.smoothing, num_classes=K) if args.mixup else None
    train_loss_fn = SoftTargetCrossEntropy() if mixup else timm.loss.LabelSmoothingCrossEntropy(args.smoothing)
    namespace.update(args=args, model=timm.create_model('test_resnet', num_classes=K), train_loss_fn=train_loss_fn,
                     device=torch.device('cpu'), model_dtype=None)
    exec(LINES[2], namespace)  # 2. task = create_tfkd_task(...)
    return namespace['task'], mixup


def test_readme_has_the_three_lines():
    assert LINES == ['from timm_tfkd import add_tfkd_args, create_tfkd_task', 'add_tfkd_args(parser)',
                     'task = create_tfkd_task(args, model, train_loss_fn, device=device, dtype=model_dtype)']


def test_lsr_does_not_smooth_mixup_targets_twice(caplog):
    caplog.set_level(logging.INFO)
    task, mixup = _timm_script(['--tfkd-mode', 'lsr', '--mixup', '0.8', '--smoothing', '0.1'])
    x, y = torch.randn(B, 3, 16, 16), torch.arange(B) % K
    x, target = mixup(x, y)
    task.eval()
    with torch.no_grad():
        logits = task.trainable_module(x).double()
        loss = task.criterion(logits, target.double())
    # The targets already carry the 0.1 smoothing (timm's convention): the loss is plain soft-target CE on them.
    expected = -(target.double() * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    assert 'already smooth the targets by 0.1' in caplog.text


def test_lsr_reference_convention_cannot_take_mixup_targets():
    with pytest.raises(ValueError, match='reference smoothing convention'):
        _timm_script(['--tfkd-mode', 'lsr', '--tfkd-smoothing-convention', 'reference', '--mixup', '0.8'])


def test_lsr_without_mixup_smooths_itself():
    task, _ = _timm_script(['--tfkd-mode', 'lsr', '--smoothing', '0.2'])
    assert task.criterion.smoothing == 0.2


@pytest.mark.parametrize('mode', ['reg'])
def test_reg_with_mixup_and_timms_default_smoothing_says_it_stacks(mode, caplog):
    caplog.set_level(logging.INFO)
    _timm_script(['--tfkd-mode', mode, '--mixup', '0.8'])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"timm's train.py folds --smoothing 0.1 into the Mixup / CutMix targets: it stacks on Tf-KD "
                        f'{mode}; pass --smoothing 0 unless that is meant']


def test_only_rank_zero_logs_the_set_up(caplog):
    caplog.set_level(logging.INFO)
    _timm_script(['--tfkd-mode', 'reg', '--mixup', '0.8'], rank=1)
    assert not [r for r in caplog.records if r.name.startswith('timm_tfkd')]
    _timm_script(['--tfkd-mode', 'reg'], rank=0)
    assert any('Tf-KD: reg' in r.getMessage() for r in caplog.records)
