from __future__ import annotations

import numpy as np
import pytest

from m2m.physics.protocol import Criterion, Protocol, ProtocolError, load_protocol, parse_protocol, score

RX = 79.2
VOXEL_CC = 0.027


def _dose_with_fraction_at(n: int, fraction: float, high: float, low: float = 10.0) -> np.ndarray:
    """``n`` voxels, ``fraction`` of them at ``high`` Gy and the rest at ``low`` Gy."""
    dose = np.full(n, low)
    dose[: round(fraction * n)] = high
    return dose


def test_prostate_protocols_have_the_specified_criteria() -> None:
    basic = load_protocol("prostate-basic")
    complex_ = load_protocol("prostate-complex")
    liver = load_protocol("liver")
    assert (basic.max_score, complex_.max_score, liver.max_score) == (9, 15, 4)
    assert complex_.criteria[:9] == basic.criteria
    labels = [c.label for c in basic.criteria]
    assert labels[0] == "ptv D0.03cc ≤ 107 %Rx"
    assert "bladder V80Gy ≤ 15 %" in labels and "rectum V60Gy ≤ 50 %" in labels
    assert all(c.zero == c.limit + 5 for c in basic.criteria[1:])
    assert {c.structure for c in complex_.criteria[9:]} == {"femoral_head_l", "femoral_head_r"}
    assert liver.structures == ("ptv", "liver_normal", "stomach")


@pytest.mark.parametrize(("value", "points"), [(20.0, 1.0), (25.0, 1.0), (27.5, 0.5), (30.0, 0.0), (40.0, 0.0)])
def test_points_are_linear_between_limit_and_zero(value: float, points: float) -> None:
    upper = Criterion("rectum", "V70Gy", "%", limit=25.0, zero=30.0)
    assert upper.points(value) == pytest.approx(points)
    assert upper.passed(value) == (value <= 25.0)


def test_lower_limits_score_in_the_other_direction() -> None:
    coverage = Criterion("ptv", "D95%", "%Rx", limit=100.0, zero=90.0)
    assert not coverage.upper
    assert coverage.points(100.0) == 1.0
    assert coverage.points(95.0) == pytest.approx(0.5)
    assert coverage.points(85.0) == 0.0
    assert coverage.label == "ptv D95% ≥ 100 %Rx"


def test_score_measures_each_criterion_on_known_doses() -> None:
    protocol = load_protocol("prostate-basic")
    n = 1000
    dose = {
        "ptv": np.full(2000, 1.085 * RX),  # hot spot 108.5 % Rx: half way to the zero point
        "bladder": _dose_with_fraction_at(n, 0.10, 81.0),  # V80..V65 = 10 %: all pass
        # 27 % at 72 Gy: V70 = 27 % (0.6 pt), V65 = V60 = 27 % (pass); V75 = 0 (pass).
        "rectum": _dose_with_fraction_at(n, 0.27, 72.0),
    }
    report = score(protocol, dose, VOXEL_CC, RX)
    by_label = {i.criterion.label: i for i in report.items}
    assert by_label["ptv D0.03cc ≤ 107 %Rx"].value == pytest.approx(108.5)
    assert by_label["ptv D0.03cc ≤ 107 %Rx"].points == pytest.approx(0.5)
    assert by_label["bladder V80Gy ≤ 15 %"].value == pytest.approx(10.0)
    assert by_label["rectum V70Gy ≤ 25 %"].value == pytest.approx(27.0)
    assert by_label["rectum V70Gy ≤ 25 %"].points == pytest.approx(0.6)
    assert report.total == pytest.approx(9 - 0.5 - 0.4)
    assert report.max_score == 9
    assert report.failing == ("ptv D0.03cc ≤ 107 %Rx", "rectum V70Gy ≤ 25 %")
    assert not report.all_passed


def test_score_accepts_a_plan_object_and_volume_units() -> None:
    class Plan:
        def __init__(self) -> None:
            self.dose = {"ptv": np.full(100, 50.0), "stomach": np.linspace(0, 40, 1001)}

    protocol = Protocol(
        "t",
        (
            Criterion("stomach", "D10cc", "Gy", limit=18.0, zero=23.0),
            Criterion("stomach", "V30Gy", "cc", limit=5.0, zero=10.0),
            Criterion("ptv", "Dmax", "%Rx", limit=107.0, zero=110.0),
        ),
    )
    report = score(protocol, Plan(), 0.1, 50.0)
    d10cc, v30cc, dmax = (i.value for i in report.items)
    assert d10cc == pytest.approx(40.0 - 99 * 0.04)  # the 100th-hottest of 0.1 cc voxels
    assert v30cc == pytest.approx(251 * 0.1)
    assert dmax == pytest.approx(100.0)
    assert report.total == pytest.approx(1.0)


