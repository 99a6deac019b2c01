"""Bad input to the trainer and to ``timm-tfkd evaluate``: exit code 2, exactly one line on stderr naming the
problem, no traceback, and nothing written (no output folder; an earlier run folder unchanged).

One table row per kind of input: numbers out of range, output locations that cannot be written, data whose splits
or class count do not fit, checkpoints to resume that do not fit or are damaged, resumes with other settings, Hub
and teacher sources that cannot work.
"""
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from timm.models import create_model

from timm_tfkd.checkpoint_io import read_checkpoint
from timm_tfkd.cli import main as cli_main
from conftest import use_offline_hub, write_image_folder
from _train_helpers import call_main, run_subprocess, script_command, tiny_args, train_in_process
from _multilabel_data import write_wds


def _save_teacher(path: Path, model_name: str, num_classes: int = 3, in_chans: int = 3, **model_kwargs) -> Path:
    """A timm-style training checkpoint of a freshly built model (no training needed to test the checks), with the
    ``args`` of its run when it was built with model kwargs."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=num_classes, in_chans=in_chans, **model_kwargs)
    checkpoint = {'epoch': 0, 'arch': model_name, 'state_dict': model.state_dict()}
    if model_kwargs:
        checkpoint['args'] = {'model': model_name, 'model_kwargs': model_kwargs}
    torch.save(checkpoint, path)
    return path


def flip_a_weight_byte(source: Path, target: Path) -> Path:
    """Copy a training checkpoint with one bit changed inside its largest weight tensor, as a failing disk would
    (torch reads such a file without complaint: it does not check the zip's CRC)."""
    weights = read_checkpoint(str(source))['state_dict']
    largest = max(weights.values(), key=lambda t: t.numel()).contiguous()
    data = bytearray(source.read_bytes())
    position = data.find(largest.view(torch.uint8).numpy().tobytes()[:256])
    assert position >= 0
    data[position + 100] ^= 0x10
    target.write_bytes(bytes(data))
    return target


def _without_experiment(argv):
    argv = list(map(str, argv))
    index = argv.index('--experiment')
    return argv[:index] + argv[index + 2:]


def _mismatched_splits(root: Path) -> Path:
    """train {class_0, class_1, class_2}, validation {class_0, class_1, class_3}."""
    data = write_image_folder(root, per_class=3)
    (data / 'validation' / 'class_2').rename(data / 'validation' / 'class_3')
    return data


def _empty_train_class(root: Path) -> Path:
    """class_1's training folder exists but holds no image: timm's labels of class_2 would become 1."""
    data = write_image_folder(root, per_class=3)
    for image in (data / 'train' / 'class_1').iterdir():
        image.unlink()
    return data


@pytest.fixture(scope='module')
def paths(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp('bad-input')
    empty = root / 'empty'
    empty.mkdir()
    a_file = root / 'a-file'
    a_file.write_text('not a folder')
    not_an_export = root / 'not-an-export'
    not_an_export.mkdir()
    (not_an_export / 'notes.txt').write_text('keep me')
    corrupt = root / 'corrupt.pth.tar'
    corrupt.write_bytes(os.urandom(4096))
    bad_yaml = root / 'bad.yaml'
    bad_yaml.write_text('batch_size: eight\n')
    script_and_compile = root / 'script-and-compile.yaml'
    script_and_compile.write_text('torchscript: true\ntorchcompile: inductor\n')  # argparse alone refuses both
    stats = root / 'stats'
    stats.mkdir()
    (stats / 'not-json.json').write_text('pos_counts: [1, 2, 3]\n')
    (stats / 'no-counts.json').write_text('{"num_samples": 9}')
    (stats / 'five-classes.json').write_text('{"pos_counts": [1, 2, 3, 2, 1], "num_samples": 9}')
    (stats / 'three-classes.json').write_text('{"pos_counts": [4, 3, 2], "num_samples": 9}')
    teachers = root / 'teachers'
    teachers.mkdir()
    data = write_image_folder(root / 'data', per_class=3)  # 9 images: one batch of 8
    trained = train_in_process(tiny_args(data, root / 'runs', 'trained'))
    # Named as timm names a run without --experiment: what --resume auto without --experiment looks for.
    train_in_process(tiny_args(data, root / 'runs', '20260101-000000-test_resnet-16'))
    return SimpleNamespace(
        data=data,
        data5=write_image_folder(root / 'data5', classes=5, per_class=2),
        mismatched=_mismatched_splits(root / 'mismatched'),
        empty_class=_empty_train_class(root / 'empty-class'),
        a_file=a_file,
        not_an_export=not_an_export,
        runs=root / 'runs',
        trained=trained,
        damaged=flip_a_weight_byte(trained / 'last.pth.tar', root / 'damaged.pth.tar'),
        gray=write_image_folder(root / 'gray', per_class=3, channels=1),
        no_val=write_image_folder(root / 'no-val', per_class=3, splits=('train',)),
        empty=empty,
        missing=root / 'does-not-exist',
        corrupt=corrupt,
        bad_yaml=bad_yaml,
        script_and_compile=script_and_compile,
        stats=stats,
        wds=write_wds(root / 'wds'),
        teacher_effnet=_save_teacher(teachers / 'effnet.pth.tar', 'test_efficientnet'),
        teacher_5_classes=_save_teacher(teachers / 'resnet-5-classes.pth.tar', 'test_resnet', num_classes=5),
        teacher_rgb=_save_teacher(teachers / 'resnet-rgb.pth.tar', 'test_resnet'),
        teacher_vit=_save_teacher(teachers / 'vit.pth.tar', 'test_vit'),
        naflex_teacher_patch_16=_save_teacher(teachers / 'naflex-16.pth.tar', NAFLEX_MODEL,
                                              **{**NAFLEX_KWARGS, 'patch_size': 16}),
        naflex_teacher_c_p_p=_save_teacher(teachers / 'naflex-cpp.pth.tar', NAFLEX_MODEL, **NAFLEX_KWARGS,
                                           patchify_channels_last=False),
    )


def _args(data, *extra, **kwargs):
    return lambda p, out: tiny_args(getattr(p, data), out, 'bad', *extra, **kwargs)


NAFLEX_MODEL = 'naflexvit_base_patch16_gap'
NAFLEX_KWARGS = {'embed_dim': 32, 'depth': 1, 'num_heads': 2, 'patch_size': 8}
NAFLEX = ('--model-kwargs', *(f'{k}={v}' for k, v in NAFLEX_KWARGS.items()), '--naflex-loader')
SIZES = ('--train-img-sizes', '16', '24')


def _naflex(*extra, teacher=None):
    """A tiny NaFlexViT run on the NaFlex loader, taught by the paths' teacher ``teacher`` (kd) when given."""
    def build(p, out):
        taught = ('--tfkd-mode', 'kd', '--tfkd-teacher-model', NAFLEX_MODEL, '--tfkd-teacher-checkpoint',
                  getattr(p, teacher)) if teacher else ()
        return tiny_args(p.data, out, 'bad', *NAFLEX, *taught, *extra, model=NAFLEX_MODEL)
    return build


# id -> (argv builder (paths, output) -> argv, words the error line must contain)
CASES = {
    'unknown-model': (_args('data', model='no_such_model_xyz'), ['unknown model', 'no_such_model_xyz']),
    'missing-data-dir': (_args('missing'), ['--data-dir', 'does-not-exist', 'not a folder']),
    'empty-data-dir': (_args('empty'), ['--data-dir', 'empty']),
    'missing-validation-split': (_args('no_val'), ["'validation'", 'split']),
    'teacher-missing': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--tfkd-mode', 'self', '--tfkd-teacher-checkpoint',
                                 p.missing / 'teacher.pth.tar'),
        ['teacher', 'does not exist']),
    'teacher-corrupt': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--tfkd-mode', 'self', '--tfkd-teacher-checkpoint', p.corrupt),
        ['corrupt.pth.tar', 'corrupt']),
    'teacher-other-architecture': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--tfkd-mode', 'self', '--tfkd-teacher-checkpoint',
                                 p.teacher_effnet),
        ['teacher', 'test_resnet', 'does not fit']),
    'teacher-other-num-classes': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--tfkd-mode', 'self', '--tfkd-teacher-checkpoint',
                                 p.teacher_5_classes),
        ['teacher', '5 classes']),
    'teacher-other-in-chans': (
        lambda p, out: tiny_args(p.gray, out, 'bad', '--in-chans', '1', '--tfkd-mode', 'kd',
                                 '--tfkd-teacher-model', 'test_resnet', '--tfkd-teacher-checkpoint', p.teacher_rgb),
        ['teacher', '3 input channels']),
    'self-without-teacher': (_args('data', '--tfkd-mode', 'self'), ['--tfkd-mode self', '--tfkd-teacher-checkpoint']),
    'alpha-out-of-range': (_args('data', '--tfkd-mode', 'reg', '--tfkd-alpha', '1.5'), ['--tfkd-alpha', '1.5']),
    'temperature-zero': (_args('data', '--tfkd-mode', 'reg', '--tfkd-temperature', '0'), ['--tfkd-temperature']),
    'correct-prob-below-1-over-k': (
        _args('data', '--tfkd-mode', 'reg', '--tfkd-correct-prob', '0.2'), ['--tfkd-correct-prob', '0.2', 'K=3']),
    'kd-model-name-with-tfkd': (
        _args('data', '--kd-model-name', 'resnet18', '--tfkd-mode', 'reg'), ['--kd-model-name', '--tfkd-mode reg']),
    'resume-missing-file': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--resume', p.missing / 'last.pth.tar'),
        ['--resume', 'does not exist']),
    'config-wrong-type': (
        lambda p, out: ['-c', p.bad_yaml, *tiny_args(p.data, out, 'bad')], ["'batch_size'", 'an integer', 'eight']),
    # Numbers that timm or torch would take unchecked.
    'epochs-zero': (_args('data', epochs=0), ['--epochs', '>= 1', 'got 0']),
    'batch-size-zero': (_args('data', batch_size=0), ['--batch-size', '>= 1']),
    'validation-batch-size-zero': (_args('data', '-vb', '0'), ['--validation-batch-size', '>= 1']),
    'img-size-zero': (_args('data', img_size=0), ['--img-size', '>= 1']),
    'input-size-zero': (_args('data', '--input-size', '3', '0', '16'), ['--input-size', '>= 1']),
    'workers-negative': (_args('data', '-j', '-1'), ['--workers', '>= 0']),
    'log-interval-zero': (_args('data', '--log-interval', '0'), ['--log-interval']),
    'val-interval-zero': (_args('data', '--val-interval', '0'), ['--val-interval']),
    'recovery-interval-negative': (_args('data', '--recovery-interval', '-1'), ['--recovery-interval']),
    'checkpoint-hist-zero': (_args('data', '--checkpoint-hist', '0'), ['--checkpoint-hist']),
    'grad-accum-steps-zero': (_args('data', '--grad-accum-steps', '0'), ['--grad-accum-steps']),
    'stop-epoch-zero': (_args('data', '--stop-epoch', '0'), ['--stop-epoch']),
    'save-epochs-zero': (_args('data', '--save-epochs', '0'), ['--save-epochs']),
    'smoothing-one': (_args('data', '--smoothing', '1'), ['--smoothing', '[0, 1)']),
    'mixup-prob-above-one': (_args('data', '--mixup', '0.2', '--mixup-prob', '1.5'), ['--mixup-prob', '1.5']),
    'hflip-nan': (_args('data', '--hflip', 'nan'), ['--hflip', 'nan']),
    'reprob-negative': (_args('data', '--reprob', '-0.1'), ['--reprob']),
    'drop-one': (_args('data', '--drop', '1'), ['--drop', '[0, 1)']),
    'scale-reversed': (_args('data', '--scale', '0.9', '0.2'), ['--scale', '0.9 0.2']),
    'lr-zero': (_args('data', '--lr', '0'), ['--lr', '> 0']),
    'weight-decay-negative': (_args('data', '--weight-decay', '-1'), ['--weight-decay']),
    'model-ema-decay-above-one': (_args('data', '--model-ema', '--model-ema-decay', '2'), ['--model-ema-decay']),
    'num-classes-zero': (_args('data', num_classes=0), ['--num-classes', '>= 1']),
    'mean-count': (_args('data', '--mean', '0.5', '0.5'), ['--mean', '1 or 3 values']),
    'eval-metric-unknown': (_args('data', '--eval-metric', 'accuracy'), ['--eval-metric', 'accuracy']),
    'kd-temperature-zero': (_args('data', '--kd-temperature', '0'), ['--kd-temperature']),
    'multiplier-zero': (_args('data', '--tfkd-mode', 'reg', '--tfkd-multiplier', '0'), ['--tfkd-multiplier']),
    'sched-unknown': (_args('data', '--sched', 'sometimes'), ['--sched', 'sometimes']),
    'device-missing': (_args('data', '--device', 'mps'), ["'mps'", 'not available']),
    # Output locations that cannot be written.
    'output-is-a-file': (lambda p, out: tiny_args(p.data, p.a_file, 'bad'), ['--output', 'a-file', 'not a folder']),
    'output-under-a-file': (
        lambda p, out: tiny_args(p.data, p.a_file / 'runs', 'bad'), ['--output', 'a-file', 'not a folder']),
    'output-not-writable': (lambda p, out: tiny_args(p.data, '/sys/tfkd-runs', 'bad'), ['--output', 'cannot be written']),
    'export-dir-not-empty': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--export-dir', p.not_an_export), ['--export-dir', 'not empty']),
    'push-to-hub-without-id': (_args('data', '--push-to-hub'), ['--push-to-hub', '--hub-model-id']),
    'hub-model-id-invalid': (_args('data', '--push-to-hub', '--hub-model-id', 'no-org'), ["'no-org'", 'org/name']),
    # Data that does not fit.
    'splits-with-other-classes': (_args('mismatched'), ['different classes', 'class_2', 'class_3']),
    'empty-class-folder': (_args('empty_class'), ['different classes', 'class_1', 'empty class folder']),
    'num-classes-not-the-data': (_args('data', num_classes=5), ['--num-classes 5', '3 classes']),
    'fewer-images-than-a-batch': (_args('data', batch_size=16), ['9 images', 'fewer than one batch', '16']),
    # Checkpoints and resumes that do not fit.
    'resume-another-model': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--resume', p.trained / 'last.pth.tar', model='test_efficientnet'),
        ['--resume checkpoint', "'test_efficientnet'", 'does not fit']),
    'resume-other-class-count': (
        lambda p, out: tiny_args(p.data5, out, 'bad', '--resume', p.trained / 'last.pth.tar', num_classes=5),
        ['--resume checkpoint', 'has 3 classes', 'the model has 5']),
    'resume-damaged-checkpoint': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--resume', p.damaged), ['damaged.pth.tar', 'damaged', 'checksum']),
    'resume-auto-other-settings': (
        lambda p, out: tiny_args(p.data, p.runs, 'trained', '--resume', 'auto', '--lr', '0.2'),
        ['trained', 'other settings', '--lr 0.2 (was 0.05)']),
    'resume-auto-no-experiment-other-settings': (
        lambda p, out: _without_experiment(tiny_args(p.data, p.runs, 'x', '--resume', 'auto', '--seed', '7')),
        ['--resume auto', 'test_resnet', '--seed 7 (was 42)']),
    # AugMix splits, TorchScript and test-time augmentation that cannot work (timm asserts against most).
    'aug-splits-one': (_args('data', '--aug-splits', '1'), ['--aug-splits', 'must be 0 or >= 2', 'got 1']),
    'aug-splits-with-mixup': (_args('data', '--aug-splits', '2', '--mixup', '0.2'), ['--aug-splits', '--mixup']),
    'aug-splits-with-no-aug': (_args('data', '--aug-splits', '2', '--no-aug'), ['--aug-splits', '--no-aug']),
    'split-bn-without-splits': (_args('data', '--split-bn'), ['--split-bn', '--aug-splits', '--resplit']),
    'split-bn-halves-of-an-odd-batch': (
        _args('data', '--split-bn', '--resplit', batch_size=7), ['--split-bn', 'even', 'got 7']),
    'split-bn-with-sync-bn': (
        _args('data', '--aug-splits', '2', '--split-bn', '--sync-bn'), ['--split-bn', '--sync-bn']),
    'jsd-loss-without-splits': (_args('data', '--jsd-loss'), ['--jsd-loss', '--aug-splits']),
    'jsd-loss-with-bce': (_args('data', '--aug-splits', '2', '--jsd-loss', '--bce-loss'), ['--jsd-loss', '--bce-loss']),
    'jsd-loss-with-reg': (
        _args('data', '--aug-splits', '2', '--jsd-loss', '--tfkd-mode', 'reg'), ['--jsd-loss', '--tfkd-mode reg']),
    'jsd-loss-with-self': (
        _args('data', '--aug-splits', '2', '--jsd-loss', '--tfkd-mode', 'self'), ['--jsd-loss', '--tfkd-mode self']),
    'jsd-loss-with-multilabel': (
        _args('data', '--aug-splits', '2', '--jsd-loss', '--task', 'multilabel', '--dataset', 'wds/ml'),
        ['--jsd-loss', '--task multilabel']),
    'jsd-loss-with-class-weights': (
        _args('data', '--aug-splits', '2', '--jsd-loss', '--tfkd-mode', 'lsr', '--loss-class-weight', '1,2,3'),
        ['--jsd-loss', '--loss-class-weight']),
    'jsd-loss-with-reference-smoothing': (
        _args('data', '--aug-splits', '2', '--jsd-loss', '--tfkd-mode', 'lsr', '--tfkd-smoothing-convention',
              'reference'), ['--jsd-loss', 'reference']),
    'torchscript-with-torchcompile': (
        lambda p, out: ['-c', p.script_and_compile, *tiny_args(p.data, out, 'bad')],
        ['--torchscript', '--torchcompile']),
    'torchscript-with-sync-bn': (_args('data', '--torchscript', '--sync-bn'), ['--torchscript', '--sync-bn']),
    'torchscript-with-split-bn': (
        _args('data', '--torchscript', '--aug-splits', '2', '--split-bn'), ['--torchscript', '--split-bn']),
    'fuser-unknown': (_args('data', '--fuser', 'fast'), ['--fuser', "'fast'"]),
    'fuser-nvfuser': (_args('data', '--fuser', 'nvfuser'), ['--fuser nvfuser', 'no nvfuser']),
    'tta-batch-not-a-multiple': (_args('data', '--tta', '3'), ['--tta 3', 'batch size (8)', 'multiples of 3']),
    'tta-split-not-a-multiple': (_args('data', '--tta', '2'), ['--tta 2', 'images validated (9)', 'multiples of 2']),
    # Loss weights (--class-stats and timm's weight flags) that cannot work.
    'class-stats-missing': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--tfkd-mode', 'reg', '--class-stats', p.missing / 'stats.json',
                                 '--loss-class-weight', 'inv_freq'),
        ['--class-stats', 'stats.json', 'cannot be read']),
    'class-stats-not-json': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--tfkd-mode', 'reg', '--class-stats',
                                 p.stats / 'not-json.json', '--loss-class-weight', 'inv_freq'),
        ['--class-stats', 'not-json.json', 'not valid JSON']),
    'class-stats-unreadable': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--tfkd-mode', 'lsr', '--class-stats', p.stats,
                                 '--loss-class-weight', 'inv_freq'),
        ['--class-stats', 'cannot be read']),
    'class-stats-without-counts': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--tfkd-mode', 'reg', '--class-stats',
                                 p.stats / 'no-counts.json', '--loss-class-weight', 'inv_freq'),
        ['--class-stats', "'pos_counts'"]),
    'class-stats-other-class-count': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--tfkd-mode', 'reg', '--class-stats',
                                 p.stats / 'five-classes.json', '--loss-class-weight', 'inv_freq'),
        ['--class-stats', 'five-classes.json', '5 entries', '3 classes']),
    'class-stats-unused-other-class-count': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--tfkd-mode', 'lsr', '--class-stats',
                                 p.stats / 'five-classes.json'),
        ['--class-stats', 'five-classes.json', '5 entries', '3 classes']),
    'class-weight-other-count': (
        _args('data', '--tfkd-mode', 'lsr', '--loss-class-weight', '1,2'), ['--loss-class-weight 1,2', '2 entries',
                                                                             '3 classes']),
    'class-weight-not-numbers': (
        _args('data', '--tfkd-mode', 'lsr', '--loss-class-weight', 'weights.json'),
        ['--loss-class-weight', 'weights.json', 'existing file']),
    'class-weight-method-without-stats': (
        _args('data', '--tfkd-mode', 'reg', '--loss-class-weight', 'inv_freq'), ['inv_freq', 'requires class stats']),
    'class-weight-method-of-pos-weight': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--tfkd-mode', 'reg', '--class-stats',
                                 p.stats / 'three-classes.json', '--loss-class-weight', 'neg_pos'),
        ['--loss-class-weight neg_pos', 'pos_weight']),
    'loss-weight-power-negative': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--tfkd-mode', 'reg', '--class-stats',
                                 p.stats / 'three-classes.json', '--loss-class-weight', 'inv_freq',
                                 '--loss-weight-power', '-0.5'),
        ['--loss-weight-power', '>= 0', '-0.5']),
    'loss-weight-beta-one': (_args('data', '--loss-weight-beta', '1'), ['--loss-weight-beta', '[0, 1)']),
    'class-weight-on-timm-cross-entropy': (
        _args('data', '--loss-class-weight', '1,2,3'), ["timm's criterion", 'only supported by bce']),
    'pos-weight-with-tfkd': (
        _args('data', '--tfkd-mode', 'reg', '--loss-pos-weight', '2'), ['--loss-pos-weight', '--tfkd-mode reg']),
    # Multi-label training (--task multilabel) where it is not defined or cannot work.
    'multilabel-reg': (_args('data', '--task', 'multilabel', '--dataset', 'wds/ml', '--tfkd-mode', 'reg'),
                       ['--task multilabel', '--tfkd-mode reg', 'until defined']),
    'multilabel-self': (
        _args('data', '--task', 'multilabel', '--dataset', 'wds/ml', '--tfkd-mode', 'self'),
        ['--task multilabel', '--tfkd-mode self', 'until defined']),
    'multilabel-kd': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--task', 'multilabel', '--dataset', 'wds/ml', '--tfkd-mode',
                                 'kd', '--tfkd-teacher-checkpoint', p.teacher_rgb, '--tfkd-teacher-model',
                                 'test_resnet'),
        ['--task multilabel', '--tfkd-mode kd', 'until defined']),
    'multilabel-lsr-reference-convention': (
        _args('data', '--task', 'multilabel', '--dataset', 'wds/ml', '--tfkd-mode', 'lsr',
              '--tfkd-smoothing-convention', 'reference'), ['--tfkd-smoothing-convention reference', 'until defined']),
    'multilabel-class-index-out-of-range': (
        lambda p, out: tiny_args(p.wds, out, 'bad', '--task', 'multilabel', '--dataset', 'wds/tiny', '--target-key',
                                 'labels', num_classes=3), ['--task multilabel', '--num-classes 3', 'must be in [0, 3)']),
    'multilabel-multihot-of-another-length': (
        lambda p, out: tiny_args(p.wds, out, 'bad', '--task', 'multilabel', '--dataset', 'wds/tiny', '--target-key',
                                 'multihot', '--target-format', 'multihot', num_classes=3),
        ['--num-classes 3 --target-format multihot', 'must have 3 entries, got 4']),
    'multilabel-folder-dataset': (_args('data', '--task', 'multilabel'), ['--task multilabel', "'folder'"]),
    'multilabel-eval-metric-top1': (
        _args('data', '--task', 'multilabel', '--dataset', 'wds/ml', '--eval-metric', 'top1'),
        ['--eval-metric', 'map', 'multilabel', "'top1'"]),
    'target-format-multihot-single-label': (
        _args('data', '--target-format', 'multihot'), ['--target-format multihot', '--task multilabel']),
    'target-format-unknown': (
        _args('data', '--task', 'multilabel', '--dataset', 'wds/ml', '--target-format', 'dense'),
        ['--target-format', 'indices, multihot', "'dense'"]),
    # Variable-resolution loaders: what timm refuses or fails on, and students or teachers that cannot read the batches.
    'naflex-with-train-img-sizes': (_naflex(*SIZES), ['--naflex-loader', '--train-img-sizes', 'alternative']),
    'naflex-with-multi-epochs-loader': (_naflex('--use-multi-epochs-loader'), ['--use-multi-epochs-loader',
                                                                             '--naflex-loader']),
    'train-img-sizes-with-multi-epochs-loader': (
        _args('data', *SIZES, '--use-multi-epochs-loader'), ['--use-multi-epochs-loader', '--train-img-sizes']),
    'naflex-with-aug-splits': (_naflex('--aug-splits', '2'), ['--aug-splits', '--naflex-loader']),
    'naflex-with-save-images': (_naflex('--save-images'), ['--save-images', '--naflex-loader', 'not images']),
    'torchscript-of-an-unscriptable-model': (_naflex('--torchscript'), ['--torchscript', 'cannot script',
                                                                        NAFLEX_MODEL]),
    'naflex-with-aug-repeats': (_naflex('--aug-repeats', '3'), ['--aug-repeats', '--naflex-loader']),
    'train-batch-sizes-count': (_args('data', *SIZES, '--train-batch-sizes', '8'),
                                ['--train-batch-sizes', 'one value for each of the 2', 'got 1']),
    'train-size-probs-count': (_args('data', *SIZES, '--train-size-probs', '0.2', '0.3', '0.5'),
                               ['--train-size-probs', 'one value for each of the 2', 'got 3']),
    'train-size-probs-zero-sum': (_args('data', *SIZES, '--train-size-probs', '0', '0'),
                                  ['--train-size-probs', 'positive sum', '0 0']),
    'train-size-probs-negative': (_args('data', *SIZES, '--train-size-probs', '-1', '2'),
                                  ['--train-size-probs', '>= 0']),
    'progressive-one-size': (_args('data', '--train-img-sizes', '16', '--train-size-schedule', 'progressive'),
                             ['--train-size-schedule progressive', 'two --train-img-sizes']),
    'train-img-sizes-zero': (_args('data', '--train-img-sizes', '16', '0'), ['--train-img-sizes', '>= 1']),
    'scheduled-batch-larger-than-data': (_args('data', '--train-img-sizes', '16', '--train-batch-sizes', '16'),
                                         ['9 images', 'too few', '--train-img-sizes', '[16]']),
    'teacher-cannot-take-train-img-sizes': (
        lambda p, out: tiny_args(p.data, out, 'bad', *SIZES, '--tfkd-mode', 'kd', '--tfkd-teacher-model', 'test_vit',
                                 '--tfkd-teacher-checkpoint', p.teacher_vit),
        ["teacher 'test_vit'", '24x24', '--train-img-sizes']),
    'naflex-seq-len-zero': (_naflex('--naflex-train-seq-lens', '0', '16'), ['--naflex-train-seq-lens', '>= 1']),
    'naflex-patch-size-probs-count': (_naflex('--naflex-patch-sizes', '8', '--naflex-patch-size-probs', '0.5', '0.5'),
                                      ['--naflex-patch-size-probs', 'one value for each of the 1']),
    'naflex-not-a-naflex-model': (_args('data', '--naflex-loader'), ["'test_resnet'", 'get_patch_size']),
    'naflex-other-layout': (_naflex('--naflex-patchify-channels-first'),
                            [NAFLEX_MODEL, 'reads P-P-C patches', 'C-P-P', 'patchify_channels_last=False']),
    'naflex-patch-sizes-without-interpolation': (_naflex('--naflex-patch-sizes', '4', '8'),
                                                 [NAFLEX_MODEL, 'cannot read 4x4 patches']),
    'naflex-teacher-not-naflex': (
        lambda p, out: tiny_args(p.data, out, 'bad', *NAFLEX, '--tfkd-mode', 'kd', '--tfkd-teacher-model',
                                 'test_resnet', '--tfkd-teacher-checkpoint', p.teacher_rgb, model=NAFLEX_MODEL),
        ["teacher 'test_resnet'", '--naflex-loader', 'get_patch_size']),
    'naflex-teacher-other-patch-size': (_naflex(teacher='naflex_teacher_patch_16'),
                                        [f"teacher '{NAFLEX_MODEL}'", 'cannot read 8x8 patches']),
    'naflex-teacher-other-layout': (_naflex(teacher='naflex_teacher_c_p_p'),
                                    [f"teacher '{NAFLEX_MODEL}'", 'reads C-P-P patches', 'P-P-C']),
    'kd-model-name-unreachable': (
        _args('data', '--kd-model-name', 'resnet18'), ['--kd-model-name resnet18', 'not in the local Hub cache']),
}

