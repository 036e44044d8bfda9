"""Where running stacks are found: one runtime folder per stack, so that stacks never share an endpoint by accident.

Every stack a supervisor runs has a **stack id** (8 hex digits) and a runtime folder ``<runtime root>/<id>/``:

* the runtime root is ``$M2M_RUNTIME_DIR`` when set, else ``$XDG_RUNTIME_DIR/m2m`` (a per-user tmpfs that the
  system empties at logout), else ``/tmp/m2m-<uid>``; it is created with mode 700 and refused when another user
  owns it;
* a stack config without ``[bus]`` endpoints (the packaged default) gets its own ipc sockets in that folder,
  ``ipc://<root>/<id>/bus`` and ``.../pub``: two ``m2m plan`` or ``m2m up`` never meet on one bus. A stack with
  explicit endpoints is registered there too (the folder then holds only its ``stack.json``), so that ``m2m
  status`` lists it;
* ``stack.json`` says which stack it is (:class:`StackEntry`: id, endpoints, supervisor pid and its start time,
  run folder with the logs and the transcript, config). It is written when the folder is made (pid: the process
  that made it), rewritten by ``start_detached`` with the supervisor's pid, and by the supervisor once it runs;
  the supervisor removes the folder when it stops;
* a folder whose supervisor is gone (killed with SIGKILL, a crash, a reboot: the pid is dead, a zombie, or was
  reused by another process, which its start time tells) is **stale**: :func:`running_stacks` skips it and
  removes it — unless children it recorded (``children``) still run: :func:`stale_stacks` lists such a stack
  (``m2m status``), :func:`stop_orphans` kills its process groups and removes it (``m2m down``, and ``m2m up`` /
  ``m2m plan`` before they start a stack at its endpoint). A folder without ``stack.json`` is one being made; it is
  removed only after :data:`UNCLAIMED_GRACE_S`.

Commands find a stack by id (``--stack ID``, any unique prefix: :func:`find_stack`), by endpoint
(:func:`stack_at`), or as the only one running (:func:`running_stacks`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import stat
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from m2m.stack.config import StackError

RUNTIME_ENV = "M2M_RUNTIME_DIR"
"""Overrides the runtime root (tests, or a machine whose ``/tmp`` is not private)."""
ENTRY_NAME = "stack.json"
BUS_SOCKET = "bus"
PUB_SOCKET = "pub"
MAX_IPC_PATH = 100
"""Longest socket path allowed (Linux ``sun_path`` holds 107 bytes)."""
UNCLAIMED_GRACE_S = 60.0
"""A runtime folder without ``stack.json`` older than this is left over from a crash, not one being made."""
_ID = re.compile(r"^[0-9a-f]{8}$")


class NoSuchStack(StackError):
    """``--stack ID`` names no running stack (or a prefix of several); the message lists the running ones."""


@dataclass(frozen=True)
class StackEntry:
    """One registered stack (the content of its ``stack.json``)."""

    id: str
    dir: str
    endpoint: str
    pub_endpoint: str
    isolated: bool
    """Its endpoints are the sockets in its runtime folder (no ``[bus]`` endpoints were given)."""
    pid: int
    """The supervisor's (or, while it starts, the starting command's) process id."""
    pid_start: int | None = None
    """That process's start time (``/proc/<pid>/stat`` field 22), which tells a reused pid apart."""
    run_dir: str = ""
    config: str = ""
    started_utc: str = ""
    children: tuple[tuple[str, int, int | None], ...] = ()
    """The supervisor's current children: (name, pid, start time); each leads its own process group. What
    :func:`stop_orphans` kills when the supervisor died without stopping them."""

    @property
    def path(self) -> Path:
        return Path(self.dir)

    def describe(self) -> str:
        """One line: id, endpoint, config, run folder."""
        where = f"run folder {self.run_dir}" if self.run_dir else "starting"
        return f"{self.id} at {self.endpoint} (config {self.config or '?'}, {where}, since {self.started_utc})"


