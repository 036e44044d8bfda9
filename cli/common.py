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

**CURVE** (a stack whose config has ``[bus]`` curve keys, :class:`~m2m.stack.config.CurveSettings`): a command
uses ``--curve-secret``/``--curve-server`` when given (another machine: its own key, authorised in the broker's
``curve_clients``), else the client keys of ``--config``, else, for a stack registered on this machine, those of
the config it was started from; so on the stack's machine ``m2m status/plan/down`` need no key options. Given
client keys but no config with broker keys, ``m2m plan`` only joins: it never starts a stack it could not reach.
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
    from m2m.stack.registry import StackEntry

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


def with_keys(
    args: argparse.Namespace, endpoint: str, pub_endpoint: str, stack: StackConfig | None = None
) -> BusConfig:
    """A client config for these endpoints with the command line's CURVE keys and heartbeat; without keys on the
    command line, those of the stack config ``stack`` (its ``[bus]`` ``curve_client_secret``), if it has any."""
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
    if curve is None and stack is not None and stack.curve is not None:
        curve = stack.curve.client
    config = BusConfig(endpoint=endpoint, pub_endpoint=pub_endpoint, curve=curve)
    if args.heartbeat is not None:
        config.heartbeat = args.heartbeat
    return config


def registered_config(entry: StackEntry) -> StackConfig | None:
    """The stack config a registered stack was started from (``stack.json``'s ``config``), when it can still be
    read: its CURVE keys let this machine's commands reach a CURVE stack by its id or endpoint without keys on the
    command line. ``None`` when the entry names no config or it no longer reads."""
    from m2m.stack.config import StackConfigError, load_stack_config

    if not entry.config or not Path(entry.config).is_file():
        return None
    try:
        return load_stack_config(Path(entry.config))
    except StackConfigError:
        return None


def registered_bus(entry: StackEntry, args: argparse.Namespace | None = None) -> BusConfig:
    """A client config for a registered stack: its endpoints, the command line's keys (``args``) or else those of
    the config it was started from (:func:`registered_config`)."""
    from m2m.bus.client import BusConfig

    if args is not None:
        keys_given = args.curve_secret is not None
        return with_keys(args, entry.endpoint, entry.pub_endpoint, None if keys_given else registered_config(entry))
    config = registered_config(entry)
    if config is not None:
        return config.client_bus(entry.endpoint, entry.pub_endpoint)
    return BusConfig(endpoint=entry.endpoint, pub_endpoint=entry.pub_endpoint)


