"""timm's ``--torchscript`` / ``--fuser``, ``--tta`` and ``--save-images`` in the trainer.

- ``--torchscript``: every mode trains a ``torch.jit.script``-ed student (the loss and a teacher stay Python); a
  scripted run's checkpoint is a plain timm model's; ``--fuser`` switches timm's TorchScript fuser.
- ``--tta N``: validation averages the logits of each N consecutive images; top-1, NLL and ECE of a real run are
  those of the averaged predictions, recomputed here in float64 from the saved weights and timm's own transforms.
- ``--save-images``: the batch of each logged step is written into the run folder as an image grid of the batch
  (8 images a row), and holds the images the model was given.
"""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_dataset, create_transform

from conftest import write_image_folder
from _train_helpers import build_in_trainer, load_state_dict, read_run_info, read_summary, tiny_args, train_in_process

IMG = 16
ECE_BINS = 15
LUMA = np.array([0.299, 0.587, 0.114])  # JPEG's brightness weights of R, G, B


@pytest.fixture(scope='module')
def data(workdir) -> Path:
    """3 classes, 8 training and 8 validation images each."""
    return write_image_folder(workdir / 'data')


# ---------------------------------------------------------------------------------------------------------------
# TorchScript


@pytest.fixture(scope='module')
def teacher(workdir) -> Path:
    torch.manual_seed(0)
    path = workdir / 'teacher.pth.tar'
    torch.save({'arch': 'test_resnet', 'state_dict': timm.create_model('test_resnet', num_classes=3).state_dict()},
               path)
    return path


@pytest.fixture
def restore_jit_settings():
    """--fuser changes process-wide TorchScript settings: put torch's back for the tests that follow."""
    texpr, cpu, gpu = (torch._C._jit_texpr_fuser_enabled(), torch._C._jit_can_fuse_on_cpu(),
                       torch._C._jit_can_fuse_on_gpu())
    executor = torch._C._jit_set_profiling_executor(True)
    mode = torch._C._jit_set_profiling_mode(True)
    torch._C._jit_set_profiling_executor(executor)
    torch._C._jit_set_profiling_mode(mode)
    yield
    torch._C._jit_set_texpr_fuser_enabled(texpr)
    torch._C._jit_override_can_fuse_on_cpu(cpu)
    torch._C._jit_override_can_fuse_on_gpu(gpu)
    torch._C._jit_set_profiling_executor(executor)
    torch._C._jit_set_profiling_mode(mode)


@pytest.mark.parametrize('mode', ['none', 'lsr', 'reg', 'self', 'kd'])
def test_every_mode_trains_a_scripted_student(mode, data, teacher, tmp_path):
    flags = ['--tfkd-teacher-checkpoint', teacher] if mode in ('self', 'kd') else []
    flags += ['--tfkd-teacher-model', 'test_resnet'] if mode == 'kd' else []
    _, task = build_in_trainer(tiny_args(data, tmp_path / 'out', 'script', '--torchscript', '--tfkd-mode', mode,
                                         *flags))
    student = task.get_trainable_module()
    assert isinstance(student, torch.jit.ScriptModule)
    task.train()
    images, target = torch.randn(8, 3, IMG, IMG), torch.arange(8) % 3
    result = task(images, target)
    result['loss'].backward()
    assert torch.isfinite(result['loss'])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())


def test_a_scripted_run_with_a_fuser_is_a_plain_timm_model(data, tmp_path, restore_jit_settings):
    run = train_in_process(tiny_args(data, tmp_path / 'out', 'scripted', '--torchscript', '--fuser', 'old'))
    assert not torch._C._jit_texpr_fuser_enabled()  # 'old': the legacy fuser instead of the tensor-expression one
    model = timm.create_model('test_resnet', num_classes=3)
    model.load_state_dict(load_state_dict(run / 'last.pth.tar'))  # strict: the same keys as the plain model


# ---------------------------------------------------------------------------------------------------------------
# Test-time augmentation


def _validation_images(data: Path, data_config: dict):
    """The validation split in the loader's order, through timm's eval transform, without the trainer's code."""
    dataset = create_dataset('', root=str(data), split='validation', is_training=False)
    dataset.transform = create_transform(
        tuple(data_config['input_size']), is_training=False, interpolation=data_config['interpolation'],
        mean=tuple(data_config['mean']), std=tuple(data_config['std']), crop_pct=data_config['crop_pct'])
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels)


