"""The stack config of ``m2m up`` (TOML; the packaged default is ``stack/stack.toml``): the bus endpoints, where
the transcripts go, the restart policy and the agents (role, implementation, instances, options).

:func:`load_stack_config` reads a file into a :class:`StackConfig` through :mod:`m2m.physics.config_file` (the
structs below give the keys, types, bounds and defaults), then checks what the types cannot: known roles and
implementations, one ``[[agent]]`` table per role, and every agent's options against what its implementation
declares (:func:`m2m.agents.runtime.check_agent`: the names in ``known_options``, and the values it can judge
without starting, e.g. the ``llm`` planner's ``model``). Every problem is a :class:`StackConfigError` naming the
file and the key, e.g. ``stack.toml: agent[1].instances: expected an integer ≥ 1, got 0`` or ``stack.toml:
agent[3].options.model: planner/llm: option model must be embedded, openai or replay, got 'foo'``, raised before
any process starts.

``[bus]`` endpoints are optional: without them (the packaged default) every stack gets its own ipc sockets in its
runtime folder (:mod:`m2m.stack.registry`), so stacks never collide; give both to run a stack at a known address.

**CURVE** (agents on other machines): ``[bus]`` ``curve_secret`` (the broker's secret key file), ``curve_clients``
(the folder of authorised client public keys, ``*.key``) and ``curve_client_secret`` (the key pair the supervisor
and its local agents use; its public key must be in ``curve_clients``) go together; paths are relative to the
config file. They are read and checked here (:class:`CurveSettings`): a missing file, a file without a secret key, a
client key the broker would refuse are each a :class:`StackConfigError` naming the field. An endpoint that other
machines can reach (a tcp address that is not loopback, ``*``, ``0.0.0.0``) without them is refused here too
(:func:`m2m.bus.security.is_local`), before the broker would refuse to bind it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import msgspec
import zmq.auth
from msgspec import Meta

from m2m.agents.runtime import IMPLEMENTATIONS, AgentConfigError, check_agent, default_impl
from m2m.bus.client import BusConfig
from m2m.bus.errors import SecurityError
from m2m.bus.security import ClientKeys, is_local, load_secret
from m2m.physics.config_file import ConfigError, convert, expected, key_path, read_toml, toml_repr

DEFAULT_CONFIG_NAME = "stack.toml"
"""The packaged default config, in ``m2m.stack``."""


class StackError(RuntimeError):
    """The stack could not be started, did not answer, or refused a request; the message says why."""


class StackConfigError(ConfigError, StackError):
    """A stack config that cannot be used. ``path`` is the file, ``key`` the offending key (``bus.endpoint``,
    ``agent[1].instances``; ``[[agent]]`` tables are counted from 0), ``problem`` what is wrong with it.

    Also a :class:`StackError`, so that a caller of ``m2m.stack.supervisor.start_detached`` handles every reason
    in one place."""


@dataclass(frozen=True)
class AgentSpec:
    """One ``[[agent]]`` table: ``instances`` processes of ``role`` run by implementation ``impl``."""

    role: str
    impl: str
    instances: int = 1
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CurveSettings:
    """A stack's CURVE keys (``[bus]`` ``curve_*``), as absolute paths, checked when the config was read.

    ``server_public`` is the broker's public key file that the local agents get as ``--curve-server``: the ``.key``
    next to ``secret`` (as ``m2m keys`` writes them) when it holds the same key, else ``secret`` itself (a client
    reads only the public key from it). ``client`` holds the loaded keys of ``client_secret`` and the broker's
    public key: what :meth:`StackConfig.bus_config` gives every client built from the config."""

    secret: Path
    clients: Path
    client_secret: Path
    server_public: Path
    client: ClientKeys

    def broker_args(self) -> list[str]:
        """``m2m broker``'s arguments for these keys."""
        return ["--curve-secret", str(self.secret), "--curve-clients", str(self.clients)]

    def agent_args(self) -> list[str]:
        """``m2m agent``'s (and every bus client command's) arguments for these keys."""
        return ["--curve-secret", str(self.client_secret), "--curve-server", str(self.server_public)]


