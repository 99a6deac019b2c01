"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, laid out as a timm image folder.

The layout has a validation split carved from the training images (for any choice of hyper-parameters) and the
official test images as a separate split that is only ever reported:
``OUT/train/<class>/*.png``, ``OUT/validation/<class>/*.png``, ``OUT/test/<class>/*.png``.
"""
import gzip
import logging
import os
import shutil
from typing import Dict, Optional

import numpy as np
from PIL import Image

_logger = logging.getLogger(__name__)

DEFAULT_SOURCE = '/usr/share/datasets/fashion-mnist'
CLASS_NAMES = ('t-shirt_top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag',
               'ankle_boot')
_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
_DONE_MARKER = '.complete'
# Part of the reuse marker: a folder written by another sampling scheme is rewritten, never reused.
_LAYOUT = 'stratified-v1'


def is_installed(source: str = DEFAULT_SOURCE) -> bool:
    """Whether the four idx files are there."""
    return all(os.path.isfile(os.path.join(source, name)) for pair in _FILES.values() for name in pair)


def _read_idx(path: str, magic: int) -> np.ndarray:
    with gzip.open(path, 'rb') as f:
        data = f.read()
    found = int.from_bytes(data[:4], 'big')
    if found != magic:
        raise ValueError(f"'{path}' is not an idx file of the expected kind (magic {found}, expected {magic})")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(magic & 0xFF)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


def load_split(split: str, source: str = DEFAULT_SOURCE):
    """Images (N, 28, 28) uint8 and labels (N,) of 'train' or 'test'."""
    images_name, labels_name = _FILES[split]
    images = _read_idx(os.path.join(source, images_name), 0x0803)
    labels = _read_idx(os.path.join(source, labels_name), 0x0801)
    if len(images) != len(labels):
        raise ValueError(f'{split}: {len(images)} images but {len(labels)} labels')
    return images, labels


def _stratified(rng: np.random.Generator, labels: np.ndarray, candidates: np.ndarray, size: int) -> np.ndarray:
    """``size`` random indices out of ``candidates``: as many of each class, one more for ``size % 10`` of them.

    Raises:
        ValueError: A class has fewer candidates than its share.
    """
    classes = np.arange(len(CLASS_NAMES))
    counts = np.full(len(classes), size // len(classes))
    counts[rng.choice(len(classes), size % len(classes), replace=False)] += 1
    chosen = []
    for cls, count in zip(classes, counts):
        pool = candidates[labels[candidates] == cls]
        if len(pool) < count:
            raise ValueError(f'class {CLASS_NAMES[cls]} has {len(pool)} images left, {count} are needed')
        chosen.append(rng.choice(pool, count, replace=False))
    return rng.permutation(np.concatenate(chosen))


def _write_split(root: str, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    for name in CLASS_NAMES:
        os.makedirs(os.path.join(root, split, name), exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image, mode='L').save(os.path.join(root, split, CLASS_NAMES[label], f'{index:05d}.png'))


def prepare_folder(
        out: str,
        train_size: Optional[int] = None,
        val_size: int = 5000,
        test_size: Optional[int] = None,
        seed: int = 0,
        source: str = DEFAULT_SOURCE,
) -> Dict[str, int]:
    """Write the train / validation / test folders, class-balanced random subsets when sizes are given.

    Each subset of a given size is stratified: every class gets ``size // 10`` images and ``size % 10`` randomly
    chosen classes one more. Validation is drawn first from the official training set, the training subset from
    what it leaves (never an image of both); test comes from the official test set only.

    Args:
        out: Output folder; reused as is when a previous call with the same sizes and seed completed.
        train_size: Training images (default: all that the validation split leaves, not rebalanced).
        val_size: Validation images carved from the official training set.
        test_size: Test images (default: all 10,000).
        seed: Seed of the split.
        source: Folder of the idx ``.gz`` files.

    Returns:
        Number of images per split.

    Raises:
        FileNotFoundError: The Debian package is not installed.
        ValueError: An idx file is not of the expected kind, or a class has too few images for a size.
    """
    if not is_installed(source):
        raise FileNotFoundError(f"Fashion-MNIST not found in '{source}': apt-get install -y dataset-fashion-mnist")
    marker = os.path.join(out, _DONE_MARKER)
    wanted = f'{_LAYOUT},{train_size},{val_size},{test_size},{seed}'
    if os.path.isfile(marker) and open(marker).read() == wanted:
        return {split: sum(len(files) for _, _, files in os.walk(os.path.join(out, split)))
                for split in ('train', 'validation', 'test')}
    for split in ('train', 'validation', 'test'):
        shutil.rmtree(os.path.join(out, split), ignore_errors=True)  # never mix images of two layouts
    rng = np.random.default_rng(seed)
    train_images, train_labels = load_split('train', source)
    val_index = _stratified(rng, train_labels, np.arange(len(train_images)), val_size)
    rest = np.setdiff1d(np.arange(len(train_images)), val_index)
    train_index = _stratified(rng, train_labels, rest, train_size) if train_size else rng.permutation(rest)
    test_images, test_labels = load_split('test', source)
    all_test = np.arange(len(test_images))
    test_index = _stratified(rng, test_labels, all_test, test_size) if test_size else all_test
    for split, images, labels in (
            ('train', train_images[train_index], train_labels[train_index]),
            ('validation', train_images[val_index], train_labels[val_index]),
            ('test', test_images[test_index], test_labels[test_index])):
        _write_split(out, split, images, labels)
    with open(marker, 'w') as f:
        f.write(wanted)
    counts = {'train': len(train_index), 'validation': len(val_index), 'test': len(test_index)}
    _logger.info(f'Fashion-MNIST written to {out}: {counts}')
    return counts
