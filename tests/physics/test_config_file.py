"""The one reader of config files: msgspec's conversion errors as ``<file>: <key>: expected …, got …``."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import pytest
from msgspec import Meta

from m2m.physics.config_file import ConfigError, convert, expected, key_path, read_toml, toml_repr


class RoomError(ConfigError):
    """A room's own error, as ProtocolError, ScenarioError and StackConfigError are."""


class Span(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    start: int
    stop: int

    def __post_init__(self) -> None:
        if self.stop <= self.start:
            raise ValueError(f"[{self.start}, {self.stop}) is empty")


class Unit(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1)]
    count: Annotated[int, Meta(ge=1)] = 1
    options: dict[str, str] = {}


class Doc(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    units: list[Unit]
    span: Annotated[Span, Meta(description="an array of 2 integers [start, stop)")] = Span(0, 1)
    spans: dict[str, Span] = {}
    site: Literal["prostate", "liver"] = "liver"
    angles: Annotated[tuple[float, ...], Meta(min_length=1)] | None = None
    step: Annotated[float, Meta(gt=0, le=180)] | None = None


UNIT = {"name": "a"}


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        ({"units": [UNIT, UNIT, {"name": "c", "count": "x"}]}, "units[2].count", 'expected an integer ≥ 1, got "x"'),
        ({"units": [{"name": "a", "count": 0}]}, "units[0].count", "expected an integer ≥ 1, got 0"),
        ({"units": [{"name": "a", "count": True}]}, "units[0].count", "expected an integer ≥ 1, got true"),
        ({"units": [{"count": 2}]}, "units[0].name", "missing; expected a non-empty string"),
        ({}, "units", "missing; expected an array of tables"),
        ({"units": [{"name": "a", "colour": "red"}]}, "units[0].colour",
         "unknown key; expected one of name, count, options"),
        ({"units": [], "extra": 1}, "extra", "unknown key; expected one of units, span, spans, site, angles, step"),
        ({"units": "a"}, "units", 'expected an array of tables, got "a"'),
        ({"units": ["a"]}, "units[0]", 'expected a table, got "a"'),
        # a table of free keys: the key msgspec leaves out ("[...]") is found again, and quoted when not bare
        ({"units": [{"name": "a", "options": {"ok": "1", "check point": 3}}]}, 'units[0].options."check point"',
         "expected a string, got 3"),
        ({"units": [], "spans": {"x": [0, 1], "y": [0, "b"]}}, "spans.y[1]", 'expected an integer, got "b"'),
        ({"units": [], "spans": {"x": [0, 1, 2]}}, "spans.x", "expected an array of 2 items, got [0, 1, 2]"),
        # a description says what was expected; a __post_init__ says what is wrong in its own words
        ({"units": [], "span": "abc"}, "span", 'expected an array of 2 integers [start, stop), got "abc"'),
        ({"units": [], "span": [5, 5]}, "span", "[5, 5) is empty"),
        # choices, optional values, bounds
        ({"units": [], "site": "brain"}, "site", 'expected one of ["prostate", "liver"], got "brain"'),
        ({"units": [], "angles": 5}, "angles", "expected a non-empty array of numbers, got 5"),
        ({"units": [], "angles": [1, "a"]}, "angles[1]", 'expected a number, got "a"'),
        ({"units": [], "step": 181}, "step", "expected a number > 0 and ≤ 180, got 181"),
    ],
)
def test_msgspec_errors_become_file_key_and_expectation(data: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(RoomError) as info:
        convert(data, Doc, "doc.toml", RoomError)
    assert (info.value.path, info.value.key, info.value.problem) == ("doc.toml", key, problem)
    assert str(info.value) == f"doc.toml: {key}: {problem}"


def test_a_valid_table_converts_with_defaults() -> None:
    doc = convert({"units": [{"name": "a", "count": 2}], "step": 2}, Doc, "doc.toml")
    assert doc == Doc(units=[Unit("a", 2)], step=2.0)
    assert isinstance(doc.step, float)


def test_the_error_reads_well_without_a_key_or_a_file_and_pickles_whole() -> None:
    assert str(ConfigError("no criteria", "p.toml")) == "p.toml: no criteria"
    assert str(ConfigError("unknown metric 'D95'")) == "unknown metric 'D95'"
    error = pickle.loads(pickle.dumps(RoomError("expected a table", "doc.toml", "units[0]")))
    assert (type(error), str(error), error.key) == (RoomError, "doc.toml: units[0]: expected a table", "units[0]")
    assert isinstance(error, ValueError)


def test_read_toml_names_the_file_it_cannot_read(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('a = 1\n[b]\nc = "d"\n')
    assert read_toml(good, "good.toml") == {"a": 1, "b": {"c": "d"}}
    bad = tmp_path / "bad.toml"
    bad.write_text("a = \n")
    with pytest.raises(RoomError, match=r"^bad\.toml: not valid TOML: "):
        read_toml(bad, "bad.toml", RoomError)
    with pytest.raises(ConfigError, match=r"^none\.toml: cannot read: "):
        read_toml(tmp_path / "none.toml", "none.toml")


def test_values_and_keys_are_written_as_in_toml() -> None:
    assert toml_repr({"a b": [1, 2.5, True, "x"], "c": {}}) == '{ "a b" = [1, 2.5, true, "x"], c = {} }'
    assert toml_repr("x" * 100, limit=10) == '"xxxxxxxx…'
    assert expected("a string", 3) == "expected a string, got 3"
    assert key_path("agent", 0, "options", "a=b") == 'agent[0].options."a=b"'
    assert key_path("cohorts", "train") == "cohorts.train"
