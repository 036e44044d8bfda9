"""Agents on other hosts, on one machine: a broker in a Linux network namespace of its own and dose engines in
"host" namespaces, joined by veth pairs on a bridge, talking TCP with CURVE over addresses that exist only inside
these namespaces (nothing is added to the machine's own network namespace).

:class:`Lab` makes and removes the namespaces (``ip netns``/``ip link``; root or CAP_NET_ADMIN+CAP_SYS_ADMIN); where
that fails it raises :class:`NamespacesUnavailable` naming the command and its error (the tests skip with it).
:func:`measure` runs what the README tells a user to run on real machines: in the broker's namespace (the main
machine) ``m2m up --config stack.toml`` with ``[bus]`` CURVE keys (:func:`stack_config`: broker, evaluator, rules
planners), in each host namespace only ``m2m agent dose-engine --connect ... --curve-secret ... --curve-server ...``;
it runs the same unguided sessions with the dose engine of one host, then of two, and returns the report that the
multi-host test checks and prints; ``drive`` (run inside the broker's namespace) is its session client, which
connects with the stack config's own client keys (``StackConfig.bus_config()``). As a command, from the repository
root (needs root)::

    PYTHONPATH=tests .venv/bin/python -m support.netns bench --out runs/i19/multihost.json

measures once and prints the table (``--sessions``, ``--cap`` and ``--planners`` make it longer or wider).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.procs import TESTS, Procs, kill_tree

IP_TIMEOUT_S = 10.0
"""The longest one ``ip`` command may take (s)."""
BROKER_UP_S = 60.0
"""How long the broker may take to bind (s)."""
READY_S = 180.0
"""How long the agents of a phase may take to report ready (s; imports are slow on a loaded machine)."""
PHASE_S = 600.0
"""The longest one phase's sessions may take (s)."""
ROGUE_PROBE_S = 3.0
"""How long a client with an unauthorised key waits for an answer that must never come (s)."""

SCENARIO = "liver"
"""The default scenario: its plans take ~1 s of one CPU to solve and report, so the dose engines, not the bus, the
planners or the evaluator, bound the sessions' throughput (prostate-basic's take ~0.2 s)."""
ROUTER_PORT, PUB_PORT = 5555, 5556
"""The broker's ports inside its own namespace (nothing else listens there)."""
ENGINE_THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                  "NUMBA_NUM_THREADS": "1"}
"""One thread per dose engine: with one CPU each, the engines are the sessions' bottleneck."""


class NamespacesUnavailable(RuntimeError):
    """The namespaces or links could not be made here (no root, no ``ip``, a kernel without veth or bridges)."""