@dataclass(frozen=True)
class StackConfig:
    """A whole stack: bus endpoints, run folders, restart policy and the agents to run. ``endpoint`` and
    ``pub_endpoint`` are both ``None`` (the stack gets its own sockets in its runtime folder) or both set."""

    agents: tuple[AgentSpec, ...]
    endpoint: str | None = None
    pub_endpoint: str | None = None
    transcript_dir: Path = Path("runs/stack")
    max_restarts: int = 3
    window_s: float = 30.0
    ready_timeout_s: float = 300.0
    stop_timeout_s: float = 60.0
    hang_timeout_s: float = 10.0
    """An agent whose watchdog pipe stays silent this long (SIGSTOPped, its event loop wedged) is killed and
    restarted (:mod:`m2m.stack.supervisor`)."""
    curve: CurveSettings | None = None
    """The broker's CURVE keys and those of the supervisor and its agents; ``None``: no CURVE (ipc or loopback
    endpoints only)."""
    source: str = ""

    def override(
        self, *, endpoint: str | None = None, pub_endpoint: str | None = None, transcript_dir: Path | None = None
    ) -> StackConfig:
        """This config with the given settings replaced (``None`` keeps the config's value); endpoints that would
        leave one of the two unset raise :class:`StackConfigError`."""
        new = dataclasses.replace(
            self,
            endpoint=endpoint or self.endpoint,
            pub_endpoint=pub_endpoint or self.pub_endpoint,
            transcript_dir=transcript_dir or self.transcript_dir,
        )
        if (new.endpoint is None) != (new.pub_endpoint is None):
            missing = "pub_endpoint" if new.pub_endpoint is None else "endpoint"
            raise StackConfigError("missing; give both endpoints (ROUTER and PUB), or neither", self.source,
                                   f"bus.{missing}")
        check_reach(new.endpoint, new.pub_endpoint, new.curve is not None, self.source)
        return new

    @property
    def isolated(self) -> bool:
        """No endpoints given: the stack's bus is the pair of sockets in its own runtime folder."""
        return self.endpoint is None

    @property
    def roles(self) -> frozenset[str]:
        return frozenset(a.role for a in self.agents)

    def bus_config(self) -> BusConfig:
        """A client's view of this stack's bus (its endpoints must be set: see :func:`m2m.stack.registry`)."""
        if self.endpoint is None or self.pub_endpoint is None:
            raise StackError("this stack's endpoints are not known before its runtime folder is made")
        return self.client_bus(self.endpoint, self.pub_endpoint)

    def client_bus(self, endpoint: str, pub_endpoint: str) -> BusConfig:
        """A client config for these endpoints (e.g. a stack of this config's in its own runtime folder) with this
        config's client CURVE keys, if it has any."""
        return BusConfig(endpoint=endpoint, pub_endpoint=pub_endpoint,
                         curve=self.curve.client if self.curve is not None else None)


def check_reach(endpoint: str | None, pub_endpoint: str | None, curve: bool, where: str) -> None:
    """:class:`StackConfigError` for an endpoint other machines can reach (:func:`m2m.bus.security.is_local` is
    false) in a stack without CURVE keys: the broker would refuse to bind it; this says which key to add."""
    for key, value in (("endpoint", endpoint), ("pub_endpoint", pub_endpoint)):
        if value is not None and not curve and not is_local(value):
            raise StackConfigError(
                f"{value} can be reached from other machines, which needs CURVE: give bus.curve_secret, "
                "bus.curve_clients and bus.curve_client_secret (m2m keys makes key pairs), or use ipc:// or a "
                "loopback address", where, f"bus.{key}")


