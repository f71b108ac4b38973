"""Ctrl-C (SIGINT) and `kill` (SIGTERM) held back while something must finish: a file being created, a training
step being applied, a checkpoint being written, numpy and torch loading (sd/__init__.py); and a Ctrl-C that the
`sd` command has handled kept from ending the process after all (forget_caught_interrupts).

No tutorial counterpart. Python runs a signal's handler between two bytecodes of the main thread, so a Ctrl-C can
land anywhere, even between creating a file and remembering its name; holding the signal back for those few lines
and handing it on afterwards makes such a step all-or-nothing. Only the main thread may set handlers: elsewhere the
block runs as it is.
"""

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Sequence

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and `kill` (which the `sd` command turns into a Ctrl-C)


def handlers_to_replace(signals: Sequence[int], accept: Callable) -> dict[int, object]:
    """{signal: its handler now} for those whose handler `accept`s being replaced; none outside the main thread
    (only it may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    handlers = {signum: signal.getsignal(signum) for signum in signals}
    return {signum: handler for signum, handler in handlers.items() if accept(handler)}


@contextlib.contextmanager
def deferred_sigint(deliver: bool = True, signals: Sequence[int] = STOP_SIGNALS) -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) and `kill` (SIGTERM) while the block runs, so that a file being written or a step
    being applied is finished; then hand each signal that came to the handler that was there before (Python's
    SIGINT one raises KeyboardInterrupt, SIGTERM's default ends the process), or drop them if not deliver. Only the
    main thread may set handlers: in another thread the block runs as it is, and so does a signal whose handler
    was set outside Python."""
    previous = handlers_to_replace(signals, lambda handler: handler is not None)
    received = {}  # signal -> the frame of its first arrival, in the order they came
    for signum in previous:
        signal.signal(signum, lambda signum, frame: received.setdefault(signum, frame))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if deliver:
        for signum, frame in received.items():
            deliver_signal(previous[signum], signum, frame)


def deliver_signal(handler, signum: int, frame) -> None:
    """Do what `handler` (one signal.getsignal returned) would have done with the signal."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # the default action (for SIGINT and SIGTERM, the process ends), as it would
    # SIG_IGN: ignored, as it would have been


class _NoteAndRaise:
    """A handler that notes the signal in `received`, then does what `previous` (Python's SIGINT handler or another
    _NoteAndRaise) does: raise KeyboardInterrupt."""

    def __init__(self, previous, received: list):
        self.previous, self.received = previous, received

    def __call__(self, signum, frame):
        self.received.append(frame)
        self.previous(signum, frame)


@contextlib.contextmanager
def remembered_interrupts(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[list]:
    """While the block runs, Ctrl-C (and SIGTERM, where the `sd` command makes it one) raises KeyboardInterrupt as
    usual and is also noted in the list yielded: one whose exception is lost (Python drops it when it lands in a
    finalizer; an extension may turn it into another error) still counts as a Ctrl-C. Nests. Only in the main
    thread, for the signals under Python's own SIGINT handler (signal.default_int_handler)."""
    previous = handlers_to_replace(signals, lambda handler: handler is signal.default_int_handler
                                   or isinstance(handler, _NoteAndRaise))
    received = []
    for signum in previous:
        signal.signal(signum, _NoteAndRaise(previous[signum], received))
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def forget_caught_interrupts() -> None:
    """Make a Ctrl-C that was caught stay caught when the process ends.

    CPython marks the interpreter as interrupted when a KeyboardInterrupt ends a string `exec` (dataclasses build
    each `__init__` that way, so importing transformers runs hundreds), even if a caller catches it. Under
    `python -m` the interpreter then ends itself by SIGINT at exit, whatever exit code the program gave (CPython's
    run_eval_code_obj and Py_RunMain): `sd` would die of the signal (-2) after saying "sd: interrupted" and
    returning 130. Evaluating a string clears the mark; call this once the interruption has been handled."""
    exec("")  # run_eval_code_obj resets the mark first; an empty module cannot be interrupted inside
