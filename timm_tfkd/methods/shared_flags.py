"""Flags that several methods read (each lists the ones it uses; the registry declares each flag once)."""
from ..loss_settings import DEFAULT_ALPHA, DEFAULT_TEMPERATURE, FORMULAS, check_positive, check_unit_interval
from .base import Flag

ALPHA = Flag(
    '--tfkd-alpha', dict(
        type=float, default=DEFAULT_ALPHA, metavar='ALPHA',
        help=f'Weight of the distillation term: (1 - alpha) * CE + alpha * KD, in [0, 1]. Default: {DEFAULT_ALPHA}.'),
    check=check_unit_interval, label='alpha (distillation weight)')

TEMPERATURE = Flag(
    '--tfkd-temperature', dict(
        type=float, default=DEFAULT_TEMPERATURE, metavar='TAU',
        help=f'Softmax temperature of the distillation term, > 0. Default: {DEFAULT_TEMPERATURE:g}.'),
    check=check_positive, public_key='tau', label='tau (temperature)')

FORMULA = Flag(
    '--tfkd-formula', dict(
        default='paper', choices=FORMULAS,
        help="paper: the equations of the paper (batch-mean KL, tau^2); official: exactly what the reference code "
             "computes (KL mean over batch x classes, reg without student temperature). Default: paper."),
    label='Formula')

MULTIPLIER = Flag(
    '--tfkd-multiplier', dict(
        type=float, default=1.0, metavar='M',
        help="Extra factor on the distillation term (the reference code's 'multiplier'), > 0. Default: 1."),
    check=check_positive, label='Multiplier')
