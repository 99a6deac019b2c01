"""A tiny multi-label dataset in the WebDataset layout timm's ``wds/`` reader reads (tar shards of ``.png`` + ``.json``
sidecar, ``_info.json``), shared by the multi-label tests."""
import io
import json
import tarfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

# Classes and image size of the dataset; its record counts per split.
K, IMG = 4, 16
SPLITS = {'train': 24, 'validation': 12}


def labels_of(split: str) -> List[List[int]]:
    """Each image's positive classes (some images have none, some several)."""
    rng = np.random.default_rng({'train': 0, 'validation': 1}[split])
    labels = [[c for c in range(K) if rng.random() < 0.45] for _ in range(SPLITS[split])]
    labels[0] = []  # an image without labels
    return labels


def _image(labels: List[int], rng: np.random.Generator) -> np.ndarray:
    """A stripe per positive class, so that the labels are learnable."""
    pixels = np.zeros((IMG, IMG, 3), np.float32)
    for c in labels:
        pixels[:, c * IMG // K:(c + 1) * IMG // K] = 200.0
    return np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)


def write_wds(root: Path, shards: Optional[Dict[str, List[int]]] = None) -> Path:
    """The sidecar holds the labels as index lists ('labels') and multi-hot ('multihot'), and one class as an int
    ('label', for single-label runs on a dataset that does not list its targets). ``shards`` gives the
    record count of each shard of a split (default: one shard per split)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(7)
    splits = {}
    for split in SPLITS:
        lengths = (shards or {}).get(split, [SPLITS[split]])
        assert sum(lengths) == SPLITS[split]
        names, records = [], list(enumerate(labels_of(split)))
        for shard, length in enumerate(lengths):
            names.append(f'{split}-{shard:06d}.tar')
            with tarfile.open(root / names[-1], 'w') as tar:
                for i, labels in records[sum(lengths[:shard]):sum(lengths[:shard + 1])]:
                    image = io.BytesIO()
                    Image.fromarray(_image(labels, rng)).save(image, format='PNG')
                    meta = {'labels': labels, 'multihot': [int(c in labels) for c in range(K)],
                            'label': labels[0] if labels else 0}
                    for suffix, data in (('png', image.getvalue()), ('json', json.dumps(meta).encode())):
                        info = tarfile.TarInfo(f'{split}{i:04d}.{suffix}')
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        splits[split] = {'name': split, 'num_samples': SPLITS[split], 'filenames': names,
                         'shard_lengths': list(lengths)}
    (root / '_info.json').write_text(json.dumps({'splits': splits}))
    return root