def _ip(*args: str) -> None:
    cmd = ["ip", *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NamespacesUnavailable(f"`{' '.join(cmd)}` failed: {exc}") from None
    if r.returncode != 0:
        raise NamespacesUnavailable(f"`{' '.join(cmd)}` failed (exit {r.returncode}): {r.stderr.strip()}")


# ------------------------------------------------------------------------------------------------ namespaces
@dataclass
class Lab:
    """One broker namespace with a bridge ``br0`` at ``10.77.N.1/24`` and ``hosts`` host namespaces, each with an
    ``eth0`` at ``10.77.N.(10+i)/24`` whose veth peer is a port of the bridge. Names carry the pid and a random tag
    (``m2m-<pid>-<tag>-broker``, ``...-h1``), so concurrent runs never meet."""

    hosts: int
    tag: str = field(default_factory=lambda: f"m2m-{os.getpid()}-{secrets.token_hex(2)}")
    net: int = field(default_factory=lambda: secrets.randbelow(256))
    made: list[str] = field(default_factory=list)

    @property
    def broker_ns(self) -> str:
        return f"{self.tag}-broker"

    def host_ns(self, i: int) -> str:
        """Host ``i`` (1-based)."""
        return f"{self.tag}-h{i}"

    @property
    def broker_addr(self) -> str:
        return f"10.77.{self.net}.1"

    def host_addr(self, i: int) -> str:
        return f"10.77.{self.net}.{10 + i}"

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.broker_addr}:{ROUTER_PORT}"

    @property
    def pub_endpoint(self) -> str:
        return f"tcp://{self.broker_addr}:{PUB_PORT}"

    def create(self) -> None:
        """Make everything; on failure what was made is removed and :class:`NamespacesUnavailable` raised."""
        try:
            for ns in (self.broker_ns, *(self.host_ns(i) for i in range(1, self.hosts + 1))):
                _ip("netns", "add", ns)
                self.made.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            b = self.broker_ns
            _ip("-n", b, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
            _ip("-n", b, "addr", "add", f"{self.broker_addr}/24", "dev", "br0")
            _ip("-n", b, "link", "set", "br0", "up")
            for i in range(1, self.hosts + 1):
                h = self.host_ns(i)
                # both ends made inside the namespaces: no interface ever appears in the machine's own
                _ip("link", "add", "eth0", "netns", h, "type", "veth", "peer", "name", f"h{i}", "netns", b)
                _ip("-n", b, "link", "set", f"h{i}", "master", "br0", "up")
                _ip("-n", h, "addr", "add", f"{self.host_addr(i)}/24", "dev", "eth0")
                _ip("-n", h, "link", "set", "eth0", "up")
        except NamespacesUnavailable:
            self.close()
            raise

    def close(self) -> list[str]:
        """Kill whatever still runs in the namespaces (only processes started there, by pid) and delete them (the
        veth pairs and the bridge go with them). Returns the namespaces that could not be deleted."""
        left = []
        for ns in reversed(self.made):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                      timeout=IP_TIMEOUT_S).stdout.split()
                for pid in pids:
                    kill_tree(int(pid))
            try:
                _ip("netns", "del", ns)
            except NamespacesUnavailable:
                left.append(ns)
        self.made.clear()
        return left


@contextlib.contextmanager
def lab(hosts: int) -> Iterator[Lab]:
    """A :class:`Lab` made on entry and removed on exit, pass or fail."""
    the_lab = Lab(hosts)
    the_lab.create()
    try:
        yield the_lab
    finally:
        the_lab.close()


