"""The CLI on a stack named by its config file (``--config`` for ``status``, ``swap``, ``plan`` and ``down``) and
``m2m plan`` losing its broker mid-session: one line that names the broker, exit status 1 (issue 19)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from support.procs import children_of, gone, kill_tree, reap, stop_stack, wait_until

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
    proc: subprocess.Popen[str] | None = None
    try:
        assert main(["status", "--config", str(config)]) == 0
        assert status.stack_id in capsys.readouterr().out
        assert main(["swap", "evaluator", "--impl", "protocol", "--config", str(config)]) == 0
        assert "evaluator now runs protocol" in capsys.readouterr().out

        env = {**os.environ, "M2M_RUNTIME_DIR": str(d / "rt")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "m2m.cli.main", "plan", "--mode", "unguided", "--step-cap", "20",
             "--config", str(config), "--out", str(d / "runs")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        lines: list[str] = []
        first_step = threading.Event()

        def read_stderr() -> None:
            assert proc is not None and proc.stderr is not None
            for line in proc.stderr:
                lines.append(line.rstrip("\n"))
                if FIRST_STEP.search(line):
                    first_step.set()

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        wait_until(lambda: first_step.is_set() or proc.poll() is not None, "the first step is shown", timeout=120)
        assert proc.poll() is None, "\n".join(lines[-30:])
        assert any("joining the running stack" in line for line in lines), "\n".join(lines)  # --config's endpoints
        [broker] = [pid for pid in children_of(supervisor)
                    if b"\0broker\0" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(supervisor, signal.SIGSTOP)  # nothing restarts the broker while the session waits
        os.kill(broker, signal.SIGKILL)
        assert proc.wait(timeout=60) == 1, "\n".join(lines[-30:])
        reader.join(timeout=10)
        assert not any("Traceback" in line for line in lines), "\n".join(lines)
        last = lines[-1]
        assert last.startswith("m2m plan: ") and "broker" in last and str(d / "bus") in last, "\n".join(lines[-10:])
        assert proc.stdout is not None and "session folder" not in proc.stdout.read()

        os.kill(supervisor, signal.SIGCONT)  # it restarts the broker; m2m down --config stops the stack
        assert gone(broker)
        assert main(["down", "--config", str(config)]) == 0
        assert reap(supervisor, 60) == 0
    finally:
        if proc is not None and proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait(timeout=10)
        if not gone(supervisor):
            os.kill(supervisor, signal.SIGCONT)
        stop_stack(bus, supervisor)
        shutil.rmtree(d, ignore_errors=True)
