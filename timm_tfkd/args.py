"""The Tf-KD command line group, for any timm-style argparse parser: every registered method's flags."""
import argparse

from .methods import DEFAULT_METHOD, method_names, registered_flags, registered_methods

# The mode names when the package was imported (the parser reads the registry itself, so later registrations count).
TFKD_MODES = method_names()


def add_tfkd_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Register the "Tf-KD parameters" group on a parser: ``--tfkd-mode`` and the flags of every method.

    Every destination starts with ``tfkd_``, so the group never collides with timm's own flags. A flag's help says
    which modes read it.

    Args:
        parser: A parser, e.g. a copy of timm's ``train.py`` parser.

    Returns:
        The argument group, for callers that want to add to it.
    """
    group = parser.add_argument_group('Tf-KD parameters')
    methods = registered_methods()
    group.add_argument(
        '--tfkd-mode', default=DEFAULT_METHOD, choices=method_names(),
        help='; '.join(f'{method.name}: {method.description}' for method in methods) + f'. Default: {DEFAULT_METHOD}.')
    for flag in registered_flags():
        readers = ', '.join(method.name for method in methods if flag in method.flags)
        kwargs = dict(flag.kwargs)
        kwargs['help'] = f"{kwargs.get('help', '')} (--tfkd-mode {readers})".strip()
        group.add_argument(flag.option, **kwargs)
    return group
