"""Real agent processes on a real broker for the agent tests: ipc endpoints in a short temp folder, every process
killed and reaped by the fixture that owns the :class:`AgentProcs`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from m2m.agents.messages import AgentStatus
from m2m.bus.client import BusClient, BusConfig

HB = 0.25  # heartbeat of every test process (s): a killed agent is noticed within ~1 s


@dataclass
class AgentProcs:
    dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.dir}/bus"

    @property
    def pub(self) -> str:
        return f"ipc://{self.dir}/pub"

    @property
    def transcript(self) -> Path:
        return self.dir / "bus.m2mt"

    def config(self) -> BusConfig:
        return BusConfig(endpoint=self.endpoint, pub_endpoint=self.pub, heartbeat=HB)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = self.dir / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as f:
            p = subprocess.Popen([sys.executable, "-m", "m2m.agents.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                 env=env)
        self.procs[name] = p
        self.logs.append(log)
        return p

    def broker(self) -> subprocess.Popen[bytes]:
        return self._spawn("broker", ["broker", "--endpoint", self.endpoint, "--pub-endpoint", self.pub,
                                      "--heartbeat", str(HB), "--transcript", str(self.transcript)])

    def agent(self, role: str, name: str, *options: str, impl: str | None = None) -> subprocess.Popen[bytes]:
        args = ["agent", role, "--name", name, "--connect", self.endpoint, "--pub-connect", self.pub,
                "--heartbeat", str(HB)]
        if impl:
            args += ["--impl", impl]
        for o in options:
            args += ["--option", o]
        return self._spawn(name, args)

    def wait_ready(self, *names: str, timeout: float = 120.0) -> dict[str, AgentStatus]:
        """Block until every named agent reports ``ready`` on the bus (fails if one exits first)."""
        return asyncio.run(self._wait_ready(set(names), timeout))

    async def _wait_ready(self, names: set[str], timeout: float) -> dict[str, AgentStatus]:
        seen: dict[str, AgentStatus] = {}
        async with BusClient("test-watcher", self.config()) as bus:
            sub = bus.subscribe("agents.status.")
            deadline = time.monotonic() + timeout
            while not names <= {n for n, s in seen.items() if s.state == "ready"}:
                for n in names:
                    p = self.procs[n]
                    if p.poll() is not None:
                        raise AssertionError(f"{n} exited with {p.returncode}:\n{self.dump_logs()}")
                try:
                    d = await sub.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise AssertionError(
                            f"not ready in {timeout} s: {names - set(seen)}\n{self.dump_logs()}"
                        ) from None
                    continue
                msg = d.message
                # the pid check skips a status retained from an earlier process of the same name
                if isinstance(msg, AgentStatus) and msg.name in names and msg.pid == self.procs[msg.name].pid:
                    seen[msg.name] = msg
        return seen

    def terminate(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGTERM)

    def kill(self, name: str) -> None:
        p = self.procs[name]
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)

    def dump_logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}" for log in self.logs)
