"""The one byte form of a JSON value that a signature covers.

A signer and a verifier never see the same JSON *text*: the object goes through json.dumps, an HTTP body,
json.loads, a file, a peer's own dumps. What they share is the *value*, so a signature covers
`canonical_json(value)`, bytes that depend on the value only:

- objects with their keys sorted by code point, no whitespace (separators "," and ":");
- strings as UTF-8, unescaped except for '"', '\\' and the control characters U+0000..U+001F
  (\\b \\f \\n \\r \\t, else \\u00xx in lowercase hex); everything else, U+2028 and U+007F included, literal;
- integers in plain decimal, within +-(2**53 - 1) so that every JSON implementation reads the same number;
- true, false, null; lists in their order.

Refused, with a ValueError naming where: floats (NaN and infinities too: "1.0" and "1" are one number to
one parser and two to another, so a float has no single byte form; send an integer or a string), object
keys that are not strings, lone surrogates (UTF-8 cannot encode them), values nested deeper than MAX_DEPTH.

Strings are not Unicode-normalized: "é" composed (U+00E9) and decomposed (U+0065 U+0301) are different
values with different signatures. A signature covers exactly the code points sent, so what a node stores,
shows and hashes is what its author signed; normalizing would make two different strings share one
signature, and a name that looks the same could stand for another record. The *text* escaping does not
matter: "\\u00e9" and "é" in a JSON text are one code point, so they give the same bytes.

For the values accepted, the bytes equal RFC 8785 (JCS) except in key order when keys in one object mix
characters above U+FFFF with ones in U+E000..U+FFFF (JCS sorts by UTF-16 code units).
"""
from __future__ import annotations

import json
from typing import Any

MAX_SAFE_INTEGER = 2**53 - 1
MAX_DEPTH = 64

_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")).encode


def canonical_json(value: Any) -> bytes:
    """The canonical UTF-8 bytes of a JSON value; ValueError naming the first part that has none."""
    _check(value, "$", 0)
    return _encode(value).encode("utf-8")


def signed_body(obj: dict[str, Any], field: str = "signature") -> bytes:
    """The bytes a signature stored in `obj[field]` covers: obj's canonical form without that field."""
    if not isinstance(obj, dict):
        raise ValueError(f"a signed object must be a JSON object, not {type(obj).__name__}")
    return canonical_json({key: value for key, value in obj.items() if key != field})


def loads(text: str | bytes) -> Any:
    """Parse JSON text strictly, for values that will be verified: a key twice in one object, a float or
    NaN/Infinity raises ValueError (json.loads would keep the last duplicate silently, and another parser
    might keep the first: one text, two values)."""
    return json.loads(text, object_pairs_hook=_unique_keys, parse_float=_no_float, parse_constant=_no_float)


def _check(value: Any, where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        _check_text(value, where)
    elif value is None or isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise ValueError(f"{where}: the integer {value} is outside +-(2**53 - 1); send it as a string")
    elif isinstance(value, float):
        raise ValueError(f"{where}: {value!r} is a float; only integers have one byte form "
                         "(send an integer, or a string)")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: the key {key!r} is not a string")
            _check_text(key, f"{where} key {key!r}")
            _check(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for position, item in enumerate(value):
            _check(item, f"{where}[{position}]", depth + 1)
    else:
        raise ValueError(f"{where}: a {type(value).__name__} is not a JSON value")


def _check_text(text: str, where: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where}: contains a lone surrogate (U+{ord(text[exc.start]):04X}) "
                         "that UTF-8 cannot encode") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice in one object")
        result[key] = value
    return result


def _no_float(text: str) -> Any:
    raise ValueError(f"{text} is not an integer; only integers have one byte form")
