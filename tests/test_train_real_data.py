"""Real data: Tf-KD-reg on a small slice of Fashion-MNIST (Debian's dataset-fashion-mnist) learns. Skipped where the
package is not installed, except under CI (environment variable CI set), where that is a failure."""
import math
import os

import pytest

from timm_tfkd.datasets import fashion_mnist
from _train_helpers import (
    assert_run_files, read_run_info, read_summary, train_in_process,
)

pytestmark = pytest.mark.slow

EPOCHS = 3


def require_fashion_mnist(source: str) -> None:
    """Skip when Fashion-MNIST is missing, or fail under CI, which installs it (.ci/run): there a missing package
    is a broken setup, not a reason to pass without the real-data test."""
    if fashion_mnist.is_installed(source):
        return
    message = f'Fashion-MNIST is not installed in {source} (apt-get install dataset-fashion-mnist)'
    if os.environ.get('CI'):
        pytest.fail(f'{message}, and CI is set', pytrace=False)
    pytest.skip(message)


@pytest.mark.parametrize('ci, outcome', [('1', pytest.fail.Exception), ('true', pytest.fail.Exception),
                                         (None, pytest.skip.Exception)])
def test_missing_data_fails_under_ci_and_skips_elsewhere(tmp_path, monkeypatch, ci, outcome):
    if ci is None:
        monkeypatch.delenv('CI', raising=False)
    else:
        monkeypatch.setenv('CI', ci)
    # Caught as BaseException: a skip where a failure is due must fail this test, not skip it.
    with pytest.raises(BaseException, match='Fashion-MNIST is not installed') as raised:
        require_fashion_mnist(str(tmp_path))
    assert raised.type is outcome


@pytest.fixture(scope='module')
def fashion_mnist_slice(tmp_path_factory):
    require_fashion_mnist(fashion_mnist.DEFAULT_SOURCE)
    root = tmp_path_factory.mktemp('fashion-mnist')
    # 1,000 training and 500 validation images, 28 px grayscale; one test image (the split is not used here).
    counts = fashion_mnist.prepare_folder(str(root), train_size=1000, val_size=500, test_size=1)
    assert counts['train'] == 1000 and counts['validation'] == 500
    return root


def test_reg_learns_fashion_mnist(fashion_mnist_slice, tmp_path):
    run = train_in_process([
        '--data-dir', fashion_mnist_slice, '--model', 'test_resnet', '--num-classes', '10', '--in-chans', '1',
        '--img-size', '28', '--mean', '0.286', '--std', '0.353', '--scale', '0.75', '1', '--ratio', '0.9', '1.1',
        '--color-jitter', '0', '-b', '32', '--lr', '0.1', '--epochs', str(EPOCHS), '--warmup-epochs', '0',
        '-j', '0', '--seed', '0', '--tfkd-mode', 'reg', '--log-interval', '1000',
        '--output', tmp_path / 'out', '--experiment', 'fmnist-reg',
    ])
    assert_run_files(run, EPOCHS)
    summary = read_summary(run)
    losses = [row['train_loss'] for row in summary]
    assert losses[-1] < losses[0], losses
    final = summary[-1]
    assert final['eval_top1'] > 40.0, final  # chance is 10%
    assert math.isfinite(final['eval_nll']) and final['train_kd_loss'] > 0
    info = read_run_info(run)
    assert info['in_chans'] == 1 and info['num_classes'] == 10
    assert sorted(info['class_names']) == sorted(fashion_mnist.CLASS_NAMES)
    assert info['tfkd']['mode'] == 'reg'
