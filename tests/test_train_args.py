"""The trainer's command line: timm parity, YAML configs, the smoothing policy and usage checks."""
import argparse
import json
import os
from typing import Dict, List

import pytest
import yaml
from timm.loss import LOSS_TYPES

from timm_tfkd.errors import UsageError
from timm_tfkd.train.config import args_to_yaml, parse_args as parse_command_line
from timm_tfkd.train.flags import TIMM_1_0_31_FLAGS, create_parser
from timm_tfkd.train.policy import check_supported, resolve_smoothing
from timm_tfkd.train.values import check_values

with open(os.path.join(os.path.dirname(__file__), 'data', 'timm_train_args.json')) as _f:
    TIMM_ARGS = json.load(_f)['args']


@pytest.fixture(scope='module')
def parser() -> argparse.ArgumentParser:
    return create_parser()


def parse_args(argv):
    """The parsed arguments and their args.yaml text."""
    command_line = parse_command_line(argv)
    return command_line.args, command_line.yaml


def explicitly_set(argv):
    """The destinations the user chose in ``argv``."""
    return parse_command_line(argv).explicit


def write_args_yaml(args, path):
    with open(path, 'w') as f:
        f.write(args_to_yaml(args))


def _action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    return next(action for action in parser._actions if action.dest == dest)