def spawn_in(procs: Procs, ns: str, *args: str, name: str, cpus: set[int] | None = None,
             env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``python ARGS`` in namespace ``ns`` (``ip netns exec``, which execs: the pid is Python's), as ``name`` of
    ``procs`` (its log in ``procs.dir``, killed and reaped by ``procs.close()``), on ``cpus`` when given."""
    log, n = procs.log(name), 0
    while log in procs.logs:
        n += 1
        log = procs.dir / f"{name}-{n}.log"
    pythonpath = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "M2M_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath,
                **(env or {})}

    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    with open(log, "wb") as f:
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *args], stdin=subprocess.DEVNULL,
                             stdout=f, stderr=subprocess.STDOUT, env=full_env, preexec_fn=pin)
    procs.procs.append(p)
    procs.named[name] = p
    procs.logs.append(log)
    return p


# ------------------------------------------------------------------------------------------------ keys
@dataclass(frozen=True)
class Keys:
    """The broker's key pair in ``dir/broker``, each client's pair in ``dir/<name>``, and the broker's folder of
    authorised public keys ``dir/clients`` (a copy of each authorised client's ``.key``, as a user would copy it
    from another machine)."""

    dir: Path

    @property
    def clients(self) -> Path:
        return self.dir / "clients"

    @property
    def broker_secret(self) -> Path:
        return self.dir / "broker" / "broker.key_secret"

    @property
    def broker_public(self) -> Path:
        return self.dir / "broker" / "broker.key"

    def secret(self, name: str) -> Path:
        return self.dir / name / f"{name}.key_secret"

    def client_args(self, name: str) -> list[str]:
        """``--curve-secret``/``--curve-server`` for client ``name``."""
        return ["--curve-secret", str(self.secret(name)), "--curve-server", str(self.broker_public)]


def make_keys(d: Path, authorised: Sequence[str], unauthorised: Sequence[str] = ()) -> Keys:
    from m2m.bus.security import generate_keys

    keys = Keys(d)
    keys.clients.mkdir(parents=True, exist_ok=True)
    generate_keys("broker", d / "broker")
    for name in (*authorised, *unauthorised):
        public, _ = generate_keys(name, d / name)
        if name in authorised:
            shutil.copy(public, keys.clients / public.name)
    return keys


# ------------------------------------------------------------------------------------------------ the driver
def cpu_s(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system, s) each live process of ``pids`` (name → pid) has used so far (network namespaces
    share /proc: the driver reads the engines' from the broker's)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick
    return out


async def _drive(a: argparse.Namespace) -> dict[str, Any]:
    """Inside the broker's namespace: wait until ``a.ready`` report ready, probe with the unauthorised key, run the
    warm-up and measured sessions, return what happened."""
    from m2m.agents.messages import EVALUATE, SESSION, EvaluateRequest, SessionRequest, SessionResult, new_session_id
    from m2m.bus.client import BusClient
    from m2m.bus.errors import BrokerUnavailable, BusError, RequestTimeout
    from m2m.bus.security import ClientKeys
    from m2m.scenarios import load_scenario
    from m2m.stack.config import load_stack_config

    stack = load_stack_config(Path(a.config))
    assert stack.curve is not None, f"{a.config} has no [bus] CURVE keys"
    bus_config = stack.bus_config()  # what m2m plan/status --config use: the stack's client keys

    out: dict[str, Any] = {}
    async with BusClient("multihost-driver", bus_config) as bus:
        wanted, end = set(a.ready), time.monotonic() + a.ready_timeout
        states: dict[str, str] = {}
        while True:
            with contextlib.suppress(BusError, TimeoutError):  # a broker still starting answers nothing yet
                statuses = await bus.retained("agents.status.")
                states = {getattr(m, "name", t): getattr(m, "state", "?") for t, m in statuses.items()}
            if all(states.get(n) == "ready" for n in wanted):
                break
            if time.monotonic() > end:
                raise SystemExit(f"agents not ready after {a.ready_timeout:g} s: {states}")
            await asyncio.sleep(0.25)
        out["ready_s"] = a.ready_timeout - (end - time.monotonic())

        if a.rogue_secret:  # a client whose key the broker was never given: no answer at all, not even an error
            protocol = load_scenario(a.scenario).protocol
            metrics = {c.id: c.limit for c in protocol.criteria}
            try:
                rogue_config = dataclasses.replace(
                    bus_config, curve=ClientKeys.load(a.rogue_secret, stack.curve.server_public))
                async with BusClient("multihost-rogue", rogue_config) as rogue:
                    await rogue.request(EVALUATE, EvaluateRequest(protocol=protocol.name, metrics=metrics),
                                        timeout=ROGUE_PROBE_S, retries=0)
                out["rogue_probe"] = "answered"
            except (RequestTimeout, TimeoutError, BrokerUnavailable) as exc:
                out["rogue_probe"] = type(exc).__name__
            except BusError as exc:  # an error reply got through the broker: the key was let in
                out["rogue_probe"] = f"answered with {type(exc).__name__}: {exc}"

        gate = asyncio.Semaphore(a.concurrency)

        async def session(seed: int, cap: int) -> dict[str, Any]:
            async with gate:
                sid = new_session_id()
                req = SessionRequest(session_id=sid, scenario=a.scenario, case_seed=seed, mode="unguided", step_cap=cap)
                r: SessionResult = await bus.request(SESSION, req, timeout=PHASE_S, retries=0, idempotency_key=sid,
                                                     expect=SessionResult, session=sid)
                return {"seed": seed, "session_id": sid, "outcome": str(r.outcome), "n_steps": r.n_steps,
                        "scores": [s.score for s in r.steps], "planner": r.header.planner}

        warm = await asyncio.gather(*(session(seed, 0) for seed in a.seeds))  # each case's dij into an engine
        out["warmup_solves"] = sum(len(r["scores"]) for r in warm)
        watch = dict((n, int(pid)) for n, _, pid in (w.partition("=") for w in a.watch))
        cpu_before, started, load_before = cpu_s(watch), time.monotonic(), os.getloadavg()[0]
        runs = await asyncio.gather(*(session(seed, a.cap) for _ in range(a.repeat) for seed in a.seeds))
        out["wall_s"] = time.monotonic() - started
        out["cpu_s"] = {n: round(v - cpu_before.get(n, 0.0), 2) for n, v in cpu_s(watch).items()}
        out["load"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        out["sessions"] = runs
        statuses = await bus.retained("agents.status.")
        out["agents"] = {getattr(m, "name", t): getattr(m, "state", "?") for t, m in statuses.items()}
    return out


def _drive_main(a: argparse.Namespace) -> int:
    result = asyncio.run(asyncio.wait_for(_drive(a), a.ready_timeout + PHASE_S))
    Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


# ------------------------------------------------------------------------------------------------ measuring
@dataclass
class Setup:
    """What :func:`measure` runs: ``sessions`` distinct cases (seeds of ``scenario``'s test cohort), each planned
    ``repeat`` times, at most ``cap`` steps, ``planners`` at once (one rules planner each); ``rounds`` times over
    (1 host, 2 hosts, 1 host, 2 hosts, ...)."""

    scenario: str = SCENARIO
    sessions: int = 4
    repeat: int = 2
    cap: int = 4
    planners: int = 4
    rounds: int = 1
    cli: bool = False
    """At the end, also ``m2m status --config`` and one ``m2m plan --config`` session in the broker's namespace (the
    test; the bench leaves them out)."""


def logs(procs: Procs, tail: int = 4000) -> str:
    """The logs of ``procs`` and of every process the stack's supervisor ran (its run folder under ``stack/``)."""
    runs = sorted((procs.dir / "stack").glob("*/*.log"))
    return procs.dump_logs(tail) + "".join(f"\n--- {p.parent.name}/{p.name}\n{p.read_text(errors='replace')[-tail:]}"
                                          for p in runs)


def _wait_log(procs: Procs, name: str, text: str, timeout: float) -> None:
    p, log = procs[name], procs.log(name)
    end = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if p.poll() is not None:
            raise AssertionError(f"{name} exited with {p.returncode}:\n{logs(procs)}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {text!r} in {log}:\n{logs(procs)}")
        time.sleep(0.05)


def stack_config(d: Path, the_lab: Lab, keys: Keys, planners: int) -> Path:
    """``d/stack.toml``, the main machine's stack config as the README has a user write it: the broker on the
    bridge's address with CURVE (key paths relative to the file), an evaluator and ``planners`` rules planners; no
    dose engine (they run on the hosts)."""
    def rel(path: Path) -> str:
        return str(path.relative_to(d))

    path = d / "stack.toml"
    path.write_text("\n".join([
        "[bus]",
        f'endpoint = "{the_lab.endpoint}"',
        f'pub_endpoint = "{the_lab.pub_endpoint}"',
        f'transcript_dir = "{d / "stack"}"',
        f'curve_secret = "{rel(keys.broker_secret)}"',
        f'curve_clients = "{rel(keys.clients)}"',
        f'curve_client_secret = "{rel(keys.secret("stack"))}"',
        "",
        "[restart]",
        f"ready_timeout_s = {READY_S:g}",
        "stop_timeout_s = 30",
        "",
        "[[agent]]",
        'role = "evaluator"',
        "",
        "[[agent]]",
        'role = "planner"',
        'impl = "rules"',
        f"instances = {planners}",
        "",
    ]))
    return path


def _stack_children(runtime: Path) -> dict[str, int]:
    """Name → pid of the processes the (only) stack registered in ``runtime`` runs (its ``stack.json``)."""
    from m2m.stack import registry

    entries = [e for f in runtime.iterdir() if (e := registry.read_entry(f)) is not None]
    assert len(entries) == 1, entries
    return {name: pid for name, pid, _ in entries[0].children}


def _cpus(n: int) -> list[set[int]]:
    """One CPU for each of ``n`` hosts (round robin over the CPUs this process may use)."""
    allowed = sorted(os.sched_getaffinity(0))
    return [{allowed[i % len(allowed)]} for i in range(n)]


def measure(the_lab: Lab, procs: Procs, setup: Setup) -> dict[str, Any]:
    """``m2m up --config`` (broker, evaluator, ``setup.planners`` rules planners) and the session driver in the
    broker's namespace; one ``m2m agent dose-engine`` (one CPU, one thread) in each host that a phase uses; an
    engine with an unauthorised key in host 2 throughout. Each round runs the sessions with host 1's engine, then
    adds host 2's, and so on (a round after the first stops the extra engines first: alternating rounds share out
    a changing load of the machine). Returns the report (phases with throughput, the sessions, per-engine solve
    counts, what the unauthorised engine and probe got, and with ``setup.cli`` what ``m2m status/plan --config``
    did)."""
    from m2m.scenarios import load_scenario

    seeds = list(load_scenario(setup.scenario).cohorts.get("test").seeds)[: setup.sessions]
    hosts = [f"engine-h{i}" for i in range(1, the_lab.hosts + 1)]
    stack = [f"planner-{i}" for i in range(1, setup.planners + 1)]
    keys = make_keys(procs.dir / "keys", ["stack", *hosts], ["rogue"])
    config = stack_config(procs.dir, the_lab, keys, setup.planners)
    bus = ["--connect", the_lab.endpoint, "--pub-connect", the_lab.pub_endpoint]
    b = the_lab.broker_ns
    runtime = {"M2M_RUNTIME_DIR": str(procs.dir / "rt")}  # the stack's registration: m2m status/plan find it there
    spawn_in(procs, b, "-m", "m2m.cli.main", "up", "--config", str(config), name="stack", env=runtime)
    _wait_log(procs, "stack", "the stack is up", READY_S + BROKER_UP_S)
    children = _stack_children(procs.dir / "rt")
    cpus = _cpus(the_lab.hosts)
    running: dict[str, tuple[subprocess.Popen[bytes], Path, str]] = {}  # host's engine → process, log, bus name
    starts = dict.fromkeys(hosts, 0)

    def engine(i: int, name: str, key: str) -> tuple[subprocess.Popen[bytes], Path, str]:
        proc = spawn_in(procs, the_lab.host_ns(i), "-m", "m2m.cli.main", "agent", "dose-engine", "--name", name,
                        *bus, *keys.client_args(key), name=name, cpus=cpus[i - 1], env=ENGINE_THREADS)
        return proc, procs.logs[-1], name

    def solves(log: Path) -> int:
        """How many plans an engine reports it solved (its log's ``dose_planned`` lines)."""
        return log.read_text(errors="replace").count("dose_planned")

    rogue_host = min(2, the_lab.hosts)
    rogue = engine(rogue_host, "engine-rogue", "rogue")
    phases: list[dict[str, Any]] = []
    for rnd in range(1, setup.rounds + 1):
        for n in range(1, the_lab.hosts + 1):
            for h in hosts[n:]:  # a new round: back to one host
                if h in running:
                    proc, _, _ = running.pop(h)
                    proc.terminate()  # drains (it is idle) and exits
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        kill_tree(proc.pid)
                        proc.wait(timeout=10)
            for i, h in enumerate(hosts[:n], start=1):
                if h not in running:
                    starts[h] += 1  # a restarted engine gets a new bus name: no stale retained status
                    running[h] = engine(i, h if starts[h] == 1 else f"{h}-{starts[h]}", h)
            before = {h: solves(running[h][1]) for h in hosts[:n]}
            out = procs.dir / f"phase-{rnd}-{n}.json"
            watch = {"broker": children["broker"], "evaluator-1": children["evaluator-1"],
                     **{name: children[name] for name in stack}, **{h: running[h][0].pid for h in hosts[:n]}}
            argv = ["-m", "support.netns", "drive", "--config", str(config), "--ready", "evaluator-1",
                    *stack, *(running[h][2] for h in hosts[:n]), "--scenario", setup.scenario, "--seeds",
                    *map(str, seeds), "--repeat", str(setup.repeat), "--cap", str(setup.cap), "--concurrency",
                    str(setup.planners), "--out", str(out), "--watch", *(f"{k}={v}" for k, v in watch.items())]
            if rnd == 1 and n == 1:
                argv += ["--rogue-secret", str(keys.secret("rogue"))]
            driver = spawn_in(procs, b, *argv, name=f"driver-{rnd}-{n}")
            try:
                code = driver.wait(timeout=READY_S + PHASE_S + 30)
            except subprocess.TimeoutExpired:
                kill_tree(driver.pid)
                raise AssertionError(f"phase {rnd}-{n} did not finish:\n{logs(procs)}") from None
            if code != 0:
                raise AssertionError(f"phase {rnd}-{n}'s driver exited with {code}:\n{logs(procs)}")
            result = json.loads(out.read_text())
            engines = {h: solves(running[h][1]) - before[h] for h in hosts[:n]}
            total = sum(len(s["scores"]) for s in result["sessions"])
            wall = result["wall_s"]
            phases.append({
                "round": rnd, "hosts": n, "engines": engines, "sessions": len(result["sessions"]), "solves": total,
                "warmup_solves": result["warmup_solves"], "wall_s": round(wall, 2),
                "solves_per_min": round(60 * total / wall, 1),
                "sessions_per_min": round(60 * len(result["sessions"]) / wall, 2),
                "ready_s": round(result["ready_s"], 1), "cpu_s": result["cpu_s"], "load": result["load"],
                "agents": result["agents"], "runs": result["sessions"],
                **({"rogue_probe": result["rogue_probe"]} if "rogue_probe" in result else {}),
            })
    cli = _cli_checks(the_lab, procs, config, setup, runtime) if setup.cli else {}
    return {
        "stack": "m2m up --config (broker, evaluator, planners); hosts: m2m agent dose-engine --curve-...",
        "cli": cli,
        "scenario": setup.scenario, "mode": "unguided", "planner": "rules", "seeds": seeds, "repeat": setup.repeat,
        "step_cap": setup.cap, "planners": setup.planners, "rounds": setup.rounds, "cpus": [sorted(c) for c in cpus],
        "machine_cpus": os.cpu_count(), "phases": phases,
        "rogue": {"solves": solves(rogue[1]), "exit": rogue[0].poll(), "host": the_lab.host_ns(rogue_host)},
    }


def _cli_checks(the_lab: Lab, procs: Procs, config: Path, setup: Setup, env: dict[str, str]) -> dict[str, Any]:
    """``m2m status --config`` and one ``m2m plan --config`` session (step cap 1) in the broker's namespace: their
    exit codes and output (the plan joins the stack; its dose engines are on the hosts, not in the config)."""
    out: dict[str, Any] = {}
    for name, args in (("status", ["status", "--config", str(config)]),
                       ("plan", ["plan", "--config", str(config), "--scenario", setup.scenario, "--mode", "unguided",
                                 "--step-cap", "1", "--out", str(procs.dir / "plans")])):
        p = spawn_in(procs, the_lab.broker_ns, "-m", "m2m.cli.main", *args, name=f"cli-{name}", env=env)
        try:
            code = p.wait(timeout=PHASE_S)
        except subprocess.TimeoutExpired:
            kill_tree(p.pid)
            code = None
        out[name] = {"exit": code, "output": procs.logs[-1].read_text(errors="replace")[-3000:]}
    out["plan"]["sessions"] = len(list((procs.dir / "plans").glob("*/transcript.m2mt")))
    return out


def table(report: dict[str, Any]) -> str:
    """The 1-vs-N-host throughput table: one row per phase, then the median of each number of hosts. "engine CPU"
    is how much of its own CPU each engine got (below 100 %, something else ran there); "other CPU s" is what the
    broker, the planners and the evaluator used in the phase."""
    rows = ["round  hosts  sessions  solves  wall (s)  solves/min  sessions/min  engine CPU  other CPU s  load avg  "
            "solves per engine (+warm-up)"]
    by_hosts: dict[int, list[float]] = {}
    for p in report["phases"]:
        engine_cpu = sum(v for k, v in p["cpu_s"].items() if k in p["engines"])
        other = sum(v for k, v in p["cpu_s"].items() if k not in p["engines"])
        busy = 100 * engine_cpu / (p["wall_s"] * len(p["engines"]))
        per = ", ".join(f"{k} {v}" for k, v in p["engines"].items())
        rows.append(f"{p['round']:>5}  {p['hosts']:>5}  {p['sessions']:>8}  {p['solves']:>6}  {p['wall_s']:>8.1f}  "
                    f"{p['solves_per_min']:>10.1f}  {p['sessions_per_min']:>12.2f}  {busy:>9.0f}%  {other:>11.1f}  "
                    f"{p['load'][0]:>8.2f}  {per}")
        by_hosts.setdefault(p["hosts"], []).append(p["solves_per_min"])
    median = {n: statistics.median(v) for n, v in by_hosts.items()}
    rows.append("median solves/min: " + ", ".join(f"{n} host(s) {m:.1f}" for n, m in median.items()))
    rows += [f"speed-up with {n} hosts: {m / median[1]:.2f}x" for n, m in median.items() if n > 1]
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ command line
def _bench(a: argparse.Namespace) -> int:
    d = Path(tempfile.mkdtemp(prefix="m2mmh", dir="/tmp"))
    procs = Procs(d)
    try:
        with lab(a.hosts) as the_lab:
            try:
                report = measure(the_lab, procs, Setup(a.scenario, a.sessions, a.repeat, a.cap, a.planners,
                                                         a.rounds))
            finally:
                procs.close()
    except NamespacesUnavailable as exc:
        print(f"cannot make network namespaces here: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(table(report))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"written to {a.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m support.netns", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="measure dose-engine throughput with 1..N host namespaces (needs root)")
    defaults = Setup()
    bench.add_argument("--hosts", type=int, default=2)
    bench.add_argument("--scenario", default=defaults.scenario, help="(%(default)s)")
    # wider than the test's: 8 sessions at once keep two engines busier than 4 do
    bench.add_argument("--sessions", type=int, default=8, help="distinct cases (%(default)s)")
    bench.add_argument("--repeat", type=int, default=1, help="runs of each case (%(default)s)")
    bench.add_argument("--cap", type=int, default=defaults.cap, help="step cap of each session (%(default)s)")
    bench.add_argument("--planners", type=int, default=8, help="sessions at once (%(default)s)")
    bench.add_argument("--rounds", type=int, default=3, help="1..N hosts, that many times over (%(default)s)")
    bench.add_argument("--out", default=None, help="write the report as JSON here")
    bench.set_defaults(func=_bench)
    drive = sub.add_parser("drive", help="(inside the broker's namespace) the session client of one phase")
    drive.add_argument("--config", required=True, help="the stack config (its endpoints and client keys)")
    drive.add_argument("--rogue-secret", default=None)
    drive.add_argument("--ready", nargs="+", required=True)
    drive.add_argument("--ready-timeout", type=float, default=READY_S)
    drive.add_argument("--scenario", default=SCENARIO)
    drive.add_argument("--seeds", nargs="+", type=int, required=True)
    drive.add_argument("--repeat", type=int, required=True)
    drive.add_argument("--cap", type=int, required=True)
    drive.add_argument("--concurrency", type=int, required=True)
    drive.add_argument("--out", required=True)
    drive.add_argument("--watch", nargs="*", default=[], metavar="NAME=PID", help="processes whose CPU to report")
    drive.set_defaults(func=_drive_main)
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a killed bench still removes its namespaces
    return int(a.func(a))


if __name__ == "__main__":
    sys.exit(main())
