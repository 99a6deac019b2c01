"""Real trainer runs published with ``--export-dir`` or ``--push-to-hub`` and loaded back with plain timm.

What a user downloads must be what the trainer trained and chose: the weights of ``model_best`` (its EMA weights
when they evaluated better) bit for bit, in the network the trainer built, architecture flags included
(``--model-kwargs``, ``--gp``, ``--in-chans``, ``--bn-eps``), so that the published model, with the
preprocessing it publishes, scores on the validation images what the trainer's summary.csv says.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import ImageDataset, create_transform, resolve_data_config

from timm_tfkd import hub
from timm_tfkd.checkpoint_io import read_checkpoint
from conftest import FakeHubApi, use_offline_hub, write_image_folder
from _train_helpers import (
    assert_state_dicts_equal, once_per_key, read_summary, tiny_args, train_in_process,
)

pytestmark = pytest.mark.slow

NUM_CLASSES = 3
HUB_ORG = 'org'


@dataclass(frozen=True)
class Case:
    """One trainer run: its flags, and the ``timm.create_model`` arguments those flags stand for."""
    name: str
    flags: Tuple[str, ...]
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    model: str = 'test_resnet'
    channels: int = 3
    img_size: int = 16
    epochs: int = 1
    push: bool = True  # --push-to-hub (export in OUTPUT/hub_export); else --export-dir only
    ema_better: Optional[bool] = None  # EMA runs: whether its eval top-1 beat the model's at the exported epoch


CASES = [
    Case('default', (), push=False),
    # Not the architecture but the preprocessing the published config.json must carry for the metrics to reproduce
    # (crop_pct 0.75: at 16 px timm's default 0.95 resizes to the same 16 px as 1.0 would).
    Case('preprocessing', ('--mean', '0.3', '0.4', '0.5', '--std', '0.2', '0.25', '0.3', '--crop-pct', '0.75',
                           '--interpolation', 'bicubic')),
    Case('model-kwargs', ('--model-kwargs', 'stem_width=8', 'channels=(16,24,24,48)'),
         {'stem_width': 8, 'channels': (16, 24, 24, 48)}),
    # At 16 px test_resnet ends on a 1x1 feature map, where max pooling equals average pooling; 48 px leaves 2x2.
    Case('gp-max', ('--gp', 'max'), {'global_pool': 'max'}, img_size=48),
    Case('in-chans-1', ('--in-chans', '1'), channels=1),  # in_chans comes from `channels`
    # bn_eps is a constructor argument of the EfficientNet family (ResNet refuses it). Its BatchNorm eps is a module
    # attribute, not a weight: only the outputs tell a model built with the default eps apart.
    Case('bn-eps', ('--bn-eps', '1e-3'), {'bn_eps': 1e-3}, model='test_efficientnet'),
    # Both EMA situations come from real runs (seed 0, one thread, exactly these settings; no summary.csv edit):
    # decay 0.999 keeps the EMA at its initial weights, at chance while the model learns; with decay 0.5 over 3
    # epochs and seed 3 the EMA average is ahead of the model at epoch 2 (91.7 % against 79.2 % top-1), and that
    # epoch is model_best (timm ranks by the EMA when it is validated). test_ema_runs_cover_both_choices says so if a
    # change of the training order or of a library moves that.
    Case('ema-worse', ('--model-ema', '--model-ema-decay', '0.999'), ema_better=False),
    Case('ema-better', ('--model-ema', '--model-ema-decay', '0.5', '--seed', '3'), epochs=3, ema_better=True),
]
EMA_CASES = [case for case in CASES if case.ema_better is not None]


@dataclass
class Published:
    """A finished run, where it was exported, and the names plain timm loads it by."""
    case: Case
    run_dir: Path
    export_dir: Path
    data_dir: Path
    sources: List[str]


@pytest.fixture(scope='module')
def hub_api(workdir):
    """The offline Hub for the whole module: ``timm_tfkd.hub.upload.HfApi`` is a fake whose uploads land in the cache that
    ``timm.create_model('hf-hub:...')`` then reads with HF_HUB_OFFLINE=1."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        api = FakeHubApi(use_offline_hub(monkeypatch, workdir / 'hf_home'))
        monkeypatch.setattr(hub.upload, 'HfApi', lambda **kwargs: api)
        yield api


@pytest.fixture(scope='module')
def data_dirs(workdir) -> Dict[int, Path]:
    return {channels: write_image_folder(workdir / f'data{channels}', channels=channels) for channels in (1, 3)}


def publish(case: Case, workdir: Path, data_dir: Path, api: FakeHubApi) -> Published:
    """Train ``case`` with the real trainer, which exports (and uploads) at the end."""
    output = workdir / 'out'
    if case.push:
        repo_id = f'{HUB_ORG}/{case.name}'
        flags = ('--push-to-hub', '--hub-model-id', repo_id)
        export_dir, sources = output / case.name / 'hub_export', [f'hf-hub:{repo_id}']
    else:
        export_dir = workdir / 'exports' / case.name
        flags, sources = ('--export-dir', export_dir), []
    run_dir = train_in_process(tiny_args(data_dir, output, case.name, '--seed', '0', *case.flags, *flags,
                                         model=case.model, epochs=case.epochs, img_size=case.img_size))
    if case.push:
        assert api.calls[-1][0] == 'upload_folder' and api.calls[-1][1]['folder_path'] == str(export_dir)
        assert api.uploaded_files == sorted(hub.EXPORT_FILES)
    return Published(case, run_dir, export_dir, data_dir, [f'local-dir:{export_dir}', *sources])


