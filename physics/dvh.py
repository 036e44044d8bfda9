"""Dose-volume histograms and dose metrics on per-voxel dose arrays (Gy), all voxels of equal volume.

Conventions: ``Dx%`` is the minimum dose received by the hottest ``x`` % of the volume; ``D(cc)`` the minimum
dose received by the hottest ``cc`` cm³ (at least one voxel, so ``D0.03cc`` on coarse grids is the voxel max
or near it); ``Vx`` the fraction of the volume receiving at least ``x`` Gy. Volumes count whole voxels: the
hottest ``x`` % of ``n`` voxels is ``ceil(x/100·n)`` voxels.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping

import numpy as np

#: The dose grid every DVH in m2m is sampled on: ``N_BINS`` bins from 0 to ``BIN_SPAN`` × Rx (the DRL policy's
#: observation), continued with the same spacing to ``REPORT_SPAN`` × Rx where DVHs are reported and plotted (hot
#: initial plans, t_ptv up to 1.2, reach well past 115 %).
N_BINS = 100
BIN_SPAN = 1.15
REPORT_SPAN = 1.5


def dvh_bins_gy(rx_gy: float) -> np.ndarray:
    """The policy's dose bins (Gy): :data:`N_BINS` from 0 to :data:`BIN_SPAN` × ``rx_gy``."""
    return np.linspace(0.0, BIN_SPAN * rx_gy, N_BINS)


def report_bins_gy(rx_gy: float) -> np.ndarray:
    """The reported DVH bins (Gy): :func:`dvh_bins_gy` (so a reader of the first :data:`N_BINS` gets the policy's
    input) continued with the same spacing to :data:`REPORT_SPAN` × ``rx_gy``."""
    spacing = BIN_SPAN * rx_gy / (N_BINS - 1)
    return np.arange(int(np.ceil(REPORT_SPAN * rx_gy / spacing)) + 1) * spacing


def _as_dose(dose: np.ndarray) -> np.ndarray:
    d = np.asarray(dose, dtype=np.float64).ravel()
    if d.size == 0:
        raise ValueError("empty dose array: the structure has no voxels")
    return d


def cumulative_dvh(dose: np.ndarray, bins_gy: np.ndarray) -> np.ndarray:
    """Fraction of the volume (0..1) receiving at least each dose in ``bins_gy`` (Gy)."""
    d = np.sort(_as_dose(dose))
    bins = np.asarray(bins_gy, dtype=np.float64)
    return (d.size - np.searchsorted(d, bins, side="left")) / d.size


def dvh_by_structure(dose_by_structure: Mapping[str, np.ndarray], bins_gy: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`cumulative_dvh` of each structure on the same bins."""
    return {name: cumulative_dvh(dose, bins_gy) for name, dose in dose_by_structure.items()}


def dvh_csv(bins_gy: np.ndarray, curves_pct: Mapping[str, np.ndarray]) -> str:
    """Cumulative DVHs as CSV text: each curve is the % of the structure's volume receiving at least (≥) the dose.

    Header ``dose_gy,<structure>,…`` (structures in mapping order), then one row per bin: the dose (Gy, 3 decimals)
    and each structure's volume (%, 4 decimals). Curves must have one value per bin (e.g. 100 × :func:`cumulative_dvh`
    or :func:`dvh_by_structure`).
    """
    bins = np.asarray(bins_gy, dtype=np.float64).ravel()
    curves = {name: np.asarray(c, dtype=np.float64).ravel() for name, c in curves_pct.items()}
    for name, c in curves.items():
        if c.shape != bins.shape:
            raise ValueError(f"DVH of {name!r} has {c.size} values for {bins.size} dose bins")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["dose_gy", *curves])
    for i, dose in enumerate(bins):
        writer.writerow([f"{dose:.3f}", *(f"{c[i]:.4f}" for c in curves.values())])
    return out.getvalue()


def _hottest_k(d: np.ndarray, k: int) -> float:
    """The k-th largest value (1-based), k clipped into [1, n]; O(n) via partition."""
    k = min(max(k, 1), d.size)
    return float(np.partition(d, d.size - k)[d.size - k])


def d_percent(dose: np.ndarray, percent: float) -> float:
    """Dx% (Gy): minimum dose to the hottest ``percent`` % of the volume (D95% is the coverage metric)."""
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"percent must be in [0, 100], got {percent}")
    d = _as_dose(dose)
    # The small guard stops 95/100·n landing one voxel high through float rounding.
    return _hottest_k(d, math.ceil(percent / 100.0 * d.size - 1e-9))


def d_cc(dose: np.ndarray, cc: float, voxel_volume_cc: float) -> float:
    """D(cc) (Gy): minimum dose to the hottest ``cc`` cm³, at least one voxel (D0.03cc is the hot spot)."""
    if cc < 0 or voxel_volume_cc <= 0:
        raise ValueError(f"need cc >= 0 and voxel_volume_cc > 0, got {cc}, {voxel_volume_cc}")
    d = _as_dose(dose)
    return _hottest_k(d, math.ceil(cc / voxel_volume_cc - 1e-9))


def v_gy(dose: np.ndarray, threshold_gy: float) -> float:
    """Vx as a fraction (0..1) of the volume receiving at least ``threshold_gy`` Gy."""
    d = _as_dose(dose)
    return float(np.count_nonzero(d >= threshold_gy)) / d.size


def v_percent_rx(dose: np.ndarray, percent_rx: float, rx_gy: float) -> float:
    """Fraction (0..1) of the volume receiving at least ``percent_rx`` % of the prescription ``rx_gy``."""
    return v_gy(dose, percent_rx / 100.0 * rx_gy)


def mean_gy(dose: np.ndarray) -> float:
    """Mean dose (Gy)."""
    return float(_as_dose(dose).mean())


def max_gy(dose: np.ndarray) -> float:
    """Maximum voxel dose (Gy)."""
    return float(_as_dose(dose).max())


def volume_cc(dose: np.ndarray, voxel_volume_cc: float) -> float:
    """Structure volume (cm³) from its voxel count."""
    return _as_dose(dose).size * voxel_volume_cc
