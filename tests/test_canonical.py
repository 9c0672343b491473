"""canonical.py: the bytes a signature covers depend on the value only, never on the JSON text that carried it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from canonical import MAX_DEPTH, MAX_SAFE_INTEGER, canonical_json, loads, signed_body

ROOT = Path(__file__).resolve().parent.parent
TRANSACTION = {"user_id": "xxxxx", "ipfs_hash": "QmbWxSqxhZms74885xceSaiHVvdjqiVWrATtYUrrUnVE1K", "EHR_name": "MRI",
               "id": "0123456789abcdef0123456789abcdef", "file_size": "63795", "node_id": "a" * 52}
# Fixed expected bytes: if this changes, every signature ever made stops verifying.
TRANSACTION_BYTES = (b'{"EHR_name":"MRI","file_size":"63795","id":"0123456789abcdef0123456789abcdef",'
                     b'"ipfs_hash":"QmbWxSqxhZms74885xceSaiHVvdjqiVWrATtYUrrUnVE1K",'
                     b'"node_id":"' + b"a" * 52 + b'","user_id":"xxxxx"}')


def test_known_bytes_sorted_keys_no_whitespace() -> None:
    assert canonical_json(TRANSACTION) == TRANSACTION_BYTES
    assert canonical_json({"b": [3, -1, 0, True, False, None], "a": {"d": "", "c": {}}}) == \
        b'{"a":{"c":{},"d":""},"b":[3,-1,0,true,false,null]}'


def test_utf8_literal_and_only_the_json_escapes() -> None:
    value = {"name": "Zoë 😀 \u2028 \x7f", "ctl": "a\"b\\c\n\t\x00\x1f"}
    assert canonical_json(value) == ('{"ctl":"a\\"b\\\\c\\n\\t\\u0000\\u001f","name":"Zoë 😀 \u2028 \x7f"}'
                                     ).encode("utf-8")


def test_the_text_received_does_not_change_the_bytes() -> None:
    texts = [
        '{"user_id":"Zoë","size":42,"nested":{"b":1,"a":[1,2]}}',
        '{ "nested" : { "a" : [ 1 , 2 ] , "b" : 1 } ,\n\t"size" : 42 , "user_id" : "Zo\\u00eb" }',  # order, space, escape
        '{"size":42,"user_id":"Zo\\u00EB","nested":{"a":[1,2],"b":1}}',  # upper-case escape
        '{"size":\t42\r\n,"user_id":"Z\\u006f\\u00eb","nested":{"a":[1,2],"b":1}}',
    ]
    assert len({canonical_json(json.loads(text)) for text in texts}) == 1
    assert len({canonical_json(loads(text)) for text in texts}) == 1


def test_unicode_is_not_normalized() -> None:
    composed, decomposed = "Jos\u00e9", "Jose\u0301"
    assert composed != decomposed and canonical_json(composed) != canonical_json(decomposed)
    assert canonical_json(json.loads('"Jos\\u00e9"')) == canonical_json(json.loads('"José"')) == canonical_json(composed)


def test_integer_formatting_of_the_text_does_not_matter_but_floats_are_refused() -> None:
    assert canonical_json(json.loads('{"n": 7}')) == canonical_json(json.loads('{"n":7 }')) == b'{"n":7}'
    assert canonical_json(json.loads("-0")) == canonical_json(0) == b"0"
    with pytest.raises(ValueError, match=r"\$\.n: 7\.0 is a float"):
        canonical_json(json.loads('{"n": 7.0}'))
    with pytest.raises(ValueError, match="7e0 is not an integer"):
        loads('{"n": 7e0}')


@pytest.mark.parametrize("value, problem", [
    (1.5, r"\$: 1\.5 is a float"),
    (float("nan"), "nan is a float"),
    (float("inf"), "inf is a float"),
    ({"a": [{"b": 0.1}]}, r"\$\.a\[0\]\.b: 0\.1 is a float"),
    ({1: "x"}, "the key 1 is not a string"),
    ({("a",): "x"}, "is not a string"),
    ({"k": "\ud800"}, r"\$\.k: contains a lone surrogate \(U\+D800\)"),
    ({"\udfff": 1}, r"key .*lone surrogate \(U\+DFFF\)"),
    (MAX_SAFE_INTEGER + 1, "outside"),
    (-MAX_SAFE_INTEGER - 1, "outside"),
    (b"bytes", "a bytes is not a JSON value"),
    ({"s": {1, 2}}, r"\$\.s: a set is not a JSON value"),
])
def test_values_without_one_byte_form_are_refused_naming_the_problem(value, problem) -> None:
    with pytest.raises(ValueError, match=problem):
        canonical_json(value)


def test_limits_that_are_accepted() -> None:
    assert canonical_json([MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER]) == b"[9007199254740991,-9007199254740991]"
    deep: object = 1
    for _ in range(MAX_DEPTH):
        deep = [deep]
    assert canonical_json(deep) == b"[" * MAX_DEPTH + b"1" + b"]" * MAX_DEPTH
    with pytest.raises(ValueError, match="nested deeper"):
        canonical_json([deep])


def test_strict_parsing_refuses_what_two_parsers_could_read_differently() -> None:
    with pytest.raises(ValueError, match="'a' appears twice"):
        loads('{"a": 1, "a": 2}')
    for text in ('{"a": NaN}', '{"a": Infinity}', '{"a": -Infinity}', '[1.0]'):
        with pytest.raises(ValueError):
            loads(text)
    assert loads(b'{"a": [1, "\\u00e9"]}') == {"a": [1, "é"]}


def test_signed_body_leaves_out_the_signature_field_only() -> None:
    signed = {**TRANSACTION, "signature": "whatever"}
    assert signed_body(signed) == TRANSACTION_BYTES
    assert signed_body({"sig": "x", "a": 1}, field="sig") == b'{"a":1}'
    assert signed_body(TRANSACTION) == TRANSACTION_BYTES  # nothing to leave out
    with pytest.raises(ValueError, match="JSON object"):
        signed_body(["signature"])


@pytest.mark.process
def test_same_bytes_in_another_process() -> None:
    """Nothing in the form depends on the run (hash seeds, insertion order)."""
    script = ("import sys, canonical, json; "
              "sys.stdout.buffer.write(canonical.canonical_json(json.loads(sys.argv[1])))")
    shuffled = json.dumps(dict(reversed(list(TRANSACTION.items()))))
    outputs = {subprocess.run([sys.executable, "-c", script, shuffled], cwd=ROOT, capture_output=True, check=True,
                              env={"PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outputs == {TRANSACTION_BYTES}
