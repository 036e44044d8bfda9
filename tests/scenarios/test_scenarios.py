from __future__ import annotations

import copy
from typing import Any

import pytest

from m2m.physics.beams import DEFAULT_GANTRY_DEG
from m2m.physics.tpp import TRAINING_RANGES
from m2m.scenarios import (
    COHORTS,
    ScenarioError,
    list_scenarios,
    load_scenario,
    parse_scenario,
    read_scenario_data,
)


def test_the_phantom_scenarios_load_with_their_shapes() -> None:
    assert list_scenarios() == ("alderson", "liver", "prostate-basic", "prostate-complex", "tg119")
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


def test_initial_ranges_override_the_training_ranges_for_the_scenarios_starts() -> None:
    data = _set(_data(), "tpp.initial_ranges", {"oar": {"lambda": [50.0, 60.0]}, "ptv": {"t": [1.0, 1.0]}})
    s = parse_scenario(data, "test.toml")
    assert s.initial_ranges[("oar", "lambda")] == (50.0, 60.0, True)  # lambda is log-scale: log-uniform
    assert s.initial_ranges[("ptv", "t")] == (1.0, 1.0, False)
    assert s.initial_ranges[("oar", "t")] == TRAINING_RANGES[("oar", "t")]
    for seed in range(20):
        tpps = s.random_tpps(seed)
        assert tpps.ptv.t == 1.0
        assert all(50.0 <= o.lam <= 60.0 for o in tpps.oars.values())
    plain = parse_scenario(_set(_data(), "tpp.initial_ranges", {}), "test.toml")
    assert dict(plain.initial_ranges) == dict(TRAINING_RANGES)
    assert plain.random_tpps(3) != s.random_tpps(3)


def _data() -> dict[str, Any]:
    return copy.deepcopy(read_scenario_data("prostate-basic"))


_DELETE = object()