def runtime_root() -> Path:
    """The folder that holds every stack's runtime folder (see the module docstring); created private."""
    if env := os.environ.get(RUNTIME_ENV):
        root = Path(env)
    elif (xdg := os.environ.get("XDG_RUNTIME_DIR")) and os.path.isdir(xdg) and os.access(xdg, os.W_OK | os.X_OK):
        root = Path(xdg) / "m2m"
    else:
        root = Path("/tmp") / f"m2m-{os.getuid()}"
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(root)
    except OSError as exc:
        raise StackError(f"cannot create the stack runtime folder {root}: {exc} (set {RUNTIME_ENV})") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise StackError(f"the stack runtime folder {root} is not a folder of this user; remove it or set "
                         f"{RUNTIME_ENV}")
    return root


def _process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot; None where /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start: int | None) -> bool:
    """Process ``pid`` runs (not a zombie) and is the one that started at ``start`` (when known)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        if Path("/proc/self/stat").exists():
            return False  # /proc works and has no such process
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if state in ("Z", "X"):
        return False
    return start is None or _process_start(pid) == start


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_entry(entry: StackEntry) -> StackEntry:
    """Write (atomically) ``stack.json`` into the entry's runtime folder."""
    path = entry.path / ENTRY_NAME
    tmp = path.with_name(f".{ENTRY_NAME}.{os.getpid()}")
    tmp.write_text(json.dumps(asdict(entry), indent=1) + "\n")
    os.replace(tmp, path)
    return entry


def claim(entry: StackEntry, pid: int, **changes: str) -> StackEntry:
    """The entry with its owner set to process ``pid`` (and ``run_dir``/``config`` changed), written."""
    fields = {**asdict(entry), "pid": pid, "pid_start": _process_start(pid), **changes}
    return write_entry(StackEntry(**fields))


def allocate(endpoint: str | None = None, pub_endpoint: str | None = None, *, config: str = "") -> StackEntry:
    """A new stack id and runtime folder, registered to this process; its ipc sockets there unless both
    endpoints are given. Raises :class:`StackError` when the socket paths would be too long for ipc."""
    if (endpoint is None) != (pub_endpoint is None):
        raise StackError("give both bus endpoints (ROUTER and PUB) or neither")
    root = runtime_root()
    while True:
        stack_id = secrets.token_hex(4)
        folder = root / stack_id
        try:
            folder.mkdir(mode=0o700)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise StackError(f"cannot create the stack runtime folder {folder}: {exc}") from None
    isolated = endpoint is None
    if endpoint is None or pub_endpoint is None:
        longest = folder / PUB_SOCKET
        if len(str(longest)) > MAX_IPC_PATH:
            shutil.rmtree(folder, ignore_errors=True)
            raise StackError(f"the stack runtime folder {folder} is too long for ipc sockets (over {MAX_IPC_PATH} "
                             f"characters): set {RUNTIME_ENV} to a shorter folder")
        endpoint, pub_endpoint = f"ipc://{folder / BUS_SOCKET}", f"ipc://{folder / PUB_SOCKET}"
    entry = StackEntry(id=stack_id, dir=str(folder), endpoint=endpoint, pub_endpoint=pub_endpoint,
                       isolated=isolated, pid=os.getpid(), pid_start=_process_start(os.getpid()), config=config,
                       started_utc=_now())
    return write_entry(entry)


def remove(entry: StackEntry | Path) -> None:
    """Remove a stack's runtime folder (its sockets and ``stack.json``); only a folder named by a stack id."""
    folder = entry.path if isinstance(entry, StackEntry) else Path(entry)
    if _ID.match(folder.name):
        shutil.rmtree(folder, ignore_errors=True)


