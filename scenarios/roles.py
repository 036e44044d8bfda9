"""Site-agnostic roles for a scenario's TPP structures, so one policy and one knowledge record serve every site.

The PTV keeps the role ``"ptv"``. The OARs that carry TPPs are ranked by how much of them sits at or near the PTV
and named ``"oar1"``, ``"oar2"``, … in that order: ``oar1`` is the OAR with the largest volume (cm³) inside the PTV
grown by :data:`PROXIMITY_MM`, i.e. the one whose sparing conflicts most with PTV coverage. Ties (e.g. two OARs
far from the PTV) break on the number of protocol criteria the OAR carries (more first), then on the scenario's
order. The ranking is a scenario-level property, taken as the mean over a few reference cases, so every case of a
scenario gets the same mapping and a trained policy always sees the same structure in the same input slot.

Each scenario declares its map (``[roles]`` in its TOML, :attr:`m2m.scenarios.Scenario.roles`, built by
:func:`m2m.scenarios.role_map`), so using it builds no phantom; :func:`scenario_roles` computes the ranking, and the
tests check that every packaged scenario declares what it computes. For the prostate phantoms this gives ``oar1 =
bladder`` (it abuts the PTV along the prostate base), ``oar2 = rectum``; for prostate-complex the femoral heads follow
as ``oar3``/``oar4``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from scipy import ndimage

from m2m.physics.case import Case
from m2m.physics.protocol import Protocol
from m2m.scenarios import Scenario, role_map
from m2m.scenarios.cases import scenario_case

PROXIMITY_MM = 5.0
#: Reference cases the ranking averages over: the first seeds of the scenario's training cohort.
REFERENCE_CASES = 5


def proximal_volume_cc(case: Case, oar: str, margin_mm: float = PROXIMITY_MM) -> float:
    """Volume (cm³) of ``oar`` within ``margin_mm`` (mm) of the case's PTV (overlap included)."""
    ptv = case.target.mask
    distance = ndimage.distance_transform_edt(~ptv, sampling=case.grid.spacing_mm)
    near = np.asarray(distance <= margin_mm)
    return float(np.count_nonzero(near & case.structure(oar).mask)) * case.grid.voxel_volume_cc


def rank_oars(
    oar_names: Iterable[str], cases: Iterable[Case], protocol: Protocol, margin_mm: float = PROXIMITY_MM
) -> tuple[str, ...]:
    """OARs ordered by mean PTV-proximal volume over ``cases`` (largest first); see the module docstring."""
    names = tuple(oar_names)
    case_list = list(cases)
    if not case_list:
        raise ValueError("ranking OARs needs at least one case")
    volume = {n: float(np.mean([proximal_volume_cc(c, n, margin_mm) for c in case_list])) for n in names}
    criteria = {n: sum(1 for c in protocol.criteria if c.structure == n) for n in names}
    return tuple(sorted(names, key=lambda n: (-round(volume[n], 3), -criteria[n], names.index(n))))


def scenario_roles(scenario: Scenario) -> dict[str, str]:
    """The role map of a scenario computed on its first :data:`REFERENCE_CASES` training phantoms (builds them), or
    on its case file's anatomy; the scenario's declared :attr:`~m2m.scenarios.Scenario.roles` must equal it."""
    # A case-file scenario's seeds share one anatomy: rank it once.
    seeds = scenario.cohorts.train.seeds[: 1 if scenario.case is not None else REFERENCE_CASES]
    cases = [scenario_case(scenario, s) for s in seeds]
    return role_map(rank_oars(scenario.oar_names, cases, scenario.protocol))


def to_role_name(tpp_name: str, roles: Mapping[str, str]) -> str:
    """``"lambda_bladder"`` → ``"lambda_oar1"`` under ``roles`` (``{role: structure}``)."""
    param, _, structure = tpp_name.partition("_")
    by_structure = {s: r for r, s in roles.items()}
    return f"{param}_{by_structure[structure]}"


def to_structure_name(role_tpp_name: str, roles: Mapping[str, str]) -> str:
    """``"lambda_oar1"`` → ``"lambda_bladder"`` under ``roles``."""
    param, _, role = role_tpp_name.partition("_")
    return f"{param}_{roles[role]}"