def test_missing_structure_and_bad_criteria_raise() -> None:
    with pytest.raises(KeyError, match="rectum"):
        score(load_protocol("prostate-basic"), {"ptv": np.ones(3), "bladder": np.ones(3)}, VOXEL_CC, RX)
    with pytest.raises(ProtocolError, match="metric"):
        Criterion("ptv", "D95", "Gy", 1.0, 2.0)
    with pytest.raises(ProtocolError, match="unit"):
        Criterion("rectum", "V70Gy", "Gy", 1.0, 2.0)
    with pytest.raises(ProtocolError, match="zero"):
        Criterion("rectum", "V70Gy", "%", 1.0, 1.0)
    with pytest.raises(ProtocolError, match=r"^x\.toml: criteria\[0\]\.zero: missing; expected a number$"):
        parse_protocol({"name": "x", "criteria": [{"structure": "ptv", "metric": "Dmax", "unit": "Gy", "limit": 1.0}]},
                       "x.toml")
    with pytest.raises(FileNotFoundError):
        load_protocol("no-such-protocol")


def test_criteria_are_keyed_by_a_stable_id_not_their_label() -> None:
    import dataclasses

    basic = load_protocol("prostate-basic")
    ids = [c.id for c in basic.criteria]
    assert "rectum:V70Gy" in ids and len(set(ids)) == len(ids)
    rectum = basic.criterion("rectum:V70Gy")
    recalibrated = dataclasses.replace(rectum, limit=rectum.limit - 1.0)
    assert recalibrated.id == rectum.id and recalibrated.label != rectum.label
    with pytest.raises(ProtocolError, match="more than once"):
        Protocol("twice", (rectum, recalibrated))
    with pytest.raises(KeyError, match="no criterion 'rectum:V99Gy'"):
        basic.criterion("rectum:V99Gy")


PTV_DMAX = {"structure": "ptv", "metric": "Dmax", "unit": "Gy", "limit": 1.0, "zero": 2.0}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # a wrong type, a missing key, an unknown key: the file, the key and what was expected
        ({"name": "x", "criteria": [{**PTV_DMAX, "limit": "high"}]},
         'protocol_x.toml: criteria[0].limit: expected a number, got "high"'),
        ({"criteria": [PTV_DMAX]}, "protocol_x.toml: name: missing; expected a non-empty string"),
        ({"name": "x", "criteria": [PTV_DMAX, {**PTV_DMAX, "metric": "Dmean", "colour": "red"}]},
         "protocol_x.toml: criteria[1].colour: unknown key; expected one of structure, metric, unit, limit, zero, "
         "source"),
        ({"name": "x", "criteria": {"ptv": PTV_DMAX}},
         "protocol_x.toml: criteria: expected an array of tables, got { ptv = { structure = \"ptv\", metric"),
        # what the criterion itself checks, at the criterion's key
        ({"name": "x", "criteria": [{**PTV_DMAX, "metric": "D95"}]},
         "protocol_x.toml: criteria[0]: unknown metric 'D95'"),
        ({"name": "x", "criteria": [PTV_DMAX, PTV_DMAX]}, "protocol_x.toml: criteria: protocol x: criteria"),
        ({"name": "x"}, "protocol_x.toml: criteria: no criteria"),
        ({"name": "x", "extends": "nope", "criteria": [PTV_DMAX]},
         "protocol_x.toml: extends: no protocol_nope.toml in m2m.scenarios"),
    ],
)
def test_a_bad_protocol_file_names_the_file_the_key_and_what_was_expected(data: dict, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_protocol(data, "protocol_x.toml")
    assert str(info.value).startswith(message)
    assert info.value.path == "protocol_x.toml"


def test_a_protocol_extends_another_and_keeps_its_name() -> None:
    extended = parse_protocol({"name": "more", "extends": "liver", "criteria": [PTV_DMAX]}, "protocol_more.toml")
    assert extended.criteria == (*load_protocol("liver").criteria, Criterion(**PTV_DMAX))
