"""``m2m experiment paper``: the paper's comparison, run through the real agent stack on the bus.

Every scenario is planned by five **arms** from the same initial TPPs: the LLM planner ``guided`` (it sees the DRL
knowledge) and ``unguided``, and three baselines without an LLM: ``drl`` (the DRL advisor's best admissible action
at every step), ``rules`` (the rule-based planner of :class:`m2m.agents.planner.RulesDecider`) and ``knowledge``
(:class:`m2m.agents.planner.KnowledgeDecider`: every TPP to the DRL knowledge's median at the first step, then the
rules; it reads the knowledge the DRL advisor publishes, as the guided LLM does, so the report can say what the LLM
adds over the knowledge alone). An arm is a planner implementation and a mode; the experiment swaps the running
stack's planner (``m2m swap``) between arms, so each session is an ordinary ``plan.session`` request to a planner
process.

Design (the paper's cohort sizes by default): prostate-basic 10 cases × 1 initial TPP setting, prostate-complex
1 case × 1, liver 1 case × 10 settings; cases are the first seeds of each scenario's ``paper`` cohort. Initial TPPs
are random from the published training ranges, a pure function of (scenario's ``initial_seed``, ``--seed``, case
seed, setting index), and shared by the arms of a run, so the arms are paired.

Resumable: every finished session is appended as one JSON line to ``sessions.jsonl`` in the output folder (and its
records are copied from the stack's bus transcript to ``transcripts/<run>.m2mt``); a rerun with the same folder
skips the sessions already there and refuses a folder made with another design (scenarios and arms may be added, to
run an experiment in parts). A session cut off by a kill is planned again from its first step.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from m2m.agents.messages import KnowledgeMessage, SessionRequest, Step, StepPhase, new_session_id
from m2m.bus.client import BusClient, BusConfig
from m2m.experiment.design import ARMS, PAPER, Design, ExperimentError, Run, runs_of
from m2m.experiment.records import (
    DESIGN_FILE,
    KNOWLEDGE_FILE,
    TRANSCRIPTS_DIR,
    SessionRecord,
    append_record,
    load_records,
    record_of,
)
from m2m.scenarios import load_scenario
from m2m.session.client import copy_session_transcript, run_session_request
from m2m.stack.control import swap

log = structlog.get_logger("experiment")


def prepare_folder(folder: Path, design: Design) -> dict[str, SessionRecord]:
    """Create ``folder`` for ``design`` or check that it holds a compatible one; the sessions already finished.

    An experiment may be run in parts: scenarios and arms can be added (``--scenarios liver`` or ``--arms drl,rules``
    into a folder made with others). The folder's design then lists the union, and its report covers it. The seed,
    step cap, LLM and the sizes of a scenario already there must match."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DESIGN_FILE
    wanted = design.to_json()
    if path.is_file():
        found = json.loads(path.read_text())
        same = ("seed", "step_cap", "llm")
        clash = [k for k in same if found.get(k) != wanted[k]] + [
            f"{k}[{sc}]" for k in ("cases", "inits") for sc in wanted[k]
            if sc in found.get(k, {}) and found[k][sc] != wanted[k][sc]
        ]
        if clash:
            raise ExperimentError(f"{folder} holds another experiment ({', '.join(clash)} differ: {found}); "
                                  f"use another --out to run {wanted}")
        wanted = {
            **wanted,
            "scenarios": sorted({*found["scenarios"], *wanted["scenarios"]},
                                key=lambda sc: (list(PAPER).index(sc) if sc in PAPER else len(PAPER), sc)),
            "arms": [a for a in ARMS if a in found["arms"] or a in wanted["arms"]],
            "cases": {**found["cases"], **wanted["cases"]},
            "inits": {**found["inits"], **wanted["inits"]},
        }
    path.write_text(json.dumps(wanted, indent=2) + "\n")
    return load_records(folder)