# ------------------------------------------------------------------------------------------------ the file
# The tables as written; a key left out takes the default of StackConfig / AgentSpec above.
_Text = Annotated[str, Meta(pattern=r"\S", description="a non-empty string")]
# Below the largest float: TOML can write inf and nan, neither is a timeout.
_Seconds = Annotated[float, Meta(gt=0, lt=sys.float_info.max, description="a positive number of seconds")]


class _BusTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    endpoint: _Text | None = None
    pub_endpoint: _Text | None = None
    transcript_dir: _Text = str(StackConfig.transcript_dir)
    curve_secret: _Text | None = None
    curve_clients: _Text | None = None
    curve_client_secret: _Text | None = None


class _RestartTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_restarts: Annotated[int, Meta(ge=0)] = StackConfig.max_restarts
    window_s: _Seconds = StackConfig.window_s
    ready_timeout_s: _Seconds = StackConfig.ready_timeout_s
    stop_timeout_s: _Seconds = StackConfig.stop_timeout_s
    hang_timeout_s: _Seconds = StackConfig.hang_timeout_s


class _AgentTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: _Text
    impl: _Text | None = None  # the role's default implementation
    instances: Annotated[int, Meta(ge=1)] = AgentSpec.instances
    options: dict[str, str] = {}


class _StackFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    agent: Annotated[list[_AgentTable], Meta(min_length=1, description="at least one [[agent]] table")]
    bus: _BusTable = _BusTable()
    restart: _RestartTable = _RestartTable()


def parse_stack_config(data: Mapping[str, Any], where: str = "<stack config>", base: Path | None = None) -> StackConfig:
    """A validated :class:`StackConfig` from a parsed TOML document; ``where`` names it in errors, ``base`` is the
    folder that relative key paths start from (default: the current one)."""
    file = convert(data, _StackFile, where, StackConfigError)
    agents: list[AgentSpec] = []
    for i, table in enumerate(file.agent):
        agents.append(_agent_spec(table, i, where, {a.role for a in agents}))
    endpoint, pub_endpoint = file.bus.endpoint, file.bus.pub_endpoint
    if (endpoint is None) != (pub_endpoint is None):
        missing = "bus.pub_endpoint" if pub_endpoint is None else "bus.endpoint"
        raise StackConfigError("missing; give both endpoints, or neither (the stack then gets its own sockets in "
                               "its runtime folder)", where, missing)
    endpoint = None if endpoint is None else endpoint.strip()
    pub_endpoint = None if pub_endpoint is None else pub_endpoint.strip()
    curve = _curve(file.bus, where, base or Path.cwd())
    check_reach(endpoint, pub_endpoint, curve is not None, where)
    return StackConfig(
        agents=tuple(agents),
        endpoint=endpoint,
        pub_endpoint=pub_endpoint,
        transcript_dir=Path(file.bus.transcript_dir.strip()),
        max_restarts=file.restart.max_restarts,
        window_s=file.restart.window_s,
        ready_timeout_s=file.restart.ready_timeout_s,
        stop_timeout_s=file.restart.stop_timeout_s,
        hang_timeout_s=file.restart.hang_timeout_s,
        curve=curve,
        source=where,
    )


_CURVE_KEYS = ("curve_secret", "curve_clients", "curve_client_secret")


