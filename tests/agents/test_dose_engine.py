"""The dose engine's pure parts: DVH summaries (its reported DVH bins are tested with m2m.physics.dvh, TPPs from
a message with m2m.physics.tpp)."""

from __future__ import annotations

import numpy as np

from m2m.agents.dose_engine import structure_doses


def test_structure_doses_are_percent_volume_and_gray() -> None:
    (rectum,) = structure_doses({"rectum": np.array([10.0, 20.0, 30.0, 40.0])}, np.array([0.0, 25.0, 50.0]))
    assert rectum.dvh_pct.tolist() == [100.0, 50.0, 0.0]
    assert (rectum.dmax_gy, rectum.dmean_gy) == (40.0, 25.0)
