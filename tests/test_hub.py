"""Hub export, upload and loading, all offline: a real timm run folder, a fake HfApi and a hand-built Hub cache."""
import argparse
import csv
import getpass
import hashlib
import json
import logging
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file
from timm.utils import CheckpointSaver, ModelEmaV3

from timm_tfkd import hub
from timm_tfkd.checkpoint_io import CheckpointError
from timm_tfkd.cli import main
from timm_tfkd.train import publish

from conftest import FakeHubApi

NUM_CLASSES = 4
CLASS_NAMES = ['T-shirt', 'Trouser', 'Pullover', 'Dress']
TOP1 = (60.0, 80.0, 70.0)  # epoch 1 is model_best, epoch 2 is last
BEST_EPOCH, LAST_EPOCH = 1, 2
REPO_ID = 'org/name'
FAKE_TOKEN = 'hf_' + 'T0kEnFAKEsecret' * 3
TOKEN_LIKE = re.compile(r'hf_[A-Za-z0-9]{20,}')

# Every test runs against an empty offline Hub cache with no token reachable (conftest.offline_hub).
pytestmark = pytest.mark.usefixtures('offline_hub')


@dataclass
class TrainedRun:
    """A run folder plus the weights it saved, to compare exports against."""
    root: Path
    run_dir: Path
    states: Dict[int, Dict[str, torch.Tensor]]
    ema_states: Dict[int, Dict[str, torch.Tensor]]


def _train_args(root: Path, ema: bool, mode: str) -> argparse.Namespace:
    # Absolute local paths on purpose: none of them may reach the export.
    return argparse.Namespace(
        model='test_resnet', num_classes=NUM_CLASSES, in_chans=1, gp=None, model_kwargs={}, pretrained=False,
        dataset='torch/fashion_mnist', data_dir=str(root / 'data'), output=str(root / 'output'),
        epochs=len(TOP1), seed=42, batch_size=32, opt='sgd', lr=None, lr_base=0.1, lr_base_size=256,
        momentum=0.9, weight_decay=5e-4, sched='cosine', warmup_epochs=0, min_lr=0.0, mixup=0.0, cutmix=0.0,
        amp=False, model_ema=ema, model_ema_decay=0.9, smoothing=0.0,
        tfkd_mode=mode, tfkd_formula='paper', tfkd_alpha=0.1, tfkd_temperature=20.0, tfkd_correct_prob=0.99,
        tfkd_multiplier=1.0, tfkd_teacher_model='test_resnet',
        tfkd_teacher_checkpoint=str(root / 'teacher-run' / 'model_best.pth.tar'),
    )


def _summary_row(epoch: int, top1: float, ema: bool, ema_better: bool) -> Dict[str, float]:
    row = {'epoch': epoch, 'train_loss': 2.0 - 0.3 * epoch, 'train_task_loss': 1.8 - 0.3 * epoch,
           'train_kd_loss': 0.2, 'eval_loss': 1.5 - 0.2 * epoch, 'eval_top1': top1, 'eval_top5': 100.0,
           'eval_nll': 1.5 - 0.2 * epoch, 'eval_ece': 0.05, 'lr': 0.01}
    if ema:
        ema_top1 = top1 + 5 if ema_better else top1 - 5
        row.update(eval_ema_loss=1.4, eval_ema_top1=ema_top1, eval_ema_top5=100.0, eval_ema_nll=1.4,
                   eval_ema_ece=0.04)
    return row


