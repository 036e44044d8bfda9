"""Stack configs the CLI tests write: one place that knows the TOML layout of ``stack.toml``
(:mod:`m2m.stack.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

RULES_AGENTS = """
[[agent]]
role = "dose-engine"

[[agent]]
role = "evaluator"

[[agent]]
role = "planner"
impl = "rules"
"""
"""The ``[[agent]]`` tables of the smallest stack that plans: one dose engine, the evaluator, the rules planner."""


def stack_toml(
    d: Path,
    *,
    planner: str,
    planner_options: Mapping[str, str] | None = None,
    drl_advisor: bool = True,
    endpoints: bool = False,
    ready_timeout_s: float | None = None,
) -> str:
    """A stack config under folder ``d``: one dose engine, the evaluator, the DRL advisor (unless ``drl_advisor`` is
    false) and one planner of implementation ``planner`` with ``planner_options``; the bus transcript in
    ``d/stack``, and the broker's sockets in ``d`` when ``endpoints`` (else the stack's own runtime folder)."""
    lines = ["[bus]"]
    if endpoints:
        lines += [f'endpoint = "ipc://{d}/bus"', f'pub_endpoint = "ipc://{d}/pub"']
    lines.append(f'transcript_dir = "{d}/stack"')
    if ready_timeout_s is not None:
        lines += ["", "[restart]", f"ready_timeout_s = {ready_timeout_s:g}"]
    roles = ["dose-engine", "evaluator", *(["drl-advisor"] if drl_advisor else [])]
    for role in roles:
        lines += ["", "[[agent]]", f'role = "{role}"']
    lines += ["", "[[agent]]", 'role = "planner"', f'impl = "{planner}"']
    if planner_options:
        lines.append("options = { " + ", ".join(f'{k} = "{v}"' for k, v in planner_options.items()) + " }")
    return "\n".join(lines) + "\n"
