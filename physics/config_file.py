"""One way to read a TOML config file (a stack config, a scenario, a protocol) and to say what is wrong with it.

:func:`read_toml` parses the file; :func:`convert` turns the parsed mapping into typed :class:`msgspec.Struct` s
with :func:`msgspec.convert` (types, required and unknown keys, ``msgspec.Meta`` bounds), and reports a problem
as ``<file>: <key>: <problem>``, e.g.
``scenario_liver.toml: cohorts.train: expected an array of 2 integers [start, stop), got "abc"``.

* The key is written as in TOML: dotted table keys and 0-based array indices (``agent[2].instances``), also
  inside tables of free keys (``agent[0].options.checkpoint``), where msgspec itself only says ``[...]``.
* What was expected is read off the schema at that key: the ``Meta(description=...)`` of its type if it has
  one, otherwise its type and bounds in words (``an integer ≥ 1``, ``one of ["prostate", "liver"]``). The value
  found there follows as TOML (``got "abc"``).
* Checks the types cannot express (disjoint cohorts, unique roles) are made in a struct's ``__post_init__``
  (a ``ValueError`` raised there is reported at the struct's key with its own message) or by the caller after
  conversion; both raise the same error type.

Each room keeps its own error, a subclass of :class:`ConfigError`, so that its callers catch one type:
``ProtocolError`` (:mod:`m2m.physics.protocol`), ``ScenarioError`` (``m2m.scenarios``), ``StackConfigError``
(``m2m.stack.config``).
"""

from __future__ import annotations

import json
import re
import tomllib
import types
from collections.abc import Mapping, Sequence
from importlib.resources.abc import Traversable
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import msgspec

T = TypeVar("T")
Step = str | int
"""One step of a key: a table key or an array index."""


class ConfigError(ValueError):
    """A config file that cannot be used: ``path`` names the file, ``key`` the offending key (``""``: the whole
    file), ``problem`` what is wrong and what was expected. Also raised without a file for an object built in
    code (e.g. a :class:`~m2m.physics.protocol.Criterion` with an unknown metric)."""

    def __init__(self, problem: str, path: str = "", key: str = "") -> None:
        super().__init__(problem, path, key)  # all three in args: the error pickles whole
        self.problem = problem
        self.path = path
        self.key = key

    def __str__(self) -> str:
        return ": ".join(part for part in (self.path, self.key, self.problem) if part)


