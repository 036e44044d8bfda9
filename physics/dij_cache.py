"""On-disk cache of dose-influence matrices, keyed by the content of everything that determines them.

Key = sha256 over the case's :meth:`~m2m.physics.case.Case.content_hash`, every :class:`BeamSet` field, the resolved
structure names and :data:`m2m.physics.dose.ENGINE_VERSION` (bump it whenever the engine's numbers change). One
uncompressed ``.npz`` per key (memory-speed loads, no pickle), written to a temporary file in the cache directory and
renamed into place, so readers never see a partial file and concurrent writers of the same key are harmless.
The packed matrix (:class:`~m2m.physics.sparse.PackedCsr`: uint16 codes, uint16 or int32 column indices,
per-beamlet scales) is stored as is and its members are read straight into arrays (no zip CRC pass), so a 44 M
non-zero, 180-beam dij (168 MiB) loads in a fraction of a second once the file is in the page cache. A file of
another layout (an older version) is unreadable here: it is recomputed and replaced.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import struct
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import structlog

from m2m.physics.beams import BeamSet
from m2m.physics.case import Case
from m2m.physics.dij import Dij
from m2m.physics.dose import ENGINE_VERSION, compute_dij
from m2m.physics.sparse import PackedCsr

log = structlog.get_logger()

CACHE_DIR_ENV = "M2M_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$M2M_CACHE_DIR`` if set, else ``~/.cache/m2m/dij``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "m2m" / "dij"


def resolved_structures(case: Case, structures: Sequence[str] | None) -> tuple[str, ...]:
    """The structure names a dij is computed for (the dose engine's default when None)."""
    if structures is not None:
        return tuple(structures)
    return tuple(s.name for s in case.structures if s.role != "body")


def _engine_source_hash() -> str:
    """sha256 of the dose engine's, beam geometry's and packed storage's source: an edit that changes the numbers or
    the stored layout but forgets to bump ENGINE_VERSION must still miss the cache (it happened during development)."""
    h = hashlib.sha256()
    for obj in (compute_dij, BeamSet, PackedCsr):
        h.update(Path(str(inspect.getsourcefile(obj))).read_bytes())
    return h.hexdigest()


_ENGINE_SOURCE_HASH = _engine_source_hash()


def dij_key(case: Case, beams: BeamSet, structures: Sequence[str] | None = None) -> str:
    """Content hash (hex sha256) identifying the dij of (case, beams, structures, engine version)."""
    h = hashlib.sha256()
    h.update(case.content_hash().encode())
    h.update(
        repr(
            (
                tuple(float(g) for g in beams.gantry_deg),
                float(beams.bixel_mm),
                tuple(float(v) for v in beams.isocentre_mm),
                float(beams.sad_mm),
                None if beams.field_mm is None else tuple(float(v) for v in beams.field_mm),
            )
        ).encode()
    )
    h.update(repr(resolved_structures(case, structures)).encode())
    h.update(ENGINE_VERSION.encode())
    h.update(_ENGINE_SOURCE_HASH.encode())
    return h.hexdigest()


def load_or_compute_dij(
    case: Case,
    beams: BeamSet,
    structures: Sequence[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Dij:
    """The dij from the cache if present, else computed by :func:`m2m.physics.dose.compute_dij` and stored."""
    names = resolved_structures(case, structures)
    key = dij_key(case, beams, names)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"{key}.npz"
    if path.exists():
        try:
            dij = load_dij(path)
            log.info("dij_cache_hit", case=case.case_id, key=key[:12])
            return dij
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            # A damaged entry is recomputed and overwritten rather than failing the plan.
            log.warning("dij_cache_unreadable", path=str(path), error=repr(exc))
    dij = compute_dij(case, beams, names, key=key)
    save_dij(dij, path)
    log.info("dij_cache_stored", case=case.case_id, key=key[:12], path=str(path))
    return dij


def save_dij(dij: Dij, path: str | os.PathLike[str]) -> None:
    """Write ``dij`` to ``path`` (.npz, uncompressed) atomically: temporary file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(dij.rows)
    arrays: dict[str, np.ndarray] = {
        "codes": dij.matrix.codes,
        "indices": dij.matrix.indices,
        "indptr": dij.matrix.indptr,
        "scale": dij.matrix.scale,
        "shape": np.asarray(dij.matrix.shape, dtype=np.int64),
        "voxel_index": dij.voxel_index,
        "beamlet_beam": dij.beamlet_beam,
        "voxel_volume_cc": np.asarray(dij.voxel_volume_cc, dtype=np.float64),
        "grid_shape": np.asarray(dij.grid_shape, dtype=np.int64),
        "key": np.asarray(dij.key),
        "row_names": np.asarray(names, dtype=np.str_),
    }
    for i, n in enumerate(names):
        arrays[f"row_{i}"] = dij.rows[n]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        # mkstemp creates 0600; cache entries are meant to be shared like any other file in the directory.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_dij(path: str | os.PathLike[str]) -> Dij:
    """Read a dij written by :func:`save_dij`."""
    z = _read_npz(Path(path))
    shape = (int(z["shape"][0]), int(z["shape"][1]))
    matrix = PackedCsr(z["indptr"], z["indices"], z["codes"], z["scale"], shape)
    names = [str(n) for n in z["row_names"]]
    gz, gy, gx = (int(v) for v in z["grid_shape"])
    return Dij(
        matrix=matrix,
        voxel_index=z["voxel_index"],
        rows={n: z[f"row_{i}"] for i, n in enumerate(names)},
        beamlet_beam=z["beamlet_beam"],
        voxel_volume_cc=float(z["voxel_volume_cc"]),
        grid_shape=(gz, gy, gx),
        key=str(z["key"]),
    )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every member of an uncompressed .npz, read directly into arrays (``np.load`` streams each member through
    zipfile's CRC check, ~10× slower). Object arrays are refused, as ``allow_pickle=False`` would."""
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: member {info.filename} is compressed")
            fh.seek(info.header_offset)
            local = fh.read(30)
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"{path}: bad local header for {info.filename}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            fh.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            if dtype.hasobject:
                raise ValueError(f"{path}: member {info.filename} holds Python objects")
            arr = np.empty(int(np.prod(shape)), dtype=dtype)
            if arr.nbytes and fh.readinto(arr.data.cast("B")) != arr.nbytes:
                raise ValueError(f"{path}: member {info.filename} is truncated")
            name = info.filename.removesuffix(".npy")
            out[name] = arr.reshape(shape, order="F" if fortran else "C")
    return out