# These go through a real process too: an argparse-level failure and one found after logging has started.
SUBPROCESS_CASES = ('config-wrong-type', 'teacher-corrupt')


def _check_error(code: int, stderr: str, words, output: Path) -> None:
    assert code == 2, stderr
    assert 'Traceback' not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f'stderr has {len(lines)} lines:\n{stderr}'
    assert 'error:' in lines[0]
    for word in words:
        assert word in lines[0], f'{word!r} not in {lines[0]!r}'
    assert not output.exists(), f'{output} was created'


def _snapshot(folder: Path):
    return {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}


def test_the_table_covers_at_least_forty_inputs():
    assert len(CASES) >= 40


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_in_process(case, paths, tmp_path, capsys, monkeypatch):
    use_offline_hub(monkeypatch, tmp_path / 'hf_home')  # no Hub weights can be had here
    build, words = CASES[case]
    output = tmp_path / 'out'
    runs_before, trained_before = _snapshot(paths.runs), _snapshot(paths.trained)
    code = call_main(build(paths, output))
    _check_error(code, capsys.readouterr().err, words, output)
    assert _snapshot(paths.runs) == runs_before and _snapshot(paths.trained) == trained_before


EVALUATE_CASES = {
    'batch-size-zero': (['-b', '0'], ['batch size', '>= 1']),
    'workers-negative': (['-j', '-1'], ['workers']),
    'device-missing': (['--device', 'cuda:1'], ["'cuda:1'", 'not available']),
    'split-missing': (['--split', 'holdout'], ["'holdout'"]),
    'checkpoint-missing': (['--checkpoint', 'checkpoint-9.pth.tar'], ['checkpoint-9.pth.tar', 'does not exist']),
    'checkpoint-damaged': (['--checkpoint', '{damaged}'], ['damaged', 'checksum']),
}