def _group_title(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return next(group.title for group in parser._action_groups if action in group._group_actions)


def _write_yaml(tmp_path, content: Dict) -> str:
    path = str(tmp_path / 'config.yaml')
    with open(path, 'w') as f:
        yaml.safe_dump(content, f)
    return path


def test_reference_lists_all_timm_flags():
    assert len(TIMM_ARGS) == 172


@pytest.mark.parametrize('entry', TIMM_ARGS, ids=[entry['dest'] for entry in TIMM_ARGS])
def test_timm_flag_matches_reference(parser, entry):
    action = _action(parser, entry['dest'])
    assert (action.option_strings or [action.dest]) == entry['flags']
    assert action.default == entry['default']
    # Same Python type too, so args.yaml spells defaults exactly like timm's (e.g. `min_lr: 0`).
    assert type(action.default) is type(entry['default'])
    assert action.nargs == entry['nargs']
    assert (action.type.__name__ if action.type else None) == entry['type']
    assert (list(action.choices) if action.choices is not None else None) == entry['choices']
    assert type(action).__name__ == entry['action']
    assert _group_title(parser, action) == entry['group']


def test_torchcompile_defaults_to_inductor(parser):
    assert _action(parser, 'torchcompile').const == 'inductor'
    args, _ = parse_args(['--torchcompile'])
    assert args.torchcompile == 'inductor'
    args, _ = parse_args(['--torchcompile', 'aot_eager'])
    assert args.torchcompile == 'aot_eager'


def test_positional_data_is_optional():
    assert parse_args([])[0].data is None
    assert parse_args(['/datasets/imagenet'])[0].data == '/datasets/imagenet'


def test_timm_1_0_31_flags_exist(parser):
    option_strings = {option for action in parser._actions for option in action.option_strings}
    assert set(TIMM_1_0_31_FLAGS) <= option_strings


def test_timm_1_0_31_defaults():
    args, _ = parse_args([])
    assert args.stop_epoch is None
    assert args.save_epochs is None
    assert args.lr_decay_fn is None
    assert args.lr_stable_timescale is None
    assert args.task == 'classification'
    assert args.loss is None
    assert args.loss_pos_weight is None
    assert args.loss_class_weight is None
    assert args.loss_weight_power is None
    assert args.loss_weight_beta == 0.999
    assert args.loss_weight_max is None
    assert args.class_stats is None
    assert args.poly_gamma == 0.0
    assert args.poly_epsilon == 2.0
    assert args.target_format is None
    assert args.multilabel_threshold == 0.5
    assert args.pretrained_cfg_overlay == {}


def test_timm_1_0_31_values():
    args, _ = parse_args([
        '--resume', 'auto', '--stop-epoch', '5', '--save-epochs', '10', '20', '--sched', 'wsd',
        '--lr-decay-fn', 'linear', '--lr-stable-timescale', '0.5', '--task', 'multilabel', '--loss', 'asl',
        '--loss-pos-weight', '1,2.5', '--loss-class-weight', 'inv_freq', '--loss-weight-power', '0.5',
        '--loss-weight-beta', '0.99', '--loss-weight-max', '10', '--class-stats', 'stats.json',
        '--poly-gamma', '1', '--poly-epsilon', '1', '--target-format', 'multihot',
        '--multilabel-threshold', '0.3', '--pretrained-cfg-overlay', 'file=/weights/model.safetensors',
    ])
    assert args.resume == 'auto'
    assert args.stop_epoch == 5
    assert args.save_epochs == [10, 20]
    assert args.sched == 'wsd'
    assert args.lr_decay_fn == 'linear'
    assert args.lr_stable_timescale == 0.5
    assert args.task == 'multilabel'
    assert args.loss == 'asl'
    # timm's forms: a number, a comma separated list, a file, or a method name computed from --class-stats.
    assert args.loss_pos_weight == '1,2.5'
    assert args.loss_class_weight == 'inv_freq'
    assert args.loss_weight_power == 0.5
    assert (args.loss_weight_beta, args.loss_weight_max, args.class_stats) == (0.99, 10.0, 'stats.json')
    assert (args.poly_gamma, args.poly_epsilon) == (1.0, 1.0)
    assert args.target_format == 'multihot'
    assert args.multilabel_threshold == 0.3
    assert args.pretrained_cfg_overlay == {'file': '/weights/model.safetensors'}


def test_loss_and_task_choices(parser, capsys):
    assert tuple(_action(parser, 'loss').choices) == tuple(LOSS_TYPES)
    for argv in (['--loss', 'hinge'], ['--task', 'regression']):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2
    assert 'invalid choice' in capsys.readouterr().err


def test_tfkd_group_is_registered():
    args, _ = parse_args(['--tfkd-mode', 'reg', '--tfkd-alpha', '0.5'])
    assert (args.tfkd_mode, args.tfkd_alpha) == ('reg', 0.5)


@pytest.mark.parametrize('flag', ['--model-kwargs', '--opt-kwargs', '--pretrained-cfg-overlay'])
def test_parse_kwargs(flag):
    dest = flag[2:].replace('-', '_')
    args, _ = parse_args([flag, 'a=1', 'b=x', 'c=[1, 2]', 'd=True', 'e=None', 'f=0.5', 'g=a=b'])
    assert getattr(args, dest) == {'a': 1, 'b': 'x', 'c': [1, 2], 'd': True, 'e': None, 'f': 0.5, 'g': 'a=b'}
    assert getattr(parse_args([flag])[0], dest) == {}


def test_parse_kwargs_needs_key_value(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(['--model-kwargs', 'drop_rate'])
    assert exc.value.code == 2
    assert 'drop_rate' in capsys.readouterr().err


def test_config_flag_is_not_in_namespace(tmp_path):
    args, _ = parse_args(['-c', _write_yaml(tmp_path, {'batch_size': 32})])
    assert args.batch_size == 32
    assert 'config' not in vars(args)


NON_DEFAULT_ARGV = [
    '/data/positional', '--model', 'resnet18', '-b', '64', '--lr', '0.01', '--sched', 'wsd', '--mean', '0.5', '0.5',
    '0.5', '--input-size', '3', '32', '32', '--amp', '--model-kwargs', 'drop_rate=0.1', 'act_layer=gelu',
    '--opt-kwargs', 'caution=True', '--torchcompile', '--tfkd-mode', 'reg', '--tfkd-alpha', '0.3',
    '--tfkd-teacher-channels-last', '--save-epochs', '3', '7', '--resume', 'auto', '--smoothing', '0.2',
]


def test_args_yaml_round_trip(tmp_path):
    args, text = parse_args(NON_DEFAULT_ARGV)
    path = str(tmp_path / 'args.yaml')
    write_args_yaml(args, path)
    with open(path) as f:
        assert f.read() == text
    replayed, replayed_text = parse_args(['-c', path])
    assert replayed == args
    # Replaying the replay changes nothing, not even the spelling of the file.
    second_path = str(tmp_path / 'args2.yaml')
    write_args_yaml(replayed, second_path)
    assert parse_args(['-c', second_path])[1] == replayed_text


def test_default_args_yaml_round_trip(tmp_path):
    args, _ = parse_args([])
    path = str(tmp_path / 'args.yaml')
    write_args_yaml(args, path)
    assert parse_args(['-c', path])[0] == args


def test_command_line_overrides_yaml(tmp_path):
    path = _write_yaml(tmp_path, {'batch_size': 32, 'model': 'resnet18', 'tfkd_mode': 'reg', 'mean': [0.5]})
    args, _ = parse_args(['-c', path, '-b', '16', '--tfkd-mode', 'lsr'])
    assert args.batch_size == 16
    assert args.tfkd_mode == 'lsr'
    assert args.model == 'resnet18'
    assert args.mean == [0.5]


def test_yaml_accepts_ints_none_and_exponents_for_floats(tmp_path):
    path = _write_yaml(tmp_path, {'lr': 1, 'num_classes': None, 'opt_betas': [0, 0.99]})
    args, _ = parse_args(['-c', path])
    assert args.lr == 1.0 and isinstance(args.lr, float)
    assert args.num_classes is None
    assert args.opt_betas == [0.0, 0.99]
    # PyYAML reads an exponent without a dot as a string.
    with open(path, 'w') as f:
        f.write('weight_decay: 5e-2\n')
    assert parse_args(['-c', path])[0].weight_decay == 0.05


@pytest.mark.parametrize('content, key', [
    ({'batch_size': 'abc'}, 'batch_size'),
    ({'batch_size': 3.5}, 'batch_size'),
    ({'batch_size': None}, 'batch_size'),
    ({'lr': 'fast'}, 'lr'),
    ({'amp': 'yes'}, 'amp'),
    ({'mean': 0.5}, 'mean'),
    ({'mean': []}, 'mean'),
    ({'mean': ['a']}, 'mean'),
    ({'input_size': [3, 224]}, 'input_size'),
    ({'tfkd_mode': 'teacherless'}, 'tfkd_mode'),
    ({'model': 18}, 'model'),
    ({'model_kwargs': ['drop_rate=0.1']}, 'model_kwargs'),
])
def test_yaml_errors_name_the_key(tmp_path, capsys, content, key):
    with pytest.raises(SystemExit) as exc:
        parse_args(['-c', _write_yaml(tmp_path, content)])
    assert exc.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert 'error:' in last_line and repr(key) in last_line


def test_yaml_key_unknown_to_this_version_is_one_warning(tmp_path):
    """A newer timm's args.yaml must still run here: its new keys are named in a warning and left out."""
    command_line = parse_command_line(['-c', _write_yaml(tmp_path, {'batch_sise': 32, 'lr': 0.5})])
    assert command_line.args.lr == 0.5 and command_line.args.batch_size == 128
    (warning,) = command_line.warnings
    assert "key 'batch_sise' is not a flag of this timm version, ignored; did you mean 'batch_size'?" in warning
    assert 'batch_sise' not in vars(command_line.args)


@pytest.mark.parametrize('text', ['- a\n- b\n', 'just a string\n', ''])
def test_yaml_must_be_a_mapping(tmp_path, capsys, text):
    path = tmp_path / 'config.yaml'
    path.write_text(text)
    with pytest.raises(SystemExit) as exc:
        parse_args(['-c', str(path)])
    assert exc.value.code == 2
    assert 'mapping' in capsys.readouterr().err


def test_yaml_syntax_error_is_one_line(tmp_path, capsys):
    path = tmp_path / 'config.yaml'
    path.write_text('batch_size: [1, 2\nlr: 0.1\n')
    with pytest.raises(SystemExit) as exc:
        parse_args(['-c', str(path)])
    assert exc.value.code == 2
    assert 'not valid YAML' in capsys.readouterr().err.strip().splitlines()[-1]


def test_missing_config_file(tmp_path, capsys):
    path = str(tmp_path / 'missing.yaml')
    with pytest.raises(SystemExit) as exc:
        parse_args(['-c', path])
    assert exc.value.code == 2
    assert path in capsys.readouterr().err


# Values for flags whose non-default value cannot be derived from the flag alone (a path, a range, a pair).
SET_VALUES = {
    'momentum': ['0.5'], 'smoothing': ['0.2'], 'mixup_prob': ['0.5'], 'mixup_switch_prob': ['0.2'],
    'reprob': ['0.2'], 'hflip': ['0.2'], 'vflip': ['0.2'], 'color_jitter_prob': ['0.5'], 'grayscale_prob': ['0.5'],
    'gaussian_blur_prob': ['0.5'], 'drop': ['0.1'], 'drop_connect': ['0.1'], 'drop_path': ['0.1'],
    'drop_block': ['0.1'], 'bn_momentum': ['0.2'], 'model_ema_decay': ['0.99'], 'multilabel_threshold': ['0.3'],
    'loss_weight_beta': ['0.99'], 'train_size_random_mix': ['0.5'], 'aug_splits': ['3'],
    'scale': ['0.5', '1'], 'ratio': ['0.5', '2'], 'cutmix_minmax': ['0.2', '0.8'], 'opt_betas': ['0.8', '0.9'],
    'input_size': ['3', '32', '32'], 'mean': ['0.5', '0.5', '0.5'], 'std': ['0.2', '0.2', '0.2'],
    'eval_metric': ['top5'], 'target_format': ['indices'],
    # Multi-label targets need a dataset that holds several labels per record.
    'task': ['multilabel', '--dataset', 'wds/tiny', '--num-classes', '3', '--eval-metric', 'map'],
}


def _non_default_argv(action: argparse.Action) -> List[str]:
    """The flag set away from its default, with a value a user could give it alone."""
    option = action.option_strings[-1]
    if action.nargs == 0:
        return [option]
    if action.dest in SET_VALUES:
        return [option, *SET_VALUES[action.dest]]
    if action.choices is not None:
        return [option, str(next(c for c in action.choices if c != action.default))]
    if type(action).__name__ == 'ParseKwargs':
        return [option, 'x=1']
    if action.type in (int, float):
        values = ['3', '6'] if action.type is int else ['0.5', '0.25']
        return [option, *(values[:1] if action.nargs in (None, '?') else values)]
    return [option, 'value']


# Every flag of the parser but the Tf-KD group's (tested with the methods) and --help.
FLAG_ACTIONS = [action for action in create_parser()._actions if action.option_strings
                and not action.option_strings[-1].startswith('--tfkd-') and action.dest != 'help']


def test_the_trainer_has_all_191_timm_flags():
    parser = create_parser()
    timm_1_0_31 = {action.dest for action in parser._actions if set(action.option_strings) & set(TIMM_1_0_31_FLAGS)}
    timm_dests = {entry['dest'] for entry in TIMM_ARGS} | timm_1_0_31
    assert timm_dests <= {action.dest for action in parser._actions}
    # With -c / --config (read by a parser of its own first, here as in timm) and -h: timm's 191.
    assert len(timm_dests) + 2 == 191


@pytest.mark.parametrize('action', FLAG_ACTIONS, ids=[action.dest for action in FLAG_ACTIONS])
def test_no_timm_flag_is_refused(action):
    """Each of timm's flags, set alone away from its default, passes the trainer's per-flag checks: none is refused
    for being unsupported (the runs of the flags once refused are in test_formerly_refused_flags_train)."""
    args = parse_args(_non_default_argv(action))[0]
    check_supported(args)
    check_values(args)


@pytest.mark.parametrize('argv', [
    [],
    ['--tfkd-mode', 'reg'],
    ['--tfkd-mode', 'lsr', '--smoothing', '0'],
    ['--tfkd-mode', 'self', '--tfkd-teacher-checkpoint', 'run/model_best.pth.tar'],
    ['--tfkd-mode', 'kd', '--tfkd-teacher-checkpoint', 'pretrained', '--tfkd-teacher-model', 'resnet50'],
    ['--kd-model-name', 'resnet50'],
    ['--tfkd-mode', 'kd', '--tfkd-teacher-checkpoint', 'run/model_best.pth.tar'],
    ['--tfkd-mode', 'reg', '--tfkd-alpha', '0', '--tfkd-correct-prob', '1'],
])
def test_supported_settings_pass(argv):
    check_supported(parse_args(argv)[0])


@pytest.mark.parametrize('argv, match', [
    (['--tfkd-mode', 'reg', '--kd-model-name', 'resnet50'], '--kd-model-name'),
    (['--tfkd-mode', 'lsr', '--kd-model-name', 'resnet50'], '--kd-model-name'),
    (['--tfkd-mode', 'reg', '--bce-loss'], '--bce-loss'),
    (['--tfkd-mode', 'self', '--tfkd-teacher-checkpoint', 't.pth', '--loss', 'poly'], '--loss poly'),
    (['--tfkd-mode', 'self'], '--tfkd-teacher-checkpoint'),
    (['--tfkd-mode', 'kd', '--tfkd-teacher-model', 'resnet50'], '--tfkd-teacher-checkpoint'),
    (['--tfkd-mode', 'reg', '--tfkd-alpha', '1.5'], '--tfkd-alpha'),
    (['--tfkd-mode', 'reg', '--tfkd-alpha', '-0.1'], '--tfkd-alpha'),
    (['--tfkd-mode', 'reg', '--tfkd-alpha', 'nan'], '--tfkd-alpha'),
    (['--tfkd-mode', 'reg', '--tfkd-temperature', '0'], '--tfkd-temperature'),
    (['--tfkd-mode', 'reg', '--tfkd-multiplier', '-1'], '--tfkd-multiplier'),
    (['--tfkd-mode', 'reg', '--tfkd-correct-prob', '0'], '--tfkd-correct-prob'),
    (['--tfkd-mode', 'reg', '--tfkd-correct-prob', '1.01'], '--tfkd-correct-prob'),
    (['--tfkd-mode', 'lsr', '--smoothing', '1'], '--smoothing'),
    (['--tfkd-mode', 'lsr', '--smoothing', '-0.1'], '--smoothing'),
])
def test_invalid_tfkd_settings_are_refused(argv, match):
    with pytest.raises(UsageError, match=match) as exc:
        check_supported(parse_args(argv)[0])
    assert '\n' not in str(exc.value)


def _smoothing(argv: List[str]) -> float:
    args, _ = parse_args(argv)
    before = vars(args).copy()
    smoothing, reason = resolve_smoothing(args, explicitly_set(argv))
    assert vars(args) == before
    assert reason and '\n' not in reason
    return smoothing


@pytest.mark.parametrize('mode, implicit, explicit', [
    ('none', 0.1, 0.3),
    ('lsr', 0.1, 0.3),
    ('reg', 0.0, 0.3),
    ('self', 0.0, 0.3),
    ('kd', 0.0, 0.3),
])
def test_smoothing_policy_from_command_line(mode, implicit, explicit):
    base = ['--tfkd-mode', mode]
    assert _smoothing(base) == implicit
    assert _smoothing(base + ['--smoothing', '0.3']) == explicit


@pytest.mark.parametrize('mode', ['reg', 'self', 'kd'])
def test_explicit_default_smoothing_is_stacked(mode):
    """Giving timm's default value on the command line is still a choice."""
    assert _smoothing(['--tfkd-mode', mode, '--smoothing', '0.1']) == 0.1


@pytest.mark.parametrize('mode, implicit, explicit', [
    ('none', 0.1, 0.3),
    ('lsr', 0.1, 0.3),
    ('reg', 0.0, 0.3),
    ('self', 0.0, 0.3),
    ('kd', 0.0, 0.3),
])
def test_smoothing_policy_from_yaml(tmp_path, mode, implicit, explicit):
    assert _smoothing(['-c', _write_yaml(tmp_path, {'tfkd_mode': mode})]) == implicit
    assert _smoothing(['-c', _write_yaml(tmp_path, {'tfkd_mode': mode, 'smoothing': 0.3})]) == explicit


@pytest.mark.parametrize('mode', ['reg', 'self', 'kd'])
def test_replayed_args_yaml_keeps_smoothing_policy(tmp_path, mode):
    """args.yaml lists timm's default smoothing; replaying it must not stack it on Tf-KD."""
    argv = ['--tfkd-mode', mode]
    args, _ = parse_args(argv)
    path = str(tmp_path / 'args.yaml')
    write_args_yaml(args, path)
    assert _smoothing(['-c', path]) == _smoothing(argv) == 0.0


def test_explicitly_set():
    assert explicitly_set([]) == set()
    assert explicitly_set(['/data', '-b', '128', '--amp', '--torchcompile']) == {
        'data', 'batch_size', 'amp', 'torchcompile'}


def test_explicitly_set_from_yaml(tmp_path):
    path = _write_yaml(tmp_path, {'batch_size': 128, 'lr': 0.5, 'model_kwargs': {}})
    assert explicitly_set(['-c', path, '--epochs', '300']) == {'lr', 'epochs'}


def test_no_token_in_args(monkeypatch):
    monkeypatch.setenv('HF_TOKEN', 'hf_secretvalue')
    args, text = parse_args(NON_DEFAULT_ARGV)
    # timm's --kd-token-distill-type is about ViT distillation tokens, not credentials.
    assert [key for key in vars(args) if 'token' in key] == ['kd_token_distill_type']
    assert 'hf_secretvalue' not in text
