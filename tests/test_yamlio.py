"""The strict YAML reader: YAML 1.2 core numbers, YAML 1.1 surprises refused with the file, line,
key and literal, duplicate keys, tags, alias bombs, and files that are not YAML text at all."""

from __future__ import annotations

import dataclasses
import math
import time
import tracemalloc

import pytest
import yaml

from agnostic_sam.errors import UsageError
from agnostic_sam.yamlio import MAX_BYTES, parse_yaml, read_yaml

SOURCE = "config file c.yaml"


def refused(text: str) -> str:
    with pytest.raises(UsageError) as info:
        parse_yaml(text, SOURCE)
    message = str(info.value)
    assert "\n" not in message and message.startswith(SOURCE)
    return message


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs": level k lists `width` aliases of level
    k-1, so `lr` is width**levels."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for k in range(1, levels):
        lines.append(f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * width)}]")
    lines.append(f"lr: *l{levels - 1}")
    return "\n".join(lines) + "\n"


# --- what is read, and how --------------------------------------------------------------------

@pytest.mark.parametrize(("literal", "value"), [
    ("1e-3", 1e-3), ("5E-4", 5e-4), ("1.0e+3", 1000.0), ("-3.5e2", -350.0), ("0.5", 0.5),
    (".5", 0.5), ("1.", 1.0), ("12", 12), ("-7", -7), ("+3", 3), ("0", 0), ("-0", 0),
    ("true", True), ("False", False), ("null", None), ("~", None), ("", None),
    ("2024-01-01", "2024-01-01"), ("inf", "inf"), ("sgd", "sgd"), ("'yes'", "yes"),
    ('"0x10"', "0x10"), ("!!str 017", "017"), ("!!float 1", 1.0), ("!!int 12", 12),
], ids=lambda v: repr(v) if isinstance(v, str) else None)
def test_scalars_read_by_the_yaml_1_2_core_schema(literal, value):
    got = parse_yaml(f"key: {literal}\n", SOURCE)["key"]
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("literal", ["+.inf", "-.inf", ".nan", ".NaN", ".Inf"])
def test_non_finite_floats_pass_as_floats_for_validation_to_refuse(literal):
    value = parse_yaml(f"lr: {literal}\n", SOURCE)["lr"]
    assert isinstance(value, float) and not math.isfinite(value)


def test_safe_dump_of_a_config_reads_back_unchanged():
    from agnostic_sam.train.config import TrainConfig, config_yaml

    cfg = dataclasses.replace(TrainConfig(), lr=1e-3, adam_eps=1e-8, model="0x10", dataset="yes",
                              data_dir="1:30", weights="017", out="runs/x")
    assert parse_yaml(config_yaml(cfg), SOURCE) == dataclasses.asdict(cfg)


def test_merge_keys_and_plain_aliases_still_work():
    text = "base: &b {lr: 0.1, epochs: 2}\nrun:\n  <<: *b\n  epochs: 3\nsame: *b\n"
    assert parse_yaml(text, SOURCE) == {"base": {"lr": 0.1, "epochs": 2},
                                        "run": {"lr": 0.1, "epochs": 3},
                                        "same": {"lr": 0.1, "epochs": 2}}


# --- YAML 1.1 surprises: refused with line, key and literal -------------------------------------

@pytest.mark.parametrize(("literal", "why"), [
    ("0x10", "hexadecimal"), ("-0x1F", "hexadecimal"), ("0o17", "octal"), ("0b101", "binary"),
    ("017", "leading zero"), ("00", "leading zero"), ("1_000", "'_'"), ("1_000.5", "'_'"),
    ("1:30", "base-60"), ("190:20:30", "base-60"), ("yes", "boolean"), ("no", "boolean"),
    ("on", "boolean"), ("Off", "boolean"), ("Y", "boolean"), ("!!int 0x10", "hexadecimal"),
    ("!!int 1.5", "not a plain int"),
    ("!!bool yes", "boolean"), ("!!float 1_0", "'_'"),
])
def test_yaml_1_1_surprises_are_refused_naming_line_key_and_literal(literal, why):
    message = refused(f"epochs: 2\nlr: {literal}\n")
    assert message.startswith(f"{SOURCE} line 2: key 'lr': ")
    assert literal.split()[-1] in message and why in message


def test_a_surprise_deep_in_the_document_names_its_path():
    message = refused("methods:\n  sam:\n    tune: [0.05, 0x10]\n")
    assert "line 3" in message and "'methods.sam.tune[1]'" in message and "0x10" in message


def test_a_surprising_key_is_refused_too():
    assert "yes" in refused("yes: 1\n")


# --- structure ------------------------------------------------------------------------------------