def _run_info(args: argparse.Namespace, last_row: Dict[str, float]) -> Dict[str, Any]:
    metrics = {name: last_row[f'eval_{name}'] for name in ('top1', 'top5', 'nll', 'ece')}
    ema_metrics = {name: last_row[f'eval_ema_{name}'] for name in ('top1', 'top5', 'nll', 'ece')} \
        if args.model_ema else None
    return {
        'model': args.model, 'num_classes': NUM_CLASSES, 'in_chans': 1, 'class_names': CLASS_NAMES,
        'data_config': {'input_size': [1, 28, 28], 'mean': [0.286], 'std': [0.353], 'crop_pct': 1.0,
                        'crop_mode': 'center', 'interpolation': 'bilinear'},
        'tfkd': {'mode': args.tfkd_mode, 'formula': 'paper', 'alpha': 0.1, 'temperature': 20.0,
                 'correct_prob': 0.99, 'multiplier': 1.0, 'smoothing': 0.0,
                 'teacher': {'model': 'test_resnet', 'source': 'model_best.pth.tar', 'sha256': 'ab' * 32}
                 if args.tfkd_mode in ('self', 'kd') else None},
        'dataset': args.dataset, 'train_split': 'train', 'eval_split': 'test', 'epochs': args.epochs,
        'seed': args.seed,
        'versions': {'timm': timm.__version__, 'timm_tfkd': '0.1.0', 'torch': torch.__version__},
        'final_metrics': metrics, 'final_ema_metrics': ema_metrics, 'best_epoch': BEST_EPOCH,
    }


def _write_summary(path: Path, rows: List[Dict[str, float]]) -> None:
    with path.open('w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _clone(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state_dict.items()}


def build_run(root: Path, ema: bool = False, ema_better: bool = False, mode: str = 'self',
              model_name: str = 'test_resnet') -> TrainedRun:
    """Train nothing, but save what timm's train.py would: CheckpointSaver files, summary, args, run_info."""
    torch.manual_seed(0)
    run_dir = root / 'output' / 'train' / 'tfkd-run'
    run_dir.mkdir(parents=True)
    model = timm.create_model(model_name, num_classes=NUM_CLASSES, in_chans=1, pretrained=False)
    model_ema = ModelEmaV3(model, decay=0.9) if ema else None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = _train_args(root, ema, mode)
    args.model = model_name
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=model_ema, checkpoint_dir=str(run_dir),
                            recovery_dir=str(run_dir), decreasing=False, max_history=2, task=None)
    states, ema_states, rows = {}, {}, []
    for epoch, top1 in enumerate(TOP1):
        with torch.no_grad():  # distinct weights per epoch, so the chosen checkpoint is identifiable
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        if model_ema is not None:
            model_ema.update(model)
            ema_states[epoch] = _clone(model_ema.module.state_dict())
        states[epoch] = _clone(model.state_dict())
        saver.save_checkpoint(epoch, metric=top1)
        rows.append(_summary_row(epoch, top1, ema, ema_better))
    _write_summary(run_dir / 'summary.csv', rows)
    (run_dir / 'args.yaml').write_text(yaml.safe_dump(vars(args), default_flow_style=False))
    (run_dir / 'run_info.json').write_text(json.dumps(_run_info(args, rows[-1]), indent=2))
    return TrainedRun(root=root, run_dir=run_dir, states=states, ema_states=ema_states)


@pytest.fixture
def make_run(tmp_path: Path):
    """Factory: ``make_run(ema=..., ema_better=..., mode=...)`` builds a run folder under its own tmp root."""
    counter = iter(range(100))

    def _make(**kwargs: Any) -> TrainedRun:
        return build_run(tmp_path / f'run{next(counter)}', **kwargs)
    return _make


