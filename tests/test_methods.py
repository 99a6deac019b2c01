"""The method registry: every method's flags reach the command line once, a method's record and card come from its
own declaration, and a clashing or duplicate registration is refused."""
import argparse

import pytest

from timm_tfkd import TFKD_MODES, add_tfkd_args, create_tfkd_loss, get_method, methods
from timm_tfkd.losses import LabelSmoothingLoss, SelfDistillLoss, VirtualTeacherLoss
from timm_tfkd.methods import Flag, Method, method_names, registered_flags, registered_methods


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_tfkd_args(parser)
    return parser


def test_modes_are_the_registry():
    assert TFKD_MODES == method_names() == ('none', 'lsr', 'reg', 'self', 'kd')
    action = next(a for a in _parser()._actions if a.dest == 'tfkd_mode')
    assert tuple(action.choices) == method_names()
    for method in registered_methods():
        assert f'{method.name}: {method.description}' in action.help


def test_every_flag_is_registered_once_and_names_its_modes():
    parser = _parser()
    options = [option for action in parser._actions for option in action.option_strings if option.startswith('--tfkd')]
    assert len(options) == len(set(options))
    assert set(options) == {'--tfkd-mode'} | {flag.option for flag in registered_flags()}
    alpha = next(a for a in parser._actions if a.dest == 'tfkd_alpha')
    assert alpha.help.endswith('(--tfkd-mode reg, self, kd)')
    assert get_method('reg').flags.count(methods.shared_flags.ALPHA) == 1


@pytest.mark.parametrize('mode, settings', [
    ('none', {}),
    ('lsr', {'smoothing_convention': 'reference'}),
    ('reg', {'formula': 'official', 'alpha': 0.3, 'temperature': 4.0, 'multiplier': 2.0, 'correct_prob': 0.9}),
    ('self', {'formula': 'official', 'alpha': 0.3, 'temperature': 4.0, 'multiplier': 2.0}),
    ('kd', {'formula': 'paper', 'alpha': 0.3, 'temperature': 4.0, 'multiplier': 2.0}),
])
def test_record_holds_exactly_the_settings_a_method_reads(mode, settings):
    argv = ['--tfkd-mode', mode, '--tfkd-formula', 'official' if mode != 'kd' else 'paper', '--tfkd-alpha', '0.3',
            '--tfkd-temperature', '4', '--tfkd-multiplier', '2', '--tfkd-correct-prob', '0.9',
            '--tfkd-smoothing-convention', 'reference']
    assert get_method(mode).record(_parser().parse_args(argv)) == settings


def test_card_rows_use_public_names_and_labels():
    rows = dict(get_method('reg').card_rows({'formula': 'paper', 'alpha': 0.1, 'tau': 20.0, 'multiplier': 1.0,
                                             'a': 0.99}))
    assert rows == {'Formula': 'paper', 'alpha (distillation weight)': 0.1, 'tau (temperature)': 20.0,
                    'Multiplier': 1.0, 'a (virtual teacher probability of the true class)': 0.99}


def test_create_tfkd_loss_goes_through_the_registry():
    assert create_tfkd_loss('none') is None
    loss = create_tfkd_loss('reg', alpha=0.2, temperature=3.0, correct_prob=0.9, formula='official', multiplier=4.0)
    assert isinstance(loss, VirtualTeacherLoss)
    assert (loss.alpha, loss.temperature, loss.correct_prob, loss.formula, loss.multiplier) == (
        0.2, 3.0, 0.9, 'official', 4.0)
    loss = create_tfkd_loss('lsr', smoothing=0.3, smoothing_convention='reference')
    assert isinstance(loss, LabelSmoothingLoss) and (loss.smoothing, loss.convention) == (0.3, 'reference')
    assert isinstance(create_tfkd_loss('kd', alpha=0.5), SelfDistillLoss)
    with pytest.raises(ValueError, match="unknown Tf-KD mode 'nope'"):
        create_tfkd_loss('nope')


def test_flag_checks_name_the_option():
    args = _parser().parse_args(['--tfkd-mode', 'reg', '--tfkd-alpha', '1.5'])
    with pytest.raises(ValueError, match=r'--tfkd-alpha must be in \[0, 1\], got 1.5'):
        get_method('reg').check(args)
    args = _parser().parse_args(['--tfkd-mode', 'reg', '--tfkd-correct-prob', '0.2'])
    get_method('reg').check(args)  # 0.2 is fine until K is known
    with pytest.raises(ValueError, match='K=5'):
        get_method('reg').check(args, num_classes=5)


class _Extra(Method):
    name = 'extra'
    description = 'a method added by a test'
    flags = (Flag('--tfkd-extra-weight', dict(type=float, default=1.0)),)


def test_a_new_method_adds_its_mode_and_flags():
    methods.register_method(_Extra())
    try:
        parser = _parser()
        args = parser.parse_args(['--tfkd-mode', 'extra', '--tfkd-extra-weight', '2'])
        assert (args.tfkd_mode, args.tfkd_extra_weight) == ('extra', 2.0)
        assert get_method('extra').record(args) == {'extra_weight': 2.0}
        with pytest.raises(ValueError, match='new name'):
            methods.register_method(_Extra())
    finally:
        del methods._METHODS['extra']
    assert 'extra' not in method_names()


def test_a_clashing_flag_declaration_is_refused():
    class Clash(Method):
        name = 'clash'
        flags = (Flag('--tfkd-alpha', dict(type=float, default=0.5)),)

    with pytest.raises(ValueError, match='--tfkd-alpha is declared differently'):
        methods.register_method(Clash())
    assert 'clash' not in method_names()
