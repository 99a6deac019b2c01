"""The settings of the Tf-KD losses: their names, their defaults (which the ``--tfkd-*`` flags share) and the range
checks every reader of a setting uses, the losses and the flags alike."""
from typing import Optional, Tuple

FORMULAS = ('paper', 'official')
SMOOTHING_CONVENTIONS = ('timm', 'reference')
# The defaults of the losses, which the ``--tfkd-*`` flags share: the reference ImageNet settings (alpha 0.1, T 20)
# and the reference code's virtual teacher (a = 0.99).
DEFAULT_ALPHA = 0.1
DEFAULT_TEMPERATURE = 20.0
DEFAULT_CORRECT_PROB = 0.99


def check_unit_interval(name: str, value: float) -> float:
    """``value`` in [0, 1] (NaN refused), e.g. a loss weight; ``name`` is how the message calls it."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f'{name} must be in [0, 1], got {value:g}')
    return float(value)


def check_positive(name: str, value: float) -> float:
    """``value`` > 0 (NaN refused)."""
    if not value > 0.0:
        raise ValueError(f'{name} must be > 0, got {value:g}')
    return float(value)


def check_correct_prob(name: str, value: float, num_classes: Optional[int] = None) -> float:
    """A virtual teacher's probability of the true class: in (1/K, 1], or in (0, 1] while K is not known."""
    if num_classes is not None and not 1.0 / num_classes < value <= 1.0:
        raise ValueError(f'{name} must be in (1/K, 1] = ({1.0 / num_classes:.6g}, 1] for K={num_classes}, '
                         f'got {value:g}')
    if not 0.0 < value <= 1.0:
        raise ValueError(f'{name} must be in (0, 1], got {value:g}')
    return float(value)


def check_smoothing(name: str, value: float) -> float:
    """A label smoothing epsilon, in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f'{name} must be in [0, 1), got {value:g}')
    return float(value)


def check_choice(name: str, value: str, choices: Tuple[str, ...]) -> str:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got '{value}'")
    return value