def assert_weights_equal(model: torch.nn.Module, expected: Dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key


def text_files(folder: Path) -> List[Path]:
    return [p for p in folder.rglob('*') if p.is_file() and p.suffix not in ('.safetensors', '.png')]


def local_user_names() -> List[str]:
    names = [getpass.getuser()]
    try:
        names.append(os.getlogin())
    except OSError:  # no controlling terminal (CI)
        pass
    return [n for n in names if len(n) > 1]


# ---------------------------------------------------------------------------------------------------------------
# export_run


def test_export_writes_exactly_the_hub_files(make_run):
    run = make_run()
    out = hub.export_run(run.run_dir, run.root / 'export')
    assert sorted(p.name for p in out.iterdir()) == sorted(hub.EXPORT_FILES)

    meta = json.loads((out / 'tfkd.json').read_text())
    assert meta['format'] == hub.EXPORT_FORMAT
    assert meta['tfkd'] == {'mode': 'self', 'formula': 'paper', 'alpha': 0.1, 'tau': 20.0, 'a': 0.99,
                            'multiplier': 1.0, 'smoothing': 0.0,
                            'teacher': {'model': 'test_resnet', 'source': 'model_best.pth.tar', 'sha256': 'ab' * 32}}
    assert (meta['dataset'], meta['epochs'], meta['seed']) == ('torch/fashion_mnist', 3, 42)
    assert meta['versions']['timm'] == timm.__version__
    assert meta['final_metrics']['top1'] == TOP1[-1]
    export = meta['export']
    assert (export['checkpoint'], export['epoch'], export['ema']) == ('model_best.pth.tar', BEST_EPOCH, False)
    assert export['metrics']['top1'] == TOP1[BEST_EPOCH]
    assert export['sha256'] == hashlib.sha256((out / 'model.safetensors').read_bytes()).hexdigest()

    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'test_resnet'
    assert config['num_classes'] == NUM_CLASSES
    assert config['label_names'] == CLASS_NAMES
    cfg = config['pretrained_cfg']
    assert (cfg['input_size'], cfg['mean'], cfg['std']) == ([1, 28, 28], [0.286], [0.353])
    assert (cfg['crop_pct'], cfg['crop_mode'], cfg['interpolation']) == (1.0, 'center', 'bilinear')
    assert cfg['num_classes'] == NUM_CLASSES

    assert (out / 'training_curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    card = (out / 'README.md').read_text()
    front = yaml.safe_load(card.split('---\n')[1])
    assert front['library_name'] == 'timm' and front['license']
    assert {'timm-tfkd', 'image-classification'} <= set(front['tags'])
    for expected in ("timm.create_model('hf-hub:ORG/NAME', pretrained=True)", '](training_curves.png)',
                     '@inproceedings{yuan2020revisiting', '| Top-1 | Top-5 | NLL | ECE |', '`test` split',
                     '| Batch size (per device) | 32 |', '| Optimizer | sgd |', '| LR schedule | cosine |',
                     'lr_base 0.1 per 256 samples', '| tau (temperature) | 20 |'):
        assert expected in card


@pytest.mark.parametrize('checkpoint, epoch', [('best', BEST_EPOCH), ('last', LAST_EPOCH),
                                               ('checkpoint-2.pth.tar', 2)])
def test_export_loads_with_plain_timm_local_dir(make_run, checkpoint, epoch):
    run = make_run()
    out = hub.export_run(run.run_dir, run.root / 'export', checkpoint=checkpoint)
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert_weights_equal(model, run.states[epoch])
    assert model.pretrained_cfg['label_names'] == CLASS_NAMES
    assert model.pretrained_cfg['input_size'] == (1, 28, 28)
    assert load_file(str(out / 'model.safetensors')).keys() == run.states[epoch].keys()


@pytest.mark.parametrize('ema_better, use_ema, expect_ema', [
    (True, None, True), (False, None, False), (False, True, True), (True, False, False)])
def test_export_ema_choice(make_run, ema_better, use_ema, expect_ema):
    run = make_run(ema=True, ema_better=ema_better)
    out = hub.export_run(run.run_dir, run.root / 'export', use_ema=use_ema)
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    expected = run.ema_states if expect_ema else run.states
    assert_weights_equal(model, expected[BEST_EPOCH])
    assert not torch.equal(run.ema_states[BEST_EPOCH]['fc.weight'], run.states[BEST_EPOCH]['fc.weight'])
    meta = json.loads((out / 'tfkd.json').read_text())
    assert meta['export']['ema'] is expect_ema
    assert meta['export']['metrics']['top1'] == TOP1[BEST_EPOCH] + (5 if ema_better else -5) * expect_ema


def test_export_ema_requested_without_ema_weights(make_run):
    run = make_run()
    with pytest.raises(CheckpointError, match='no EMA weights'):
        hub.export_run(run.run_dir, run.root / 'export', use_ema=True)
    assert not (run.root / 'export').exists()


def test_export_publishes_no_local_paths_user_names_or_tokens(make_run):
    run = make_run()
    info_path = run.run_dir / 'run_info.json'
    info = json.loads(info_path.read_text())
    info['tfkd']['teacher']['source'] = str(run.root / 'teacher-run' / 'model_best.pth.tar')
    info_path.write_text(json.dumps(info))
    out = hub.export_run(run.run_dir, run.root / 'export')

    forbidden = [str(run.run_dir), str(run.root), str(run.root.resolve()), str(Path.home())]
    users = local_user_names()
    for path in text_files(out):
        text = path.read_text()
        for secret in forbidden:
            assert secret not in text, (path.name, secret)
        for user in users:
            assert not re.search(rf'\b{re.escape(user)}\b', text), (path.name, user)
        assert not TOKEN_LIKE.search(text), path.name
    assert json.loads((out / 'tfkd.json').read_text())['tfkd']['teacher']['source'] == 'model_best.pth.tar'


def test_export_refuses_metadata_that_would_publish_a_local_path(make_run):
    run = make_run()
    info_path = run.run_dir / 'run_info.json'
    info = json.loads(info_path.read_text())
    info['dataset'] = str(run.run_dir / 'images')
    info_path.write_text(json.dumps(info))
    with pytest.raises(hub.ExportError, match='would publish the local path'):
        hub.export_run(run.run_dir, run.root / 'export')
    assert sorted(p.name for p in run.root.iterdir()) == ['output']  # neither export nor staging left


def test_export_refuses_a_folder_that_is_not_an_export(make_run):
    run = make_run()
    out = run.root / 'export'
    out.mkdir()
    (out / 'notes.txt').write_text('keep me')
    with pytest.raises(hub.ExportError, match='not empty and is not a previous timm-tfkd export'):
        hub.export_run(run.run_dir, out)
    assert [p.name for p in out.iterdir()] == ['notes.txt']
    with pytest.raises(hub.ExportError, match='training run folder'):
        hub.export_run(run.run_dir, run.run_dir)


def test_export_replaces_a_previous_export(make_run):
    run = make_run()
    out = hub.export_run(run.run_dir, run.root / 'export', checkpoint='best')
    hub.export_run(run.run_dir, out, checkpoint='last')
    assert sorted(p.name for p in out.iterdir()) == sorted(hub.EXPORT_FILES)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith('.')] == []  # no staging left over
    assert_weights_equal(timm.create_model(f'local-dir:{out}', pretrained=True), run.states[LAST_EPOCH])


class _WritesMarker:
    """Unpickling this runs code: it writes a marker file (the shape of a malicious checkpoint)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f'open({str(self.marker)!r}, "w").write("pwned")',)


def test_pickled_object_checkpoint_is_refused_never_executed(make_run, capsys):
    run = make_run()
    marker = run.root / 'marker'
    evil = run.root / 'evil.pth.tar'
    torch.save({'epoch': 0, 'state_dict': run.states[0], 'extra': _WritesMarker(marker)}, evil)

    with pytest.raises(CheckpointError, match='refused for safety'):
        hub.export_run(run.run_dir, run.root / 'export', checkpoint=str(evil))
    assert main(['export', str(run.run_dir), str(run.root / 'export2'), '--checkpoint', str(evil)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('timm-tfkd: error: ') and err.count('\n') == 1 and 'refused for safety' in err
    assert not marker.exists()
    assert not (run.root / 'export').exists() and not (run.root / 'export2').exists()

    # The payload is live: an unsafe load would have run it.
    torch.load(evil, weights_only=False)
    assert marker.read_text() == 'pwned'


# ---------------------------------------------------------------------------------------------------------------
# Uploading and loading back


def test_push_run_uploads_export_that_round_trips(make_run, offline_hub):
    run = make_run(ema=True, ema_better=True)
    api = FakeHubApi(offline_hub)
    url = hub.push_run(run.run_dir, REPO_ID, private=True, revision='v1', commit_message='first model',
                       token='hf_explicitTokenArgumentValue', api=api)

    folder = run.run_dir / 'hub_export'
    assert url.startswith(f'https://huggingface.co/{REPO_ID}/commit/')
    assert api.calls == [
        ('create_repo', {'repo_id': REPO_ID, 'private': True, 'exist_ok': True,
                         'token': 'hf_explicitTokenArgumentValue'}),
        ('create_branch', {'repo_id': REPO_ID, 'branch': 'v1', 'exist_ok': True,
                           'token': 'hf_explicitTokenArgumentValue'}),
        ('upload_folder', {'repo_id': REPO_ID, 'folder_path': str(folder), 'revision': 'v1',
                           'commit_message': 'first model', 'token': 'hf_explicitTokenArgumentValue'}),
    ]
    assert api.uploaded_files == sorted(hub.EXPORT_FILES)
    assert "hf-hub:org/name'" in (folder / 'README.md').read_text()

    expected = run.ema_states[BEST_EPOCH]
    assert_weights_equal(timm.create_model(f'local-dir:{folder}', pretrained=True), expected)
    model = timm.create_model('hf-hub:org/name@v1', pretrained=True)
    assert_weights_equal(model, expected)
    assert model.pretrained_cfg['label_names'] == CLASS_NAMES
    model, meta = hub.load_pretrained('hf-hub:org/name@v1')
    assert_weights_equal(model, expected)
    assert meta == json.loads((folder / 'tfkd.json').read_text())
    assert meta['export']['ema'] is True


def test_push_to_hub_uploads_an_existing_export_to_main(make_run, offline_hub):
    run = make_run()
    folder = hub.export_run(run.run_dir, run.root / 'export')
    api = FakeHubApi(offline_hub)
    hub.push_to_hub(folder, REPO_ID, api=api)

    assert [name for name, _ in api.calls] == ['create_repo', 'upload_folder']
    (_, create), (_, upload) = api.calls
    assert create['private'] is False and create['token'] is None
    assert upload['revision'] is None and 'Tf-KD (self)' in upload['commit_message']
    model, meta = hub.load_pretrained('hf-hub:org/name')
    assert_weights_equal(model, run.states[BEST_EPOCH])
    assert meta['export']['checkpoint'] == 'model_best.pth.tar'


def test_push_to_hub_refuses_a_folder_that_is_not_an_export(make_run, offline_hub):
    run = make_run()
    api = FakeHubApi(offline_hub)
    with pytest.raises(hub.ExportError, match='not a timm-tfkd export'):
        hub.push_to_hub(run.run_dir, REPO_ID, api=api)
    assert api.calls == []


def test_load_pretrained_from_folder_and_without_metadata(make_run, caplog):
    run = make_run()
    out = hub.export_run(run.run_dir, run.root / 'export')
    for name in (f'local-dir:{out}', str(out)):
        model, meta = hub.load_pretrained(name)
        assert_weights_equal(model, run.states[BEST_EPOCH])
        assert meta['tfkd']['mode'] == 'self'

    (out / 'tfkd.json').unlink()
    with caplog.at_level(logging.WARNING, logger='timm_tfkd.hub'):
        model, meta = hub.load_pretrained(str(out))
    assert meta == {}
    assert 'No tfkd.json' in caplog.text
    with pytest.raises(ValueError, match='not'):
        hub.load_pretrained(str(run.root / 'missing'))


def test_failed_upload_keeps_export_and_prints_retry(make_run, offline_hub, monkeypatch, capsys):
    run = make_run()
    api = FakeHubApi(offline_hub, fail_with=ConnectionError('Hub unreachable'))
    with pytest.raises(hub.HubUploadError) as info:
        hub.push_run(run.run_dir, REPO_ID, private=True, revision='v1', api=api)
    retry = f'timm-tfkd push {run.run_dir} org/name --private --revision v1'
    assert info.value.retry_command == retry
    assert retry in str(info.value) and 'Hub unreachable' in str(info.value)
    folder = run.run_dir / 'hub_export'
    assert sorted(p.name for p in folder.iterdir()) == sorted(hub.EXPORT_FILES)

    monkeypatch.setattr(hub.upload, 'HfApi', lambda **kwargs: api)
    assert main(['push', str(run.run_dir), REPO_ID, '--private', '--revision', 'v1']) == 1
    err = capsys.readouterr().err
    assert err.startswith('timm-tfkd: error: upload of') and retry in err and 'Traceback' not in err
    assert sorted(p.name for p in folder.iterdir()) == sorted(hub.EXPORT_FILES)

    api.fail_with = None  # the Hub is back: the printed command finishes the job
    assert main(shlex.split(retry)[1:]) == 0
    assert api.calls[-1] == ('upload_folder', {'repo_id': REPO_ID, 'folder_path': str(folder), 'revision': 'v1',
                                               'commit_message': api.calls[-1][1]['commit_message'], 'token': None})
    assert hub.load_pretrained('hf-hub:org/name@v1')[1]['export']['checkpoint'] == 'model_best.pth.tar'


def test_failed_push_of_an_export_folder_retries_that_folder(make_run, offline_hub, monkeypatch):
    run = make_run()
    folder = hub.export_run(run.run_dir, run.root / 'my export')
    api = FakeHubApi(offline_hub, fail_with=TimeoutError('read timed out'))
    with pytest.raises(hub.HubUploadError) as info:
        hub.push_to_hub(folder, REPO_ID, commit_message='try 1', api=api)
    assert info.value.retry_command == shlex.join(
        ['timm-tfkd', 'push', str(folder), REPO_ID, '--commit-message', 'try 1'])

    api.fail_with = None
    monkeypatch.setattr(hub.upload, 'HfApi', lambda **kwargs: api)
    assert main(shlex.split(info.value.retry_command)[1:]) == 0
    assert api.calls[-1][1]['folder_path'] == str(folder) and api.calls[-1][1]['commit_message'] == 'try 1'


def test_env_token_is_used_but_never_written_or_logged(make_run, offline_hub, monkeypatch, caplog, capsys):
    monkeypatch.setenv('HF_TOKEN', FAKE_TOKEN)
    caplog.set_level(logging.DEBUG)
    run = make_run()
    api = FakeHubApi(offline_hub)
    hub.push_run(run.run_dir, REPO_ID, api=api)
    assert all(kwargs['token'] == FAKE_TOKEN for _, kwargs in api.calls)

    # A failing call whose error echoes the token: the retry message must not repeat it.
    failing = FakeHubApi(offline_hub, fail_with=PermissionError(f'401: invalid token {FAKE_TOKEN}'))
    monkeypatch.setattr(hub.upload, 'HfApi', lambda **kwargs: failing)
    assert main(['push', str(run.run_dir), REPO_ID]) == 1

    captured = capsys.readouterr()
    assert FAKE_TOKEN not in captured.out + captured.err + caplog.text
    for path in [p for p in run.root.rglob('*') if p.is_file()] + list(offline_hub.rglob('*')):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------------------------------------------------------
# Trainer integration


def _trainer_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    publish.add_hub_args(parser)
    args = parser.parse_args(argv)
    publish.check_hub_args(args)
    return args


def test_hub_args_defaults_and_validation():
    args = _trainer_args([])
    assert (args.push_to_hub, args.hub_model_id, args.hub_private, args.hub_revision, args.export_dir) == \
        (False, None, False, None, None)
    args = _trainer_args(['--push-to-hub', '--hub-model-id', REPO_ID, '--hub-private', '--hub-revision', 'v2'])
    assert (args.push_to_hub, args.hub_model_id, args.hub_private, args.hub_revision) == (True, REPO_ID, True, 'v2')
    for argv in (['--push-to-hub'], ['--push-to-hub', '--hub-model-id', 'name-only'],
                 ['--hub-model-id', 'org/name/extra'], ['--push-to-hub', '--hub-model-id', 'org/bad--name']):
        with pytest.raises(ValueError) as info:
            _trainer_args(argv)
        assert '\n' not in str(info.value)


def test_publish_run_exports_and_pushes_as_asked(make_run, offline_hub, monkeypatch):
    run = make_run()
    publish.publish_run(_trainer_args([]), run.run_dir)
    assert not (run.run_dir / 'hub_export').exists()

    export_dir = run.root / 'chosen_export'
    publish.publish_run(_trainer_args(['--export-dir', str(export_dir)]), run.run_dir)
    assert sorted(p.name for p in export_dir.iterdir()) == sorted(hub.EXPORT_FILES)

    api = FakeHubApi(offline_hub)
    monkeypatch.setattr(hub.upload, 'HfApi', lambda **kwargs: api)
    args = _trainer_args(['--push-to-hub', '--hub-model-id', REPO_ID])
    publish.publish_run(args, run.run_dir)
    assert api.uploaded_files == sorted(hub.EXPORT_FILES)
    assert api.calls[-1][1]['folder_path'] == str(run.run_dir / 'hub_export')

    api.fail_with = OSError('403 Forbidden')
    args = _trainer_args(['--push-to-hub', '--hub-model-id', REPO_ID, '--export-dir', str(export_dir)])
    with pytest.raises(hub.HubUploadError) as info:  # the trainer's exit status 1
        publish.publish_run(args, run.run_dir)
    assert f'timm-tfkd push {run.run_dir} org/name --export-dir {export_dir}' in str(info.value)
    assert sorted(p.name for p in export_dir.iterdir()) == sorted(hub.EXPORT_FILES)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_export(make_run, capsys):
    run = make_run(ema=True, ema_better=True)
    out = run.root / 'export'
    assert main(['export', str(run.run_dir), str(out), '--checkpoint', 'last', '--no-ema']) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert_weights_equal(timm.create_model(f'local-dir:{out}', pretrained=True), run.states[LAST_EPOCH])


def test_cli_bad_inputs_exit_2_with_one_line(make_run, offline_hub, monkeypatch, capsys):
    run = make_run()
    garbage = run.root / 'garbage.pth.tar'
    garbage.write_bytes(b'not a checkpoint')
    api = FakeHubApi(offline_hub)
    monkeypatch.setattr(hub.upload, 'HfApi', lambda **kwargs: api)
    out = str(run.root / 'export')
    cases = [
        [],
        ['export'],
        ['export', str(run.root / 'missing'), out],
        ['export', str(run.run_dir), out, '--checkpoint', str(garbage)],
        ['export', str(run.run_dir), out, '--ema'],
        ['export', str(run.run_dir), out, '--ema', '--no-ema'],
        ['push', str(run.run_dir), 'not-a-repo-id'],
        ['push', str(run.run_dir), 'org/name/extra'],
        ['push', str(run.root / 'missing'), REPO_ID],
        ['frobnicate'],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith('timm-tfkd: error: ') and err.count('\n') == 1, (argv, err)
    assert api.calls == []
    assert not (run.root / 'export').exists() and not (run.run_dir / 'hub_export').exists()


def test_export_files_are_readable_by_everyone(make_run):
    run = make_run()
    out = hub.export_run(run.run_dir, run.root / 'export')
    assert {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()} == dict.fromkeys(hub.EXPORT_FILES, 0o644)
    assert out.stat().st_mode & 0o777 == 0o755


def test_export_of_a_timm_tfkd_architecture_says_it_needs_the_plugin(make_run):
    run = make_run(model_name='cifar_resnet18')
    out = hub.export_run(run.run_dir, run.root / 'export')
    card = (out / 'README.md').read_text()
    assert 'no plugin code is needed' not in card
    assert '`import timm_tfkd` before `timm.create_model`' in card and 'Unknown model (cifar_resnet18)' in card
    assert 'import timm_tfkd  # registers cifar_resnet18 with timm' in card
    assert 'import timm_tfkd' in json.loads((out / 'config.json').read_text())['requires']
    assert_weights_equal(timm.create_model(f'local-dir:{out}', pretrained=True), run.states[BEST_EPOCH])
    plain = (make_run().run_dir, run.root / 'plain')
    assert 'no plugin code is needed' in (hub.export_run(*plain) / 'README.md').read_text()
