"""timm_tfkd.datasets.fashion_mnist on synthetic idx files written here: the folders hold exactly the source pixels under
the right class names, sizes are honoured with equal per-class counts, validation and train never share an image,
test comes from the test files only, a finished folder is reused, and a file of the wrong kind is refused."""
import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from timm_tfkd.datasets import fashion_mnist

SIDE = 28
# Unbalanced on purpose: a plain random subset would not have equal class counts.
TRAIN_PER_CLASS = [5 + label for label in range(10)]  # 95 images
TEST_PER_CLASS = [3 + label % 3 for label in range(10)]  # 39 images
SPLITS = ('train', 'validation', 'test')


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """An idx file: magic number, one big-endian uint32 per dimension, then the uint8 data."""
    header = magic.to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _source_split(rng, per_class):
    labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
    images = rng.integers(0, 256, (len(labels), SIDE, SIDE), dtype=np.uint8)
    return images, labels


@pytest.fixture
def source(tmp_path):
    """A folder with the four idx .gz files; returns it and the arrays written."""
    folder = tmp_path / 'source'
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {'train': _source_split(rng, TRAIN_PER_CLASS), 'test': _source_split(rng, TEST_PER_CLASS)}
    for split, (images_name, labels_name) in (('train', ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz')),
                                              ('test', ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'))):
        images, labels = arrays[split]
        _write_idx(folder / images_name, images, 0x0803)
        _write_idx(folder / labels_name, labels, 0x0801)
    return folder, arrays


def _read_folder(out: Path, arrays):
    """Per split: the (source split, source index) of every written image, and its class folder's label."""
    lookup = {images[i].tobytes(): (split, i) for split, (images, _) in arrays.items() for i in range(len(images))}
    found = {}
    for split in SPLITS:
        entries = []
        for path in sorted((out / split).rglob('*.png')):
            pixels = np.array(Image.open(path))
            assert pixels.dtype == np.uint8 and pixels.shape == (SIDE, SIDE), path
            assert pixels.tobytes() in lookup, f'{path} matches no source image'
            entries.append((*lookup[pixels.tobytes()], fashion_mnist.CLASS_NAMES.index(path.parent.name)))
        found[split] = entries
    return found


def _check_layout(out, arrays, counts):
    found = _read_folder(out, arrays)
    for split in SPLITS:
        assert len(found[split]) == counts[split], split
        for source_split, index, label in found[split]:
            assert source_split == ('test' if split == 'test' else 'train'), (split, source_split)
            assert label == arrays[source_split][1][index], f'{split}: source image {index} in the wrong class'
        assert len({index for _, index, _ in found[split]}) == len(found[split]), f'{split} repeats an image'
    train = {index for _, index, _ in found['train']}
    validation = {index for _, index, _ in found['validation']}
    assert not train & validation, f'in train and validation: {sorted(train & validation)}'
    return found


def _class_counts(entries):
    counts = Counter(label for _, _, label in entries)
    return [counts[label] for label in range(10)]


def test_sizes_are_stratified_and_splits_disjoint(source, tmp_path):
    folder, arrays = source
    out = tmp_path / 'out'
    counts = fashion_mnist.prepare_folder(str(out), train_size=25, val_size=20, test_size=15, seed=1,
                                          source=str(folder))
    assert counts == {'train': 25, 'validation': 20, 'test': 15}
    found = _check_layout(out, arrays, counts)
    assert _class_counts(found['validation']) == [2] * 10
    # 25 = 10 x 2 + 5: five classes get a third image; 15 test images: five classes get a second.
    assert sorted(_class_counts(found['train'])) == [2] * 5 + [3] * 5
    assert sorted(_class_counts(found['test'])) == [1] * 5 + [2] * 5


def test_default_sizes_use_every_image_once(source, tmp_path):
    folder, arrays = source
    out = tmp_path / 'out'
    counts = fashion_mnist.prepare_folder(str(out), val_size=30, source=str(folder))
    assert counts == {'train': 95 - 30, 'validation': 30, 'test': 39}
    found = _check_layout(out, arrays, counts)
    assert _class_counts(found['validation']) == [3] * 10
    assert {index for _, index, _ in found['train'] + found['validation']} == set(range(95))
    assert _class_counts(found['test']) == TEST_PER_CLASS


def test_the_seed_decides_the_split(source, tmp_path):
    folder, arrays = source
    splits = []
    for name, seed in (('a', 0), ('b', 0), ('c', 1)):
        fashion_mnist.prepare_folder(str(tmp_path / name), train_size=20, val_size=10, test_size=10, seed=seed,
                                     source=str(folder))
        found = _read_folder(tmp_path / name, arrays)
        splits.append({split: sorted(index for _, index, _ in found[split]) for split in SPLITS})
    assert splits[0] == splits[1] and splits[0] != splits[2]


def test_finished_folder_is_reused_and_rewritten_for_other_sizes(source, tmp_path):
    folder, arrays = source
    out = tmp_path / 'out'
    first = fashion_mnist.prepare_folder(str(out), train_size=20, val_size=10, test_size=10, source=str(folder))
    stamps = {path: path.stat().st_mtime_ns for path in out.rglob('*.png')}
    assert fashion_mnist.prepare_folder(str(out), train_size=20, val_size=10, test_size=10,
                                        source=str(folder)) == first
    assert {path: path.stat().st_mtime_ns for path in out.rglob('*.png')} == stamps
    # Other sizes: the folder is rewritten, nothing of the first layout is left beside the new one.
    counts = fashion_mnist.prepare_folder(str(out), train_size=30, val_size=20, test_size=5, source=str(folder))
    assert counts == {'train': 30, 'validation': 20, 'test': 5}
    _check_layout(out, arrays, counts)


@pytest.mark.parametrize('name,magic', [('train-labels-idx1-ubyte.gz', 0x0803), ('t10k-images-idx3-ubyte.gz', 0x0801)])
def test_wrong_magic_number_is_refused(source, tmp_path, name, magic):
    folder, _ = source
    _write_idx(folder / name, np.zeros((95, SIDE, SIDE) if magic == 0x0803 else (39,), dtype=np.uint8), magic)
    with pytest.raises(ValueError, match=f'is not an idx file of the expected kind \\(magic {magic}'):
        fashion_mnist.prepare_folder(str(tmp_path / 'out'), val_size=10, source=str(folder))


def test_too_few_images_of_a_class_and_missing_files_are_refused(source, tmp_path):
    folder, _ = source
    with pytest.raises(ValueError, match='class t-shirt_top has 5 images left, 7 are needed'):
        fashion_mnist.prepare_folder(str(tmp_path / 'out'), val_size=70, source=str(folder))
    (folder / 't10k-labels-idx1-ubyte.gz').unlink()
    with pytest.raises(FileNotFoundError, match='apt-get install -y dataset-fashion-mnist'):
        fashion_mnist.prepare_folder(str(tmp_path / 'out'), val_size=10, source=str(folder))