def read_entry(folder: Path) -> StackEntry | None:
    """The folder's ``stack.json``; None when it has none or an unreadable one."""
    try:
        data = json.loads((folder / ENTRY_NAME).read_text())
        data["children"] = tuple((str(n), int(p), None if t is None else int(t))
                                 for n, p, t in data.get("children", ()))
        return StackEntry(**data)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def record_children(entry: StackEntry, children: list[tuple[str, int]]) -> StackEntry:
    """The entry with its supervisor's current children (name, pid) recorded (with their start times), written."""
    recorded = tuple((name, pid, _process_start(pid)) for name, pid in children)
    return write_entry(dataclasses.replace(entry, children=recorded))


def live_children(entry: StackEntry) -> list[tuple[str, int]]:
    """The recorded children of a stack that still run (a reused pid, told by its start time, is not one)."""
    return [(name, pid) for name, pid, start in entry.children if _alive(pid, start)]


def stop_orphans(entry: StackEntry, grace_s: float = 5.0) -> list[str]:
    """Stop what is left of a stack whose supervisor is gone: SIGTERM to each recorded child's process group, SIGKILL
    after ``grace_s`` s to what still runs; then remove its runtime folder. Returns the names of the children that
    were still running."""
    left = live_children(entry)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for _, pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
                os.killpg(pid, signal.SIGCONT)  # a stopped process acts on its SIGTERM
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(pid, None) for _, pid in left):
            time.sleep(0.05)
        if not any(_alive(pid, None) for _, pid in left):
            break
    remove(entry)
    return [name for name, _ in left]


def stale_stacks() -> list[StackEntry]:
    """Registered stacks whose supervisor is gone but some recorded child still runs (a ``kill -9``ed supervisor):
    what ``m2m status`` reports and ``m2m down`` stops (:func:`stop_orphans`). :func:`running_stacks` leaves
    their folders alone."""
    try:
        folders = [f for f in runtime_root().iterdir() if _ID.match(f.name) and f.is_dir()]
    except (StackError, OSError):
        return []
    found = []
    for folder in folders:
        entry = read_entry(folder)
        if entry is not None and not _alive(entry.pid, entry.pid_start) and live_children(entry):
            found.append(entry)
    return sorted(found, key=lambda e: (e.started_utc, e.id))


def running_stacks(*, clean: bool = True) -> list[StackEntry]:
    """The registered stacks whose supervisor (or starting command) is alive, oldest first; stale runtime folders
    are removed on the way when ``clean``."""
    try:
        root = runtime_root()
        folders = [f for f in root.iterdir() if _ID.match(f.name) and f.is_dir()]
    except (StackError, OSError):
        return []
    found: list[StackEntry] = []
    for folder in folders:
        entry = read_entry(folder)
        if entry is not None and _alive(entry.pid, entry.pid_start):
            found.append(entry)
            continue
        if not clean or (entry is not None and live_children(entry)):
            continue  # a dead supervisor's children still run: stale_stacks() reports them, stop_orphans() ends them
        if entry is None:
            with contextlib.suppress(OSError):
                if time.time() - folder.stat().st_mtime < UNCLAIMED_GRACE_S:
                    continue  # being made right now
        remove(folder)
    return sorted(found, key=lambda e: (e.started_utc, e.id))


def find_stack(ident: str) -> StackEntry:
    """The running stack whose id is ``ident`` or starts with it; :class:`NoSuchStack` otherwise."""
    stacks = running_stacks()
    exact = [e for e in stacks if e.id == ident]
    matches = exact or [e for e in stacks if ident and e.id.startswith(ident)]
    if len(matches) == 1:
        return matches[0]
    listing = "; ".join(e.describe() for e in stacks) or "none"
    if not matches:
        raise NoSuchStack(f"no running stack has the id {ident!r} (running: {listing})")
    raise NoSuchStack(f"{ident!r} is the start of several stack ids: {', '.join(e.id for e in matches)}")


def stack_at(endpoint: str) -> StackEntry | None:
    """The running registered stack whose ROUTER endpoint is ``endpoint``, if any."""
    return next((e for e in running_stacks() if e.endpoint == endpoint), None)
