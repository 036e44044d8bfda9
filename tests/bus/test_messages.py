"""Typed, versioned messages and their codec (in-process: no bus needed)."""

from __future__ import annotations

import contextlib
import random

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.busapp import Echo, EchoReply

from m2m.bus.errors import BusError, DecodeError, SchemaConflict, SchemaVersionError, UnknownSchema
from m2m.bus.messages import ArraySpec, Envelope, ErrorReply, Message, decode, decode_envelope, encode, new_id

pytestmark = pytest.mark.timeout(60)


def env() -> Envelope:
    return Envelope(id=new_id(), schema="", version=0, sender="t", kind="request", session="s1")


def as_bytes(frames: list) -> list[bytes]:
    return [bytes(f) for f in frames]


class Dose(Message):
    schema = "test.dose"
    version = 1
    plan: str
    grid: np.ndarray
    weights: np.ndarray | None = None
    tags: list[str] = msgspec.field(default_factory=list)


class DoseV2(Message):
    """A breaking change of test.dose: a new version, a new class."""

    schema = "test.dose"
    version = 2
    plan: str
    grid: np.ndarray
    scale: float


class DoseNewer(msgspec.Struct, kw_only=True):
    """What a newer sender of test.dose v1 might add (an extra field); not registered."""

    plan: str
    grid: int
    weights: None = None
    tags: list[str] = msgspec.field(default_factory=list)
    comment: str = "added later"


def test_round_trip_with_arrays_as_raw_frames() -> None:
    grid = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    w = np.array([1, 2, 3], dtype=np.int64)
    frames = as_bytes(encode(Dose(plan="p", grid=grid, weights=w, tags=["a"]), env()))
    assert len(frames) == 4  # envelope, payload, two raw array frames
    assert frames[2] == grid.tobytes() and frames[3] == w.tobytes()
    assert len(frames[1]) < 40  # the payload holds only references, not the numbers
    e, msg = decode(frames)
    assert isinstance(msg, Dose)
    assert (e.schema, e.version, e.session) == ("test.dose", 1, "s1")
    assert [a.dtype for a in e.arrays] == ["<f4", "<i8"]
    np.testing.assert_array_equal(msg.grid, grid)
    np.testing.assert_array_equal(msg.weights, w)
    assert msg.grid.dtype == np.float32 and msg.grid.shape == (2, 3, 4)


def test_non_contiguous_array_travels() -> None:
    a = np.arange(20.0).reshape(4, 5)[:, ::2]
    _, msg = decode(as_bytes(encode(Dose(plan="p", grid=a), env())))
    np.testing.assert_array_equal(msg.grid, a)


def test_versions_are_distinct_types() -> None:
    _, m1 = decode(as_bytes(encode(Dose(plan="p", grid=np.zeros(2)), env())))
    _, m2 = decode(as_bytes(encode(DoseV2(plan="p", grid=np.zeros(2), scale=2.0), env())))
    assert type(m1) is Dose and type(m2) is DoseV2


def test_unknown_fields_from_newer_sender_are_tolerated() -> None:
    e = env()
    e.schema, e.version = "test.dose", 1
    e.arrays = [ArraySpec("<f8", (1,))]
    payload = msgspec.msgpack.encode(DoseNewer(plan="p", grid=0))
    # the envelope itself may also carry fields this process does not know
    env_bytes = msgspec.msgpack.encode({**msgspec.to_builtins(e), "priority": 3})
    _, msg = decode([env_bytes, payload, np.ones(1).tobytes()])
    assert isinstance(msg, Dose) and msg.plan == "p" and msg.grid.tolist() == [1.0]


def test_unknown_schema_and_version_are_typed() -> None:
    frames = as_bytes(encode(Echo(text="x"), env()))
    e = decode_envelope(frames[0])
    e.schema = "nobody.knows"
    with pytest.raises(UnknownSchema):
        decode([msgspec.msgpack.encode(e), frames[1]])
    e.schema, e.version = "test.dose", 7
    with pytest.raises(SchemaVersionError) as info:
        decode([msgspec.msgpack.encode(e), frames[1]])
    assert "[1, 2]" in str(info.value)
    assert issubclass(UnknownSchema, BusError) and issubclass(SchemaVersionError, DecodeError)


def test_conflicting_declaration_is_refused() -> None:
    with pytest.raises(SchemaConflict):

        class Impostor(Message):
            schema = "test.echo"
            version = 1
            other: int


def test_bad_array_frames_are_decode_errors() -> None:
    frames = as_bytes(encode(Dose(plan="p", grid=np.zeros(3)), env()))
    with pytest.raises(DecodeError):
        decode(frames[:2])  # array frame missing
    with pytest.raises(DecodeError):
        decode([frames[0], frames[1], frames[2][:-1]])  # wrong byte count for the shape
    e = decode_envelope(frames[0])
    e.arrays[0] = type(e.arrays[0])("|O", (3,))
    with pytest.raises(DecodeError):
        decode([msgspec.msgpack.encode(e), frames[1], b"\0" * 24])  # object dtype refused
    with pytest.raises(TypeError):
        encode(Dose(plan="p", grid=np.array([object()])), env())


def test_payload_of_the_wrong_type_is_a_decode_error() -> None:
    frames = as_bytes(encode(Echo(text="x"), env()))
    other = as_bytes(encode(EchoReply(text="x", pid=1), env()))
    with pytest.raises(DecodeError):
        decode([frames[0], msgspec.msgpack.encode({"text": 5})])
    _, ok = decode([other[0], other[1]])
    assert isinstance(ok, EchoReply)


def test_error_reply_is_a_message() -> None:
    _, m = decode(as_bytes(encode(ErrorReply(code="worker_lost", retryable=True), env())))
    assert isinstance(m, ErrorReply) and m.retryable


# ------------------------------------------------------------------------------------------ fuzzing
SEEDS = [
    as_bytes(encode(Dose(plan="p", grid=np.arange(6.0).reshape(2, 3), tags=["a", "b"]), env())),
    as_bytes(encode(Echo(text="héllo", data=np.arange(4, dtype=np.int32)), env())),
    as_bytes(encode(ErrorReply(code="x", message="y"), env())),
]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        elif op == 2 and b:
            del b[rng.randrange(len(b))]
        elif op == 3:
            b = b[: rng.randrange(len(b) + 1)]
        else:  # a msgpack type byte that nests deeply or claims a huge length
            evil = rng.choice([b"\x91" * 2000, b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff"])
            b[rng.randrange(len(b) + 1) : 0] = evil
    return bytes(b)


def _only_typed_errors(frames: list[bytes]) -> None:
    with contextlib.suppress(BusError):  # DecodeError & co: the only allowed failures
        decode(frames)


def test_mutation_fuzz_10k_inputs_only_typed_errors() -> None:
    rng = random.Random(1234)
    for i in range(12_000):
        seed = SEEDS[i % len(SEEDS)]
        frames = list(seed)
        k = rng.randrange(len(frames))
        frames[k] = _mutate(rng, frames[k])
        if rng.random() < 0.1:
            frames = frames[: rng.randrange(len(frames) + 1)]
        _only_typed_errors(frames)


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=5))
def test_hypothesis_random_frames_only_typed_errors(frames: list[bytes]) -> None:
    _only_typed_errors(frames)


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
                    | st.binary(max_size=20),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=20))
def test_hypothesis_well_formed_msgpack_of_wrong_shape(obj: object) -> None:
    good = SEEDS[0]
    packed = msgspec.msgpack.encode(obj)
    _only_typed_errors([packed, good[1], *good[2:]])
    _only_typed_errors([good[0], packed, *good[2:]])
