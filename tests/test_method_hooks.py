"""The extension points the next methods need, driven through the real trainer by methods registered here:
per-sample state in every checkpoint and restored exactly on resume, epoch hooks, each batch's sample indices, and
an epoch order chosen by the task.

The method counts how often each training sample was seen and remembers the label that came with each index; its
task implements :class:`timm_tfkd.EpochHooks` and :class:`timm_tfkd.SampleIndexed`. If the trainer handed over
wrong indices, the remembered labels would not be the dataset's labels of those indices.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from timm.data import create_dataset
from timm.task import ClassificationTask

from timm_tfkd import EpochHooks, EpochOrdered, SampleIndexed, methods
from timm_tfkd.checkpoint_io import read_checkpoint
from timm_tfkd.methods import Method
from timm_tfkd.run_folder import INVOCATIONS_FILE
from conftest import write_image_folder
from _multilabel_data import K as WDS_CLASSES, write_wds
from _train_helpers import (
    TRAIN_SCRIPT, assert_run_files, assert_state_dicts_equal, call_main, load_state_dict, read_summary, run_subprocess,
    tiny_args, train_in_process,
)

pytestmark = pytest.mark.slow

PER_CLASS = 7  # 21 training images, batch 8: two batches per epoch, the last 5 images dropped (drop_last)
EPOCHS = 3
PAIRED_BATCHES = 5  # 21 drawn, each with a partner: 42 loaded, five batches of 8 an epoch


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


class PairingTask(CountingTask):
    """Loads each drawn sample followed by another of its class (so a batch of 8 holds 4 same-class pairs) and
    records every batch's indices in its state."""

    def __init__(self, model, labels, **kwargs):
        super().__init__(model, len(labels), **kwargs)
        self.dataset_labels = labels
        self.loaded = []
        self.interrupt_at = None  # (epoch, batch): a Ctrl-C before that batch's step
        self.ordered_epoch = None
        self.anchors = None  # pair only the first drawn samples

    def epoch_length(self, num_drawn):
        return 2 * min(num_drawn, self.anchors or num_drawn)

    def epoch_order(self, drawn, epoch):
        self.ordered_epoch = epoch
        generator = torch.Generator().manual_seed(1000 + epoch)
        order = []
        for index in drawn[:self.anchors].tolist():
            same = (self.dataset_labels == self.dataset_labels[index]).nonzero().flatten()
            same = same[same != index]
            order += [index, int(same[torch.randint(len(same), (1,), generator=generator)])]
        return torch.tensor(order)

    def forward(self, input, target):
        assert self.ordered_epoch == self.events[-1][1], 'the epoch order was asked for another epoch'
        assert torch.equal(self.dataset_labels[self.index], target.cpu()), 'the indices are not those of this batch'
        self.loaded.append(self.index.clone())
        epoch = self.events[-1][1]
        if self.interrupt_at == (epoch, len(self.loaded) - 1 - epoch * PAIRED_BATCHES):
            raise KeyboardInterrupt
        return super().forward(input, target)

    def get_task_state(self, module=None, ema=False):
        state = super().get_task_state(module, ema)
        if state:
            state['loaded'] = torch.stack(self.loaded) if self.loaded else torch.empty(0, 8, dtype=torch.int64)
        return state

    def load_task_state(self, state, strict=True, module=None, ema=False):
        super().load_task_state(state, strict, module, ema)
        if state and not ema:
            self.loaded = list(state['loaded'].unbind(0))


class PairingMethod(Method):
    name = 'pairing'
    description = 'test method that loads same-class pairs'
    needs_train_targets = True
    interrupt_at = None
    anchors = None

    def create_task(self, args, model, context):
        assert context.train_targets is not None and len(context.train_targets) == context.num_train_samples
        task = PairingTask(model, context.train_targets, device=context.device, dtype=context.dtype,
                           verbose=context.verbose)
        task.interrupt_at, task.anchors = self.interrupt_at, self.anchors
        return task


@pytest.fixture(scope='module')
def counting_method():
    """Register the method for this module's runs, as a method module would."""
    method = methods.register_method(CountingMethod())
    yield method
    del methods._METHODS[method.name]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp('hooks') / 'data', per_class=PER_CLASS)


@pytest.fixture(scope='module')
def pairing_method():
    method = methods.register_method(PairingMethod())
    yield method
    del methods._METHODS[method.name]


def _dataset_labels(data_dir: Path) -> torch.Tensor:
    dataset = create_dataset('', root=str(data_dir), split='train')
    return torch.tensor([target for _, target in dataset.reader.samples])


def _args(data_dir, output, name, *extra, mode='counting', epochs=EPOCHS):
    return tiny_args(data_dir, output, name, '--tfkd-mode', mode, '--seed', '3', *extra, epochs=epochs)


def _run(data_dir, output, name, *extra, mode='counting', epochs=EPOCHS):
    return train_in_process(_args(data_dir, output, name, *extra, mode=mode, epochs=epochs))


def _task_state(run_dir: Path):
    return read_checkpoint(str(run_dir / 'last.pth.tar'))['task_state']


def test_protocols_are_recognised(counting_method):
    task = CountingTask(torch.nn.Linear(2, 2), 4)
    assert isinstance(task, EpochHooks) and isinstance(task, SampleIndexed) and not isinstance(task, EpochOrdered)
    assert isinstance(PairingTask(torch.nn.Linear(2, 2), torch.zeros(4)), EpochOrdered)
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