def _metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1, NLL and 15-bin ECE (bins closed on the right, in %) of float64 logits."""
    log_probs = torch.log_softmax(logits, 1)
    confidence, predicted = log_probs.exp().max(1)
    correct = (predicted == labels).double()
    ece = 0.0
    for k in range(ECE_BINS):
        inside = (confidence > k / ECE_BINS) & (confidence <= (k + 1) / ECE_BINS)
        if inside.any():
            ece += inside.double().mean() * (correct[inside].mean() - confidence[inside].mean()).abs()
    return {'top1': 100 * correct.mean().item(), 'nll': F.nll_loss(log_probs, labels).item(),
            'ece': 100 * float(ece)}


def test_tta_metrics_are_those_of_the_averaged_predictions(data, tmp_path):
    tta = 2
    run = train_in_process(tiny_args(data, tmp_path / 'out', 'tta', '--tta', tta, '--lr', '0.02', epochs=3))
    row = read_summary(run)[-1]
    model = timm.create_model('test_resnet', num_classes=3)
    model.load_state_dict(load_state_dict(run / 'last.pth.tar'))
    images, labels = _validation_images(data, read_run_info(run)['data_config'])
    with torch.no_grad():
        logits = model.double().eval()(images.double())
    averaged = logits.view(-1, tta, logits.shape[1]).mean(1)  # groups of tta consecutive images
    expected = _metrics(averaged, labels[::tta])
    assert row['eval_top1'] == pytest.approx(expected['top1'], abs=1e-6)
    assert row['eval_nll'] == pytest.approx(expected['nll'], rel=1e-5)
    assert row['eval_ece'] == pytest.approx(expected['ece'], abs=1e-4)
    # The test can tell: the images one by one score otherwise.
    one_by_one = _metrics(logits, labels)
    assert abs(one_by_one['top1'] - expected['top1']) > 1 and abs(one_by_one['ece'] - expected['ece']) > 1


# ---------------------------------------------------------------------------------------------------------------
# Saved images


def _grid_size(batch: int) -> tuple:
    """(width, height) of torchvision's save_image grid without padding: 8 images a row."""
    return min(batch, 8) * IMG, -(-batch // 8) * IMG


@pytest.mark.parametrize('flags, batch', [([], 4), (['--aug-splits', '2'], 8)], ids=['plain', 'aug-splits'])
def test_save_images_writes_the_logged_batches(data, tmp_path, flags, batch):
    run = train_in_process(tiny_args(data, tmp_path / 'out', 'images', '--save-images', '--log-interval', '2',
                                     *flags, batch_size=4))
    # 24 images, batches of 4: steps 0 to 5, logged every 2nd and the last.
    assert sorted(p.name for p in run.glob('train-batch-*')) == [f'train-batch-{i}.jpg' for i in (0, 2, 4, 5)]
    with Image.open(run / 'train-batch-0.jpg') as image:
        assert image.format == 'JPEG' and image.mode == 'RGB'
        assert image.size == _grid_size(batch)
        assert np.asarray(image).std() > 10


def test_saved_images_are_the_batch_the_model_got(data, tmp_path):
    """Without augmentation the first batch is known: the seed's permutation of the training images (timm's
    distributed-sampler order, which the trainer keeps on one process), each as it is on disk at 16 px."""
    run = train_in_process(tiny_args(data, tmp_path / 'out', 'content', '--save-images', '--no-aug', batch_size=4))
    dataset = create_dataset('', root=str(data), split='train', is_training=True)
    generator = torch.Generator().manual_seed(42)  # the trainer's default --seed, epoch 0
    order = torch.randperm(len(dataset), generator=generator)[:4].tolist()
    other = [i for i in range(len(dataset)) if i not in order][:4]

    def grid(indices):
        row = np.concatenate([np.asarray(dataset[i][0].convert('RGB'), dtype=np.float64) for i in indices], axis=1)
        row = (row - row.min()) / (row.max() - row.min()) * 255  # save_image's normalize=True, over the batch
        return row @ LUMA  # compared in brightness: JPEG keeps it, but not the colour of these noisy images

    with Image.open(run / 'train-batch-0.jpg') as image:
        saved = np.asarray(image, dtype=np.float64) @ LUMA
    error, wrong = np.abs(saved - grid(order)).mean(), np.abs(saved - grid(other)).mean()
    assert error < 10 and wrong > 4 * error, (error, wrong)  # measured: 6.4 and 65 (of 255)
