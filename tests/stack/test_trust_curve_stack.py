"""A CURVE stack from a stack config (issue 19, agents on other hosts): ``[bus]`` curve keys make ``m2m up`` start
the broker with CURVE on a TCP endpoint and give its agents and supervisor the client keys; ``m2m status/plan/down``
reach it with ``--config`` (the config's client keys) or, as another machine would, ``--connect`` with keys of their
own; a key the broker was not given gets no answer, and a command holding one does not start a stack of its own
there. Config problems are one :class:`StackConfigError` naming the field, before anything starts.

Real processes: a detached supervisor, its broker on ``tcp://127.0.0.1:<free port>`` with CURVE and three agents
(dose engine, evaluator, rules planner); ``m2m plan`` as a subprocess; everything stopped in teardown.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.procs import gone, processes_mentioning, reap, run_m2m, stop_stack, wait_until
from support.stacks import RULES_AGENTS

from m2m.agents.messages import CONTROL, StackStatus, StatusRequest
from m2m.bus.client import BusClient, BusConfig
from m2m.bus.errors import BrokerUnavailable, RequestTimeout
from m2m.bus.security import ClientKeys, generate_keys
from m2m.cli.main import main
from m2m.stack import registry
from m2m.stack.config import StackConfigError, load_stack_config
from m2m.stack.control import stack_status, start_detached

pytestmark = pytest.mark.timeout(420)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Keys:
    """``keys/<name>/<name>.key{,_secret}`` for the broker and each client; ``keys/clients`` the authorised ones."""

    dir: Path

    def secret(self, name: str) -> Path:
        return self.dir / name / f"{name}.key_secret"

    def public(self, name: str) -> Path:
        return self.dir / name / f"{name}.key"

    def client_args(self, name: str) -> list[str]:
        return ["--curve-secret", str(self.secret(name)), "--curve-server", str(self.public("broker"))]


def _keys(d: Path) -> Keys:
    keys = Keys(d / "keys")
    (keys.dir / "clients").mkdir(parents=True)
    for name in ("broker", "stack", "me", "rogue"):
        public, _ = generate_keys(name, keys.dir / name)
        if name in ("stack", "me"):  # the stack's own agents, and a user on another machine
            shutil.copy(public, keys.dir / "clients" / public.name)
    return keys


def _curve_toml(d: Path, endpoint: str, pub_endpoint: str, **override: str | None) -> Path:
    """A stack config in ``d`` with the CURVE keys of :func:`_keys` (paths relative to the file); ``override`` replaces
    or (``None``) leaves out ``[bus]`` keys."""
    bus: dict[str, str | None] = {
        "endpoint": endpoint, "pub_endpoint": pub_endpoint, "transcript_dir": f"{d}/runs",
        "curve_secret": "keys/broker/broker.key_secret", "curve_clients": "keys/clients",
        "curve_client_secret": "keys/stack/stack.key_secret", **override,
    }
    lines = ["[bus]", *(f'{k} = "{v}"' for k, v in bus.items() if v is not None),
             "", "[restart]", "ready_timeout_s = 300", "stop_timeout_s = 30", RULES_AGENTS]
    path = d / "stack.toml"
    path.write_text("\n".join(lines))
    return path


# ------------------------------------------------------------------------------------------------ the config
@pytest.fixture
def keyed(tmp_path: Path) -> tuple[Path, Keys]:
    return tmp_path, _keys(tmp_path)


def test_curve_keys_in_a_config_are_read_relative_to_it(keyed: tuple[Path, Keys]) -> None:
    d, keys = keyed
    cfg = load_stack_config(_curve_toml(d, "tcp://10.0.0.5:5555", "tcp://10.0.0.5:5556"))
    assert cfg.curve is not None
    assert cfg.curve.secret == keys.secret("broker").resolve()
    assert cfg.curve.server_public == keys.public("broker").resolve()  # the .key next to it: agents get no secret
    assert cfg.curve.broker_args() == ["--curve-secret", str(keys.secret("broker").resolve()), "--curve-clients",
                                       str((keys.dir / "clients").resolve())]
    assert cfg.curve.agent_args() == ["--curve-secret", str(keys.secret("stack").resolve()), "--curve-server",
                                      str(keys.public("broker").resolve())]
    bus = cfg.bus_config()  # what m2m status/plan/down --config connect with
    assert bus.curve == ClientKeys.load(keys.secret("stack"), keys.public("broker"))
    # CURVE with ipc sockets is allowed (e.g. a config shared by machines, or checked before it is moved)
    assert load_stack_config(_curve_toml(d, "ipc:///tmp/x/bus", "ipc:///tmp/x/pub")).curve is not None


@pytest.mark.parametrize(
    ("override", "key", "problem"),
    [
        ({"curve_secret": "keys/none.key_secret"}, "bus.curve_secret", "no such file: "),
        ({"curve_secret": "keys/broker/broker.key"}, "bus.curve_secret", "holds no secret key"),  # the public half
        ({"curve_client_secret": "keys/stack/stack.key"}, "bus.curve_client_secret", "holds no secret key"),
        ({"curve_clients": None}, "bus.curve_clients",
         "missing; curve_secret, curve_clients and curve_client_secret go together"),
        ({"curve_client_secret": None}, "bus.curve_client_secret",
         "missing; curve_secret, curve_clients and curve_client_secret go together"),
        ({"curve_clients": "keys/nowhere"}, "bus.curve_clients", "no such folder: "),
        ({"curve_client_secret": "keys/rogue/rogue.key_secret"}, "bus.curve_client_secret",
         "its public key is not in bus.curve_clients"),
        ({"curve_secret": None, "curve_clients": None, "curve_client_secret": None}, "bus.endpoint",
         "tcp://10.0.0.5:5555 can be reached from other machines, which needs CURVE"),
        ({"curve_secret": None, "curve_clients": None, "curve_client_secret": None, "endpoint": "tcp://127.0.0.1:5"},
         "bus.pub_endpoint", "tcp://10.0.0.5:5556 can be reached from other machines, which needs CURVE"),
    ],
)
def test_a_bad_curve_config_names_the_field(
    keyed: tuple[Path, Keys], override: dict[str, str | None], key: str, problem: str
) -> None:
    d, _ = keyed
    override = dict(override)
    endpoint = override.pop("endpoint", None) or "tcp://10.0.0.5:5555"
    path = _curve_toml(d, endpoint, "tcp://10.0.0.5:5556", **override)
    with pytest.raises(StackConfigError) as info:
        load_stack_config(path)
    assert (info.value.path, info.value.key) == (str(path), key)
    assert problem in info.value.problem, info.value.problem


def test_an_endpoint_override_off_loopback_needs_curve(keyed: tuple[Path, Keys]) -> None:
    d, _ = keyed
    plain = load_stack_config(_curve_toml(d, "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556", curve_secret=None,
                                          curve_clients=None, curve_client_secret=None))
    assert plain.curve is None and plain.bus_config().curve is None
    with pytest.raises(StackConfigError, match=r"bus\.endpoint: tcp://0\.0\.0\.0:5555 can be reached"):
        plain.override(endpoint="tcp://0.0.0.0:5555", pub_endpoint="tcp://0.0.0.0:5556")  # m2m up --endpoint
    curve = load_stack_config(_curve_toml(d, "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"))
    assert curve.override(endpoint="tcp://0.0.0.0:5555", pub_endpoint="tcp://0.0.0.0:5556").curve == curve.curve


# ------------------------------------------------------------------------------------------------ a real stack
@dataclass
class CurveStack:
    dir: Path
    config: Path
    keys: Keys
    status: StackStatus
    supervisor: int
    env: dict[str, str]

    @property
    def connect(self) -> list[str]:
        return ["--connect", self.status.endpoint, "--pub-connect", self.status.pub_endpoint]

    def client(self, name: str) -> BusConfig:
        return BusConfig(endpoint=self.status.endpoint, pub_endpoint=self.status.pub_endpoint,
                         curve=ClientKeys.load(self.keys.secret(name), self.keys.public("broker")))

    def logs(self) -> str:
        run_dir = Path(self.status.transcript).parent
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(run_dir.glob("*.log")))


@pytest.fixture(scope="module")
def curve_stack() -> Iterator[CurveStack]:
    """``m2m up --detach --config`` (:func:`start_detached`) of a CURVE stack on two free loopback TCP ports."""
    d = Path(tempfile.mkdtemp(prefix="m2mcs", dir="/tmp"))
    keys = _keys(d)
    config = _curve_toml(d, f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}")
    env = {**os.environ, "M2M_RUNTIME_DIR": str(d / "rt"), "PYTHONUNBUFFERED": "1"}
    supervisor: int | None = None
    st: CurveStack | None = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("M2M_RUNTIME_DIR", str(d / "rt"))
        try:
            status = start_detached(config)
            supervisor = registry.running_stacks()[0].pid
            st = CurveStack(d, config, keys, status, supervisor, env)
            yield st
        finally:
            if supervisor is not None:
                stop_stack(load_stack_config(config).bus_config(), supervisor)
            if st is not None:
                print(st.logs())
            left = processes_mentioning(str(d))
            shutil.rmtree(d, ignore_errors=True)
            assert not left, left


def test_status_reaches_the_curve_stack_by_config_by_id_and_with_own_keys(
    curve_stack: CurveStack, capsys: pytest.CaptureFixture[str]
) -> None:
    st = curve_stack
    assert st.status.endpoint.startswith("tcp://127.0.0.1:")
    assert {(a.role, a.state) for a in st.status.agents} == {
        ("dose-engine", "ready"), ("evaluator", "ready"), ("planner", "ready")}
    broker_log = (Path(st.status.transcript).parent / "broker.log").read_text()
    assert '"curve": true' in broker_log  # the supervisor started the broker with the config's keys
    for argv in (["status", "--config", str(st.config)],  # the config's client keys
                 ["status"],  # every registered stack, with the keys of the config it was started from
                 ["status", "--stack", st.status.stack_id],
                 ["status", *st.connect, *st.keys.client_args("me")]):  # another machine's own authorised key
        assert main(argv) == 0, (argv, capsys.readouterr().err)
        out = capsys.readouterr().out
        assert f"stack:      {st.status.stack_id}" in out and "planner-1" in out, (argv, out)


def test_a_key_the_broker_was_not_given_gets_no_answer(curve_stack: CurveStack,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    st = curve_stack

    async def ask(bus: BusConfig) -> None:
        async with BusClient("curve-rogue", bus) as rogue:
            await rogue.request(CONTROL, StatusRequest(), timeout=3.0, retries=0, expect=StackStatus)

    with pytest.raises((RequestTimeout, BrokerUnavailable)):
        asyncio.run(ask(st.client("rogue")))
    plain = BusConfig(endpoint=st.status.endpoint, pub_endpoint=st.status.pub_endpoint)  # no keys at all
    assert asyncio.run(stack_status(plain, timeout=2.0)) is None
    assert asyncio.run(stack_status(st.client("me"), timeout=10.0)) is not None  # the same call with a good key
    assert main(["status", *st.connect, *st.keys.client_args("rogue"), "--timeout", "2"]) == 1
    assert f"no stack answers at {st.status.endpoint}" in capsys.readouterr().err
    # m2m plan holding only client keys joins or fails: it never starts a stack of its own at that address
    before = {e.id for e in registry.running_stacks()}
    plan = run_m2m("plan", "--mode", "unguided", "--step-cap", "1", "--out", str(st.dir / "plans"), *st.connect,
                   *st.keys.client_args("rogue"), env=st.env, timeout=120)
    assert plan.returncode == 1, plan.stderr[-3000:]
    assert f"no stack answers at {st.status.endpoint} (with CURVE: is this client's public key" in plan.stderr
    assert "started stack" not in plan.stderr
    assert {e.id for e in registry.running_stacks()} == before


@pytest.mark.parametrize("how", ["config", "own-keys"])
def test_plan_runs_a_session_on_the_curve_stack(curve_stack: CurveStack, how: str) -> None:
    st = curve_stack
    where = ["--config", str(st.config)] if how == "config" else [*st.connect, *st.keys.client_args("me")]
    plan = run_m2m("plan", "--mode", "unguided", "--step-cap", "1", "--out", str(st.dir / "plans" / how), *where,
                   env=st.env, timeout=300)
    assert plan.returncode == 0, plan.stderr[-3000:] + st.logs()
    assert f"m2m plan: joining the running stack {st.status.stack_id} at {st.status.endpoint}" in plan.stderr
    assert "started stack" not in plan.stderr
    sessions = list((st.dir / "plans" / how).glob("*/transcript.m2mt"))
    assert len(sessions) == 1, sorted((st.dir / "plans").rglob("*"))


def test_down_with_own_keys_stops_the_curve_stack(curve_stack: CurveStack,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    st = curve_stack
    assert main(["down", *st.connect, *st.keys.client_args("me")]) == 0, capsys.readouterr().err
    assert f"stack at {st.status.endpoint} down" in capsys.readouterr().out
    assert reap(st.supervisor, 60) is not None
    wait_until(lambda: registry.running_stacks() == [] and gone(st.supervisor), what="the stack gone", timeout=30)
