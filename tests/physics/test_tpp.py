from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from m2m.physics.tpp import (
    PARAMETERS,
    PARAMS,
    ROLES,
    TRAINING_RANGES,
    StructureTpp,
    TppRangeError,
    TppSet,
    random_tpps,
    step,
    tightening_steps,
)

OARS = ("bladder", "rectum")


def test_defaults_names_and_vector_order() -> None:
    tpps = TppSet.default(OARS)
    assert tpps.names() == (
        "t_ptv", "lambda_ptv", "v_ptv", "t_bladder", "lambda_bladder", "v_bladder",
        "t_rectum", "lambda_rectum", "v_rectum",
    )
    np.testing.assert_array_equal(tpps.to_vector(), [1, 1, 0.1, 1, 1, 1, 1, 1, 1])
    assert TppSet.from_vector(tpps.to_vector(), OARS) == tpps


def test_from_vector_round_trips_and_keeps_oar_order() -> None:
    vec = [1.1, 3.0, 0.2, 0.5, 20.0, 0.4, 0.7, 0.01, 0.9]
    tpps = TppSet.from_vector(vec, ("rectum", "bladder"))
    assert tpps.oar_names == ("rectum", "bladder")
    assert tpps.get("lambda_rectum") == 20.0
    assert tpps.get("v_bladder") == 0.9
    np.testing.assert_array_equal(tpps.to_vector(), vec)
    with pytest.raises(ValueError, match="expected 9"):
        TppSet.from_vector(vec[:-1], OARS)


def test_with_value_returns_a_new_set_and_leaves_the_old_one() -> None:
    tpps = TppSet.default(OARS)
    changed = tpps.with_value("t_rectum", 0.6)
    assert changed.get("t_rectum") == 0.6
    assert tpps.get("t_rectum") == 1.0
    assert changed.get("t_bladder") == 1.0


def test_sets_are_immutable() -> None:
    tpps = TppSet.default(OARS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tpps.ptv = StructureTpp()  # type: ignore[misc]
    with pytest.raises(TypeError):
        tpps.oars["rectum"] = StructureTpp()  # type: ignore[index]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("t_ptv", 0.99), ("t_ptv", 1.21), ("t_rectum", 0.0), ("t_rectum", 1.01), ("lambda_ptv", 0.0),
        ("lambda_bladder", 1e5 * 1.001), ("lambda_rectum", -1.0), ("v_ptv", 0.31), ("v_ptv", 0.0),
        ("v_rectum", 0.0), ("v_rectum", 1.5), ("t_bladder", math.nan),
    ],
)
def test_out_of_range_raises_a_typed_error_naming_the_tpp(name: str, value: float) -> None:
    with pytest.raises(TppRangeError, match=name) as info:
        TppSet.default(OARS).with_value(name, value)
    assert isinstance(info.value, ValueError)
    assert info.value.name == name


@pytest.mark.parametrize(
    ("name", "value"),
    [("t_ptv", 1.0), ("t_ptv", 1.2), ("t_rectum", 1.0), ("lambda_ptv", 1e5), ("v_ptv", 0.3), ("v_bladder", 1.0)],
)
def test_range_ends_are_accepted(name: str, value: float) -> None:
    assert TppSet.default(OARS).with_value(name, value).get(name) == value


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(KeyError):
        TppSet.default(OARS).with_value("t_femur", 0.5)
    with pytest.raises(KeyError):
        TppSet.default(OARS).with_value("alpha_ptv", 0.5)


@pytest.mark.parametrize(
    ("name", "direction", "expected"),
    [
        ("t_ptv", 1, 1.01), ("lambda_ptv", 1, 1.65), ("lambda_ptv", -1, 0.6), ("v_ptv", 1, 0.125),
        ("v_ptv", -1, 0.08), ("t_rectum", -1, 0.6), ("lambda_rectum", 1, 1.65), ("v_bladder", -1, 0.8),
    ],
)
def test_step_applies_the_published_factors(name: str, direction: int, expected: float) -> None:
    assert step(TppSet.default(OARS), name, direction).get(name) == pytest.approx(expected)


def test_step_clamps_into_the_valid_range() -> None:
    tpps = TppSet.default(OARS)
    assert step(tpps, "t_ptv", -1).get("t_ptv") == 1.0  # 0.91 would leave [1.0, 1.2]
    assert step(tpps, "t_rectum", 1).get("t_rectum") == 1.0
    assert step(tpps, "v_rectum", 1).get("v_rectum") == 1.0
    assert step(tpps.with_value("v_ptv", 0.3), "v_ptv", 1).get("v_ptv") == 0.3
    assert step(tpps.with_value("lambda_ptv", 9e4), "lambda_ptv", 1).get("lambda_ptv") == 1e5
    with pytest.raises(ValueError, match="direction"):
        step(tpps, "t_ptv", 0)


