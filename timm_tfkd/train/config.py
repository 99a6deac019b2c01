"""The trainer's command line read once: ``-c/--config FILE.yaml`` defaults first, then the flags, as timm does.

Besides the arguments, a parse tells which settings the user chose (on the command line, or in a YAML file with a
value other than the default), which is what the smoothing policy and the ignored-flag warnings need.
"""
import argparse
import difflib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import yaml

from .flags import ParseKwargs, _OneLineErrorParser, create_parser


@dataclass(frozen=True)
class CommandLine:
    """One parsed command line.

    Attributes:
        args: Every option destination (nothing else), with YAML and command-line values applied.
        explicit: Destinations the user chose, as opposed to those left at timm's defaults.
        yaml: ``args`` as YAML, the ``args.yaml`` of a run, readable back with ``-c``.
        warnings: One line each for the log, e.g. config keys this version does not know.
    """
    args: argparse.Namespace
    explicit: Set[str]
    yaml: str
    warnings: Tuple[str, ...] = ()


def _create_config_parser() -> argparse.ArgumentParser:
    """The small parser that only picks ``-c/--config`` out of the command line."""
    # No abbreviations: '--co' or '--con' must stay errors of the main parser, not become --config.
    parser = _OneLineErrorParser(add_help=False, allow_abbrev=False)
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE')
    return parser


def _actions_by_dest(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    """Actions by destination, leaving out those that store nothing (``--help``)."""
    return {action.dest: action for action in parser._actions if action.default is not argparse.SUPPRESS}


_KIND_NAMES = {int: 'integer', float: 'number'}


def _kind(action: argparse.Action) -> str:
    """What one value of the flag is, in words."""
    return _KIND_NAMES.get(action.type, 'string')


def _config_scalar(action: argparse.Action, value: Any) -> Any:
    """Check one YAML value against what the flag would store; raise ``ValueError(expected)`` if it does not fit."""
    kind = _kind(action)
    expected = f"{'an' if kind == 'integer' else 'a'} {kind}"
    if action.type is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(expected)
    elif action.type is float:
        # YAML 1.1 reads `1e-3` (no dot) as a string; argparse would convert it, so accept it too.
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(expected)
        try:
            value = float(value)
        except ValueError:
            raise ValueError(expected) from None
    elif not isinstance(value, str):
        raise ValueError(expected)
    if action.choices is not None and value not in action.choices:
        raise ValueError('one of ' + ', '.join(str(choice) for choice in action.choices))
    return value


def _config_value(action: argparse.Action, value: Any) -> Any:
    """Check a YAML value for a flag and return it as the command line would have stored it.

    Raises:
        ValueError: The value does not fit; the message says what was expected.
    """
    if value is None and action.default is None:
        return None
    if isinstance(action, ParseKwargs):
        if isinstance(value, dict) and all(isinstance(key, str) for key in value):
            return value
        raise ValueError('a mapping of keyword arguments')
    if isinstance(action, argparse._StoreTrueAction):
        if isinstance(value, bool):
            return value
        raise ValueError('true or false')
    if action.nargs in ('+', '*') or isinstance(action.nargs, int):
        size = f'{action.nargs} ' if isinstance(action.nargs, int) else ''
        expected = f'a list of {size}{_kind(action)}s'
        if not isinstance(value, list) or (isinstance(action.nargs, int) and len(value) != action.nargs):
            raise ValueError(expected)
        # '+' needs a value on the command line, so an empty list only matches a flag whose default is empty.
        if action.nargs == '+' and not value and action.default != []:
            raise ValueError(f'a non-empty list of {_kind(action)}s')
        try:
            return [_config_scalar(action, item) for item in value]
        except ValueError:
            raise ValueError(expected) from None
    return _config_scalar(action, value)


def _load_config(parser: argparse.ArgumentParser, path: str) -> Tuple[Dict[str, Any], List[str]]:
    """Read a YAML config and check it against the parser; a value of the wrong type or choice exits through
    ``parser.error``, a key this version does not know is left out with a warning (a newer timm's file still runs).

    Args:
        parser: The trainer's parser, which provides the valid keys, types and choices.
        path: The file given with ``-c/--config``.

    Returns:
        Destination to value, in the form the command line would have produced, and the warnings.
    """
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except OSError as exc:
        parser.error(f'cannot read config file {path}: {exc.strerror}')
    except yaml.YAMLError as exc:
        parser.error(f'config file {path} is not valid YAML: ' + ' '.join(str(exc).split()))
    if not isinstance(config, dict):
        found = 'an empty file' if config is None else type(config).__name__
        parser.error(f'config file {path} must be a YAML mapping of option names to values, got {found}')
    actions = _actions_by_dest(parser)
    values, warnings = {}, []
    for key, value in config.items():
        if key not in actions:
            close = difflib.get_close_matches(str(key).replace('-', '_'), actions, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ''
            warnings.append(f'config file {path}: key {key!r} is not a flag of this timm version, ignored{hint}')
            continue
        try:
            values[key] = _config_value(actions[key], value)
        except ValueError as exc:
            parser.error(f'config file {path}: key {key!r} expects {exc}, got {value!r}')
    return values, warnings


def args_to_yaml(args: argparse.Namespace) -> str:
    """The resolved settings as YAML, readable back with ``-c``."""
    return yaml.safe_dump(vars(args), default_flow_style=False)


# Default of every destination during the parse, so that what the command line set can be told apart.
_UNSET = object()


def parse_args(argv: Optional[Sequence[str]] = None) -> CommandLine:
    """Parse the trainer's command line the way timm does: config file defaults first, then flags.

    A flag on the command line counts as chosen even when its value equals the default. A config file key counts
    only when its value differs from the default: an ``args.yaml`` written by a run lists every destination, and
    replaying it must not turn defaults into choices (e.g. stack timm's default label smoothing on Tf-KD).

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The arguments, the set of chosen destinations and the YAML dump.
    """
    config_args, remaining = _create_config_parser().parse_known_args(argv)
    parser = create_parser()
    defaults = {dest: action.default for dest, action in _actions_by_dest(parser).items()}
    config, warnings = _load_config(parser, config_args.config) if config_args.config else ({}, [])
    parser.set_defaults(**dict.fromkeys(defaults, _UNSET))
    args = parser.parse_args(remaining)
    explicit = {dest for dest, value in vars(args).items() if value is not _UNSET}
    explicit.update(dest for dest, value in config.items() if value != defaults[dest])
    for dest, value in vars(args).items():
        if value is _UNSET:
            setattr(args, dest, config[dest] if dest in config else defaults[dest])
    return CommandLine(args, explicit, args_to_yaml(args), tuple(warnings))
