"""The stack config: the packaged default, and every problem of a file as one typed error naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from m2m.bus import protocol as P
from m2m.stack.config import StackConfigError, StackError, load_stack_config


def test_default_stack_config() -> None:
    cfg = load_stack_config(None)
    assert [(a.role, a.impl, a.instances, dict(a.options)) for a in cfg.agents] == [
        ("dose-engine", "pencil-beam", 2, {}),
        ("evaluator", "protocol", 1, {}),
        ("drl-advisor", "dqn", 1, {}),
        ("planner", "llm", 1, {"model": "embedded"}),
    ]
    assert (cfg.endpoint, cfg.pub_endpoint) == (P.DEFAULT_ENDPOINT, P.DEFAULT_PUB_ENDPOINT)
    assert cfg.transcript_dir == Path("runs/stack")
    assert (cfg.max_restarts, cfg.window_s, cfg.ready_timeout_s, cfg.stop_timeout_s) == (3, 30.0, 300.0, 60.0)
    assert cfg.source.endswith("stack/stack.toml")


def test_left_out_keys_take_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "stack.toml"
    path.write_text('[[agent]]\nrole = " evaluator "\n[[agent]]\nrole = "planner"\nimpl = "rules"\ninstances = 3\n')
    cfg = load_stack_config(path)
    assert [(a.role, a.impl, a.instances) for a in cfg.agents] == [
        ("evaluator", "protocol", 1),
        ("planner", "rules", 3),
    ]
    assert (cfg.endpoint, cfg.transcript_dir, cfg.max_restarts, cfg.stop_timeout_s) == (
        P.DEFAULT_ENDPOINT, Path("runs/stack"), 3, 60.0)
    assert cfg.source == str(path)


EVALUATOR = '[[agent]]\nrole = "evaluator"\n'


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        # a wrong type, a missing key, an unknown key: the key and what was expected
        (EVALUATOR + 'instances = "two"\n', "agent[0].instances", 'expected an integer ≥ 1, got "two"'),
        (EVALUATOR + "instances = true\n", "agent[0].instances", "expected an integer ≥ 1, got true"),
        ('[[agent]]\nimpl = "protocol"\n', "agent[0].role", "missing; expected a non-empty string"),
        ('[bus]\nendpoint = "ipc:///tmp/x"\n', "agent", "missing; expected at least one [[agent]] table"),
        (EVALUATOR + 'colour = "red"\n', "agent[0].colour", "unknown key; expected one of role, impl, instances, "
                                                            "options"),
        ("[restart]\nwindow = 3\n" + EVALUATOR, "restart.window",
         "unknown key; expected one of max_restarts, window_s, ready_timeout_s, stop_timeout_s"),
        ('[[agent]]\nrole = "drl-advisor"\noptions = { checkpoint = 3 }\n', "agent[0].options.checkpoint",
         "expected a string, got 3"),
        ('bus = "x"\n' + EVALUATOR, "bus", 'expected a table, got "x"'),
        ("[bus]\nendpoint = 5\n" + EVALUATOR, "bus.endpoint", "expected a non-empty string, got 5"),
        ('[bus]\nendpoint = "  "\n' + EVALUATOR, "bus.endpoint", 'expected a non-empty string, got "  "'),
        # bounds
        (EVALUATOR + "instances = 0\n", "agent[0].instances", "expected an integer ≥ 1, got 0"),
        ("[restart]\nmax_restarts = -1\n" + EVALUATOR, "restart.max_restarts", "expected an integer ≥ 0, got -1"),
        ("[restart]\nwindow_s = -1\n" + EVALUATOR, "restart.window_s", "expected a positive number of seconds, got -1"),
        ("[restart]\nstop_timeout_s = inf\n" + EVALUATOR, "restart.stop_timeout_s",
         "expected a positive number of seconds, got inf"),
        ("agent = []\n", "agent", "expected at least one [[agent]] table, got []"),
        # what the types cannot say
        ('[[agent]]\nrole = "nope"\n', "agent[0].role", 'expected a role, one of ["dose-engine", "drl-advisor", '
                                                         '"evaluator", "planner"], got "nope"'),
        (EVALUATOR + 'impl = "llm"\n', "agent[0].impl",
         'expected an implementation of "evaluator", one of ["protocol"], got "llm"'),
        (EVALUATOR + EVALUATOR, "agent[1].role", '"evaluator" appears in two [[agent]] tables; use instances instead'),
        ('[[agent]]\nrole = "drl-advisor"\noptions = { "a=b" = "c" }\n', 'agent[0].options."a=b"',
         "option names must be non-empty and contain no '='"),
    ],
)
def test_a_bad_config_names_the_file_the_key_and_what_was_expected(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = tmp_path / "stack.toml"
    path.write_text(text)
    with pytest.raises(StackConfigError) as info:
        load_stack_config(path)
    assert (info.value.path, info.value.key, info.value.problem) == (str(path), key, problem)
    assert str(info.value) == f"{path}: {key}: {problem}"
    assert isinstance(info.value, StackError) and isinstance(info.value, ValueError)


def test_an_unreadable_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "stack.toml"
    path.write_text("[[agent]\nrole =")
    with pytest.raises(StackConfigError, match=rf"^{path}: not valid TOML: ") as info:
        load_stack_config(path)
    assert info.value.key == ""
    with pytest.raises(StackConfigError, match=rf"^{tmp_path}/none\.toml: cannot read: "):
        load_stack_config(tmp_path / "none.toml")