def test_random_tpps_are_reproducible_valid_and_span_the_training_ranges() -> None:
    a = random_tpps(np.random.default_rng(7), OARS)
    b = random_tpps(np.random.default_rng(7), OARS)
    assert a == b
    draws = np.array([random_tpps(np.random.default_rng(s), OARS).to_vector() for s in range(400)])
    names = a.names()
    for j, name in enumerate(names):
        param, structure = name.split("_", 1)
        low, high, log = TRAINING_RANGES[("ptv" if structure == "ptv" else "oar", param)]
        assert draws[:, j].min() >= low and draws[:, j].max() <= high
        # The median sits mid-range on the drawing scale: log for lambda, linear otherwise.
        scale = np.log if log else (lambda x: x)
        position = (scale(np.median(draws[:, j])) - scale(low)) / (scale(high) - scale(low))
        assert position == pytest.approx(0.5, abs=0.1)


def test_random_tpps_draw_from_given_ranges_and_refuse_invalid_ones() -> None:
    narrow = {**TRAINING_RANGES, ("oar", "lambda"): (0.001, 0.01, True), ("oar", "t"): (0.9, 1.0, False)}
    draws = [random_tpps(np.random.default_rng(s), OARS, narrow) for s in range(50)]
    lams = [d.get(f"lambda_{o}") for d in draws for o in OARS]
    ts = [d.get(f"t_{o}") for d in draws for o in OARS]
    assert min(lams) >= 0.001 and max(lams) <= 0.01
    assert min(ts) >= 0.9 and max(ts) <= 1.0
    # A drawing range reaching past the valid range is refused, not silently clamped.
    with pytest.raises(TppRangeError, match="t_ptv"):
        random_tpps(np.random.default_rng(0), OARS, {**TRAINING_RANGES, ("ptv", "t"): (1.3, 1.4, False)})


def test_the_parameter_table_is_consistent() -> None:
    assert PARAMS == ("t", "lambda", "v") == tuple(PARAMETERS)
    for p in PARAMETERS.values():
        assert "_" not in p.name and p.tightens in (1, -1)
        for role in ROLES:
            spec = p.of(role)
            assert spec.raise_factor > 1.0 > spec.lower_factor > 0.0
            assert spec.valid.contains(spec.default)
            low, high, _ = spec.training
            assert spec.valid.contains(low) and spec.valid.contains(high)
            assert spec.tightens_oars in (-1, 0, 1)
            assert TRAINING_RANGES[(role, p.name)] == spec.training
    for role in ROLES:
        assert sorted(p.of(role).tighten_rank for p in PARAMETERS.values()) == list(range(len(PARAMS)))
    # Only lambda_ptv moves other structures: the optimizer divides every OAR weight by it.
    assert [(p.name, r) for p in PARAMETERS.values() for r in ROLES if p.of(r).tightens_oars] == [("lambda", "ptv")]


def test_tightening_steps_lower_the_structures_dose_in_the_documented_order() -> None:
    assert tightening_steps("ptv") == (("t_ptv", -1), ("v_ptv", 1), ("lambda_ptv", 1))
    assert tightening_steps("rectum") == (("lambda_rectum", 1), ("t_rectum", -1), ("v_rectum", 1))
    # A structure that needs more dose (a failing lower limit): the same steps, reversed.
    assert tightening_steps("rectum", -1) == (("lambda_rectum", -1), ("t_rectum", 1), ("v_rectum", -1))
    with pytest.raises(ValueError, match="need"):
        tightening_steps("ptv", 0)


def test_a_move_is_one_typed_step_rendered_one_way() -> None:
    from m2m.physics.tpp import Direction, Move, TppSet

    move = Move("lambda_rectum", Direction.RAISE)
    assert str(move) == "raise lambda_rectum" and Move.parse("raise lambda_rectum") == move
    assert Move("t_ptv", -1).direction is Direction.LOWER  # a plain ±1 is coerced to the enum
    tpps = TppSet.default(("bladder", "rectum"))
    assert move.apply(tpps).get("lambda_rectum") == pytest.approx(1.65)
    with pytest.raises(ValueError, match="not a TPP name"):
        Move("gain_rectum", Direction.RAISE)
    with pytest.raises(ValueError, match="not a move"):
        Move.parse("nudge t_ptv")
    with pytest.raises(ValueError):
        Move("t_ptv", 0)  # type: ignore[arg-type]


def test_tpps_from_dict_needs_every_tpp_once_and_valid_values() -> None:
    full = TppSet.default(("bladder", "rectum")).as_dict()
    assert TppSet.from_dict(full, ("bladder", "rectum")).as_dict() == full
    with pytest.raises(ValueError, match="missing"):
        TppSet.from_dict({k: v for k, v in full.items() if k != "v_rectum"}, ("bladder", "rectum"))
    with pytest.raises(ValueError, match="unexpected"):
        TppSet.from_dict({**full, "t_femur": 0.5}, ("bladder", "rectum"))
    with pytest.raises(TppRangeError):
        TppSet.from_dict({**full, "t_ptv": 2.0}, ("bladder", "rectum"))
