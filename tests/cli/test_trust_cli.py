"""The CLI on a stack named by its config file (``--config`` for ``status``, ``swap``, ``plan`` and ``down``) and
``m2m plan`` losing its broker mid-session: one line that names the broker, exit status 1 (issue 19)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from support.procs import WatchedCommand, children_of, gone, reap, stop_stack

from m2m.bus.client import BusConfig
from m2m.cli.main import main
from m2m.stack.control import start_detached
from m2m.stack.supervisor import PID_FILE_NAME

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FIRST_STEP = re.compile(r"\bstep +0 +score ")


def test_config_names_the_stack_and_plan_reports_a_lost_broker_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    d = Path(tempfile.mkdtemp(prefix="m2mcfg", dir="/tmp"))  # ipc paths must stay short
    monkeypatch.setenv("M2M_RUNTIME_DIR", str(d / "rt"))
    config = d / "stack.toml"
    config.write_text(
        f'[bus]\nendpoint = "ipc://{d}/bus"\npub_endpoint = "ipc://{d}/pub"\ntranscript_dir = "{d}/stack"\n\n'
        '[[agent]]\nrole = "dose-engine"\n\n[[agent]]\nrole = "evaluator"\n\n[[agent]]\nrole = "planner"\n'
        'impl = "rules"\n'
    )
    bus = BusConfig(endpoint=f"ipc://{d}/bus", pub_endpoint=f"ipc://{d}/pub")
    status = start_detached(config)
    supervisor = int((Path(status.transcript).parent / PID_FILE_NAME).read_text())
    cmd: WatchedCommand | None = None
    try:
        assert main(["status", "--config", str(config)]) == 0
        assert status.stack_id in capsys.readouterr().out
        assert main(["swap", "evaluator", "--impl", "protocol", "--config", str(config)]) == 0
        assert "evaluator now runs protocol" in capsys.readouterr().out

        env = {**os.environ, "M2M_RUNTIME_DIR": str(d / "rt")}
        cmd = WatchedCommand("plan", "--mode", "unguided", "--step-cap", "20", "--config", str(config),
                             "--out", str(d / "runs"), env=env)
        cmd.wait_for(FIRST_STEP.search, "the first step is shown", timeout=120)
        lines = cmd.lines
        assert any("joining the running stack" in line for line in lines), "\n".join(lines)  # --config's endpoints
        [broker] = [pid for pid in children_of(supervisor)
                    if b"\0broker\0" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(supervisor, signal.SIGSTOP)  # nothing restarts the broker while the session waits
        os.kill(broker, signal.SIGKILL)
        assert cmd.wait(timeout=60) == 1, cmd.tail()
        assert not any("Traceback" in line for line in lines), "\n".join(lines)
        last = lines[-1]
        assert last.startswith("m2m plan: ") and "broker" in last and str(d / "bus") in last, cmd.tail(10)
        assert "session folder" not in cmd.stdout()

        os.kill(supervisor, signal.SIGCONT)  # it restarts the broker; m2m down --config stops the stack
        assert gone(broker)
        assert main(["down", "--config", str(config)]) == 0
        assert reap(supervisor, 60) == 0
    finally:
        if cmd is not None:
            cmd.close()
        if not gone(supervisor):
            os.kill(supervisor, signal.SIGCONT)
        stop_stack(bus, supervisor)
        shutil.rmtree(d, ignore_errors=True)
