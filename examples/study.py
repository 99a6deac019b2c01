#!/usr/bin/env python3
"""The CPU Fashion-MNIST study of ``docs/results/cpu-fashion-mnist``: six ways to train one ResNet-18, three seeds.

Prepare the data once, then run this file; rerun it to resume (finished runs are skipped)::

    timm-tfkd fashion-mnist data/fm-study --train-size 10000 --val-size 5000
    python examples/study.py data/fm-study output/study-cpu

It is ``timm-tfkd study`` with that study's settings: further arguments are passed on (``--seeds 0``,
``--epochs 2``, ``--device cuda``, ``--modes ...``, ``--report-only``); ``timm-tfkd study --help`` lists them.
"""
import sys
from typing import List

from timm_tfkd.cli import main

# ResNet-18 on one-channel 28 px images; the Tf-KD settings of each mode are the study's defaults (modes.yaml).
FASHION_MNIST_RECIPE = (
    '--num-classes 10 --img-size 28 --in-chans 1 --mean 0.286 --std 0.353 -b 128 --lr 0.1 --warmup-epochs 1 '
    '--weight-decay 5e-4 --scale 0.75 1 --ratio 0.9 1.1 --color-jitter 0 --hflip 0.5 --crop-pct 1 -j 2 '
    '--log-interval 20'
)


def study_argv(data_dir: str, out: str, *more: str) -> List[str]:
    """``timm-tfkd`` arguments of the study on ``data_dir``, writing to ``out``; ``more`` override or add options."""
    return ['study', '--data-dir', data_dir, '--out', out, '--model', 'resnet18',
            '--modes', 'ce', 'ls', 'reg-paper', 'reg-official', 'self', 'de-kd', '--seeds', '0', '1', '2',
            '--epochs', '8', f'--extra={FASHION_MNIST_RECIPE}', *more]


if __name__ == '__main__':
    if len(sys.argv) < 3:
        sys.exit(f'usage: {sys.argv[0]} DATA_DIR OUT_DIR [timm-tfkd study options]')
    sys.exit(main(study_argv(*sys.argv[1:])))
