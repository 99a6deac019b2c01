"""The console of the command lines: timm's log layout (every record on stderr, INFO without a level prefix)."""
import logging
import sys
from contextlib import contextmanager
from logging.handlers import MemoryHandler
from typing import Callable, Iterator

from timm.utils.log import FormatterNoInfo


class ConsoleHandler(logging.StreamHandler):
    """timm's console log: every record on stderr, INFO without a level prefix.

    The stream is looked up for each record, so a replaced ``sys.stderr`` (pytest's capture, a caller's redirect)
    is honoured instead of the one there when the handler was made.
    """

    def __init__(self):
        super().__init__()
        self.setFormatter(FormatterNoInfo())

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


@contextmanager
def console_logging() -> Iterator[None]:
    """timm's ``setup_default_logging`` for one call of an entry point's ``main``: when it is called in a process
    that goes on (a test, a notebook), the root logger is given back as it was."""
    root = logging.getLogger()
    level, console = root.level, None
    if not any(isinstance(handler, ConsoleHandler) for handler in root.handlers):
        console = ConsoleHandler()
        root.addHandler(console)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        if console is not None:
            root.removeHandler(console)
        root.setLevel(level)


@contextmanager
def held_logs() -> Iterator[Callable[[], None]]:
    """Hold the console's log lines until the work is accepted (call the function this yields): work refused on the
    way then prints nothing but its one error line, accepted work every line it logged, in order."""
    root = logging.getLogger()
    consoles = [handler for handler in root.handlers if isinstance(handler, ConsoleHandler)]
    held = MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
    for handler in consoles:
        root.removeHandler(handler)
    root.addHandler(held)

    def release() -> None:
        if held in root.handlers:
            root.removeHandler(held)
            for handler in consoles:
                root.addHandler(handler)
            for record in held.buffer:
                root.handle(record)
            held.buffer.clear()

    try:
        yield release
    finally:
        if held in root.handlers:  # not accepted: the lines are dropped, the consoles come back
            root.removeHandler(held)
            for handler in consoles:
                root.addHandler(handler)
