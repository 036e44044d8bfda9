"""The planning environment on a synthetic dij: gymnasium's checker, action clamping, reward bookkeeping."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from support.synthetic import RX_GY, SYNTHETIC_PROTOCOL, make_env

from m2m.agents.drl.env import (
    N_BINS,
    PlanningEnv,
    observation_bounds,
    smoothed_points,
    smoothed_score,
    tpp_feature,
)
from m2m.physics.protocol import score
from m2m.physics.tpp import TppSet


def test_passes_gymnasium_env_checker(env: PlanningEnv) -> None:
    check_env(env, skip_render_check=True)


def test_training_starts_are_drawn_from_the_initial_ranges() -> None:
    from m2m.agents.drl.env import scenario_env
    from m2m.physics.tpp import TRAINING_RANGES
    from m2m.scenarios import parse_scenario, read_scenario_data

    env = make_env()
    env.initial_ranges = {**TRAINING_RANGES, ("oar", "lambda"): (40.0, 50.0, True), ("ptv", "t"): (1.1, 1.1, False)}
    for seed in range(4):
        _, info = env.reset(seed=seed)
        assert info["tpps"]["t_ptv"] == pytest.approx(1.1)
        assert all(40.0 <= v <= 50.0 for k, v in info["tpps"].items() if k.startswith("lambda_") and k != "lambda_ptv")
    data = read_scenario_data("prostate-basic")
    data["tpp"]["initial_ranges"] = {"oar": {"lambda": [40.0, 50.0]}}
    scenario = parse_scenario(data, "test.toml")
    assert scenario_env(scenario, [0], ["bladder"]).initial_ranges is scenario.initial_ranges


def test_spaces_match_the_controlled_tpps() -> None:
    env = make_env(controlled=("ptv", "rectum"))
    assert env.action_space.n == 12
    assert env.observation_space.shape == (2 * N_BINS + 2 + 6,)
    assert env.action_meaning(0) == ("t_ptv", 1)
    assert env.action_meaning(11) == ("v_rectum", -1)


def test_same_seed_gives_same_episode(env: PlanningEnv) -> None:
    a, info_a = env.reset(seed=7)
    b, info_b = env.reset(seed=7)
    assert info_a["case_id"] == info_b["case_id"]
    np.testing.assert_array_equal(a, b)


def test_raising_a_tpp_at_its_upper_bound_clamps(env: PlanningEnv) -> None:
    start = TppSet.default(("bladder", "rectum")).with_value("t_ptv", 1.2).with_value("v_rectum", 1.0)
    env.reset(seed=0, options={"case_seed": 1, "tpps": start})
    env.step(0)  # raise t_ptv
    assert env.tpps.get("t_ptv") == 1.2
    env.step(16)  # raise v_rectum
    assert env.tpps.get("v_rectum") == 1.0
    env.step(17)  # lower v_rectum by its published factor
    assert env.tpps.get("v_rectum") == pytest.approx(0.8)
    env.step(3)  # lower lambda_ptv by its published factor
    assert env.tpps.get("lambda_ptv") == pytest.approx(0.6)


def test_tpp_features_are_in_the_observation(env: PlanningEnv) -> None:
    start = TppSet.default(("bladder", "rectum")).with_value("lambda_bladder", 1e3)
    obs, _ = env.reset(seed=0, options={"case_seed": 1, "tpps": start})
    tpp_part = obs[-9:]
    np.testing.assert_allclose(tpp_part[:3], [1.0, 0.0, 0.1], atol=1e-6)  # t, log10(lambda)/5, v of the PTV
    assert tpp_part[4] == pytest.approx(3.0 / 5.0)
    dvh_ptv = obs[:N_BINS]
    assert dvh_ptv[0] == 1.0 and np.all(np.diff(dvh_ptv) <= 0)


def test_tpp_features_keep_the_shipped_policys_layout() -> None:
    # Read from the parameter table; the shipped checkpoint was trained on exactly these features and bounds.
    low, high = observation_bounds(2)
    np.testing.assert_array_equal(low[-6:], np.tile(np.float32([0.0, -1.0, 0.0]), 2))
    np.testing.assert_array_equal(high[-6:], np.tile(np.float32([1.2, 1.0, 1.0]), 2))
    assert tpp_feature("lambda", 1e3) == math.log10(1e3) / 5.0
    assert tpp_feature("lambda", 1e-7) == -1.0 and tpp_feature("lambda", 1e5) == 1.0
    assert tpp_feature("t", 0.83) == 0.83 and tpp_feature("v", 0.2) == 0.2


def test_reward_is_the_change_in_smoothed_score_of_the_plans(env: PlanningEnv) -> None:
    _, info = env.reset(seed=3)
    before = info["smoothed_score"]
    for action in (1, 7, 14):
        _, reward, _, _, info = env.step(action)
        plan = env._state().plan
        recomputed = smoothed_score(score(SYNTHETIC_PROTOCOL, plan, env.case.dij.voxel_volume_cc, RX_GY))
        assert info["smoothed_score"] == pytest.approx(recomputed)
        assert reward == pytest.approx(recomputed - before)
        assert math.copysign(1.0, reward) == math.copysign(1.0, recomputed - before)
        before = recomputed


def test_preview_does_not_move_and_step_reuses_it(env: PlanningEnv) -> None:
    env.reset(seed=1)
    tpps = env.tpps
    preview = env.preview(5)
    assert env.tpps == tpps and env.steps_taken == 0
    obs, reward, *_ = env.step(5)
    assert reward == preview.reward
    np.testing.assert_array_equal(obs, preview.observation)


def test_episode_truncates_at_the_step_cap() -> None:
    env = make_env(step_cap=2)
    env.reset(seed=0)
    flags = [env.step(0)[2:4] for _ in range(2)]
    assert flags[0] == (False, False) or flags[0][0]
    assert flags[-1][0] or flags[-1][1]


def test_reaching_the_maximum_score_terminates() -> None:
    env = make_env()
    env.reset(seed=0, options={"case_seed": 2, "tpps": TppSet.default(("bladder", "rectum"))})
    outcomes = [env.preview(a) for a in range(env.action_space.n)]
    for a, t in enumerate(outcomes):
        assert t.terminated == (t.report.total >= env.max_score - 1e-9), a


@pytest.mark.parametrize(("linear", "expected"), [(1.5, 1.0), (1.0, 1.0), (0.4, 0.4), (0.0, 0.0), (-1.0, -math.log(2))])
def test_smoothed_points(linear: float, expected: float) -> None:
    assert smoothed_points(linear) == pytest.approx(expected)


def test_smoothed_points_keep_falling_past_the_zero_point() -> None:
    values = [smoothed_points(x) for x in np.linspace(-50, 1, 200)]
    assert np.all(np.diff(values) > 0)


def test_action_masks_flag_only_moves_into_a_bound(env: PlanningEnv) -> None:
    start = TppSet.default(("bladder", "rectum")).with_value("t_ptv", 1.2)
    env.reset(seed=0, options={"case_seed": 1, "tpps": start})
    mask = env.action_masks()
    # Raising t_ptv (at 1.2), t_bladder, v_bladder, t_rectum, v_rectum (all at 1.0) changes nothing.
    assert [a for a in range(env.action_space.n) if not mask[a]] == [0, 6, 10, 12, 16]
    env.step(1)  # lower t_ptv: raising it is possible again
    assert env.action_masks()[0]
