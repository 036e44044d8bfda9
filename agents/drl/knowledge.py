"""The DRL advisor's knowledge (its M2M payload): where its successful plans ended and how it got there.

From episodes of the trained policy on a knowledge cohort, :func:`extract_knowledge` keeps the final TPPs of the
plans that reached the maximum score and summarises, in site-agnostic role names (``t_ptv``, ``lambda_oar1``, …,
see :mod:`m2m.scenarios.roles`; the scenario's structure names are kept as labels):

* per TPP: the 5/25/50/75/95 % quantiles, mean and standard deviation of the final values — on ``log10`` for the
  log-scale parameters (:attr:`m2m.physics.tpp.ParameterSpec.log_scale`: the ``lambda`` weights, whose natural scale
  is multiplicative) — and the count of cases;
* per OAR role: the same statistics of ``log10(lambda_oar / lambda_ptv)``, the quantity the optimizer actually uses;
* the policy's priorities over all episodes: how often each TPP was moved in each direction, when in an episode
  (``mean_stage``: 0 = first step, 1 = last step), and how often it was the first move; ``priority`` orders the TPPs
  by the stage of their first move in each episode (earliest first) — the "hierarchy" of the virtual planners.

The record is a versioned, frozen msgspec struct (no bus imports); :func:`save_knowledge` / :func:`load_knowledge`
round-trip it through JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import numpy as np

from m2m.agents.drl.evaluate import EpisodeRecord
from m2m.physics.tpp import PARAMETERS, split_name
from m2m.scenarios.roles import PROXIMITY_MM, to_role_name, to_structure_name

SCHEMA = "m2m.drl.tpp-knowledge"
VERSION = 1
QUANTILES = (5, 25, 50, 75, 95)
ROLE_RULE = (
    f"ptv = the target; oarN = the N-th OAR ranked by mean volume within {PROXIMITY_MM:g} mm of the PTV over the "
    "scenario's first training phantoms (ties: more protocol criteria first)"
)


class TppStats(msgspec.Struct, frozen=True, kw_only=True):
    """Distribution of one TPP (or lambda ratio) over the plans that reached the maximum score.

    ``scale`` is ``"linear"`` (values as they are: t as a fraction of Rx, v as a volume fraction) or ``"log10"``
    (statistics of log10 of the value); ``quantiles`` maps percent → value on that scale. With no successful plan
    ``count`` is 0, ``mean`` and ``sd`` are None and ``quantiles`` is empty.
    """

    name: str
    label: str
    scale: str
    count: int
    mean: float | None
    sd: float | None
    quantiles: dict[str, float]


class MoveStats(msgspec.Struct, frozen=True, kw_only=True):
    """How the policy moved one TPP in one direction (+1 raise, −1 lower) over all episodes."""

    tpp: str
    label: str
    direction: int
    count: int
    share: float
    mean_stage: float
    first_move_count: int


class Provenance(msgspec.Struct, frozen=True, kw_only=True):
    """Where the knowledge comes from: the policy (checkpoint sha256, and how its actions were chosen: ``"greedy"``
    or ``"top-k lookahead"``), the cohort and how well the policy did."""

    checkpoint_sha256: str
    decision_rule: str
    scenario: str
    cohort: str
    seeds: list[int]
    n_cases: int
    n_at_max: int
    success_rate: float
    mean_final_score: float
    max_score: float
    created_utc: str


class TppKnowledge(msgspec.Struct, frozen=True, kw_only=True):
    """The advisor's knowledge record; ``schema`` and ``version`` identify the layout."""

    schema: str = SCHEMA
    version: int = VERSION
    roles: dict[str, str]
    role_rule: str = ROLE_RULE
    tpps: list[TppStats]
    lambda_ratios: list[TppStats]
    moves: list[MoveStats]
    priority: list[str]
    provenance: Provenance


def _stats(name: str, label: str, values: Sequence[float], log: bool) -> TppStats:
    x = np.log10(np.asarray(values, dtype=np.float64)) if log else np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return TppStats(name=name, label=label, scale="log10" if log else "linear", count=0, mean=None,
                        sd=None, quantiles={})
    q = np.percentile(x, QUANTILES)
    return TppStats(
        name=name,
        label=label,
        scale="log10" if log else "linear",
        count=int(x.size),
        mean=float(x.mean()),
        sd=float(x.std()),
        quantiles={str(p): float(v) for p, v in zip(QUANTILES, q, strict=True)},
    )