def _curve(bus: _BusTable, where: str, base: Path) -> CurveSettings | None:
    """The ``[bus]`` CURVE keys, read and checked: all three or none; files that hold what they should; the
    supervisor's own key among the authorised ones (else the broker would refuse its own stack)."""
    given = {k: getattr(bus, k).strip() for k in _CURVE_KEYS if getattr(bus, k) is not None}
    if not given:
        return None
    for k in _CURVE_KEYS:
        if k not in given:
            raise StackConfigError("missing; curve_secret, curve_clients and curve_client_secret go together",
                                   where, f"bus.{k}")
    paths = {k: (base / Path(v).expanduser()).resolve() for k, v in given.items()}

    def keys_of(k: str) -> tuple[bytes, bytes]:
        path = paths[k]
        if not path.is_file():
            raise StackConfigError(f"no such file: {path}", where, f"bus.{k}")
        hint = "give the .key_secret file that m2m keys writes"
        try:
            return load_secret(path)
        except SecurityError:  # a public key file
            raise StackConfigError(f"{path} holds no secret key; {hint}", where, f"bus.{k}") from None
        except (OSError, ValueError) as exc:  # unreadable, or no key in it at all
            raise StackConfigError(f"{path} is not a key file ({exc}); {hint}", where, f"bus.{k}") from None

    server_public_key, _ = keys_of("curve_secret")
    clients = paths["curve_clients"]
    if not clients.is_dir():
        raise StackConfigError(f"no such folder: {clients}", where, "bus.curve_clients")
    try:
        authorised = set(zmq.auth.load_certificates(str(clients)))
    except (OSError, ValueError) as exc:
        raise StackConfigError(f"cannot read the public keys in {clients}: {exc}", where, "bus.curve_clients") from None
    client_public, client_secret = keys_of("curve_client_secret")
    if client_public not in authorised:
        raise StackConfigError(f"its public key is not in bus.curve_clients ({clients}): the broker would refuse "
                               f"the stack's own agents; copy the .key next to it there", where,
                               "bus.curve_client_secret")
    secret = paths["curve_secret"]
    server_public = secret
    if secret.name.endswith("_secret"):  # m2m keys NAME: NAME.key next to NAME.key_secret
        public = secret.with_name(secret.name.removesuffix("_secret"))
        with contextlib.suppress(OSError, ValueError):
            if public.is_file() and zmq.auth.load_certificate(str(public))[0] == server_public_key:
                server_public = public
    return CurveSettings(
        secret=secret, clients=clients, client_secret=paths["curve_client_secret"], server_public=server_public,
        client=ClientKeys(public=client_public, secret=client_secret, server_public=server_public_key),
    )


def _agent_spec(table: _AgentTable, index: int, where: str, seen_roles: set[str]) -> AgentSpec:
    """The checks of ``[[agent]]`` number ``index`` that its types cannot make."""
    role = table.role.strip()
    if role not in IMPLEMENTATIONS:
        problem = expected(f"a role, one of {toml_repr(sorted(IMPLEMENTATIONS))}", role)
        raise StackConfigError(problem, where, key_path("agent", index, "role"))
    if role in seen_roles:
        raise StackConfigError(f"{toml_repr(role)} appears in two [[agent]] tables; use instances instead", where,
                               key_path("agent", index, "role"))
    impl = table.impl.strip() if table.impl is not None else default_impl(role)
    if impl not in IMPLEMENTATIONS[role]:
        what = f"an implementation of {toml_repr(role)}, one of {toml_repr(sorted(IMPLEMENTATIONS[role]))}"
        raise StackConfigError(expected(what, impl), where, key_path("agent", index, "impl"))
    for name in table.options:
        if "=" in name or not name.strip():
            raise StackConfigError("option names must be non-empty and contain no '='", where,
                                   key_path("agent", index, "options", name))
    try:
        check_agent(role, impl, table.options)
    except AgentConfigError as exc:
        key = key_path("agent", index, "options", exc.option) if exc.option else key_path("agent", index, "impl")
        raise StackConfigError(exc.problem, where, key) from None
    return AgentSpec(role=role, impl=impl, instances=table.instances, options=dict(table.options))


def load_stack_config(path: Path | None = None) -> StackConfig:
    """Read and validate a stack config; ``None`` reads the packaged default (``stack/stack.toml``).

    Raises :class:`StackConfigError` naming the file and the key for anything unusable."""
    source = resources.files("m2m.stack") / DEFAULT_CONFIG_NAME if path is None else Path(path)
    where = str(source)
    base = Path(path).resolve().parent if path is not None else None
    return parse_stack_config(read_toml(source, where, StackConfigError), where, base)
