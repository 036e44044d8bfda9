"""The stack registry: one runtime folder per stack (its own sockets, its ``stack.json``), found by id or endpoint,
stale folders of dead stacks ignored and removed. No process is started here."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from m2m.stack import registry
from m2m.stack.config import StackError


@pytest.fixture
def root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    r = tmp_path / "rt"
    monkeypatch.setenv(registry.RUNTIME_ENV, str(r))
    return r


def test_each_stack_gets_its_own_folder_and_sockets(root: Path) -> None:
    a, b = registry.allocate(config="a.toml"), registry.allocate()
    assert a.id != b.id and a.isolated and b.isolated
    assert a.endpoint == f"ipc://{root}/{a.id}/bus" and a.pub_endpoint == f"ipc://{root}/{a.id}/pub"
    assert b.endpoint != a.endpoint
    assert (root.stat().st_mode & 0o777) == 0o700 and (Path(a.dir).stat().st_mode & 0o777) == 0o700
    assert registry.read_entry(Path(a.dir)) == a and a.pid == os.getpid() and a.config == "a.toml"
    assert {e.id for e in registry.running_stacks()} == {a.id, b.id}
    assert registry.find_stack(a.id) == a and registry.find_stack(a.id[:6]) == a
    assert registry.stack_at(b.endpoint) == b and registry.stack_at("ipc:///elsewhere") is None
    with pytest.raises(registry.NoSuchStack, match=rf"no running stack has the id 'zz' \(running: .*{a.id} at "):
        registry.find_stack("zz")
    # explicit endpoints are registered too, without sockets of their own
    c = registry.allocate("ipc:///tmp/x-bus", "ipc:///tmp/x-pub")
    assert not c.isolated and (c.endpoint, c.pub_endpoint) == ("ipc:///tmp/x-bus", "ipc:///tmp/x-pub")
    with pytest.raises(StackError, match="both bus endpoints"):
        registry.allocate("ipc:///tmp/x-bus", None)
    registry.remove(a)
    assert not Path(a.dir).exists() and {e.id for e in registry.running_stacks()} == {b.id, c.id}


def test_stale_folders_of_dead_stacks_are_ignored_and_removed(root: Path) -> None:
    live = registry.allocate()
    dead = registry.allocate()
    registry.write_entry(replace(dead, pid_start=(dead.pid_start or 0) + 1))  # the pid now belongs to another process
    unclaimed = root / "0123abcd"  # made by a command that died before it wrote stack.json
    unclaimed.mkdir()
    fresh = root / "4567cdef"  # being made right now
    fresh.mkdir()
    old = time.time() - registry.UNCLAIMED_GRACE_S - 5
    os.utime(unclaimed, (old, old))
    other = root / "not-a-stack"  # never touched: not named like a stack
    other.mkdir()
    assert [e.id for e in registry.running_stacks(clean=False)] == [live.id]
    assert Path(dead.dir).exists()
    assert [e.id for e in registry.running_stacks()] == [live.id]
    assert not Path(dead.dir).exists() and not unclaimed.exists()
    assert fresh.exists() and other.exists()


def test_claim_hands_the_entry_to_the_supervisor(root: Path) -> None:
    entry = registry.allocate()
    claimed = registry.claim(entry, os.getpid(), run_dir="/runs/x")
    assert registry.read_entry(Path(entry.dir)) == claimed and claimed.run_dir == "/runs/x"
    assert registry.claim(entry, 2**22 + 12345).pid == 2**22 + 12345  # a pid that does not run
    assert registry.running_stacks() == []


def test_a_runtime_root_too_long_for_ipc_or_not_ours_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    long = tmp_path / ("x" * 90)
    monkeypatch.setenv(registry.RUNTIME_ENV, str(long))
    with pytest.raises(StackError, match=f"too long for ipc sockets.*{registry.RUNTIME_ENV}"):
        registry.allocate()
    assert list(long.iterdir()) == []  # the folder it made is gone again
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    monkeypatch.setenv(registry.RUNTIME_ENV, str(link))
    with pytest.raises(StackError, match="not a folder of this user"):
        registry.runtime_root()


def test_the_default_root_is_per_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(registry.RUNTIME_ENV, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert registry.runtime_root() == tmp_path / "m2m"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert registry.runtime_root() == Path("/tmp") / f"m2m-{os.getuid()}"