@pytest.mark.parametrize('workers', ['0', '2'])
def test_the_task_chooses_what_each_epoch_loads(pairing_method, data_dir, tmp_path, capsys, workers):
    run = _run(data_dir, tmp_path / 'out', f'pairing-j{workers}', '-j', workers, mode='pairing')
    # The loader's length, hence the progress counter and the LR schedule, is that of the task's order.
    assert f'Train: {EPOCHS - 1} [   4/{PAIRED_BATCHES} (100%)]' in capsys.readouterr().err
    state = _task_state(run)
    labels = _dataset_labels(data_dir)
    loaded = state['loaded']
    assert loaded.shape == (EPOCHS * PAIRED_BATCHES, 8)
    assert [row['epoch'] for row in read_summary(run)] == list(range(EPOCHS))
    pairs = loaded.view(-1, 2)
    assert torch.equal(labels[pairs[:, 0]], labels[pairs[:, 1]]), 'a pair of other classes: not the task\'s order'
    assert (pairs[:, 0] != pairs[:, 1]).all()
    anchors = pairs[:, 0].view(EPOCHS, PAIRED_BATCHES * 4)
    for epoch in range(EPOCHS):
        assert len(set(anchors[epoch].tolist())) == PAIRED_BATCHES * 4, 'each drawn sample once an epoch'
    assert not torch.equal(anchors[0], anchors[1])


def test_an_epoch_the_task_ordered_resumes_at_the_right_batch(pairing_method, data_dir, tmp_path):
    flags = ('--recovery-interval', '1', '--no-prefetcher', '-j', '0')
    uninterrupted = _run(data_dir, tmp_path / 'out', 'whole', *flags, mode='pairing')
    argv = _args(data_dir, tmp_path / 'out', 'stopped', *flags, mode='pairing')
    pairing_method.interrupt_at = (1, 3)  # Ctrl-C in epoch 1 before its fourth batch: three recovery checkpoints
    try:
        assert call_main(argv) == 130
    finally:
        pairing_method.interrupt_at = None
    stopped = tmp_path / 'out' / 'stopped'
    assert call_main([*argv, '--resume', 'auto']) == 0
    (invocation,) = [json.loads(line) for line in (stopped / INVOCATIONS_FILE).read_text().splitlines()]
    assert (invocation['resumed_from'], invocation['epoch'], invocation['batch']) == ('recovery-1-2.pth.tar', 1, 3)
    assert_run_files(stopped, EPOCHS)
    a, b = _task_state(uninterrupted), _task_state(stopped)
    assert torch.equal(b['loaded'], a['loaded']), 'the resumed epoch loaded other samples than the uninterrupted one'
    assert read_summary(stopped) == read_summary(uninterrupted)
    assert_state_dicts_equal(load_state_dict(stopped / 'last.pth.tar'), load_state_dict(uninterrupted / 'last.pth.tar'))


@pytest.mark.parametrize('mode', ['counting', 'pairing'])
def test_a_loader_whose_order_the_trainer_cannot_own_is_refused(counting_method, pairing_method, data_dir, tmp_path,
                                                                capsys, mode):
    output = tmp_path / 'out'
    assert call_main(_args(data_dir, output, 'refused', '--use-multi-epochs-loader', mode=mode)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    assert f'--tfkd-mode {mode}' in err and '--use-multi-epochs-loader' in err
    assert not output.exists()


def test_an_epoch_order_shorter_than_a_batch_is_refused(pairing_method, data_dir, tmp_path, capsys):
    output = tmp_path / 'out'
    pairing_method.anchors = 3  # 21 drawn, 6 loaded: no batch of 8
    try:
        assert call_main(_args(data_dir, output, 'refused', mode='pairing')) == 2
    finally:
        pairing_method.anchors = None
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    assert '--tfkd-mode pairing loads 6 images' in err and '--batch-size 8' in err
    assert not output.exists()


# The training script with this module's pairing method registered, for torchrun's processes.
WITH_PAIRING_METHOD = f'''
import runpy, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from timm_tfkd import methods
from test_method_hooks import PairingMethod
methods.register_method(PairingMethod())
sys.argv = [{TRAIN_SCRIPT!r}, *sys.argv[1:]]
runpy.run_path({TRAIN_SCRIPT!r}, run_name='__main__')
'''


def test_under_ddp_each_rank_orders_and_indexes_its_own_share(data_dir, tmp_path):
    script = tmp_path / 'train_with_pairing.py'
    script.write_text(WITH_PAIRING_METHOD)
    argv = _args(data_dir, tmp_path / 'out', 'ddp', mode='pairing')
    result = run_subprocess([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                             script, *argv])
    # Each rank's task checks every batch (its labels are the dataset's at the indices it got, its epoch order
    # was asked for this epoch); a wrong index on either rank fails the run.
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Distributed training: 2 processes' in result.stderr
    loaded = _task_state(tmp_path / 'out' / 'ddp')['loaded']  # rank 0's
    # 21 images on 2 ranks: 11 drawn each (one padded), 22 loaded, two batches of 8 an epoch.
    assert loaded.shape == (EPOCHS * 2, 8)
    pairs = loaded.view(-1, 2)
    labels = _dataset_labels(data_dir)
    assert torch.equal(labels[pairs[:, 0]], labels[pairs[:, 1]])


def test_a_dataset_that_does_not_list_its_classes_is_refused_for_a_method_that_needs_them(pairing_method, tmp_path,
                                                                                         capsys):
    data, output = write_wds(tmp_path / 'wds'), tmp_path / 'out'
    argv = ['--dataset', 'wds/tiny', '--data-dir', data, '--target-key', 'label', '--num-classes', WDS_CLASSES,
            '--model', 'test_resnet', '--img-size', 16, '-b', 8, '-j', 0, '--tfkd-mode', 'pairing', '--output', output]
    assert call_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    assert '--tfkd-mode pairing needs the class of every training image' in err and 'wds/tiny' in err
    assert not output.exists()
