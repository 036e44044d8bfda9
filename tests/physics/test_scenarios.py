from __future__ import annotations

import copy
from typing import Any

import pytest

from m2m.physics.beams import DEFAULT_GANTRY_DEG
from m2m.scenarios import (
    COHORTS,
    ScenarioError,
    list_scenarios,
    load_scenario,
    parse_scenario,
    read_scenario_data,
)


def test_the_three_scenarios_load_with_their_shapes() -> None:
    assert list_scenarios() == ("liver", "prostate-basic", "prostate-complex")
    basic, complex_, liver = (load_scenario(n) for n in ("prostate-basic", "prostate-complex", "liver"))
    assert (basic.n_tpps, complex_.n_tpps, liver.n_tpps) == (9, 15, 9)
    assert (basic.protocol.max_score, complex_.protocol.max_score, liver.protocol.max_score) == (9, 15, 4)
    assert basic.oar_names == ("bladder", "rectum")
    assert complex_.oar_names == ("bladder", "rectum", "femoral_head_l", "femoral_head_r")
    assert liver.oar_names == ("liver_normal", "stomach")
    assert basic.beams.angles() == tuple(float(a) for a in DEFAULT_GANTRY_DEG)
    assert len(complex_.beams.angles()) == 180 and complex_.beams.angles()[1] == 2.0
    assert (basic.rx_gy, liver.rx_gy) == (79.2, 50.0)
    for s in (basic, complex_, liver):
        assert s.step_cap == 20
        ranges = [s.cohorts.get(c) for c in COHORTS]
        assert all(len(r) > 0 for r in ranges)
        assert not any(a.overlaps(b) for i, a in enumerate(ranges) for b in ranges[i + 1 :])


def test_initial_tpps_follow_the_policy_and_are_reproducible() -> None:
    s = load_scenario("prostate-basic")
    assert s.default_tpps().get("v_ptv") == 0.1
    assert s.random_tpps(5) == s.random_tpps(5)
    assert s.random_tpps(5) != s.random_tpps(6)
    assert s.initial_tpp_set(5) == (s.random_tpps(5) if s.initial_tpps == "random" else s.default_tpps())
    assert s.random_tpps(5).names() == s.default_tpps().names()


def _data() -> dict[str, Any]:
    return copy.deepcopy(read_scenario_data("prostate-basic"))


def _set(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    *parents, leaf = path.split(".")
    table = data
    for key in parents:
        table = table[key]
    table[leaf] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("cohorts.test", [900, 1050], "overlap"),
        ("cohorts.paper", [5, 5], "empty"),
        ("site", "brain", "site"),
        ("rx_gy", -1, "rx_gy"),
        ("step_cap", 0, "step_cap"),
        ("protocol", "nope", "protocol"),
        ("tpp.structures", ["bladder", "ptv"], "ptv"),
        ("tpp.structures", ["ptv", "kidney_l"], "prostate phantoms have no"),
        ("tpp.initial", "best", "initial"),
        ("beams.every_deg", 2, "not both"),
        ("beams.bixel_mm", 0, "bixel_mm"),
        ("colour", "red", "unknown keys"),
    ],
)
def test_invalid_scenarios_are_rejected_with_a_clear_message(path: str, value: Any, message: str) -> None:
    data = _data()
    if path == "beams.every_deg":
        data["beams"]["gantry_deg"] = [0, 90]
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(_set(data, path, value), "test.toml")


def test_a_valid_table_parses_and_an_unknown_name_fails() -> None:
    assert parse_scenario(_data()).name == "prostate-basic"
    with pytest.raises(ScenarioError, match="unknown scenario"):
        load_scenario("prostate-advanced")
