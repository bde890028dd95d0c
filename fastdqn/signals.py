"""Signal handlers in place for the length of a block (Ctrl-C and SIGTERM during training), and
child processes that die with their parent."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading


@contextlib.contextmanager
def handling(signum: int, handler, *, over_ctrl_c_default: bool = False):
    """``handler`` for ``signum`` while the block runs, then the handler that was there before.

    Only the main thread receives signals, so elsewhere nothing is installed. With
    ``over_ctrl_c_default`` (SIGINT), nothing is installed either unless Python's own Ctrl-C
    handler is in place: a caller's handler, or SIGINT ignored (a background job), stays.
    """
    if threading.current_thread() is not threading.main_thread() \
            or over_ctrl_c_default and signal.getsignal(signum) is not signal.default_int_handler:
        yield
        return
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when its parent dies, even by SIGKILL (Linux; elsewhere
    nothing is done). Call it first thing in a child process."""
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
