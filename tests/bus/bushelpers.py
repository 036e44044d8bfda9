"""Helpers for the bus tests: real broker and worker processes on ipc:// endpoints in a short temp folder.

(Kept out of conftest.py so that ``import bushelpers`` cannot pick up another folder's conftest module.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).parent

HB = 0.2  # heartbeat used by every test process


@dataclass
class Procs:
    dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.dir}/bus"

    @property
    def pub(self) -> str:
        return f"ipc://{self.dir}/pub"

    def spawn(self, *args: str, name: str = "proc") -> subprocess.Popen[bytes]:
        log = self.dir / f"{name}-{len(self.procs)}.log"
        env = {**os.environ, "M2M_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as f:
            p = subprocess.Popen([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, env=env)
        self.procs.append(p)
        self.logs.append(log)
        return p

    def broker(self, *extra: str, endpoint: str | None = None, pub: str | None = None) -> subprocess.Popen[bytes]:
        return self.spawn("-m", "m2m.bus.broker", "--endpoint", endpoint or self.endpoint, "--pub-endpoint",
                          pub or self.pub, "--heartbeat", str(HB), *extra, name="broker")

    def worker(self, service: str = "echo", *extra: str, name: str = "worker") -> subprocess.Popen[bytes]:
        return self.spawn(str(HERE / "busapp.py"), "worker", "--endpoint", self.endpoint, "--pub", self.pub,
                          "--service", service, "--heartbeat", str(HB), "--name", name, *extra, name=name)

    def kill(self, p: subprocess.Popen[bytes]) -> None:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)

    def dump_logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in self.logs)


def wait_until(pred, timeout: float = 10.0, step: float = 0.02) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(step)
    raise AssertionError("condition not met in time")
