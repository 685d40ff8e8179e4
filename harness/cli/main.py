"""The ``harness`` command's entry point: Ctrl-C or SIGTERM at any moment ends it with one line, exit code 130.

``harness.cli.app`` imports torch and diffusers, which takes seconds, and an interrupt during those imports would
print a traceback from deep inside them. So this module imports nothing heavy: until the command line is
ready a signal ends the process at once (nothing has been written yet); from then on it raises
KeyboardInterrupt, which ``harness bench`` turns into keeping its finished measurements.

Python acts on a signal only between bytecodes, so one that lands inside a long native call (a single huge
tensor operation, a wait for other processes inside torch.distributed) would wait for that call to return,
which can take many minutes. A watchdog thread learns of every signal at once and ends the process when the
main thread has not moved for a few seconds since: what was finished is on disk already (records are
appended and fsynced one at a time). A native call that holds the GIL blocks the watchdog too.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from harness.errors import ExitCode, one_line

if TYPE_CHECKING:
    import click

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How long the main thread may sit inside one native call after a signal before the process ends without it.
STUCK_AFTER_S = 5.0
STUCK_MESSAGE = (f"interrupted inside a native call that had not returned to Python {STUCK_AFTER_S:g} s later "
                 "(e.g. one huge tensor operation, or a wait for other processes): stopped at once. Finished "
                 "measurements are in the run's records.jsonl; harness report RUN_DIR rebuilds its summary.md.")


def main() -> None:
    """``harness`` and ``python -m harness``: the command line, with signals handled from the first moment."""
    _on_signals(_exit_at_once)
    _start_watchdog()
    # torch's C++ code logs its errors with a C++ stack trace besides raising them (a rendezvous timing out
    # prints dozens of lines); harness reports what is raised, in one line. Set the variable to see them.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    # A name that is not valid text (a folder name in another encoding, a lone surrogate in a record) is printed
    # escaped, as \udcff, instead of ending the command in a UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    from harness.cli.app import cli

    _on_signals(_raise_interrupt)
    _running.set()
    try:
        code = _run(cli)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = ExitCode.INTERRUPTED
    finally:
        _on_signals(_exit_at_once)  # a signal while Python shuts down would print a traceback from its hooks
        # Once a KeyboardInterrupt has passed through code run by exec() (dataclasses and namedtuples make their
        # methods so, while modules import), CPython ends the process with SIGINT after the exit code is set;
        # the interrupt was handled here, and running exec() again clears that mark.
        exec("")
    sys.exit(code)


def _run(cli: click.Group) -> int:
    """Click's standalone mode, except that an interrupt reaches the caller instead of becoming "Aborted!"."""
    import click

    try:
        result = cli.main(prog_name="harness", standalone_mode=False)
    except click.exceptions.Abort as abort:
        if isinstance(abort.__cause__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        click.echo("Aborted!", err=True)
        return 1
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except Exception as error:  # noqa: BLE001 - a bug: its own exit code, its traceback for the report
        import traceback

        traceback.print_exc()
        print(f"harness: internal error (a bug in harness or a plugin, not in your input): {one_line(error)}; "
              "please report it with the traceback above.", file=sys.stderr)
        return ExitCode.INTERNAL_ERROR
    # Outside standalone mode click returns ctx.exit()'s code (--help, --version) or what the command returned,
    # which harness's commands leave None; their failures exit through sys.exit or a ClickException.
    return result if isinstance(result, int) else 0


def _on_signals(handler: Callable[[int, FrameType | None], Any]) -> None:
    for signum in SIGNALS:
        signal.signal(signum, handler)


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def _exit_at_once(_signum: int, _frame: FrameType | None) -> NoReturn:
    _leave("interrupted")


def _leave(message: str) -> NoReturn:
    """End the process now, with ``message`` as its last line; Python's shutdown (and its hooks) is skipped."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stream: the message below goes to the descriptor itself
    os.write(2, f"{message}\n".encode())
    os._exit(ExitCode.INTERRUPTED)


def _start_watchdog() -> None:
    """Have a thread learn of every signal when it arrives, even while the main thread is inside native code."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    except ValueError:  # not the main thread: harness runs inside another program, which owns its signals
        os.close(read_end)
        os.close(write_end)
        return
    threading.Thread(target=_watch, args=(read_end, threading.main_thread().ident), name="harness-interrupts",
                     daemon=True).start()
    os.register_at_fork(after_in_child=_forget_watchdog)


def _forget_watchdog() -> None:
    """A forked child (a data-loader worker) has no watchdog: its signals must not reach its parent's."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # only the main thread may change it; a child forked elsewhere keeps it
        pass


_running = threading.Event()  # set once the command line runs: before that, nothing is written that could be kept


def _watch(read_end: int, main: int | None) -> None:
    while True:
        received = os.read(read_end, 1)  # the C-level signal handler writes each signal's number here
        if received and received[0] in SIGNALS and _stuck(main):
            _leave(STUCK_MESSAGE if _running.is_set() else "interrupted")


def _stuck(main: int | None) -> bool:
    """Whether the main thread stays on one bytecode instruction, inside one native call, for STUCK_AFTER_S.

    A main thread that acts on the signal raises KeyboardInterrupt and so moves at once.
    """
    def position() -> tuple[int, int] | None:
        frame = sys._current_frames().get(main) if main is not None else None
        return None if frame is None else (id(frame), frame.f_lasti)

    start = position()
    deadline = time.monotonic() + STUCK_AFTER_S
    while start is not None and time.monotonic() < deadline:
        time.sleep(0.05)
        if position() != start:
            return False
    return start is not None
