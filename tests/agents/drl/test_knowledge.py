"""Knowledge extraction on hand-made episodes, and the JSON round trip."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest

from m2m.agents.drl.evaluate import EpisodeRecord
from m2m.agents.drl.knowledge import SCHEMA, extract_knowledge, load_knowledge, relabel_knowledge, save_knowledge

ROLES = {"ptv": "ptv", "oar1": "bladder", "oar2": "rectum"}


def tpps(t_ptv: float, lam_ptv: float, lam_bladder: float) -> dict[str, float]:
    return {"t_ptv": t_ptv, "lambda_ptv": lam_ptv, "v_ptv": 0.1, "t_bladder": 0.8, "lambda_bladder": lam_bladder,
            "v_bladder": 0.5, "t_rectum": 0.7, "lambda_rectum": 1.0, "v_rectum": 0.4}


EPISODES = [
    EpisodeRecord("c0", 0, 8.0, 9.0, 9.0, (("t_ptv", -1), ("t_bladder", 1)), final_tpps=tpps(1.00, 1.0, 10.0)),
    EpisodeRecord("c1", 1, 8.0, 9.0, 9.0, (("t_ptv", -1),), final_tpps=tpps(1.02, 10.0, 10.0)),
    EpisodeRecord("c2", 2, 7.0, 9.0, 9.0, (("t_bladder", 1), ("t_ptv", -1), ("t_ptv", -1)),
                  final_tpps=tpps(1.04, 100.0, 1000.0)),
    # Did not reach the maximum: its final TPPs must not count, its moves must.
    EpisodeRecord("c3", 3, 6.0, 8.0, 9.0, (("lambda_rectum", 1), ("lambda_rectum", 1)),
                  final_tpps=tpps(1.2, 1e4, 1e-3)),
]


def extract():
    return extract_knowledge(EPISODES, ROLES, scenario="prostate-basic", cohort="knowledge", seeds=[0, 1, 2, 3],
                             checkpoint_sha256="ab" * 32, created_utc="2026-01-01T00:00:00+00:00")


def test_distributions_use_only_plans_at_the_maximum() -> None:
    k = extract()
    by_name = {s.name: s for s in k.tpps}
    assert [s.name for s in k.tpps][:4] == ["t_ptv", "lambda_ptv", "v_ptv", "t_oar1"]
    t = by_name["t_ptv"]
    assert t.count == 3 and t.scale == "linear" and t.label == "t_ptv"
    assert t.mean == pytest.approx(1.02)
    assert t.quantiles["50"] == pytest.approx(1.02)
    assert t.quantiles["5"] == pytest.approx(np.percentile([1.0, 1.02, 1.04], 5))
    lam = by_name["lambda_ptv"]
    assert lam.scale == "log10" and lam.mean == pytest.approx(1.0) and lam.sd == pytest.approx(np.std([0, 1, 2]))
    assert by_name["lambda_oar1"].label == "lambda_bladder"
    ratio = {s.name: s for s in k.lambda_ratios}["lambda_oar1/lambda_ptv"]
    assert ratio.mean == pytest.approx(np.mean([1.0, 0.0, 1.0]))


def test_moves_and_priority() -> None:
    k = extract()
    moves = {(m.tpp, m.direction): m for m in k.moves}
    assert moves[("t_ptv", -1)].count == 4 and moves[("t_ptv", -1)].first_move_count == 2
    assert moves[("t_oar1", 1)].count == 2
    assert moves[("t_oar1", 1)].mean_stage == pytest.approx(0.5)  # last of 2 steps (1.0) and first of 3 (0.0)
    assert moves[("lambda_oar2", 1)].count == 2
    assert sum(m.share for m in k.moves) == pytest.approx(1.0)
    # First-move stages: lambda_rectum 0; t_ptv (0, 0, 0.5); t_bladder (1, 0).
    assert k.priority == ["lambda_oar2", "t_ptv", "t_oar1"]


def test_provenance() -> None:
    p = extract().provenance
    assert (p.n_cases, p.n_at_max) == (4, 3)
    assert p.success_rate == pytest.approx(0.75)
    assert p.mean_final_score == pytest.approx(8.75)


def test_json_round_trip(tmp_path: Path) -> None:
    k = extract()
    path = tmp_path / "k.json"
    save_knowledge(k, path)
    assert load_knowledge(path) == k
    assert b'"schema": "m2m.drl.tpp-knowledge"' in path.read_bytes()


def test_empty_success_set_still_serialises(tmp_path: Path) -> None:
    k = extract_knowledge(EPISODES[3:], ROLES, scenario="s", cohort="knowledge", seeds=[3], checkpoint_sha256="0")
    assert all(s.count == 0 and s.mean is None for s in k.tpps)
    save_knowledge(k, tmp_path / "k.json")
    assert load_knowledge(tmp_path / "k.json") == k


def test_other_schema_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    save_knowledge(msgspec.structs.replace(extract(), schema="other"), path)
    with pytest.raises(ValueError, match=SCHEMA):
        load_knowledge(path)


def test_relabel_names_another_sites_structures_and_keeps_the_statistics() -> None:
    k = extract()
    liver = relabel_knowledge(k, {"ptv": "ptv", "oar1": "liver_normal"})  # a site with one OAR role here
    assert {t.label for t in liver.tpps} == {"t_ptv", "lambda_ptv", "v_ptv", "t_liver_normal", "lambda_liver_normal",
                                             "v_liver_normal"}
    by_name = {t.name: t for t in k.tpps}
    for t in liver.tpps:
        assert t.quantiles == by_name[t.name].quantiles  # same numbers, only the label changes
    assert all(not p.endswith("oar2") for p in liver.priority)
    assert {m.label for m in liver.moves} <= {t.label for t in liver.tpps}
    assert liver.roles == {"ptv": "ptv", "oar1": "liver_normal"}
