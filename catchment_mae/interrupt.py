"""SIGTERM handled like Ctrl-C, so long runs stop cleanly under job schedulers."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def sigterm_raises(*_: object) -> None:
    """SIGTERM, as Ctrl-C, raises KeyboardInterrupt: the commands' one error
    boundary turns it into ``cmae: error: interrupted`` and exit code 130
    (a service manager's stop, ``timeout``), wherever the run is."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (main thread only)."""
    try:
        previous = signal.signal(signal.SIGTERM, sigterm_raises)
    except ValueError:  # not the main thread (web UI jobs): nothing to install
        yield
        return
    try:
        yield
    finally:
        # Unless the block chose to drop signals from now on (ignore_interrupts:
        # a rank that is stopping), the handler from before is back, even where
        # the block installed its own (ray.init does).
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Within the block, Ctrl-C and SIGTERM wait: they are raised as
    KeyboardInterrupt when it ends (main thread only).

    For writes that must not be cut: a KeyboardInterrupt raised inside
    torch.save's zip writer became "RuntimeError: unexpected pos" and a failed
    run instead of a stop (seen once in CI under SIGTERM).
    """
    received: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        received.append(signum)

    try:
        previous = {sig: signal.signal(sig, hold) for sig in SIGNALS}
    except ValueError:  # not the main thread: nothing to defer
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt


def ignore_interrupts() -> None:
    """From now on Ctrl-C and SIGTERM are dropped (main thread only).

    For a torchrun rank that is already stopping: the launcher forwards to every
    rank the signal each one had from the terminal, and a second
    KeyboardInterrupt during the shutdown can cut ``destroy_process_group``
    short; a group not destroyed has gloo's threads abort the rank at exit
    ("terminate called without an active exception": once in CI, once in 28
    local runs of the test). The launcher still kills a rank that has not left
    30 s after its signal.
    """
    try:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to change
        pass