def _set(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``data`` with the value at dotted ``path`` replaced (removed for :data:`_DELETE`)."""
    *parents, leaf = path.split(".")
    table = data
    for key in parents:
        table = table[key]
    if value is _DELETE:
        del table[leaf]
    else:
        table[leaf] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        # a wrong type, a missing key, an unknown key: the file, the key and what was expected
        ("cohorts.train", "abc", 'cohorts.train: expected an array of 2 integers [start, stop), got "abc"'),
        ("cohorts.train", [0, "b"], 'cohorts.train[1]: expected an integer, got "b"'),
        ("rx_gy", "high", 'rx_gy: expected a number > 0, got "high"'),
        ("rx_gy", _DELETE, "rx_gy: missing; expected a number > 0"),
        ("tpp", _DELETE, "tpp: missing; expected a table"),
        ("colour", "red", "colour: unknown key; expected one of name, description, site, rx_gy, protocol, step_cap, "
                          "beams, tpp, roles, cohorts, case"),
        ("tpp.colour", "red", "tpp.colour: unknown key; expected one of structures, initial, initial_seed, "
                               "initial_ranges"),
        ("tpp.initial_ranges", {"ptv": {"lambda": [5.0, 1.0]}},
         "tpp.initial_ranges.ptv.lambda: expected low <= high, both in (0, 100000], got [5.0, 1.0]"),
        ("tpp.initial_ranges", {"oar": {"t": [0.5, 1.5]}},
         "tpp.initial_ranges.oar.t: expected low <= high, both in (0, 1], got [0.5, 1.5]"),
        ("tpp.initial_ranges", {"oar": {"w": [0.5, 1.0]}},
         'tpp.initial_ranges.oar: expected one of ["t", "lambda", "v"], got "w"'),
        ("tpp.initial_ranges", {"organ": {"t": [0.5, 1.0]}},
         'tpp.initial_ranges: expected one of ["ptv", "oar"], got "organ"'),
        # bounds and choices
        ("cohorts.paper", [5, 5], "cohorts.paper: [5, 5) holds no seeds; expected [start, stop) with 0 ≤ start < stop"),
        ("site", "brain", 'site: expected one of ["prostate", "liver", "other"], got "brain"'),
        ("site", "other", "site: site 'other' has no phantoms; give a [case] table with a case file"),
        ("cohorts", _DELETE, "cohorts: expected a [cohorts] table (phantom cases) or a [case] table (a case file)"),
        ("rx_gy", -1, "rx_gy: expected a number > 0, got -1"),
        ("step_cap", 0, "step_cap: expected an integer > 0, got 0"),
        ("tpp.initial", "best", 'tpp.initial: expected one of ["default", "random"], got "best"'),
        ("beams.bixel_mm", 0, "beams.bixel_mm: expected a number > 0, got 0"),
        ("beams.every_deg", 181, "beams.every_deg: expected a number > 0 and ≤ 180, got 181"),
        # what the types cannot say
        ("cohorts.test", [900, 1050], "cohorts.test: [900, 1050) overlaps train [0, 1000); cohorts must be disjoint"),
        ("protocol", "nope", "protocol: no protocol_nope.toml in m2m.scenarios"),
        ("tpp.structures", ["bladder", "ptv"], 'tpp.structures: expected an array of structure names, "ptv" first'),
        ("tpp.structures", ["ptv", "rectum", "rectum"], "tpp.structures: duplicate TPP structures"),
        ("tpp.structures", ["ptv", "kidney_l"], 'tpp.structures: prostate phantoms have no ["kidney_l"]'),
        ("beams.gantry_deg", [0, 360], "beams.gantry_deg: duplicate gantry angles (modulo 360) in [0.0, 360.0]"),
        ("roles.oar1", "rectum", 'roles: expected one role for each TPP OAR ["bladder", "rectum"], got { oar1 = '),
        ("roles.oar3", "bladder", "roles: expected exactly the keys oar1, oar2 (one per TPP OAR), got { oar1 = "),
    ],
)
def test_invalid_scenarios_name_the_file_the_key_and_what_was_expected(path: str, value: Any, message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(_set(_data(), path, value), "test.toml")
    assert str(info.value).startswith(f"test.toml: {message}")
    assert (info.value.path, info.value.key) == ("test.toml", message.split(": ")[0])


def test_beams_take_a_gantry_list_or_a_spacing_not_both() -> None:
    data = _set(_set(_data(), "beams.gantry_deg", [0, 90]), "beams.every_deg", 2)
    with pytest.raises(ScenarioError, match=r"^test\.toml: beams: expected gantry_deg or every_deg, not both$"):
        parse_scenario(data, "test.toml")
    assert parse_scenario(_set(_data(), "beams.gantry_deg", [370, 90])).beams.angles() == (10.0, 90.0)


def _file_data() -> dict[str, Any]:
    return copy.deepcopy(read_scenario_data("tg119"))


def test_case_file_scenarios_plan_one_anatomy_from_many_starts() -> None:
    tg119, alderson = load_scenario("tg119"), load_scenario("alderson")
    assert tg119.case is not None and tg119.case.format == "matrad" and tg119.case.structures["ptv"] == "OuterTarget"
    assert alderson.case is not None and alderson.case.dose_grid_mm == (3.0, 3.0, 3.0)
    # Every cohort holds the starts 0..9 of the one anatomy; each start has its own random initial TPPs.
    assert all(tg119.cohorts.get(c).seeds == range(10) for c in COHORTS)
    assert tg119.initial_tpp_set(0) != tg119.initial_tpp_set(1)
    assert tg119.beams.angles() == tuple(40.0 * i for i in range(9))
    assert [c.id for c in tg119.protocol.criteria] == ["ptv:D95%", "ptv:D10%", "core:D10%:easy", "core:D10%:hard"]
    assert tg119.fingerprint != alderson.fingerprint and tg119.fingerprint == load_scenario("tg119").fingerprint


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("cohorts", read_scenario_data("prostate-basic")["cohorts"],
         "cohorts: a scenario with a [case] file plans that one anatomy"),
        ("case.structures", {"core": "Core", "x": "OuterTarget"}, 'case.structures: no "ptv" entry'),
        ("case.structures.Core2", "Core", 'case.structures: expected a lower-case identifier'),
        ("case.format", "nifti", 'case.format: expected one of ["dicom", "matrad"], got "nifti"'),
        ("case.dose_grid_mm", [3, 3], "case.dose_grid_mm: expected an array of 3 spacings (z, y, x) in mm"),
        ("case.starts", 0, "case.starts: expected an integer ≥ 1"),
        ("tpp.structures", ["ptv", "rectum"], "tpp.structures: the [case.structures] map has no [\"rectum\"]"),
    ],
)
def test_invalid_case_file_scenarios_name_the_key(path: str, value: Any, message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(_set(_file_data(), path, value), "mine.toml")
    assert str(info.value).startswith(f"mine.toml: {message}"), str(info.value)


def test_a_valid_table_parses_and_an_unknown_name_fails() -> None:
    assert parse_scenario(_data()).name == "prostate-basic"
    with pytest.raises(ScenarioError, match="unknown scenario"):
        load_scenario("prostate-advanced")
