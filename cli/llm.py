"""``m2m bench llm``: the LLM planner's candidate models on the fixed benchmark situations (:mod:`.bench`).

Heavy imports (llama.cpp, autogen) happen inside the handler so ``m2m --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from m2m.agents.drl import DEFAULT_KNOWLEDGE


def add_commands(sub: argparse._SubParsersAction, bench_sub: argparse._SubParsersAction) -> None:
    """Add ``bench llm``."""
    p = bench_sub.add_parser("llm", help="LLM planner: candidate models on fixed situations, both modes, baselines")
    p.add_argument("--models", default=None,
                   help="comma-separated registry names (default: every installed candidate)")
    p.add_argument("--knowledge", type=Path, default=DEFAULT_KNOWLEDGE,
                   help="DRL knowledge JSON for the guided mode (default: the packaged prostate knowledge)")
    p.add_argument("--no-advice", action="store_true", help="guided mode without the DRL advice")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="clear the llama.cpp context before every request (to measure prefix KV reuse)")
    p.add_argument("--limit", type=int, default=None, help="only the first N situations")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp CPU threads (default 2)")
    p.add_argument("--json", type=Path, default=None, help="also write the table and every decision as JSON here")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses
    import json
    import sys
    import time

    from rich.console import Console

    from m2m.agents.drl.knowledge import load_knowledge
    from m2m.agents.llm.bench import baseline_records, bench_cases, run_model, summarise, table, with_knowledge
    from m2m.agents.llm.clients import ModelClientSpec, make_client
    from m2m.agents.llm.models import REGISTRY, installed_models

    if not args.knowledge.is_file():
        print(f"no DRL knowledge at {args.knowledge}: pass --knowledge PATH (write one with `m2m drl knowledge`)",
              file=sys.stderr)
        return 2
    models = args.models.split(",") if args.models else list(installed_models())
    unknown = [m for m in models if m not in REGISTRY]
    if unknown or not models:
        print(f"unknown or no models {unknown}; candidates: {', '.join(REGISTRY)}", file=sys.stderr)
        return 2
    cases = with_knowledge(bench_cases()[: args.limit], load_knowledge(args.knowledge))
    records = baseline_records(cases)
    load_seconds: dict[str, float] = {}

    async def run_all() -> None:
        for name in models:
            start = time.perf_counter()
            client = make_client(ModelClientSpec("embedded", model=name, threads=args.threads,
                                                 reuse_prefix=not args.no_prefix_reuse))
            load_seconds[name] = time.perf_counter() - start
            try:
                records.extend(await run_model(name, client, cases, with_advice=not args.no_advice))
            finally:
                await client.close()

    asyncio.run(run_all())
    rows = summarise(records)
    title = (f"m2m bench llm: {len(cases)} situations, {args.threads} threads, prefix reuse "
             f"{'off' if args.no_prefix_reuse else 'on'}, guided {'without' if args.no_advice else 'with'} advice")
    # Piped output gets rich's 80 columns, which truncates the model names: give it room.
    Console(width=None if sys.stdout.isatty() else 150).print(table(rows, title))
    print("model load + verification (s): " + ", ".join(f"{m} {s:.1f}" for m, s in load_seconds.items()))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "title": title, "knowledge": str(args.knowledge), "load_seconds": load_seconds,
            "summary": [dataclasses.asdict(r) for r in rows],
            "decisions": [dataclasses.asdict(r) for r in records],
        }, indent=2) + "\n")
    return 0
