"""``m2m bench llm``: the LLM planner's candidate models in every decision form on the fixed benchmark situations
(:mod:`m2m.agents.llm.bench`), both modes, against rule-made baselines (the rules and knowledge planners' deciders
come from :mod:`m2m.agents.planner`, above the bench's package).

Heavy imports (llama.cpp, autogen) happen inside the handler so ``m2m --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from m2m.agents.drl import DEFAULT_KNOWLEDGE

#: The smaller model benchmarked beside the default one when no ``--models`` are given (if installed).
SMALL_MODEL = "qwen-0.5b"


def add_commands(sub: argparse._SubParsersAction, bench_sub: argparse._SubParsersAction) -> None:
    """Add ``bench llm``."""
    p = bench_sub.add_parser("llm", help="LLM planner: candidate models × decision forms on fixed situations, both "
                                         "modes, baselines")
    p.add_argument("--models", default=None,
                   help=f"comma-separated registry names (default: the default model, and {SMALL_MODEL} if "
                        "installed)")
    p.add_argument("--forms", default="step,values,quantile",
                   help="comma-separated decision forms (default step,values,quantile; quantile is guided only: "
                        "unguided asks it as values)")
    p.add_argument("--modes", default="guided,unguided", help="comma-separated modes (default guided,unguided)")
    p.add_argument("--knowledge", type=Path, default=DEFAULT_KNOWLEDGE,
                   help="DRL knowledge JSON for the guided mode (default: the packaged prostate knowledge)")
    p.add_argument("--no-advice", action="store_true", help="guided mode without the DRL advice")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="clear the llama.cpp context before every request (to measure prefix KV reuse)")
    p.add_argument("--situations", default="",
                   help="comma-separated name patterns of the situations to run (fnmatch; a plain word matches as "
                        "a substring: e.g. held-out, liver/, prostate/rectum-*)")
    p.add_argument("--no-held-out", action="store_true", help="only the 24 base situations")
    p.add_argument("--cases", "--limit", dest="limit", type=int, default=None, metavar="N",
                   help="only the first N situations (after --situations)")
    p.add_argument("--no-baselines", action="store_true", help="skip the rule-made baselines")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp CPU threads (default 2)")
    p.add_argument("--json", type=Path, default=None,
                   help="also write the summary, the situations and every decision as JSON here")
    p.set_defaults(func=_bench)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _bench(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import sys
    import time
    from typing import Any, cast

    from rich.console import Console

    from m2m.agents.drl.knowledge import load_knowledge
    from m2m.agents.llm.answer import FORMS, DecisionForm
    from m2m.agents.llm.bench import (
        BASELINE_KNOWLEDGE,
        BASELINE_RULES,
        bench_cases,
        mode_forms,
        report,
        run_baselines,
        run_model,
        select_cases,
        summarise,
        table,
        with_knowledge,
    )
    from m2m.agents.llm.clients import ModelClientSpec, make_client
    from m2m.agents.llm.models import DEFAULT_MODEL, REGISTRY, is_installed
    from m2m.agents.llm.situation import MODES, Mode
    from m2m.agents.planner import KnowledgeDecider, RulesDecider

    if not args.knowledge.is_file():
        print(f"no DRL knowledge at {args.knowledge}: pass --knowledge PATH (write one with `m2m drl knowledge`)",
              file=sys.stderr)
        return 2
    if args.models:
        models = _split(args.models)
    else:
        models = [m for m in (DEFAULT_MODEL, SMALL_MODEL) if m == DEFAULT_MODEL or is_installed(m)]
    unknown = [m for m in models if m not in REGISTRY]
    if unknown or not models:
        print(f"unknown or no models {unknown}; candidates: {', '.join(REGISTRY)}", file=sys.stderr)
        return 2
    forms, modes = _split(args.forms), _split(args.modes)
    if not forms or any(f not in FORMS for f in forms) or not modes or any(m not in MODES for m in modes):
        print(f"--forms must name some of {', '.join(FORMS)} and --modes some of {', '.join(MODES)}",
              file=sys.stderr)
        return 2
    cases = select_cases(bench_cases(held_out=not args.no_held_out), _split(args.situations), args.limit)
    if not cases:
        print(f"no situation matches {args.situations!r}", file=sys.stderr)
        return 2
    cases = with_knowledge(cases, load_knowledge(args.knowledge))
    chosen_forms = cast(list[DecisionForm], forms)
    chosen_modes = cast(list[Mode], modes)
    with_advice = not args.no_advice
    records = []
    load_seconds: dict[str, float] = {}
    system_tokens: dict[str, dict[str, int]] = {}

    async def run_all() -> None:
        if not args.no_baselines:
            deciders = {BASELINE_RULES: (RulesDecider().decide, "step"),
                        BASELINE_KNOWLEDGE: (KnowledgeDecider().decide, "quantile")}
            records.extend(await run_baselines(cases, deciders, modes=chosen_modes, with_advice=with_advice))
        for name in models:
            start = time.perf_counter()
            client = make_client(ModelClientSpec("embedded", model=name, threads=args.threads,
                                                 reuse_prefix=not args.no_prefix_reuse))
            load_seconds[name] = time.perf_counter() - start
            llm: Any = getattr(client, "llm", None)

            def count(text: str, llm: Any = llm) -> int:
                return len(llm.tokenize(text.encode(), add_bos=False))

            counter = count if llm is not None else None
            if counter is not None:
                from m2m.agents.llm.situation import SYSTEM_PROMPT

                system_tokens[name] = dict.fromkeys(FORMS, counter(SYSTEM_PROMPT))  # one text for every form
            try:
                records.extend(await run_model(name, client, cases, with_advice=with_advice, modes=chosen_modes,
                                               forms=chosen_forms, count_tokens=counter))
            finally:
                await client.close()

    asyncio.run(run_all())
    rows = summarise(records)
    asked = {m: [str(f) for f in mode_forms(chosen_forms, m)] for m in chosen_modes}
    held_out = sum(c.held_out for c in cases)
    title = (f"m2m bench llm: {len(cases)} situations ({held_out} held-out), {args.threads} threads, prefix reuse "
             f"{'off' if args.no_prefix_reuse else 'on'}, guided {'without' if args.no_advice else 'with'} advice")
    notes = [
        "forms asked per mode: " + "; ".join(f"{m}: {', '.join(fs)}" for m, fs in asked.items())
        + " (the unguided mode has no knowledge: it asks quantile as values; guided quantile falls back to values "
          "where no knowledge point helps, counted in the form column)",
        "correct = admissible under the guided guard's rules and tightens what the worst helpable failing criterion "
        "needs, or stop exactly at the maximum; harmful = loosens an at-risk structure or stops early",
        "held-out raw/guarded = correct on the held-out situations; own = the guard took the planner's proposal or "
        "retry; feedback = decisions with the guard's feedback turn; re-asks = after invalid answers",
        "steps saved = published steps a correct answer's helping changes span (credited up to the knowledge's "
        "p25-p75 range) less one; jumps = helping changes of more than one step into that range",
    ]
    # Piped output gets rich's 80 columns, which truncates the model names: give it room.
    console = Console(width=None if sys.stdout.isatty() else 240)
    console.print(table(rows, title))
    for note in notes:
        console.print(f"- {note}", highlight=False)
    if load_seconds:
        print("model load + verification (s): " + ", ".join(f"{m} {s:.1f}" for m, s in load_seconds.items()))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = report(rows, records, cases, title=title, knowledge=str(args.knowledge), models=models,
                     forms=forms, modes=modes, forms_asked=asked, with_advice=with_advice,
                     load_seconds=load_seconds, system_tokens=system_tokens, notes=notes)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0
