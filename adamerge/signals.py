"""SIGINT and SIGTERM: outside training they unwind like Ctrl+C (temporaries are removed); during
``Trainer.fit`` Lightning handles SIGTERM and the step in progress finishes (``checkpointing.StopOnSignal``).
Training that a signal stopped ends in ``Stopped``, so that the entry point reports it without importing Lightning.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM outside training: unwinds like Ctrl+C, so that ``finally``/``except BaseException`` blocks
    (the fold's temporary directory) clean up instead of the process vanishing mid-write."""


_FITTING = threading.Event()  # set while Trainer.fit runs: Lightning handles SIGTERM then


def raise_on_sigterm() -> None:
    """Turn SIGTERM into ``Terminated`` (main thread only), except during ``Trainer.fit``: Lightning calls the
    handler it finds beside its own, and there the step in progress must finish (``StopOnSignal``)."""
    def terminated(signum, frame) -> None:
        if not _FITTING.is_set():
            raise Terminated

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminated)


@contextmanager
def lightning_handles_sigterm() -> Iterator[None]:
    """Around ``Trainer.fit``: SIGTERM stops after the step and writes ``interrupted.ckpt`` instead of unwinding."""
    _FITTING.set()
    try:
        yield
    finally:
        _FITTING.clear()


class Stopped(SystemExit):
    """Training stopped by SIGINT or SIGTERM after a finished step: ``str()`` says how to resume, ``code`` is the
    exit status (128 + the signal). A ``SystemExit``, as the ``SIGTERMException`` of Lightning's it stands for."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message
