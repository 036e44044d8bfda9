"""Model provisioning: assembly from chunk packages, sha256 verification, GGUF metadata."""

from __future__ import annotations

import hashlib
import importlib
import struct
from pathlib import Path

import pytest

from m2m.agents.llm.models import (
    DEFAULT_MODEL,
    REGISTRY,
    ModelIntegrityError,
    ModelNotInstalledError,
    ModelSpec,
    cache_dir,
    ensure_model,
    file_sha256,
    gguf_metadata,
)

CHUNKS = (b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 3)
WHOLE = b"".join(CHUNKS)


@pytest.fixture
def fake_spec(tmp_path, monkeypatch) -> ModelSpec:
    """A model shipped as three chunk packages on a temporary sys.path entry."""
    site = tmp_path / "site"
    for i, data in enumerate(CHUNKS, start=1):
        package = site / f"m2mtest_fake_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return ModelSpec(
        name="fake", file_name="fake.gguf", sha256=hashlib.sha256(WHOLE).hexdigest(), size_bytes=len(WHOLE),
        chunks=tuple((f"m2mtest_fake_part{i}", f"data/part{i:02d}.bin") for i in (1, 2, 3)),
        packages=tuple(f"m2mtest-fake-part{i}" for i in (1, 2, 3)), licence="test", chat_format=None,
        description="three chunks",
    )


def test_assembles_the_chunks_in_order(fake_spec, tmp_path):
    path = ensure_model(fake_spec, tmp_path / "models")
    assert path == tmp_path / "models" / "fake.gguf"
    assert path.read_bytes() == WHOLE
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no temporary file left behind


def test_a_verified_cached_file_is_reused(fake_spec, tmp_path):
    path = ensure_model(fake_spec, tmp_path)
    before = path.stat().st_mtime_ns
    assert ensure_model(fake_spec, tmp_path) == path
    assert path.stat().st_mtime_ns == before


@pytest.mark.parametrize("damage", [b"x" * len(WHOLE), WHOLE[:-1]], ids=["same-size", "truncated"])
def test_a_corrupt_cached_file_is_assembled_again(fake_spec, tmp_path, damage):
    path = ensure_model(fake_spec, tmp_path)
    path.write_bytes(damage)
    assert ensure_model(fake_spec, tmp_path).read_bytes() == WHOLE


def test_a_sha256_mismatch_raises_and_leaves_no_file(fake_spec, tmp_path):
    wrong = ModelSpec(**{**fake_spec.__dict__, "sha256": "0" * 64})
    models = tmp_path / "models"
    with pytest.raises(ModelIntegrityError, match="sha256"):
        ensure_model(wrong, models)
    assert list(models.iterdir()) == []
    # A cached file that does not match is re-assembled once; the assembly still does not match: the error.
    (models / "fake.gguf").write_bytes(WHOLE)
    with pytest.raises(ModelIntegrityError):
        ensure_model(wrong, models)


def test_missing_chunk_packages_name_what_to_install(fake_spec, tmp_path):
    missing = ModelSpec(**{**fake_spec.__dict__, "chunks": (*fake_spec.chunks, ("m2mtest_absent_part4", "x.bin"))})
    with pytest.raises(ModelNotInstalledError, match=r"m2mtest_absent_part4.*pip install"):
        ensure_model(missing, tmp_path)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("M2M_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path / "models"
    monkeypatch.delenv("M2M_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "m2m" / "models"


def test_registry_records_every_candidate():
    assert set(REGISTRY) == {"qwen2.5-coder-1.5b", "qwen-0.5b", "smollm2-135m", "gemma3-270m"}
    assert DEFAULT_MODEL in REGISTRY
    assert len(REGISTRY["qwen2.5-coder-1.5b"].chunks) == 22
    assert len(REGISTRY["qwen-0.5b"].chunks) == 6
    for spec in REGISTRY.values():
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert spec.licence and spec.size_bytes > 0


def _gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def test_gguf_metadata_reads_scalars_and_skips_arrays(tmp_path):
    kvs = [
        _gguf_string("general.name") + struct.pack("<I", 8) + _gguf_string("Tiny"),
        _gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + _gguf_string("a") + _gguf_string("bc"),
        _gguf_string("llama.block_count") + struct.pack("<II", 4, 12),
        _gguf_string("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 1, 2, 3),
        _gguf_string("general.license") + struct.pack("<I", 8) + _gguf_string("apache-2.0"),
        _gguf_string("rope.scale") + struct.pack("<If", 6, 0.5),
        _gguf_string("general.flag") + struct.pack("<I?", 7, True),
    ]
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))
    assert gguf_metadata(path) == {"general.name": "Tiny", "llama.block_count": 12, "general.license": "apache-2.0",
                                   "rope.scale": 0.5, "general.flag": True}
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + b"\0" * 20)
    with pytest.raises(ValueError, match="not a GGUF"):
        gguf_metadata(tmp_path / "bad.gguf")


def test_file_sha256(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"abc")
    assert file_sha256(path) == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.slow
def test_the_installed_candidates_verify_and_carry_their_licence():
    """Every installed candidate assembles (once per cache) to its recorded sha256; the GGUF names the model."""
    from m2m.agents.llm.models import installed_models

    names = installed_models()
    if DEFAULT_MODEL not in names:
        pytest.skip("the llm extra (the default model's packages) is not installed")
    for name in names:
        meta = gguf_metadata(ensure_model(name))
        assert str(meta["general.size_label"]) in REGISTRY[name].description
        if "general.license" in meta:
            assert str(meta["general.license"]) in REGISTRY[name].licence
