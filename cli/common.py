"""What several commands share: the exit codes, which stack a command talks to (``--stack``, ``--connect``, CURVE
keys, heartbeat), checking arguments before anything starts, and bringing up a stack of the command's own.

**Exit codes** (every command): 0 done; :data:`EXIT_FAILED` (1) the command could not do its work (no stack
answers, the stack did not come up, a session failed); :data:`EXIT_USAGE` (2, argparse's code) a bad or ambiguous
command line or config, refused with one line ``m2m COMMAND: error: …`` on stderr before any process started.

**Which stack.** ``--stack ID`` (a running stack's id, or a unique prefix of it; ``m2m status`` lists them) or
``--connect ENDPOINT`` (``--pub-connect`` defaults to that of the stack registered there) name one. Without
either, ``m2m status`` shows every running stack and ``m2m swap``/``m2m down`` take the only one (several:
refused, name one). ``m2m plan``, ``m2m replay`` and ``m2m experiment paper`` never join a stack they were not
told to: without ``--stack``/``--connect`` (or ``[bus]`` endpoints in ``--config``) each brings up a stack of its
own on new sockets (:mod:`m2m.stack.registry`) and takes that one down when it ends (:func:`prepare_stack`,
:func:`ensure_stack`); told an address where a stack runs, it says that it joins it and leaves it running.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from m2m.agents.messages import StackStatus
    from m2m.bus.client import BusConfig
    from m2m.stack.config import StackConfig

EXIT_FAILED = 1
"""The command could not do its work: no stack answers, the stack did not come up, the session failed."""
EXIT_USAGE = 2
"""A bad or ambiguous command line or config (argparse's code): refused before any process started."""


class UsageError(ValueError):
    """A bad argument, found before anything started: :func:`usage_error` prints it, the command exits 2."""


def usage_error(command: str, problem: object) -> int:
    """Print ``m2m COMMAND: error: PROBLEM`` (one line, as argparse does) on stderr; :data:`EXIT_USAGE`."""
    print(f"m2m {command}: error: {problem}", file=sys.stderr)
    return EXIT_USAGE


def failed(command: str, problem: object) -> int:
    """Print ``m2m COMMAND: PROBLEM`` on stderr; :data:`EXIT_FAILED`."""
    print(f"m2m {command}: {problem}", file=sys.stderr)
    return EXIT_FAILED


def check_writable_folder(path: Path, what: str) -> None:
    """:class:`UsageError` unless ``path`` is a folder this user can write into, or one that can be made (its
    nearest existing parent is a writable folder). Nothing is created."""
    probe = Path(os.path.abspath(path))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{what} {path}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: {probe} is not writable")


# ------------------------------------------------------------------------------------------------ which stack
OWN_STACK = "a new stack of its own"
"""The ``default`` of :func:`add_bus_arguments` for commands that bring up their own stack (``m2m plan``)."""


def add_bus_arguments(p: argparse.ArgumentParser, *, default: str = "the only running stack") -> None:
    """Which stack (``--stack`` or ``--connect``) and how to authenticate (CURVE keys are required off-loopback);
    ``default`` says in the help what the command uses when neither is given."""
    p.add_argument("--stack", default=None, metavar="ID",
                   help=f"a running stack by its id or a prefix of it (m2m status lists them; default: {default})")
    p.add_argument("--connect", default=None, metavar="ENDPOINT", help=f"broker ROUTER (default: {default})")
    p.add_argument("--pub-connect", default=None, metavar="ENDPOINT",
                   help="broker PUB (default: that of the stack registered at --connect)")
    p.add_argument("--curve-secret", default=None, metavar="FILE", help="this agent's CURVE secret key file")
    p.add_argument("--curve-server", default=None, metavar="FILE", help="the broker's CURVE public key file")
    p.add_argument("--heartbeat", type=float, default=None, help="heartbeat interval in s (must match the broker's)")


def with_keys(args: argparse.Namespace, endpoint: str, pub_endpoint: str) -> BusConfig:
    """A client config for these endpoints with the command line's CURVE keys and heartbeat."""
    from m2m.bus.client import BusConfig
    from m2m.bus.security import ClientKeys

    if (args.curve_secret is None) != (args.curve_server is None):
        raise UsageError("--curve-secret and --curve-server go together")
    if args.heartbeat is not None and not 0 < args.heartbeat < float("inf"):
        raise UsageError(f"--heartbeat must be a positive number of seconds, got {args.heartbeat:g}")
    try:
        curve = ClientKeys.load(args.curve_secret, args.curve_server) if args.curve_secret else None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the CURVE keys: {exc}") from None
    config = BusConfig(endpoint=endpoint, pub_endpoint=pub_endpoint, curve=curve)
    if args.heartbeat is not None:
        config.heartbeat = args.heartbeat
    return config


def named_bus(args: argparse.Namespace) -> BusConfig | None:
    """The bus the command line names with ``--stack`` or ``--connect``; None when it names none. Raises
    :class:`UsageError` for arguments that do not go together and :class:`~m2m.stack.registry.NoSuchStack` (a
    ``StackError``) for an id no running stack has."""
    from m2m.bus.protocol import DEFAULT_ENDPOINT, DEFAULT_PUB_ENDPOINT
    from m2m.stack import registry

    if (args.curve_secret is None) != (args.curve_server is None):
        raise UsageError("--curve-secret and --curve-server go together")
    if args.stack is not None and args.connect is not None:
        raise UsageError("give --stack or --connect, not both")
    if args.pub_connect is not None and args.connect is None:
        raise UsageError("--pub-connect goes with --connect")
    if args.stack is not None:
        entry = registry.find_stack(args.stack)
        return with_keys(args, entry.endpoint, entry.pub_endpoint)
    if args.connect is None:
        return None
    pub = args.pub_connect
    if pub is None:
        entry = registry.stack_at(args.connect)
        if entry is not None:
            pub = entry.pub_endpoint
        elif args.connect == DEFAULT_ENDPOINT:
            pub = DEFAULT_PUB_ENDPOINT  # a broker started by hand with m2m broker's defaults
        else:
            raise UsageError(f"--pub-connect is needed with --connect {args.connect}: no running stack is "
                             "registered there")
    return with_keys(args, args.connect, pub)


def hand_started_bus(args: argparse.Namespace) -> BusConfig:
    """The bus the command line names, else the default endpoints of a broker started by hand with ``m2m broker``
    (``m2m agent``: the supervisor always names its stack's)."""
    from m2m.bus.protocol import DEFAULT_ENDPOINT, DEFAULT_PUB_ENDPOINT

    return named_bus(args) or with_keys(args, DEFAULT_ENDPOINT, DEFAULT_PUB_ENDPOINT)


def bus_config(args: argparse.Namespace) -> BusConfig:
    """The bus of the stack the command line names, else of the only running stack (``m2m status/swap/down``).
    Raises :class:`UsageError` when several stacks run and none is named, a ``StackError`` when none runs."""
    from m2m.stack import registry
    from m2m.stack.config import StackError

    named = named_bus(args)
    if named is not None:
        return named
    stacks = registry.running_stacks()
    if len(stacks) == 1:
        return with_keys(args, stacks[0].endpoint, stacks[0].pub_endpoint)
    if len(stacks) > 1:
        listing = "; ".join(e.describe() for e in stacks)
        raise UsageError(f"{len(stacks)} stacks run: name one with --stack ID ({listing})")
    raise StackError("no stack runs (start one with m2m up)")


# ------------------------------------------------------------------------------------------------ own stack
@dataclass
class StackUse:
    """How a command gets the stack it needs, decided and checked by :func:`prepare_stack` before anything
    starts: join the stack at ``bus`` (``--stack``/``--connect``/the config's ``[bus]`` endpoints), or start
    ``config_path``'s stack there when none answers (not with ``--stack``), or, with no address at all
    (``bus`` None), start a stack of its own on new sockets."""

    command: str
    config_path: Path | None
    config: StackConfig
    bus: BusConfig | None
    join_only: bool
    needs: frozenset[str]


@dataclass
class StackInUse:
    """The stack a command uses: its bus, its transcript, whether the command started it (and so takes it down),
    and its status as found (``status.agents`` tell, e.g., which planner ran before an experiment swapped it)."""

    bus: BusConfig
    transcript: Path | None
    started: bool
    status: StackStatus
    stack_id: str = field(default="")


def prepare_stack(args: argparse.Namespace, command: str, needs: set[str] | frozenset[str]) -> StackUse:
    """Check everything about the stack a command needs before anything starts: the arguments that name one, the
    stack config (``--config``; parsed and every agent's options checked), that it runs the roles in ``needs``,
    that its transcript folder can be written. Raises :class:`UsageError` (exit 2) or, for a ``--stack`` no
    running stack has, a ``StackError`` (exit 1)."""
    from m2m.stack.config import StackConfigError, load_stack_config

    if args.stack is not None and args.config is not None:
        raise UsageError("--config describes a stack this command would start; --stack joins a running one: "
                         "give one of them")
    bus = named_bus(args)
    try:
        config = load_stack_config(args.config)
    except StackConfigError as exc:
        raise UsageError(str(exc)) from None
    if bus is None and not config.isolated:
        assert config.endpoint is not None and config.pub_endpoint is not None
        bus = with_keys(args, config.endpoint, config.pub_endpoint)
    if args.stack is None:
        if missing := sorted(set(needs) - config.roles):
            raise UsageError(f"the stack config {config.source} runs no {', '.join(missing)} agent, which m2m "
                             f"{command} needs")
        check_writable_folder(config.transcript_dir, f"the stack config's bus.transcript_dir ({config.source})")
    return StackUse(command=command, config_path=args.config, config=config, bus=bus,
                    join_only=args.stack is not None, needs=frozenset(needs))


async def ensure_stack(
    use: StackUse,
    *,
    keep_up: bool = False,
    starting: Callable[[], AbstractContextManager[object]] | None = None,
) -> StackInUse:
    """Join the stack at ``use.bus`` when one answers there (saying so on stderr), else start one (at that address,
    or a stack of its own on new sockets when there is none) and say so, and whether it goes down when the command
    ends (not with ``keep_up``). Raises ``StackError`` (its message says which, for ``m2m COMMAND: …``) when the
    stack does not come up, when none answers at a ``--stack``, or the one that answers lacks a role the command
    needs. ``starting()`` is what is shown while a stack comes up (default: a spinner;
    ``m2m plan`` and ``m2m experiment paper`` show their progress view, :mod:`m2m.session.progress`)."""
    from rich.console import Console

    from m2m.bus.client import BusConfig
    from m2m.stack.config import StackError
    from m2m.stack.control import stack_status, start_detached

    if use.bus is not None:
        status = await stack_status(use.bus, timeout=2.0)
        if status is not None:
            roles = {a.role for a in status.agents}
            if missing := sorted(use.needs - roles):
                raise StackError(f"not joining the stack at {use.bus.endpoint}: it runs no {', '.join(missing)} "
                                 f"agent, which m2m {use.command} needs (its roles: {', '.join(sorted(roles))})")
            name = f"stack {status.stack_id} " if status.stack_id else "stack "
            impls = ", ".join(sorted({f"{a.role} {a.impl}" for a in status.agents}))
            print(f"m2m {use.command}: joining the running {name}at {use.bus.endpoint} ({impls}); it stays up after "
                  "this command", file=sys.stderr)
            return StackInUse(use.bus, Path(status.transcript) if status.transcript else None, False, status,
                              status.stack_id)
        if use.join_only:
            raise StackError(f"no stack answers at {use.bus.endpoint}")  # --stack: never start one there
    if starting is None:
        def starting() -> AbstractContextManager[object]:
            return Console(stderr=True).status(
                "bringing a stack up (broker, dose engines, evaluator, DRL advisor, planner)")
    with starting():
        try:
            status = await asyncio.to_thread(
                start_detached, use.config_path,
                endpoint=use.bus.endpoint if use.bus else None, pub_endpoint=use.bus.pub_endpoint if use.bus else None,
            )
        except StackError as exc:
            raise StackError(f"the stack did not come up: {exc}") from None
    # a stack of its own: local ipc sockets, no keys, the broker's default heartbeat
    bus = use.bus or BusConfig(endpoint=status.endpoint, pub_endpoint=status.pub_endpoint)
    after = (f"it stays up (--keep-up): stop it with m2m down --stack {status.stack_id}" if keep_up
             else "it goes down when this command ends")
    print(f"m2m {use.command}: started stack {status.stack_id} at {status.endpoint} (logs "
          f"{Path(status.transcript).parent}); {after}", file=sys.stderr)
    return StackInUse(bus, Path(status.transcript) if status.transcript else None, True, status, status.stack_id)
