"""The extension points the next methods need, driven through the real trainer by a method registered here:
per-sample state in every checkpoint and restored exactly on resume, epoch hooks, and each batch's sample indices.

The method counts how often each training sample was seen and remembers the label that came with each index; its
task implements :class:`timm_tfkd.EpochHooks` and :class:`timm_tfkd.SampleIndexed`. If the trainer handed over
wrong indices, the remembered labels would not be the dataset's labels of those indices.
"""
from pathlib import Path

import pytest
import torch
from timm.data import create_dataset
from timm.task import ClassificationTask

from timm_tfkd import EpochHooks, SampleIndexed, methods
from timm_tfkd.checkpoint_io import read_checkpoint
from timm_tfkd.methods import Method
from conftest import write_image_folder
from _train_helpers import (
    assert_state_dicts_equal, load_state_dict, read_summary, tiny_args, train_in_process,
)

pytestmark = pytest.mark.slow

PER_CLASS = 7  # 21 training images, batch 8: two batches per epoch, the last 5 images dropped (drop_last)
EPOCHS = 3


class CountingTask(ClassificationTask):
    """Cross-entropy, plus a per-sample visit count, the label seen with each index, and the epoch events."""

    def __init__(self, model, num_samples, **kwargs):
        super().__init__(model, torch.nn.CrossEntropyLoss(), **kwargs)
        self.visits = torch.zeros(num_samples, dtype=torch.int64)
        self.labels = torch.full((num_samples,), -1, dtype=torch.int64)
        self.events = []
        self.index = None

    def set_sample_index(self, index):
        self.index = index

    def forward(self, input, target):
        assert self.index is not None and self.index.shape == target.shape, 'no sample index for this batch'
        self.visits[self.index] += 1
        self.labels[self.index] = target.cpu()
        self.index = None
        return super().forward(input, target)

    def on_epoch_start(self, epoch, num_epochs):
        self.events.append((0, epoch, num_epochs))

    def on_epoch_end(self, epoch):
        self.events.append((1, epoch, int(self.visits.sum())))

    def get_task_state(self, module=None, ema=False):
        if ema:
            return {}
        return {'visits': self.visits.clone(), 'labels': self.labels.clone(), 'events': torch.tensor(self.events)}

    def load_task_state(self, state, strict=True, module=None, ema=False):
        if ema or not state:
            return
        self.visits.copy_(state['visits'])
        self.labels.copy_(state['labels'])
        self.events = [tuple(row) for row in state['events'].tolist()]


class CountingMethod(Method):
    name = 'counting'
    description = 'test method with per-sample state'

    def create_task(self, args, model, context):
        return CountingTask(model, context.num_train_samples, device=context.device, dtype=context.dtype,
                            verbose=context.verbose)


@pytest.fixture(scope='module')
def counting_method():
    """Register the method for this module's runs, as a method module would."""
    method = methods.register_method(CountingMethod())
    yield method
    del methods._METHODS[method.name]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp('hooks') / 'data', per_class=PER_CLASS)


def _dataset_labels(data_dir: Path) -> torch.Tensor:
    dataset = create_dataset('', root=str(data_dir), split='train')
    return torch.tensor([target for _, target in dataset.reader.samples])


def _run(data_dir, output, name, *extra, epochs=EPOCHS):
    return train_in_process(tiny_args(data_dir, output, name, '--tfkd-mode', 'counting', '--seed', '3', *extra,
                                      epochs=epochs))


def _task_state(run_dir: Path):
    return read_checkpoint(str(run_dir / 'last.pth.tar'))['task_state']


def test_protocols_are_recognised(counting_method):
    task = CountingTask(torch.nn.Linear(2, 2), 4)
    assert isinstance(task, EpochHooks) and isinstance(task, SampleIndexed)
    assert not isinstance(ClassificationTask(torch.nn.Linear(2, 2)), SampleIndexed)


@pytest.mark.parametrize('workers', ['0', '2'])
def test_indices_state_and_epoch_hooks(counting_method, data_dir, tmp_path, workers):
    run = _run(data_dir, tmp_path / 'out', f'counting-j{workers}', '-j', workers)
    state = _task_state(run)
    visits, labels = state['visits'], state['labels']
    seen = visits > 0
    # Two batches of 8 per epoch: 16 distinct samples an epoch, drawn in a new order each epoch.
    assert int(visits.sum()) == EPOCHS * 16 and int(visits.max()) <= EPOCHS
    assert int(seen.sum()) > 16
    assert torch.equal(labels[seen], _dataset_labels(data_dir)[seen]), 'a batch got the indices of other samples'
    events = [tuple(row) for row in state['events'].tolist()]
    assert events == [event for epoch in range(EPOCHS) for event in ((0, epoch, EPOCHS), (1, epoch, 16 * (epoch + 1)))]


def test_state_survives_resume_exactly(counting_method, data_dir, tmp_path):
    uninterrupted = _run(data_dir, tmp_path / 'out', 'A')
    stopped = _run(data_dir, tmp_path / 'out', 'B', '--stop-epoch', '2')
    assert [row['epoch'] for row in read_summary(stopped)] == [0, 1]
    _run(data_dir, tmp_path / 'out', 'B', '--resume', 'auto')
    a, b = _task_state(uninterrupted), _task_state(stopped)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert_state_dicts_equal(load_state_dict(stopped / 'last.pth.tar'), load_state_dict(uninterrupted / 'last.pth.tar'))