@pytest.mark.parametrize('case', list(EVALUATE_CASES))
def test_evaluate_bad_input(case, paths, capsys):
    extra, words = EVALUATE_CASES[case]
    extra = [word.format(damaged=paths.damaged) for word in extra]
    assert cli_main(['evaluate', str(paths.trained), '--data-dir', str(paths.data), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('timm-tfkd: error: ') and 'Traceback' not in err, err
    for word in words:
        assert word in err, (word, err)


def test_tfkd_flags_the_mode_ignores_are_one_warning(paths, tmp_path, capsys):
    run = train_in_process(tiny_args(paths.data, tmp_path / 'out', 'ignored', '--tfkd-alpha', '0.5',
                                     '--tfkd-correct-prob', '0.9'))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith('WARNING')]
    assert warnings == ['WARNING: --tfkd-alpha, --tfkd-correct-prob are ignored by --tfkd-mode none, which does not '
                        'read them']
    assert run.is_dir()


@pytest.mark.slow
@pytest.mark.parametrize('case', SUBPROCESS_CASES)
def test_bad_input_subprocess(case, paths, tmp_path):
    build, words = CASES[case]
    output = tmp_path / 'out'
    result = run_subprocess(script_command(build(paths, output)), timeout=120)
    _check_error(result.returncode, result.stderr, words, output)


def test_config_keys_of_a_newer_timm_are_one_warning(paths, tmp_path, capsys):
    config = tmp_path / 'newer.yaml'
    config.write_text('flag_of_a_newer_timm: 3\nbatch_size: 8\n')
    run = train_in_process(['-c', config, *tiny_args(paths.data, tmp_path / 'out', 'newer')])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith('WARNING')]
    assert len(warnings) == 1 and "'flag_of_a_newer_timm' is not a flag of this timm version, ignored" in warnings[0]
    assert 'flag_of_a_newer_timm' not in (run / 'args.yaml').read_text()
