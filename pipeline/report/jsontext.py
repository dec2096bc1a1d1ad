"""pipeline.report.jsontext: the text of ``json.dumps(obj, indent=2)``, made faster.

With an ``indent`` the standard library encodes in pure Python, one generator step per token;
a GeoJSON of a large AOI (hundreds of thousands of coordinates, each on its own line) spent
about a third of its writing time there. :func:`dumps_indented` builds the same text with
string joins, and lists of plain floats (positions) in one join. Anything it does not handle
exactly as ``json`` does (a key that is not a string, NaN or infinity, an object ``json``
would refuse) makes it hand the whole object to ``json.dumps``, so the text, and the errors,
are always the standard library's.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring
from typing import Any

__all__ = ["dumps_indented"]

_INDENT = "  "
_NOT_FINITE = frozenset({"inf", "-inf", "nan"})


class _Unsupported(Exception):
    """An object this encoder leaves to ``json.dumps``."""


def dumps_indented(obj: Any) -> str:
    """``json.dumps(obj, ensure_ascii=False, allow_nan=False, indent=2)``, same text.

    Parameters
    ----------
    obj
        JSON-like data: dicts with string keys, lists, tuples, strings, numbers, booleans,
        None.

    Returns
    -------
    str
        The JSON text, without a final newline.

    Raises
    ------
    ValueError, TypeError
        As ``json.dumps`` raises them (NaN or infinity, an object JSON cannot hold).
    """
    parts: list[str] = []
    try:
        _encode(obj, 0, parts)
    except (_Unsupported, RecursionError):
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, indent=2)
    return "".join(parts)


def _encode(obj: Any, level: int, parts: list[str]) -> None:
    """Append the text of ``obj`` at nesting ``level`` (json's order of type checks)."""
    if isinstance(obj, str):
        parts.append(encode_basestring(obj))
    elif obj is None:
        parts.append("null")
    elif obj is True:
        parts.append("true")
    elif obj is False:
        parts.append("false")
    elif isinstance(obj, int):
        parts.append(int.__repr__(obj))
    elif isinstance(obj, float):
        parts.append(_float(obj))
    elif isinstance(obj, list | tuple):
        _encode_list(obj, level, parts)
    elif isinstance(obj, dict):
        _encode_dict(obj, level, parts)
    else:
        raise _Unsupported


def _float(value: float) -> str:
    """``float.__repr__``; NaN and infinity are left to json (which refuses them)."""
    text = float.__repr__(value)
    if text in _NOT_FINITE:
        raise _Unsupported
    return text


def _encode_list(items: list[Any] | tuple[Any, ...], level: int, parts: list[str]) -> None:
    """A list: one item per line, one level deeper; ``[]`` when empty."""
    if not items:
        parts.append("[]")
        return
    inner = "\n" + _INDENT * (level + 1)
    if all(type(v) is list and len(v) == 2 and type(v[0]) is float and type(v[1]) is float
           for v in items):  # a line or ring of [x, y] positions: one join
        deeper = "\n" + _INDENT * (level + 2)
        numbers = [_float(c) for v in items for c in v]
        between = inner + "]," + inner + "[" + deeper
        pairs = zip(numbers[0::2], numbers[1::2], strict=True)
        parts.append("[" + inner + "[" + deeper
                     + between.join(x + "," + deeper + y for x, y in pairs)
                     + inner + "]\n" + _INDENT * level + "]")
        return
    if all(type(v) is float for v in items):  # a position: one join
        parts.append("[" + inner + ("," + inner).join(map(_float, items))
                     + "\n" + _INDENT * level + "]")
        return
    parts.append("[" + inner)
    for k, value in enumerate(items):
        if k:
            parts.append("," + inner)
        _encode(value, level + 1, parts)
    parts.append("\n" + _INDENT * level + "]")


def _encode_dict(obj: dict[Any, Any], level: int, parts: list[str]) -> None:
    """An object: one ``"key": value`` per line, in insertion order; ``{}`` when empty."""
    if not obj:
        parts.append("{}")
        return
    inner = "\n" + _INDENT * (level + 1)
    parts.append("{" + inner)
    for k, (key, value) in enumerate(obj.items()):
        if not isinstance(key, str):
            raise _Unsupported  # json turns numbers, booleans and None into key strings
        if k:
            parts.append("," + inner)
        parts.append(encode_basestring(key) + ": ")
        _encode(value, level + 1, parts)
    parts.append("\n" + _INDENT * level + "}")
