"""Role mapping: OARs ranked by PTV-proximal volume, ties by criteria count, then scenario order."""

from __future__ import annotations

import numpy as np
import pytest

from m2m.physics.case import Case, Grid, Structure
from m2m.physics.protocol import Criterion, Protocol
from m2m.scenarios import ScenarioError, list_scenarios, load_scenario, parse_scenario, read_scenario_data
from m2m.scenarios.roles import (
    proximal_volume_cc,
    rank_oars,
    role_map,
    scenario_roles,
    to_role_name,
    to_structure_name,
)


def box(shape: tuple[int, int, int], x: slice) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[:, 3:7, x] = True
    return m


def toy_case() -> Case:
    shape = (4, 10, 30)
    structures = (
        Structure("ptv", "target", box(shape, slice(10, 15))),
        Structure("far_a", "oar", box(shape, slice(26, 30))),
        Structure("near", "oar", box(shape, slice(15, 18))),  # touches the PTV: 1 voxel (3 mm) away
        Structure("far_b", "oar", box(shape, slice(0, 3))),
    )
    return Case("toy", "prostate", Grid(shape, (3.0, 3.0, 3.0)), np.ones(shape, np.float32), structures, 60.0)


PROTOCOL = Protocol(
    "toy",
    (
        Criterion("far_b", "Dmean", "Gy", 10, 20),
        Criterion("far_b", "Dmax", "Gy", 10, 20),
        Criterion("far_a", "Dmean", "Gy", 10, 20),
    ),
)


def test_proximal_volume_counts_voxels_within_the_margin() -> None:
    case = toy_case()
    # 4 × 4 voxels per x-column of 0.027 cc; at 5 mm only the first column (3 mm) of "near" is close.
    assert proximal_volume_cc(case, "near") == pytest.approx(16 * 0.027)
    assert proximal_volume_cc(case, "near", margin_mm=7.0) == pytest.approx(32 * 0.027)
    assert proximal_volume_cc(case, "far_a") == 0.0


def test_rank_puts_the_closest_first_then_breaks_ties_on_criteria() -> None:
    assert rank_oars(("far_a", "near", "far_b"), [toy_case()], PROTOCOL) == ("near", "far_b", "far_a")


def test_role_names_translate_both_ways() -> None:
    roles = role_map(("rectum", "bladder"))
    assert roles == {"ptv": "ptv", "oar1": "rectum", "oar2": "bladder"}
    assert to_role_name("lambda_bladder", roles) == "lambda_oar2"
    assert to_structure_name("v_oar1", roles) == "v_rectum"
    assert to_role_name("t_ptv", roles) == "t_ptv"


@pytest.mark.slow
@pytest.mark.parametrize("name", list_scenarios())
def test_each_scenario_declares_the_role_map_its_phantoms_rank(name: str) -> None:
    # The declared map ([roles] in the TOML) is what planners use; the proximity ranking is how it was chosen.
    scenario = load_scenario(name)
    assert dict(scenario.roles) == scenario_roles(scenario)


def test_a_role_map_must_give_each_tpp_oar_one_role() -> None:
    data = read_scenario_data("prostate-basic")
    assert dict(parse_scenario(data).roles) == {"ptv": "ptv", "oar1": "bladder", "oar2": "rectum"}
    for roles, match in (
        ({"oar1": "bladder"}, "roles: expected exactly the keys oar1, oar2"),
        ({"oar1": "bladder", "oar2": "bladder"}, "roles: expected one role for each TPP OAR"),
        ({"oar1": "bladder", "oar2": "rectum", "oar3": "rectum"}, "roles: expected exactly the keys oar1, oar2"),
        (None, "roles: missing; expected a table of strings"),
    ):
        changed = {k: v for k, v in data.items() if k != "roles"}
        if roles is not None:
            changed["roles"] = roles
        with pytest.raises(ScenarioError, match=match):
            parse_scenario(changed)