def extract_knowledge(
    records: Iterable[EpisodeRecord],
    roles: Mapping[str, str],
    *,
    scenario: str,
    cohort: str,
    seeds: Sequence[int],
    checkpoint_sha256: str,
    decision_rule: str = "greedy",
    created_utc: str | None = None,
) -> TppKnowledge:
    """Summarise ``records`` (structure-named TPPs) in role terms under ``roles`` (``{role: structure}``).

    Only roles whose structures appear in the records' final TPPs are summarised; moves count every episode.
    """
    recs = list(records)
    if not recs:
        raise ValueError("no episodes to extract knowledge from")
    successes = [r for r in recs if r.reached_max]
    names = [n for n in recs[0].final_tpps if to_role_name(n, roles).partition("_")[2] in roles]
    role_of = {n: to_role_name(n, roles) for n in names}
    tpps = [_stats(role_of[n], n, [r.final_tpps[n] for r in successes], PARAMETERS[split_name(n)[0]].log_scale)
            for n in names]
    ratios = [
        _stats(
            f"lambda_{role_of[n].partition('_')[2]}/lambda_ptv",
            f"{n}/lambda_ptv",
            [r.final_tpps[n] / r.final_tpps["lambda_ptv"] for r in successes],
            log=True,
        )
        for n in names
        if n.startswith("lambda_") and n != "lambda_ptv"
    ]
    counts: dict[tuple[str, int], list[float]] = {}
    first: dict[tuple[str, int], int] = {}
    first_stage: dict[str, list[float]] = {}
    total_moves = sum(r.steps for r in recs)
    for r in recs:
        seen: set[str] = set()
        for i, (name, direction) in enumerate(r.actions):
            stage = i / (r.steps - 1) if r.steps > 1 else 0.0
            counts.setdefault((name, direction), []).append(stage)
            if i == 0:
                first[(name, direction)] = first.get((name, direction), 0) + 1
            if name not in seen:
                seen.add(name)
                first_stage.setdefault(name, []).append(stage)
    moves = sorted(
        (
            MoveStats(
                tpp=to_role_name(name, roles),
                label=name,
                direction=direction,
                count=len(stages),
                share=len(stages) / total_moves,
                mean_stage=float(np.mean(stages)),
                first_move_count=first.get((name, direction), 0),
            )
            for (name, direction), stages in counts.items()
        ),
        key=lambda m: (-m.count, m.tpp, -m.direction),
    )
    priority = [to_role_name(n, roles) for n in sorted(first_stage, key=lambda n: (np.mean(first_stage[n]), n))]
    max_score = recs[0].max_score
    provenance = Provenance(
        checkpoint_sha256=checkpoint_sha256,
        decision_rule=decision_rule,
        scenario=scenario,
        cohort=cohort,
        seeds=[int(s) for s in seeds],
        n_cases=len(recs),
        n_at_max=len(successes),
        success_rate=len(successes) / len(recs),
        mean_final_score=float(np.mean([r.final_score for r in recs])),
        max_score=max_score,
        created_utc=created_utc or datetime.now(UTC).isoformat(timespec="seconds"),
    )
    used_roles = {role_of[n].partition("_")[2] for n in names}
    return TppKnowledge(
        roles={r: s for r, s in roles.items() if r in used_roles},
        tpps=tpps,
        lambda_ratios=ratios,
        moves=moves,
        priority=priority,
        provenance=provenance,
    )


def relabel_knowledge(knowledge: TppKnowledge, roles: Mapping[str, str]) -> TppKnowledge:
    """The same knowledge labelled in another scenario's structure names (``roles``: role → structure, the
    scenario's :attr:`~m2m.scenarios.Scenario.roles`), so knowledge learned on prostate can guide liver. Roles the
    scenario lacks are dropped."""

    def keep(name: str) -> bool:
        return name.partition("_")[2] in roles

    return msgspec.structs.replace(
        knowledge,
        roles=dict(roles),
        tpps=[msgspec.structs.replace(t, label=to_structure_name(t.name, roles)) for t in knowledge.tpps
              if keep(t.name)],
        lambda_ratios=[msgspec.structs.replace(t, label=to_structure_name(t.name, roles))
                       for t in knowledge.lambda_ratios if keep(t.name)],
        moves=[msgspec.structs.replace(m, label=to_structure_name(m.tpp, roles)) for m in knowledge.moves
               if keep(m.tpp)],
        priority=[p for p in knowledge.priority if keep(p)],
    )


def save_knowledge(knowledge: TppKnowledge, path: Path) -> None:
    """Write ``knowledge`` as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(knowledge), indent=2) + b"\n")


def decode_knowledge(data: bytes | str, source: str = "<knowledge>") -> TppKnowledge:
    """Decode and validate a knowledge JSON document; raises ValueError on another schema or version (and
    ``msgspec.DecodeError``/``ValidationError`` on a malformed one)."""
    knowledge = msgspec.json.decode(data, type=TppKnowledge)
    if knowledge.schema != SCHEMA or knowledge.version != VERSION:
        raise ValueError(f"{source}: schema {knowledge.schema} v{knowledge.version}, expected {SCHEMA} v{VERSION}")
    return knowledge


def load_knowledge(path: Path) -> TppKnowledge:
    """Read and validate a knowledge JSON file (see :func:`decode_knowledge`)."""
    return decode_knowledge(path.read_bytes(), str(path))
