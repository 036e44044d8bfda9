"""Tiny synthetic planning problems for the DRL tests: a 140-row, 24-beamlet dij and a 3-criterion protocol,
milliseconds per step."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from m2m.agents.drl.env import CaseBank, PlanningCase, PlanningEnv
from m2m.physics.dij import Dij
from m2m.physics.protocol import Criterion, Protocol

RX_GY = 60.0
STRUCTURES = ("ptv", "bladder", "rectum")


def synthetic_case(seed: int) -> PlanningCase:
    """PTV rows see every beamlet; each OAR row sees the beamlets of one side, so OAR sparing fights coverage."""
    rng = np.random.default_rng(seed)
    n_ptv, n_oar, n_beamlets = 60, 40, 24
    ptv = rng.uniform(0.5, 1.5, size=(n_ptv, n_beamlets))
    bladder = np.zeros((n_oar, n_beamlets))
    bladder[:, :12] = rng.uniform(0.2, 1.0, size=(n_oar, 12))
    rectum = np.zeros((n_oar, n_beamlets))
    rectum[:, 12:] = rng.uniform(0.2, 1.0, size=(n_oar, 12))
    matrix = sp.csr_matrix(np.vstack([ptv, bladder, rectum]).astype(np.float32))
    rows = {
        "ptv": np.arange(n_ptv),
        "bladder": np.arange(n_ptv, n_ptv + n_oar),
        "rectum": np.arange(n_ptv + n_oar, n_ptv + 2 * n_oar),
    }
    dij = Dij.from_csr(
        matrix,
        voxel_index=np.arange(n_ptv + 2 * n_oar),
        rows=rows,
        beamlet_beam=np.repeat(np.arange(4), 6).astype(np.int32),
        voxel_volume_cc=0.027,
        grid_shape=(1, 1, n_ptv + 2 * n_oar),
    )
    return PlanningCase(f"synthetic-{seed}", seed, dij)


SYNTHETIC_PROTOCOL = Protocol(
    name="synthetic",
    criteria=(
        Criterion("ptv", "Dmax", "%Rx", 107.0, 110.0),
        Criterion("bladder", "Dmean", "%Rx", 50.0, 60.0),
        Criterion("rectum", "V90%Rx", "%", 10.0, 20.0),
    ),
)


def make_env(step_cap: int = 5, controlled: tuple[str, ...] = STRUCTURES) -> PlanningEnv:
    return PlanningEnv(
        CaseBank([1, 2, 3], synthetic_case),
        SYNTHETIC_PROTOCOL,
        RX_GY,
        STRUCTURES,
        controlled,
        step_cap=step_cap,
        fmo_max_iterations=300,
    )