async def save_knowledge(config: BusConfig, folder: Path) -> Path | None:
    """Keep the DRL knowledge the running stack publishes as the folder's ``knowledge.json`` (the report's reference
    for the guided arm). A folder that already holds other knowledge is refused: its sessions ran with that one.
    None when the stack publishes none (no DRL advisor)."""
    async with BusClient("experiment-knowledge", config) as bus:
        published = [m for m in (await bus.retained("knowledge.tpp.")).values() if isinstance(m, KnowledgeMessage)]
    if not published:
        log.warning("no_knowledge_published", folder=str(folder))
        return None
    text = sorted(published, key=lambda m: m.site)[0].knowledge_json
    path = folder / KNOWLEDGE_FILE
    if path.is_file() and path.read_text() != text:
        raise ExperimentError(f"{path}: this experiment ran with other DRL knowledge than the stack publishes now; "
                              "continue it with the same checkpoint and knowledge, or use another --out")
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ running
@dataclass
class Progress:
    """Callbacks the command line uses to show progress (all optional)."""

    on_step: Callable[[Run, Step], None] = lambda run, step: None
    on_phase: Callable[[Run, StepPhase], None] = lambda run, phase: None
    on_session_done: Callable[[Run, SessionRecord], None] = lambda run, record: None
    on_swap: Callable[[str], None] = lambda impl: None


@dataclass
class RunSummary:
    """What one run did: sessions planned, sessions skipped as already finished, its wall time (s)."""

    planned: int
    skipped: int
    wall_s: float = 0.0


async def run_experiment(
    config: BusConfig,
    design: Design,
    folder: Path,
    *,
    transcript: Path | None,
    progress: Progress | None = None,
    max_sessions: int | None = None,
) -> RunSummary:
    """Plan every unfinished session of ``design`` on the running stack at ``config``; records go to ``folder``.

    The planner is swapped to each arm's implementation before that arm's first session (the LLM arms with
    ``design.llm``). ``transcript`` is the stack's bus transcript (each session's records are copied out of it).
    ``max_sessions`` stops after that many sessions (tests of resumption)."""
    progress = progress or Progress()
    done = prepare_folder(folder, design)
    await save_knowledge(config, folder)
    runs = runs_of(design)
    todo = [r for r in runs if r.key not in done]
    summary = RunSummary(planned=0, skipped=len(runs) - len(todo))
    started = time.perf_counter()
    current_impl: str | None = None
    sc_caps = {s: load_scenario(s).step_cap for s in design.scenarios}
    for run in todo:
        if max_sessions is not None and summary.planned >= max_sessions:
            break
        arm = ARMS[run.arm]
        if arm.impl != current_impl:
            progress.on_swap(arm.impl)
            await swap(config, "planner", arm.impl, dict(design.llm) if arm.impl == "llm" else {})
            current_impl = arm.impl
        req = SessionRequest(
            session_id=new_session_id(), scenario=run.scenario, case_seed=run.case_seed, mode=arm.mode,
            step_cap=sc_caps[run.scenario] if design.step_cap is None else design.step_cap,
            initial_tpps=dict(run.initial_tpps),
        )
        t0 = time.perf_counter()
        result = await run_session_request(config, req, lambda s, _outcome, run=run: progress.on_step(run, s),
                                           lambda p, run=run: progress.on_phase(run, p))
        record = record_of(run, result, time.perf_counter() - t0)
        if transcript is not None and transcript.is_file():
            (folder / TRANSCRIPTS_DIR).mkdir(exist_ok=True)
            await asyncio.to_thread(copy_session_transcript, transcript, result.header.session_id,
                                    folder / TRANSCRIPTS_DIR / f"{run.file_stem}.m2mt")
        append_record(folder, record)
        summary.planned += 1
        progress.on_session_done(run, record)
        log.info("experiment_session", key=run.key, score=record.final_score, steps=record.steps,
                 wall_s=round(record.wall_s, 1))
    summary.wall_s = time.perf_counter() - started
    return summary


