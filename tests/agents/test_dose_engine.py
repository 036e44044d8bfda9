"""The dose engine's pure parts: reported DVH bins, TPPs from a message, DVH summaries."""

from __future__ import annotations

import numpy as np
import pytest

from m2m.agents.dose_engine import structure_doses
from m2m.physics.dvh import REPORT_SPAN, dvh_bins_gy, report_bins_gy
from m2m.physics.tpp import TppRangeError, TppSet


def test_report_bins_begin_with_the_policys_bins_and_reach_150_percent() -> None:
    bins = report_bins_gy(79.2)
    policy = dvh_bins_gy(79.2)
    np.testing.assert_allclose(bins[: policy.size], policy, atol=1e-9)
    assert bins[-1] >= REPORT_SPAN * 79.2 and np.allclose(np.diff(bins), policy[1] - policy[0])


def test_tpps_from_dict_needs_every_tpp_once_and_valid_values() -> None:
    full = TppSet.default(("bladder", "rectum")).as_dict()
    assert TppSet.from_dict(full, ("bladder", "rectum")).as_dict() == full
    with pytest.raises(ValueError, match="missing"):
        TppSet.from_dict({k: v for k, v in full.items() if k != "v_rectum"}, ("bladder", "rectum"))
    with pytest.raises(ValueError, match="unexpected"):
        TppSet.from_dict({**full, "t_femur": 0.5}, ("bladder", "rectum"))
    with pytest.raises(TppRangeError):
        TppSet.from_dict({**full, "t_ptv": 2.0}, ("bladder", "rectum"))


def test_structure_doses_are_percent_volume_and_gray() -> None:
    (rectum,) = structure_doses({"rectum": np.array([10.0, 20.0, 30.0, 40.0])}, np.array([0.0, 25.0, 50.0]))
    assert rectum.dvh_pct.tolist() == [100.0, 50.0, 0.0]
    assert (rectum.dmax_gy, rectum.dmean_gy) == (40.0, 25.0)
