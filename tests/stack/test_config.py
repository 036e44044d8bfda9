"""The stack config: the packaged default, and every problem of a file as one typed error naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from m2m.stack.config import StackConfigError, StackError, load_stack_config


def test_default_stack_config() -> None:
    cfg = load_stack_config(None)
    assert [(a.role, a.impl, a.instances, dict(a.options)) for a in cfg.agents] == [
        ("dose-engine", "pencil-beam", 2, {}),
        ("evaluator", "protocol", 2, {}),  # one lost or hung evaluator does not stall the sessions
        ("drl-advisor", "dqn", 1, {}),
        ("planner", "llm", 1, {"model": "embedded"}),
    ]
    # no endpoints: every stack started from it gets sockets of its own (m2m.stack.registry)
    assert (cfg.endpoint, cfg.pub_endpoint, cfg.isolated) == (None, None, True)
    assert cfg.transcript_dir == Path("runs/stack")
    assert (cfg.max_restarts, cfg.window_s, cfg.ready_timeout_s, cfg.stop_timeout_s) == (3, 30.0, 300.0, 60.0)
    assert cfg.hang_timeout_s == 10.0
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
        None, Path("runs/stack"), 3, 60.0)
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
         "unknown key; expected one of max_restarts, window_s, ready_timeout_s, stop_timeout_s, hang_timeout_s"),
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
        ('[bus]\nendpoint = "ipc:///tmp/x"\n' + EVALUATOR, "bus.pub_endpoint",
         "missing; give both endpoints, or neither (the stack then gets its own sockets in its runtime folder)"),
        # options, checked against what the implementation declares, before anything starts
        (EVALUATOR + 'options = { bogus = "1" }\n', "agent[0].options.bogus",
         "evaluator/protocol does not take option 'bogus'; it takes: none"),
        ('[[agent]]\nrole = "planner"\nimpl = "rules"\noptions = { model = "embedded" }\n', "agent[0].options.model",
         "planner/rules does not take option 'model'; it takes: none"),
        ('[[agent]]\nrole = "planner"\nimpl = "llm"\noptions = { model = "foo" }\n', "agent[0].options.model",
         "planner/llm: option model must be embedded, openai or replay, got 'foo'"),
        ('[[agent]]\nrole = "planner"\noptions = { model = "openai" }\n', "agent[0].options.base_url",
         "planner/llm: model=openai needs base_url=URL (and model_name=, api_key_env= as the server wants)"),
        ('[[agent]]\nrole = "planner"\noptions = { model_name = "gpt-9" }\n', "agent[0].options.model_name",
         "planner/llm: option model_name of model=embedded must be one of "),
        ('[[agent]]\nrole = "dose-engine"\noptions = { cases_in_memory = "0" }\n', "agent[0].options.cases_in_memory",
         "dose-engine/pencil-beam: option cases_in_memory must be an integer >= 1, got '0'"),
    ],
)
def test_a_bad_config_names_the_file_the_key_and_what_was_expected(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = tmp_path / "stack.toml"
    path.write_text(text)
    with pytest.raises(StackConfigError) as info:
        load_stack_config(path)
    if problem.endswith("one of "):  # the list that follows is the model registry's
        assert info.value.problem.startswith(problem)
        problem = info.value.problem
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
