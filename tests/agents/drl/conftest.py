"""Fixtures of the DRL tests (the synthetic problems themselves are in :mod:`support.synthetic`)."""

from __future__ import annotations

import pytest
from support.synthetic import make_env

from m2m.agents.drl.env import PlanningEnv


@pytest.fixture
def env() -> PlanningEnv:
    return make_env()
