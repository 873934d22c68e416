"""Stopping on SIGTERM / SIGINT, also while blocked.

Python runs a signal's handler only once the main thread is back in Python holding the interpreter lock: a call
blocked inside a C or Rust library (safetensors and pyarrow retry an interrupted open()) may never get there, and
no Python thread can run while such a call holds the lock. So `watch_signals` works outside Python:
  - the stop handlers are installed with SA_RESETHAND (Linux): a second SIGTERM/SIGINT takes the default action and
    ends the process at once, whatever it is doing, with the usual status (143 / 130);
  - a small watcher process reads the signal numbers the C-level handler writes (`signal.set_wakeup_fd`, which needs
    no lock) and, when no Python handler has run (`acknowledge`) within `GRACE_SECONDS`, sends the signal again: the
    default action then ends the process with that same status.
Handlers that do run stop the usual way (the commands raise `Terminated` so every clean-up runs; the training loop
checkpoints first).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

GRACE_SECONDS = 20.0  # for a handler to run: longer than any one blocking call of a healthy run on a busy machine
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_ACK = 255  # written after the signal numbers by `acknowledge`: a handler ran

# The watcher: reads signal numbers (and acknowledgements) from stdin; re-sends an unacknowledged stop signal to the
# parent after the grace period. Standard library only, so it starts in milliseconds.
_WATCHER = """
import os, select, sys, time
parent, grace, pending, deadline = int(sys.argv[1]), float(sys.argv[2]), 0, 0.0
while True:
    timeout = None if not pending else max(0.0, deadline - time.monotonic())
    if not select.select([0], [], [], timeout)[0]:
        name = {2: "SIGINT", 15: "SIGTERM"}[pending]
        os.write(2, f"\\nerror: stopped by {name} while blocked (no handler ran within {grace:g} s); files already "
                    "written are complete (a hidden temporary file may remain)\\n".encode())
        os.kill(parent, pending)
        sys.exit(0)
    data = os.read(0, 64)
    if not data:
        sys.exit(0)
    for byte in data:
        if byte == 255:
            pending = 0
        elif byte in (2, 15) and not pending:
            pending, deadline = byte, time.monotonic() + grace
"""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread. A BaseException (like KeyboardInterrupt), so no `except Exception` on the
    way swallows it, while every `finally` (temporary-file clean-up) runs."""


_wakeup_fd = -1  # the write end the C-level handler writes to, while a watch is on


def acknowledge() -> None:
    """Called by every Python-level stop handler when it runs: the main thread is responsive, stopping is its job."""
    if _wakeup_fd >= 0:
        try:
            os.write(_wakeup_fd, bytes([_ACK]))
        except OSError:
            pass


def reset_after_first(signum: int) -> None:
    """Add SA_RESETHAND to the handler installed for `signum` (Linux; elsewhere nothing): its first delivery runs
    the handler, a second one takes the default action, even while the process is blocked."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    class SigAction(ctypes.Structure):  # glibc's and musl's struct sigaction
        _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * (128 // ctypes.sizeof(ctypes.c_ulong))),
                    ("flags", ctypes.c_uint), ("restorer", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    action = SigAction()
    if libc.sigaction(signum, None, ctypes.byref(action)) == 0 and action.handler not in (None, 0, 1):
        action.flags |= 0x80000000  # SA_RESETHAND
        libc.sigaction(signum, ctypes.byref(action), None)


def _not_in_forked_children() -> None:
    global _wakeup_fd
    if _wakeup_fd >= 0:  # a forked DataLoader worker must not wake its parent's watcher with its own signals
        _wakeup_fd = -1
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:  # forked from another thread than the main one: its fd is the parent's concern
            pass


os.register_at_fork(after_in_child=_not_in_forked_children)


@contextmanager
def watch_signals(grace: float | None = None) -> Iterator[None]:
    """Within (main thread; nested calls share the outer watch): the installed SIGTERM/SIGINT handlers run once (a
    second signal ends the process), and a signal no handler acknowledges within `grace` seconds (default
    GRACE_SECONDS) ends it too, with 128 + its number."""
    global _wakeup_fd
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    for signum in STOP_SIGNALS:  # the handlers just installed, also under an outer watch
        reset_after_first(signum)
    if _wakeup_fd >= 0:
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    watcher = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHER, str(os.getpid()),
                                str(GRACE_SECONDS if grace is None else grace)], stdin=read_fd)
    os.close(read_fd)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    _wakeup_fd = write_fd
    try:
        yield
    finally:
        _wakeup_fd = -1
        signal.set_wakeup_fd(previous)
        os.close(write_fd)  # the watcher reads end-of-file and exits
        try:
            watcher.wait(timeout=5)
        except subprocess.TimeoutExpired:
            watcher.kill()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within (and watched): SIGTERM raises `Terminated` and SIGINT `KeyboardInterrupt` in the main thread (a second
    SIGTERM during the clean-up is ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        acknowledge()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    def on_sigint(signum, frame):
        acknowledge()
        raise KeyboardInterrupt()

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm),
                signal.SIGINT: signal.signal(signal.SIGINT, on_sigint)}
    try:
        with watch_signals():
            yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
