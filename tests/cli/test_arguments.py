"""Bad arguments are refused before anything starts: one line ``m2m COMMAND: error: …`` on stderr and exit 2 (a
stack that does not run: exit 1), and no stack runtime folder is made and no process started. In-process, fast."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.procs import children_of
from support.stacks import RULES_AGENTS

from m2m.cli.main import main
from m2m.stack import registry


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A private runtime root: after the test it must hold no stack folder, and this process no new child."""
    root = tmp_path / "rt"
    monkeypatch.setenv(registry.RUNTIME_ENV, str(root))
    monkeypatch.chdir(tmp_path)  # runs/ and friends, were anything written

    def no_stack(*args: object, **kwargs: object) -> None:
        raise AssertionError("a stack was started for arguments that should have been refused")

    # a check that let bad arguments through must fail the test, not start a stack that outlives it
    monkeypatch.setattr("m2m.stack.control.start_detached", no_stack)
    monkeypatch.setattr("m2m.stack.supervisor.Supervisor.run", no_stack)
    before = children_of(os.getpid())
    yield root
    assert not root.exists() or list(root.iterdir()) == [], "a stack runtime folder was made"
    assert children_of(os.getpid()) <= before, "a process was started"


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 2) -> str:
    """Run ``m2m ARGV``; it must exit ``code`` with one line on stderr, which is returned."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _config(tmp_path: Path, agents: str, name: str = "stack.toml") -> str:
    path = tmp_path / name
    path.write_text(f'[bus]\ntranscript_dir = "{tmp_path}/stack"\n\n{agents}')
    return str(path)


GOOD_AGENTS = RULES_AGENTS


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--step-cap", "-3"], "m2m plan: error: --step-cap must be >= 0, got -3"),
        (["--scenario", "lung"], "m2m plan: error: --scenario: unknown scenario 'lung'"),
        (["--cohort", "nope"], "m2m plan: error: --cohort: unknown cohort 'nope'"),
        (["--case", "100000"], "m2m plan: error: --case 100000 is outside cohort 'test' of prostate-basic"),
        (["--case", "-1"], "is outside cohort"),
        (["--mode", "unguided", "--with-advice"], "m2m plan: error: --with-advice needs --mode guided"),
        (["--out", "/etc/hostname/runs"], "m2m plan: error: --out /etc/hostname/runs: /etc/hostname is not a folder"),
        (["--stack", "ab", "--connect", "ipc:///tmp/x"], "m2m plan: error: give --stack or --connect, not both"),
        (["--pub-connect", "ipc:///tmp/x"], "m2m plan: error: --pub-connect goes with --connect"),
        (["--connect", "ipc:///tmp/m2m-nowhere"], "m2m plan: error: --pub-connect is needed with --connect"),
        (["--curve-secret", "k"], "m2m plan: error: --curve-secret and --curve-server go together"),
        (["--planner", "greedy", "--keep-up"], "--planner greedy plans in this process, without a stack: --keep-up"),
        (["--planner", "drl", "--checkpoint", "/nonexistent.pt"], "--checkpoint /nonexistent.pt: no such file"),
    ],
)
def test_plan_refuses_bad_arguments_before_starting_anything(
    runtime: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    assert says in _refused(capsys, ["plan", *argv])


def test_plan_refuses_a_bad_stack_config_before_starting_anything(
    runtime: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_option = _config(tmp_path, GOOD_AGENTS.replace('impl = "rules"', 'impl = "llm"\noptions = { model = "foo" }'))
    err = _refused(capsys, ["plan", "--mode", "unguided", "--config", bad_option])
    # the file, the agent, the option and what is allowed
    assert err == (f"m2m plan: error: {bad_option}: agent[2].options.model: planner/llm: option model must be "
                   "embedded, openai or replay, got 'foo'")
    bad_impl = _config(tmp_path, GOOD_AGENTS.replace('impl = "rules"', 'impl = "gpt"'), "impl.toml")
    assert ('agent[2].impl: expected an implementation of "planner", one of ["drl", "knowledge", "llm", "rules"], '
            'got "gpt"') in _refused(capsys, ["plan", "--config", bad_impl])
    unknown = _config(tmp_path, GOOD_AGENTS + 'options = { temperature = "0" }\n', "unknown.toml")
    assert "agent[2].options.temperature: planner/rules does not take option 'temperature'; it takes: none" \
        in _refused(capsys, ["plan", "--mode", "unguided", "--config", unknown])
    not_toml = tmp_path / "broken.toml"
    not_toml.write_text("[[agent]\nrole =")
    assert f"{not_toml}: not valid TOML" in _refused(capsys, ["plan", "--config", str(not_toml)])
    assert "cannot read" in _refused(capsys, ["plan", "--config", str(tmp_path / "none.toml")])
    # guided sessions need the DRL advisor's knowledge: a config without one is refused, unguided is not the issue
    assert "runs no drl-advisor agent, which m2m plan needs" in _refused(
        capsys, ["plan", "--mode", "guided", "--config", _config(tmp_path, GOOD_AGENTS, "good.toml")])
    no_evaluator = _config(tmp_path, GOOD_AGENTS.replace('role = "evaluator"', 'role = "drl-advisor"'), "ne.toml")
    assert "runs no evaluator agent" in _refused(capsys, ["plan", "--mode", "unguided", "--config", no_evaluator])


def test_plan_on_a_stack_that_does_not_run_fails_with_1(runtime: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(capsys, ["plan", "--stack", "0bad0bad"], code=1)
    assert err == "m2m plan: no running stack has the id '0bad0bad' (running: none)"


def test_up_refuses_bad_arguments_before_starting_anything(
    runtime: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _config(tmp_path, '[[agent]]\nrole = "planner"\nimpl = "llm"\noptions = { model = "foo" }\n')
    assert "agent[0].options.model: planner/llm: option model must be" in _refused(capsys, ["up", "--config", bad])
    assert "agent[0].options.model" in _refused(capsys, ["up", "--detach", "--config", bad])
    assert "--endpoint and --pub-endpoint go together" in _refused(capsys, ["up", "--endpoint", "ipc:///tmp/x"])
    assert "/etc/hostname is not a folder" in _refused(capsys, ["up", "--transcript-dir", "/etc/hostname/m2m"])


def test_swap_refuses_a_bad_implementation_or_option_without_asking_a_supervisor(
    runtime: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # no stack runs: the refusal comes before any stack is looked for
    assert _refused(capsys, ["swap", "planner", "--impl", "llm", "--option", "model=foo"]) == (
        "m2m swap: error: planner/llm: option model must be embedded, openai or replay, got 'foo'")
    assert "role 'evaluator' has no implementation 'llm'" in _refused(capsys, ["swap", "evaluator", "--impl", "llm"])
    assert "evaluator/protocol does not take option 'x'" in _refused(
        capsys, ["swap", "evaluator", "--impl", "protocol", "--option", "x=1"])
    assert "unknown role 'judge'" in _refused(capsys, ["swap", "judge", "--impl", "x"])
    assert "is not key=value" in _refused(capsys, ["swap", "planner", "--impl", "rules", "--option", "nokey"])
    # a good swap with no stack running: nothing to ask
    assert _refused(capsys, ["swap", "planner", "--impl", "rules"], code=1) == (
        "m2m swap: no stack runs (start one with m2m up)")


def test_an_agent_with_a_bad_option_exits_64_before_it_connects(
    runtime: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bus = ["--connect", f"ipc://{tmp_path}/bus", "--pub-connect", f"ipc://{tmp_path}/pub"]
    assert main(["agent", "planner", "--impl", "llm", "--option", "model=foo", *bus]) == 64
    assert "planner/llm: option model must be embedded, openai or replay, got 'foo'" in capsys.readouterr().err
    assert not (tmp_path / "bus").exists()


def test_experiment_refuses_bad_arguments_before_starting_anything(
    runtime: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ["--out", str(tmp_path / "exp")]
    paper = ["experiment", "paper", *out]
    assert "step cap must be >= 0, got -1" in _refused(capsys, [*paper, "--step-cap", "-1"])
    assert "--cases must be >= 1" in _refused(capsys, [*paper, "--cases", "0"])
    assert "unknown scenario or arm" in _refused(capsys, [*paper, "--scenarios", "lung"])
    assert "paper cohort has" in _refused(capsys, [*paper, "--scenarios", "liver", "--cases", "100000"])
    assert "planner/llm: option model_name of model=embedded must be one of" in _refused(
        capsys, [*paper, "--llm-option", "model_name=gpt-9"])
    assert "planner/llm: model=openai needs base_url=URL" in _refused(capsys, [*paper, "--llm", "openai"])
    assert "planner/llm does not take option 'colour'" in _refused(capsys, [*paper, "--llm-option", "colour=red"])
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert f"--out {a_file}: {a_file} is not a folder" in _refused(
        capsys, ["experiment", "paper", "--out", str(a_file)])
    no_planner = _config(tmp_path, '[[agent]]\nrole = "evaluator"\n')
    assert "runs no dose-engine, drl-advisor, planner agent, which m2m experiment paper needs" in _refused(
        capsys, [*paper, "--config", no_planner])
    assert not (tmp_path / "exp").exists()  # nothing written for a refused experiment


def test_down_and_swap_refuse_to_guess_between_several_stacks(
    runtime: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = registry.allocate(), registry.allocate()  # registered to this (live) process, answering nothing
    try:
        for argv in (["down"], ["swap", "planner", "--impl", "rules"]):
            err = _refused(capsys, argv)
            assert "2 stacks run: name one with --stack ID" in err and a.id in err and b.id in err
        assert main(["status", "--timeout", "0.2"]) == 0  # status shows them all
        out = capsys.readouterr().out
        assert f"stack {a.id}: supervisor pid {os.getpid()} is starting or does not answer" in out
        assert f"stack {b.id}:" in out and "2 stacks run" in out
        assert _refused(capsys, ["down", "--stack", a.id, "--timeout", "0.2"], code=1) == (
            f"no stack answers at {a.endpoint}")
    finally:
        registry.remove(a)
        registry.remove(b)


def test_replay_refuses_a_file_it_cannot_use_before_starting_anything(
    runtime: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _refused(capsys, ["replay", str(tmp_path / "none.m2mt")]).startswith("m2m replay: error: ")