def read_toml(source: Traversable, where: str, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """The table of TOML file ``source`` (a :class:`~pathlib.Path` or a packaged resource), named ``where`` in
    errors; a file that cannot be read or is not TOML raises ``error``."""
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read: {exc}", where) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"not valid TOML: {exc}", where) from None


def convert(data: Mapping[str, Any], schema: type[T], where: str, error: type[ConfigError] = ConfigError) -> T:
    """``data`` (a parsed TOML table) as a ``schema`` struct; any problem raises ``error`` for file ``where``
    naming the key and what was expected there."""
    try:
        return msgspec.convert(data, schema)
    except msgspec.ValidationError as exc:
        key, problem = explain(exc, data, schema)
        raise error(problem, where, key) from None


def expected(what: str, got: object) -> str:
    """The wording of every type problem: ``expected <what>, got <value as TOML>``."""
    return f"expected {what}, got {toml_repr(got)}"


def toml_repr(value: object, limit: int = 80) -> str:
    """``value`` as it would be written in TOML (``"abc"``, ``true``, ``[1, 2]``, ``{ a = 1 }``), shortened to
    ``limit`` characters."""
    text = _toml(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def key_path(*steps: Step) -> str:
    """A key as written in messages: ``("agent", 0, "options", "a b")`` → ``agent[0].options."a b"``."""
    out = ""
    for step in steps:
        out += f"[{step}]" if isinstance(step, int) else f".{_key(step)}" if out else _key(step)
    return out


# ------------------------------------------------------------------------------------------------ msgspec's errors
_AT = re.compile(r"^(?P<text>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]+)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>[^`]+)`$")
_TYPE_PROBLEM = ("Expected ", "Invalid enum value ")
_ABSENT = object()


def explain(exc: msgspec.ValidationError, data: Mapping[str, Any], schema: Any) -> tuple[str, str]:
    """(key, problem) for msgspec's ``exc`` (``Expected `int`, got `str` - at `$.agent[0].instances```) raised
    converting ``data`` into ``schema``: the key as in TOML (``agent[0].instances``) and the problem in the words
    of :func:`expected` (``expected an integer ≥ 1, got "two"``)."""
    match = _AT.match(str(exc))
    assert match is not None  # every string matches: the path is optional
    text, path = match["text"], match["path"] or ""
    steps: list[Step] = []
    tp: Any = schema
    value: Any = data
    for m in _STEP.finditer(path):
        name, index = m.group(1), m.group(2)
        step: Step
        if index == "...":  # a key of a table of free keys: msgspec does not say which
            step = _failing_key(value, _item_type(tp, ""))
        elif index is not None:
            step = int(index)
        else:
            step = name
        steps.append(step)
        tp, value = _item_type(tp, step), _item(value, step)
    if found := _MISSING.match(text):
        steps.append(found["name"])
        return key_path(*steps), f"missing; expected {_describe(_item_type(tp, found['name']))}"
    if found := _UNKNOWN.match(text):
        steps.append(found["name"])
        known = ", ".join(_key(f.encode_name) for f in _struct_fields(tp))
        return key_path(*steps), f"unknown key; expected one of {known}"
    if text.startswith(_TYPE_PROBLEM):
        what = _describe(tp)
        return key_path(*steps), f"expected {what}" if value is _ABSENT else expected(what, value)
    return key_path(*steps), text  # a ValueError of a struct's __post_init__: its own words


def _failing_key(table: Any, value_type: Any) -> Step:
    """The first key of ``table`` whose value does not convert to ``value_type`` (msgspec stops at the first)."""
    if isinstance(table, Mapping):
        for key, value in table.items():
            try:
                msgspec.convert(value, value_type)
            except msgspec.ValidationError:
                return str(key)
    return "..."


def _item(value: Any, step: Step) -> Any:
    """``value[step]`` of the raw data, or :data:`_ABSENT`."""
    if isinstance(step, int):
        ok = isinstance(value, Sequence) and not isinstance(value, str) and 0 <= step < len(value)
        return value[step] if ok else _ABSENT
    return value.get(step, _ABSENT) if isinstance(value, Mapping) else _ABSENT


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name, ensure_ascii=False)


# ------------------------------------------------------------------------------------------------ schema types
def _unwrap(tp: Any) -> tuple[Any, list[msgspec.Meta]]:
    """The type under ``Annotated`` and ``X | None`` (TOML has no null), and the Metas met on the way."""
    metas: list[msgspec.Meta] = []
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp, *extras = get_args(tp)
            metas += [m for m in extras if isinstance(m, msgspec.Meta)]
        elif origin in (Union, types.UnionType) and len(arms := [a for a in get_args(tp) if a is not type(None)]) == 1:
            tp = arms[0]
        else:
            return tp, metas


def _struct_fields(tp: Any) -> tuple[msgspec.structs.FieldInfo, ...]:
    core, _ = _unwrap(tp)
    return msgspec.structs.fields(core) if isinstance(core, type) and issubclass(core, msgspec.Struct) else ()


def _item_type(tp: Any, step: Step) -> Any:
    """The type at ``step`` (a field, an array index, a free key) inside ``tp``; ``None`` when unknown."""
    if fields := _struct_fields(tp):
        if isinstance(step, int):  # an array_like struct
            return fields[step].type if step < len(fields) else None
        return next((f.type for f in fields if f.encode_name == step), None)
    core, _ = _unwrap(tp)
    origin, args = get_origin(core), get_args(core)
    if origin in (dict, Mapping) and len(args) == 2:
        return args[1]
    if origin is tuple and isinstance(step, int) and args and args[-1] is not Ellipsis:
        return args[step] if step < len(args) else None
    if origin in (list, tuple, set, frozenset, Sequence) and args:
        return args[0]
    return None


_WORDS: dict[type, tuple[str, str]] = {
    bool: ("a boolean", "booleans"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
}
_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


def _describe(tp: Any) -> str:
    """What a value of type ``tp`` must be, in words: its description if it has one, else its type and bounds."""
    if tp is None:
        return "a valid value"
    core, metas = _unwrap(tp)
    description = next((m.description for m in metas if m.description), None)
    if description:
        return description
    one, _ = _words(core)
    bounds = [f"{sign} {getattr(m, name):g}" for m in metas for name, sign in _BOUNDS if getattr(m, name) is not None]
    unit = "characters" if core is str else "items"
    if any(m.min_length == 1 for m in metas):
        one = "a non-empty " + one.split(" ", 1)[1]  # "a string" → "a non-empty string"
    bounds += [f"of at least {m.min_length} {unit}" for m in metas if m.min_length not in (None, 1)]
    bounds += [f"of at most {m.max_length} {unit}" for m in metas if m.max_length is not None]
    return " ".join([one, " and ".join(bounds)]) if bounds else one


def _words(core: Any) -> tuple[str, str]:
    """(singular, plural) words for a bare type: ``int`` → ("an integer", "integers")."""
    if core in _WORDS:
        return _WORDS[core]
    origin, args = get_origin(core), get_args(core)
    if origin is Literal:
        return f"one of {toml_repr(list(args))}", f"values among {toml_repr(list(args))}"
    if origin in (Union, types.UnionType):
        pairs = [_words(_unwrap(a)[0]) for a in args if a is not type(None)]
        return " or ".join(p[0] for p in pairs), " or ".join(p[1] for p in pairs)
    if fields := _struct_fields(core):
        if core.__struct_config__.array_like:
            return f"an array of {len(fields)} items", f"arrays of {len(fields)} items"
        return "a table", "tables"
    if origin in (dict, Mapping) and len(args) == 2:
        return f"a table of {_words(_unwrap(args[1])[0])[1]}", "tables"
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"an array of {len(args)} items", f"arrays of {len(args)} items"
    if origin in (list, tuple, set, frozenset, Sequence) and args:
        return f"an array of {_words(_unwrap(args[0])[0])[1]}", "arrays"
    return f"a {getattr(core, '__name__', core)}", f"{getattr(core, '__name__', core)} values"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(str(k))} = {_toml(v)}" for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)  # numbers (inf and nan as TOML writes them), dates