def test_duplicate_keys_are_refused_with_both_lines():
    message = refused("lr: 0.1\nepochs: 2\nlr: 0.2\n")
    assert message == f"{SOURCE} line 3: duplicate key 'lr' (first on line 1)"


@pytest.mark.parametrize("text", ["true: 1\nTrue: 2\n", "1: a\n+1: b\n", "a:\n  x: 1\n  x: 2\n"])
def test_keys_that_construct_equal_are_duplicates(text):
    assert "duplicate key" in refused(text)


def test_a_merge_may_be_overridden_without_being_a_duplicate():
    assert parse_yaml("b: &b {x: 1}\na:\n  <<: *b\n  x: 2\n", SOURCE)["a"] == {"x": 2}


@pytest.mark.parametrize("text", [
    "a: !!python/object/apply:os.system ['echo hi']\n", "a: !!python/name:os.system\n",
    "a: !custom 1\n", "a: !!binary aGVsbG8=\n", "a: !!timestamp 2020-01-01\n", "a: !!set {x}\n",
])
def test_tags_other_than_the_standard_ones_are_refused(text):
    message = refused(text)
    assert "line 1" in message and "tag" in message and "not allowed" in message


def test_an_alias_bomb_in_lr_is_refused_fast_and_small():
    text = alias_bomb(9, 9)  # 9**9 = 387 million strings if expanded
    tracemalloc.start()
    start = time.perf_counter()
    try:
        message = refused(text)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seconds < 1.0 and peak < 20 * 2**20
    assert "alias" in message and "lol" not in message and len(message) < 200


def test_many_alias_references_are_refused_before_measuring():
    text = "a: &a 1\nb: [" + ", ".join(["*a"] * 2000) + "]\n"
    assert "alias references" in refused(text)


def test_a_recursive_alias_is_refused():
    assert "contains it" in refused("a: &x [1, *x]\n")


@pytest.mark.parametrize(("text", "needle"), [
    ("a: [1, 2\n", "line 2 is not valid YAML"), ("a: b: c\n", "line 1 is not valid YAML"),
    ("a: 1\n---\nb: 2\n", "line 2 is not valid YAML"), ("a:\n\t- 1\n", "is not valid YAML"),
    ("[" * 3000 + "]" * 3000, "nested too deeply"), ("a: \x07\n", "not UTF-8 text"),
    ("{[1, 2]: x}\n", "keys must be scalars"), ("seed: " + "9" * 5000 + "\n", "5000 characters"),
])
def test_broken_yaml_names_the_line(text, needle):
    assert needle in refused(text)


# --- files ----------------------------------------------------------------------------------------

def test_read_yaml_returns_the_mapping_and_empty_is_empty(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("\ufeff# comment only\nlr: 1e-3\n")
    assert read_yaml(path) == {"lr": 1e-3}
    path.write_text("# nothing\n")
    assert read_yaml(path) == {}


@pytest.mark.parametrize(("content", "needle"), [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not UTF-8 text"),
    ("lr: 0.1 # caf\u00e9\n".encode("latin-1"), "is not UTF-8 text"),
    (b"lr: 0.1\n\x00\x00", "is not UTF-8 text"),
    (b"- 1\n- 2\n", "must hold a mapping of keys to values, got a list"),
    (b"just text\n", "must hold a mapping of keys to values, got a single str"),
    (b"lr: 1\nlr: 2\n", "line 2: duplicate key 'lr'"),
])
def test_read_yaml_names_the_file(tmp_path, content, needle):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(UsageError) as info:
        read_yaml(path)
    message = str(info.value)
    assert "\n" not in message and f"config file {path}" in message and needle in message


def test_what_names_the_role_of_the_file(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("x: 0x10\n")
    with pytest.raises(UsageError, match=rf"^reproduce config {path} line 1: key 'x'"):
        read_yaml(path, what="reproduce config")


def test_unreadable_and_oversized_files(tmp_path):
    with pytest.raises(UsageError, match="cannot read config file .*none.yaml"):
        read_yaml(tmp_path / "none.yaml")
    with pytest.raises(UsageError, match="cannot read config file"):
        read_yaml(tmp_path)  # a directory
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(MAX_BYTES + 10)
    with pytest.raises(UsageError, match="larger than"):
        read_yaml(big)


def test_pyyaml_itself_would_have_read_these_silently():
    # Why the module exists: the same texts under PyYAML's safe loader.
    assert yaml.safe_load("lr: 0x10\nb: yes\nc: 1:30\nd: 1e-3\n") == {
        "lr": 16, "b": True, "c": 90, "d": "1e-3"}
    assert yaml.safe_load("lr: 1\nlr: 2\n") == {"lr": 2}