@pytest.fixture(scope='module')
def runs(workdir, data_dirs, hub_api):
    """``runs(case)``: the case trained and published once per module, however many tests ask for it."""
    return once_per_key(lambda case: publish(case, workdir, data_dirs[case.channels], hub_api),
                        key=lambda case: case.name)


@pytest.fixture(params=CASES, ids=lambda case: case.name)
def published(request, runs) -> Published:
    return runs(request.param)


def best_epoch_row(run_dir: Path) -> Dict[str, float]:
    """model_best's epoch and its summary.csv row."""
    epoch = read_checkpoint(str(run_dir / 'model_best.pth.tar'))['epoch']
    return next(row for row in read_summary(run_dir) if row['epoch'] == epoch)


def expected_weights(published: Published) -> Tuple[Dict[str, torch.Tensor], bool]:
    """What README promises is exported: model_best, its EMA weights when their eval top-1 was higher that epoch."""
    checkpoint = read_checkpoint(str(published.run_dir / 'model_best.pth.tar'))
    row = best_epoch_row(published.run_dir)
    # With an EMA, summary.csv's eval_* are the EMA's (as timm) and eval_model_* the model's.
    use_ema = 'state_dict_ema' in checkpoint and row['eval_top1'] > row['eval_model_top1']
    return checkpoint['state_dict_ema' if use_ema else 'state_dict'], use_ema


def trainer_network(published: Published) -> torch.nn.Module:
    """The network the trainer's flags ask for, built here with timm and given the exported weights."""
    case = published.case
    model = timm.create_model(case.model, num_classes=NUM_CLASSES, in_chans=case.channels, **case.model_kwargs)
    model.load_state_dict(expected_weights(published)[0])
    return model.eval()


def plain_timm(source: str) -> torch.nn.Module:
    return timm.create_model(source, pretrained=True).eval()


def validation_batch(model: torch.nn.Module, published: Published) -> Tuple[torch.Tensor, torch.Tensor]:
    """All validation images, preprocessed as a timm user would: from the model's own (published) data config."""
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    mode = 'L' if published.case.channels == 1 else 'RGB'
    dataset = ImageDataset(str(published.data_dir / 'validation'), input_img_mode=mode, transform=transform)
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels)


def test_plain_timm_loads_the_checkpoint_the_trainer_chose(published):
    expected, use_ema = expected_weights(published)
    for source in published.sources:
        assert_state_dicts_equal(plain_timm(source).state_dict(), expected)
    model, meta = hub.load_pretrained(published.sources[-1])
    assert_state_dicts_equal(model.state_dict(), expected)
    export = meta['export']
    assert (export['checkpoint'], export['epoch'], export['ema']) == (
        'model_best.pth.tar', best_epoch_row(published.run_dir)['epoch'], use_ema)


def test_plain_timm_builds_the_network_the_trainer_trained(published):
    reference = trainer_network(published)
    for source in published.sources:
        model = plain_timm(source)
        images, _ = validation_batch(model, published)
        with torch.no_grad():
            published_logits, trained_logits = model(images), reference(images)
        assert torch.equal(published_logits, trained_logits), f'{source}: other outputs than the trained network'


def test_published_model_reproduces_the_trainers_validation_metrics(published):
    """Weights, architecture and preprocessing together: the numbers summary.csv reports for the exported epoch."""
    row = best_epoch_row(published.run_dir)
    with_ema = 'eval_model_top1' in row  # then eval_* are the EMA's metrics
    prefix = 'eval_' if expected_weights(published)[1] or not with_ema else 'eval_model_'
    for source in published.sources:
        model = plain_timm(source)
        images, labels = validation_batch(model, published)
        with torch.no_grad():
            logits = model(images).double()
        top1 = 100.0 * (logits.argmax(dim=1) == labels).double().mean().item()
        nll = F.cross_entropy(logits, labels).item()
        assert top1 == pytest.approx(row[prefix + 'top1'], abs=1e-9), source
        assert nll == pytest.approx(row[prefix + 'nll'], rel=1e-6), source


@pytest.mark.parametrize('case', EMA_CASES, ids=lambda case: case.name)
def test_ema_runs_cover_both_choices(runs, case):
    """Each EMA run really is in the situation it stands for, and the other set of weights was not exported."""
    published = runs(case)
    row = best_epoch_row(published.run_dir)
    assert (row['eval_top1'] > row['eval_model_top1']) is published.case.ema_better, (
        f"the '{published.case.name}' run no longer has its EMA {'above' if published.case.ema_better else 'below'} "
        f"the model at model_best (epoch {row['epoch']}: EMA {row['eval_top1']}, model {row['eval_model_top1']}); "
        f'pick other EMA settings for it')
    checkpoint = read_checkpoint(str(published.run_dir / 'model_best.pth.tar'))
    other = checkpoint['state_dict' if published.case.ema_better else 'state_dict_ema']
    exported = plain_timm(published.sources[-1]).state_dict()
    assert any(not torch.equal(exported[key], other[key]) for key in other)