def named_bus(args: argparse.Namespace, *, registered_keys: bool = True) -> BusConfig | None:
    """The bus the command line names with ``--stack`` or ``--connect``; None when it names none. CURVE keys: the
    command line's, else (with ``registered_keys``), for a stack registered on this machine, those of the config it
    was started from (:func:`registered_bus`). Raises
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
        return registered_bus(registry.find_stack(args.stack), args)
    if args.connect is None:
        return None
    pub = args.pub_connect
    if pub is None or (registered_keys and args.curve_secret is None):
        entry = next((e for e in registry.running_stacks(clean=False) if e.endpoint == args.connect), None)
        if entry is not None and pub in (None, entry.pub_endpoint):
            if registered_keys:
                return registered_bus(entry, args)
            return with_keys(args, entry.endpoint, entry.pub_endpoint)
    if pub is None:
        if args.connect == DEFAULT_ENDPOINT:
            pub = DEFAULT_PUB_ENDPOINT  # a broker started by hand with m2m broker's defaults
        else:
            raise UsageError(f"--pub-connect is needed with --connect {args.connect}: no running stack is "
                             "registered there")
    return with_keys(args, args.connect, pub)


def hand_started_bus(args: argparse.Namespace) -> BusConfig:
    """The bus the command line names, else the default endpoints of a broker started by hand with ``m2m broker``
    (``m2m agent``: the supervisor always names its stack's)."""
    from m2m.bus.protocol import DEFAULT_ENDPOINT, DEFAULT_PUB_ENDPOINT

    return named_bus(args, registered_keys=False) or with_keys(args, DEFAULT_ENDPOINT, DEFAULT_PUB_ENDPOINT)


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
        return registered_bus(stacks[0], args)
    if len(stacks) > 1:
        listing = "; ".join(e.describe() for e in stacks)
        raise UsageError(f"{len(stacks)} stacks run: name one with --stack ID ({listing})")
    raise StackError("no stack runs (start one with m2m up)")


# ------------------------------------------------------------------------------------------------ own stack
JOIN_PROBE_S = 2.0
"""How long a command waits for a stack at its address to answer before it starts one there (s)."""
JOIN_PROBE_CURVE_S = 5.0
"""The same over CURVE (a TCP connect and a CURVE handshake, possibly over a network, come first)."""

@dataclass
class StackUse:
    """How a command gets the stack it needs, decided and checked by :func:`prepare_stack` before anything
    starts: join the stack at ``bus`` (``--stack``/``--connect``/the config's ``[bus]`` endpoints), or start
    ``config_path``'s stack there when none answers (not with ``--stack``, nor with CURVE keys given on the command
    line for a config that has none: ``join_only``), or, with no address at all (``bus`` None), start a stack of
    its own on new sockets."""

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
        bus = with_keys(args, config.endpoint, config.pub_endpoint, config)
    elif bus is not None and bus.curve is None and config.curve is not None:
        bus.curve = config.curve.client  # --connect to the stack that --config describes, with its keys
    # Client keys the config cannot serve (no [bus] curve keys of its own): only a CURVE stack that runs already
    # answers them, and a stack started here from that config would not.
    join_only = args.stack is not None or (bus is not None and bus.curve is not None and config.curve is None)
    # A CURVE stack's roles may run on other machines (m2m agent ROLE --connect ...): ensure_stack checks the bus.
    if args.stack is None:
        if config.curve is None and (missing := sorted(set(needs) - config.roles)):
            raise UsageError(f"the stack config {config.source} runs no {', '.join(missing)} agent, which m2m "
                             f"{command} needs")
        check_writable_folder(config.transcript_dir, f"the stack config's bus.transcript_dir ({config.source})")
    return StackUse(command=command, config_path=args.config, config=config, bus=bus,
                    join_only=join_only, needs=frozenset(needs))


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

    from m2m.stack.config import StackError
    from m2m.stack.control import bus_roles, stack_status, start_detached

    if use.bus is not None:
        # A CURVE handshake over a network takes longer than an ipc hello.
        status = await stack_status(use.bus, timeout=JOIN_PROBE_CURVE_S if use.bus.curve else JOIN_PROBE_S)
        if status is not None:
            roles = {a.role for a in status.agents}
            if use.needs - roles:  # agents that joined from other machines are on the bus, not in the supervisor's
                roles |= await bus_roles(use.bus)
            if missing := sorted(use.needs - roles):
                raise StackError(f"not joining the stack at {use.bus.endpoint}: it runs no {', '.join(missing)} "
                                 f"agent, which m2m {use.command} needs (its roles: {', '.join(sorted(roles))})")
            name = f"stack {status.stack_id} " if status.stack_id else "stack "
            impls = ", ".join(sorted({f"{a.role} {a.impl}" for a in status.agents}))
            print(f"m2m {use.command}: joining the running {name}at {use.bus.endpoint} ({impls}); it stays up after "
                  "this command", file=sys.stderr)
            return StackInUse(use.bus, Path(status.transcript) if status.transcript else None, False, status,
                              status.stack_id)
        if use.join_only:  # --stack, or client keys only: never start one there
            hint = (" (with CURVE: is this client's public key in the broker's curve_clients folder, and "
                    "--curve-server the broker's public key?)" if use.bus.curve else "")
            raise StackError(f"no stack answers at {use.bus.endpoint}{hint}")
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
    # a stack of its own: local ipc sockets, the config's keys if it has any, the broker's default heartbeat
    bus = use.bus or use.config.client_bus(status.endpoint, status.pub_endpoint)
    after = (f"it stays up (--keep-up): stop it with m2m down --stack {status.stack_id}" if keep_up
             else "it goes down when this command ends")
    print(f"m2m {use.command}: started stack {status.stack_id} at {status.endpoint} (logs "
          f"{Path(status.transcript).parent}); {after}", file=sys.stderr)
    return StackInUse(bus, Path(status.transcript) if status.transcript else None, True, status, status.stack_id)
