"""What the long-running commands (``m2m plan``, ``m2m experiment paper``) share: the progress of a stack they bring
up, and Ctrl-C as a clean stop instead of a traceback.

**Ctrl-C.** Inside :func:`sigint_cancels`, SIGINT cancels the command's coroutine (the task that entered the block)
at the ``await`` it is at, instead of raising :class:`KeyboardInterrupt` wherever the interpreter happens to be. The
command catches :class:`asyncio.CancelledError`, sees from :attr:`Sigint.count` that it was the user, calls
:func:`resume_after_interrupt` and cleans up (keeps what was done, takes down a stack it started), then returns
:data:`EXIT_INTERRUPTED` after one line on stderr. A second Ctrl-C cancels that clean-up as well: ``asyncio.run``
then raises ``CancelledError``, which the command turns into one line too. SIGTERM (a ``kill``, a job scheduler
stopping the command) is handled as a Ctrl-C, so a stack the command started goes down with it (:data:`STOP_SIGNALS`).

**A stack coming up.** :class:`StackStart` is the ``starting`` view of :func:`m2m.cli.common.ensure_stack`: it finds
the stack this process is starting in the registry (a new runtime folder whose supervisor is this process's child;
its sockets are only made as it starts), shows its agents coming up (:func:`m2m.session.progress.watch_stack`: the
LLM planner loading its model), and can stop it while it starts (SIGTERM to its supervisor, which stops what it
started in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from m2m.bus.client import BusConfig
    from m2m.cli.common import StackInUse, StackUse
    from m2m.session.progress import ProgressView
    from m2m.stack.registry import StackEntry

EXIT_INTERRUPTED = 130
"""The exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it."""
STARTING = "bringing a stack up"
STOPPING = "interrupted: stopping the stack that is coming up"
LOG_LEVEL_ENV = "M2M_LOG_LEVEL"
FIND_POLL_S = 0.2


@dataclass
class Sigint:
    """How many SIGINTs arrived inside :func:`sigint_cancels`."""

    count: int = 0


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""The signals that stop a long-running command cleanly inside :func:`sigint_cancels`."""


@contextlib.contextmanager
def sigint_cancels() -> Iterator[Sigint]:
    """While the block runs, SIGINT or SIGTERM cancels the current task (see the module docstring). Call from a
    coroutine."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    state = Sigint()

    def on_sigint() -> None:
        state.count += 1
        if task is not None and not task.done():
            task.cancel()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_sigint)
    try:
        yield state
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def resume_after_interrupt() -> None:
    """Clear the current task's cancellation after a Ctrl-C was caught, so its clean-up can await (timeouts work)."""
    task = asyncio.current_task()
    if task is not None:
        while task.uncancel():
            pass


def quiet_logs(args: object) -> None:
    """The progress view says what happens; the in-process info logs would say it again (``m2m replay`` showed each
    step twice in a terminal). Warnings and errors only, unless ``--log-level`` or ``$M2M_LOG_LEVEL`` asks."""
    from m2m.bus.logs import configure_logging

    if getattr(args, "log_level", None) is None and LOG_LEVEL_ENV not in os.environ:
        configure_logging("warning")


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _ours(entry: StackEntry) -> bool:
    """Registered by this process (still starting) or supervised by a child of it."""
    return entry.pid == os.getpid() or _parent_of(entry.pid) == os.getpid()


class StackStart:
    """The ``starting`` view of :func:`m2m.cli.common.ensure_stack` (see the module docstring). ``bus``: where the
    stack comes up when the command line or config named it (None: on sockets of its own, found when made)."""

    def __init__(self, view: ProgressView, bus: BusConfig | None) -> None:
        self.view = view
        self.bus = bus
        self.entry: StackEntry | None = None
        self.what = STARTING
        self.since = time.monotonic()
        self._before: set[str] = set()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        from m2m.stack import registry

        self.since = time.monotonic()
        self._before = {e.id for e in registry.running_stacks(clean=False)}
        task = asyncio.get_running_loop().create_task(self._watch())
        try:
            yield
        finally:
            task.cancel()
            self.view.idle()

    def _find(self) -> StackEntry | None:
        from m2m.stack import registry

        return next((e for e in registry.running_stacks(clean=False) if e.id not in self._before and _ours(e)), None)

    async def _watch(self) -> None:
        from m2m.cli.common import registered_bus
        from m2m.session.progress import watch_stack

        while self.entry is None:
            self.view.activity(self.what, since=self.since)
            self.entry = self._find()
            if self.entry is None:
                await asyncio.sleep(FIND_POLL_S)
        bus = self.bus or registered_bus(self.entry)  # a CURVE stack's keys come from its config
        await watch_stack(bus, self.view, lambda: self.what, since=self.since)

    async def stop(self, timeout: float = 5.0) -> bool:
        """Ask the supervisor of the stack being started to stop (SIGTERM: it stops whatever it started, in
        order); waits at most ``timeout`` s for it to have been started. False when it was not found."""
        self.what = STOPPING
        self.view.activity(STOPPING)
        deadline = time.monotonic() + timeout
        while True:
            entry = self._find() or self.entry
            if entry is not None and entry.pid != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(entry.pid, signal.SIGTERM)
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(FIND_POLL_S)


async def bring_up(
    command: str, use: StackUse, view: ProgressView, sigint: Sigint, nothing_done: str, **ensure: Any
) -> StackInUse | int:
    """The stack ``use`` asks for, brought up under the progress ``view``; an exit code instead when it did not come
    up (1) or a Ctrl-C came while it did (130: a stack this command started is taken down again, and the message
    says ``nothing_done``). ``ensure`` goes to :func:`~m2m.cli.common.ensure_stack` (e.g. ``keep_up``)."""
    from m2m.cli.common import ensure_stack, failed
    from m2m.stack.config import StackError
    from m2m.stack.control import take_down

    starting = StackStart(view, use.bus)
    start = asyncio.ensure_future(ensure_stack(use, starting=starting, **ensure))
    try:
        return await asyncio.shield(start)
    except StackError as exc:
        return failed(command, exc)
    except asyncio.CancelledError:
        if not sigint.count:
            raise
    resume_after_interrupt()
    await starting.stop()
    try:
        stack: StackInUse | None = await start
    except StackError:
        stack = None
    if stack is not None and stack.started:
        await take_down(stack.bus, timeout=60.0, drain=False)
    print(f"m2m {command}: interrupted while the stack came up; {nothing_done}", file=sys.stderr)
    return EXIT_INTERRUPTED
