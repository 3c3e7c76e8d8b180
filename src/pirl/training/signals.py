"""Signals during training: SIGTERM / SIGINT stop the run at the next step boundary, and DataLoader workers leave
the decision to the main process."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import torch


def worker_init(_: int) -> None:
    """``worker_init_fn`` of every training-side DataLoader (views, bank initialisation, kNN monitor)."""
    torch.set_num_threads(1)  # workers augment one sample at a time; threads would fight the trainer
    # Ctrl-C reaches the whole process group; the main process decides when to stop. SIGTERM keeps its default
    # (the inherited handler would ignore it): the DataLoader terminates workers that do not exit in time.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class StopRequest:
    """SIGTERM / SIGINT handlers that only note the signal; the trainer stops at the next step boundary.

    A second SIGINT raises :class:`KeyboardInterrupt` at once. Forked DataLoader workers inherit the handler
    before their own setup runs, so it ignores signals outside the process that installed it.
    """

    signals = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal only works in the main thread; the caller keeps its own handling
        for sig in self.signals:
            if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. SIGINT in a background job stays ignored
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum
