"""Ctrl-C (SIGINT) and SIGTERM during long work: stop at the next safe point, keep what is finished.

The first signal only sets a flag that the loops check between steps (training) or images (testing, inference);
they then finish the outputs they can and raise `Interrupted`, which the entry point prints as one line. A second
signal stops at once (KeyboardInterrupt). Every file is written atomically, so nothing is left half-written.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Work stopped on request; the message says where, what was kept and how to continue."""


def _stop_now(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """A function telling whether a stop was asked for since the block began. Outside the main thread (where
    Python cannot take signals) it always says no."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def request_stop(signum, frame):
        requested.append(signum)
        for other in SIGNALS:  # the second signal stops at once
            signal.signal(other, _stop_now)

    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, request_stop)
    try:
        yield lambda: bool(requested)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
