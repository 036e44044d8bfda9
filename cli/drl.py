"""``m2m drl …``: train the DQN advisor, evaluate it, extract its TPP knowledge, ask it for advice.

Heavy imports (torch, the physics) happen inside the handlers so ``m2m --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from m2m.agents.drl import ASSETS, DEFAULT_CHECKPOINT, DEFAULT_KNOWLEDGE

if TYPE_CHECKING:
    from m2m.agents.drl.evaluate import EpisodeRecord

SITE_SCENARIO = {"prostate": "prostate-basic", "liver": "liver"}


def add_commands(sub: argparse._SubParsersAction, bench_sub: argparse._SubParsersAction) -> None:
    """Add the ``drl`` group (train, evaluate, knowledge, advise)."""
    drl = sub.add_parser("drl", help="DRL advisor: train, evaluate, knowledge, advise")
    drl_sub = drl.add_subparsers(dest="drl_command", required=True, metavar="ACTION")
    ckpt = DEFAULT_CHECKPOINT

    p = drl_sub.add_parser("train", help="train the DQN on a site's training cohort; writes checkpoint, summary, PNG")
    p.add_argument("--site", choices=sorted(SITE_SCENARIO), default="prostate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=45.0, help="wall-time budget (default 45)")
    p.add_argument("--workers", type=int, default=2, help="actor processes planning episodes (default 2; 0: none)")
    p.add_argument("--rollout-steps", type=int, default=None, help="policy steps per labelled rollout (default 12)")
    p.add_argument("--train-cases", type=int, default=None, help="training-cohort seeds used (default: config)")
    p.add_argument("--out", type=Path, default=ASSETS, help="output folder (default: the package assets)")
    p.set_defaults(func=_train)

    p = drl_sub.add_parser("evaluate", help="run the policy on a cohort from random initial TPPs; print the table")
    p.add_argument("--checkpoint", type=Path, default=ckpt)
    p.add_argument("--scenario", default="prostate-basic")
    p.add_argument("--cohort", default="test")
    p.add_argument("--cases", type=int, default=50)
    p.add_argument("--json", type=Path, default=None, help="also write the summary and episodes as JSON here")
    p.add_argument("--lookahead", type=int, default=1, help="preview the policy's k best actions per step (1: greedy)")
    p.set_defaults(func=_evaluate)

    p = drl_sub.add_parser("knowledge", help="distil the policy's final TPPs and priorities into a knowledge JSON")
    p.add_argument("--checkpoint", type=Path, default=ckpt)
    p.add_argument("--scenario", default="prostate-basic")
    p.add_argument("--cases", type=int, default=40)
    p.add_argument("--out", type=Path, default=DEFAULT_KNOWLEDGE)
    p.add_argument("--lookahead", type=int, default=1, help="preview the policy's k best actions per step (1: greedy)")
    p.set_defaults(func=_knowledge)

    p = drl_sub.add_parser("advise", help="top-k actions the policy would take at a case's initial plan")
    p.add_argument("--checkpoint", type=Path, default=ckpt)
    p.add_argument("--scenario", default="prostate-basic")
    p.add_argument("--case-seed", type=int, required=True)
    p.add_argument("-k", type=int, default=3)
    p.set_defaults(func=_advise)


def _log_episode(record: EpisodeRecord) -> None:
    """Per-case progress of a cohort rollout (structlog, info level)."""
    import structlog

    structlog.get_logger().info("drl_case_planned", case=record.case_id, initial=round(record.initial_score, 3),
                                final=round(record.final_score, 3), steps=record.steps)


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from m2m.agents.drl.dqn import DqnConfig
    from m2m.agents.drl.training import run_training

    cfg = DqnConfig(seed=args.seed, scenario=SITE_SCENARIO[args.site], wall_minutes=args.minutes,
                    workers=args.workers)
    if args.train_cases is not None:
        cfg = dataclasses.replace(cfg, train_cases=args.train_cases)
    if args.rollout_steps is not None:
        cfg = dataclasses.replace(cfg, rollout_max_steps=args.rollout_steps)
    summary = run_training(cfg, args.out)
    best = summary["best_validation"]
    print(f"checkpoint {args.out / summary['checkpoint']['file']} ({summary['checkpoint']['bytes']} bytes, "
          f"sha256 {summary['checkpoint']['sha256'][:12]}); {summary['wall_seconds']:.0f} s, "
          f"{summary['env_steps']} env steps at {summary['env_steps_per_wall_second']:.1f}/s; best validation "
          f"{best['final_mean']:.2f}/{best['max_score']:g}, {best['pct_at_max']:.0f} % at max")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from m2m.agents.drl.advisor import Advisor
    from m2m.agents.drl.dqn import episode_to_dict
    from m2m.agents.drl.evaluate import run_cohort, summarise, table
    from m2m.scenarios.cases import file_sha256

    advisor = Advisor.from_checkpoint(args.checkpoint)
    env, seeds = advisor.cohort_env(args.scenario, args.cohort, args.cases)
    records = run_cohort(env, advisor.lookahead_policy(env, args.lookahead), seeds, _log_episode)
    summary = summarise(records)
    rule = "greedy" if args.lookahead == 1 else f"top-{args.lookahead} lookahead"
    print(table({f"{args.scenario} {args.cohort}, {rule}": summary}))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"scenario": args.scenario, "cohort": args.cohort, "seeds": seeds,
                                         "decision_rule": rule,
                                         # identified as the training summary and the knowledge identify it, not by
                                         # a path that is only true on the machine that ran this
                                         "checkpoint": {"file": args.checkpoint.name,
                                                        "sha256": file_sha256(args.checkpoint)},
                                         "summary": summary.as_dict(),
                                         "episodes": [episode_to_dict(r) for r in records]}, indent=2) + "\n")
    return 0


def _knowledge(args: argparse.Namespace) -> int:
    from m2m.agents.drl.advisor import Advisor
    from m2m.agents.drl.evaluate import run_cohort
    from m2m.agents.drl.knowledge import extract_knowledge, save_knowledge
    from m2m.scenarios.cases import file_sha256

    advisor = Advisor.from_checkpoint(args.checkpoint)
    env, seeds = advisor.cohort_env(args.scenario, "knowledge", args.cases)
    records = run_cohort(env, advisor.lookahead_policy(env, args.lookahead), seeds, _log_episode)
    knowledge = extract_knowledge(
        records, advisor.roles_for(args.scenario), scenario=args.scenario, cohort="knowledge", seeds=seeds,
        checkpoint_sha256=file_sha256(args.checkpoint),
        decision_rule="greedy" if args.lookahead == 1 else f"top-{args.lookahead} lookahead",
    )
    save_knowledge(knowledge, args.out)
    print(f"{args.out}: {knowledge.provenance.n_at_max}/{knowledge.provenance.n_cases} plans at the maximum score")
    print("priority (earliest first):", ", ".join(knowledge.priority))
    return 0


def _advise(args: argparse.Namespace) -> int:
    from m2m.agents.drl.advisor import Advisor
    from m2m.physics.tpp import Direction

    advisor = Advisor.from_checkpoint(args.checkpoint)
    env, _ = advisor.cohort_env(args.scenario, "test", 1)
    obs, info = env.reset(options={"case_seed": args.case_seed})
    print(f"{info['case_id']}: score {info['score']:.2f}/{info['max_score']:g}, failing {list(info['failing'])}")
    for a in advisor.advise(obs, args.k, labels=advisor.roles_for(args.scenario), mask=env.action_masks()):
        print(f"  {a.label:<16} {Direction(a.direction).word}  p={a.probability:.2f}  Q={a.q_value:+.3f}")
    return 0
