"""Shared fixtures: small image folders written by the tests themselves."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 16, channels: int = 3,
                       splits=('train', 'validation'), seed: int = 0) -> Path:
    """Write ``root/<split>/class_<k>/<i>.png`` images whose class is visible (a per-class brightness pattern)."""
    rng = np.random.default_rng(seed)
    mode = 'L' if channels == 1 else 'RGB'
    for split in splits:
        for label in range(classes):
            folder = root / split / f'class_{label}'
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                base = np.zeros((size, size), dtype=np.float32)
                base[:, label * size // classes:(label + 1) * size // classes] = 200.0
                pixels = np.clip(base + rng.normal(0, 25, (size, size)), 0, 255).astype(np.uint8)
                if channels == 3:
                    pixels = np.stack([pixels, pixels[::-1], pixels.T], axis=-1)
                Image.fromarray(pixels, mode=mode).save(folder / f'{index}.png')
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A 3-class, 16 px RGB folder dataset with train and validation splits."""
    return write_image_folder(tmp_path / 'data')
