"""What ``m2m plan`` and ``m2m experiment paper`` show while they run: the live progress view.

In a terminal (rich): the lines that stay — the stack coming up, one line per step (score, the failing criteria by
name, the decision taken), one per finished session — and below them one live status line with a spinner and the
seconds ticking: the stack starting (which agents are ready, the LLM planner loading its model), or what the
planner does now within a step (planning with the dose engine, scoring with the evaluator, asking the DRL advisor,
asking the LLM / the DRL / the rules), with the step's score and its failing criteria by label.

Off a terminal (a log file, CI): the same events as plain lines, one per event, never wrapped, each with the
seconds since the command started (``[   12.3 s] step 2: asking the LLM (llm:embedded) · score 7.50/9 · …``).

The planner publishes what it does on ``session.<id>`` (:class:`~m2m.agents.messages.StepPhase` before each
request and decision, :class:`~m2m.agents.messages.StepEvent` after each step); the stack's agents announce their
state on ``agents.status.<name>`` (:func:`watch_stack` reads them while the stack starts).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from types import TracebackType

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from m2m.agents.messages import AgentStatus, StepPhase
from m2m.bus.client import BusClient, BusConfig
from m2m.bus.errors import BusError

WIDE = 10_000
"""Console width off a terminal: rich never wraps a line or cuts a table cell in a log."""
POLL_S = 0.5
"""How often :func:`watch_stack` reads the agents' states."""


def make_console() -> Console:
    """The console of the interactive commands (on stderr: stdout keeps only the results, e.g. the session
    folder). Off a terminal it is wide and soft-wrapping, so log lines stay whole."""
    terminal = sys.stderr.isatty()
    return Console(stderr=True, soft_wrap=not terminal, width=None if terminal else WIDE)


def phase_text(p: StepPhase) -> str:
    """What the planner does in phase ``p``, for people."""
    if p.phase == "planning":
        return "planning (dose engine)"
    if p.phase == "scoring":
        return "scoring (evaluator)"
    if p.phase == "advising":
        return "asking the DRL advisor"
    who = p.decider.split(":")[0]
    if who == "llm":
        return f"asking the LLM ({p.decider})"
    if who == "drl":
        return "asking the DRL"
    if who == "rules":
        return "applying the rules"
    return f"deciding ({p.decider})"


def phase_score(p: StepPhase) -> str:
    """``score 7.50/9`` once the step's plan is scored ("" before)."""
    return f"score {p.score:.2f}/{p.max_score:g}" if p.score is not None and p.max_score is not None else ""


class ProgressView:
    """Lines that stay plus one live status line (in a terminal), or plain lines (off a terminal; see the module
    docstring). Use as a context manager around the work; ``live=None`` decides by the console."""

    def __init__(self, console: Console, *, live: bool | None = None) -> None:
        self.console = console
        self.live = console.is_terminal if live is None else live
        self._t0 = time.monotonic()
        self._title = ""
        self._text = ""
        self._since: float | None = None
        self._detail = ""
        self._last_plain = ""
        self._spinner = Spinner("dots", style="cyan")
        self._live: Live | None = None

    def __enter__(self) -> ProgressView:
        if self.live:
            self._live = Live(self, console=self.console, refresh_per_second=4, transient=True)
            self._live.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def __rich__(self) -> RenderableType:
        head = " · ".join(p for p in (self._title, self._text) if p)
        if not head:
            return Text("")
        if self._since is not None:
            head += f" · {time.monotonic() - self._since:.0f} s"
        self._spinner.update(text=Text(head))
        return Group(self._spinner, Text(f"  {self._detail}", style="dim")) if self._detail else self._spinner

    # ------------------------------------------------------------------------------------------ what is shown
    def line(self, text: str) -> None:
        """A line that stays (above the status line in a terminal)."""
        if self.live:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self._plain(text)

    def title(self, text: str) -> None:
        """What the whole command is at (e.g. ``session 3/84``), shown before the status in a terminal."""
        self._title = text

    def activity(self, text: str, *, since: float | None = None, detail: str = "") -> None:
        """What is going on now, since ``since`` (monotonic; default now), with a ``detail`` line. Off a terminal
        it is printed once each time it changes."""
        if text != self._text or since is not None:
            self._since = time.monotonic() if since is None else since
        self._text, self._detail = text, detail
        if not self.live:
            plain = " · ".join(p for p in (self._title, text, detail) if p)
            if plain != self._last_plain:
                self._last_plain = plain
                self._plain(plain)

    def idle(self) -> None:
        """Nothing going on (the status line goes blank)."""
        self._text, self._since, self._detail = "", None, ""

    def phase(self, p: StepPhase) -> None:
        """The planner entered a phase of a step (its own start time, so the seconds are the planner's)."""
        since = time.monotonic() - max(0.0, time.time() - p.started_at)
        text = " · ".join(x for x in (f"step {p.step}: {phase_text(p)}", phase_score(p)) if x)
        self.activity(text, since=since, detail=f"failing: {', '.join(p.failing)}" if p.failing else "")

    def _plain(self, text: str) -> None:
        print(f"[{time.monotonic() - self._t0:7.1f} s] {text}", file=self.console.file, flush=True)


# ------------------------------------------------------------------------------------------------ the stack
def agents_summary(statuses: dict[str, AgentStatus]) -> str:
    """``ready 5/6 · planner-1: loading the model …`` for the agents a stack announced."""
    if not statuses:
        return "broker up · the agents are starting"
    ready = sum(s.state == "ready" for s in statuses.values())
    busy = [f"{s.name}: {s.detail or s.state}" for s in statuses.values() if s.state not in ("ready", "stopped")]
    return " · ".join([f"ready {ready}/{len(statuses)}", *busy])


async def watch_stack(config: BusConfig, view: ProgressView, what: str | Callable[[], str], *,
                      since: float | None = None, changes_only: bool = False) -> None:
    """Show ``what`` (e.g. bringing the stack up, since ``since``, monotonic; a callable is asked each time) with
    the agents' announced states until cancelled: in a terminal on the status line; off a terminal one line per
    agent state change (``planner-1 (llm): starting: loading the model …``; with ``changes_only`` not the states
    first found)."""
    since = time.monotonic() if since is None else since
    title = what if callable(what) else lambda: what
    seen: dict[str, tuple[int, str, str]] | None = None if changes_only else {}
    view.activity(title(), since=since, detail="waiting for the broker" if view.live else "")
    async with BusClient(f"m2m-view-{os.getpid()}", config) as bus:
        while True:
            try:
                retained = await bus.retained("agents.status.")
            except (TimeoutError, BusError):
                await asyncio.sleep(POLL_S)
                continue
            statuses = {m.name: m for m in retained.values() if isinstance(m, AgentStatus)}
            if seen is None:
                seen = {s.name: (s.pid, s.state, s.detail) for s in statuses.values()}
            for s in sorted(statuses.values(), key=lambda s: s.name):
                key = (s.pid, s.state, s.detail)
                if seen.get(s.name) != key:
                    seen[s.name] = key
                    if not view.live:
                        view.line(f"{s.name} ({s.impl}): {s.state}" + (f": {s.detail}" if s.detail else ""))
            view.activity(title(), since=since, detail=agents_summary(statuses) if view.live else "")
            await asyncio.sleep(POLL_S)

