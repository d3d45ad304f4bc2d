"""THE strict YAML reader of the project: every config file (train, compare, reproduce) goes here.

PyYAML reads YAML 1.1, whose plain scalars hold surprises for a config file: `0x10`, `0o17` and
`017` are integers 16, 15 and 15, `1_000` is 1000, `1:30` is the base-60 number 90, `yes`/`no`/
`on`/`off` are booleans, and `1e-3` (an exponent without a dot) is the *string* "1e-3". This
reader resolves plain scalars by the YAML 1.2 core schema instead (so `1e-3` is a float) and
refuses, with the file, the line, the key and the literal, every plain scalar that YAML 1.1 and
1.2 read differently or that reads as a number only by accident of the version. Quoting a value
always makes it a string, so every refusal has a one-character way out.

It also refuses what a safe loader lets through but a config never needs:

* duplicate keys in one mapping (YAML 1.1 keeps the last silently);
* tags other than the standard ones (`!!str`, `!!int`, `!!float`, `!!bool`, `!!null`, `!!seq`,
  `!!map`, `!!merge`), and `!!int`/`!!float`/`!!bool`/`!!null` on a literal that is not one;
* documents whose alias references would expand past :data:`MAX_NODES` nodes (a "billion
  laughs" alias bomb) or refer to themselves. The size is counted on the composed node graph,
  each shared node once, before anything is constructed or formatted;
* files over :data:`MAX_BYTES`, non-UTF-8 or binary files, several documents in one file.

Every error is a :class:`~agnostic_sam.errors.UsageError` whose message is one line naming the
file (``source``); values shown are the literal text of one scalar, cut to 40 characters.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.nodes import Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

from agnostic_sam.errors import UsageError

__all__ = ["MAX_BYTES", "MAX_NODES", "parse_yaml", "read_yaml"]

MAX_BYTES = 4 * 2**20  # a config file is a few KiB; this bounds what a wrong path can cost
MAX_NODES = 100_000  # nodes after alias expansion; the largest shipped config has 181
MAX_ALIASES = 1_000  # alias references in one document
MAX_NUMBER_CHARS = 100  # no setting needs more digits; Python refuses ints of > 4300 anyway

_TAG = "tag:yaml.org,2002:"
_NULL, _BOOL, _INT, _FLOAT, _STR = (_TAG + t for t in ("null", "bool", "int", "float", "str"))
_SEQ, _MAP, _MERGE = _TAG + "seq", _TAG + "map", _TAG + "merge"
# A plain scalar YAML 1.1 reads as something a reader of the file would not expect.
_AMBIGUOUS = "tag:agnostic-sam,2026:ambiguous"
ALLOWED_TAGS = frozenset({_NULL, _BOOL, _INT, _FLOAT, _STR, _SEQ, _MAP, _MERGE})

# YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution), decimal integers only.
_CORE = [
    (_NULL, re.compile(r"^(?:~|null|Null|NULL|)$")),
    (_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")),
    (_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$")),
    (_FLOAT, re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
                           |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X)),
    (_MERGE, re.compile(r"^<<$")),
]

# Plain scalars YAML 1.1 reads as a number or a boolean where YAML 1.2 reads a string (or another
# number): (pattern, why), the first match names the reason in the error.
_SURPRISES = [
    (re.compile(r"^(?:y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF)$"),
     "read as a boolean by YAML 1.1; write true or false (or quote it for text)"),
    (re.compile(r"^[-+]?0[xX][0-9a-fA-F_]*$"),
     "a hexadecimal literal; write the number in decimal (or quote it for text)"),
    (re.compile(r"^[-+]?0[oO][0-7_]*$"),
     "an octal literal; write the number in decimal (or quote it for text)"),
    (re.compile(r"^[-+]?0[bB][01_]*$"),
     "a binary literal; write the number in decimal (or quote it for text)"),
    (re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$"),
     "a base-60 number to YAML 1.1 (1:30 is 90); quote it for text"),
    (re.compile(r"^[-+]?(?=[0-9._]*_)[0-9_]*\.?[0-9_]*(?:[eE][-+]?[0-9_]+)?$"),
     "a number with digit separators '_'; write the digits alone"),
    (re.compile(r"^[-+]?0[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?$"),
     "a number with a leading zero (octal to YAML 1.1); drop the zero (or quote it for text)"),
]


def _surprise(value: str) -> str | None:
    """Why a plain scalar is refused, or None when YAML 1.1 and 1.2 read it the same way."""
    if value in ("0", "+0", "-0"):
        return None
    return next((why for pattern, why in _SURPRISES if pattern.match(value)), None)


class _Resolver(BaseResolver):
    """YAML 1.2 core resolution of plain scalars, with YAML 1.1 look-alikes marked ambiguous."""

    yaml_implicit_resolvers: dict = {}  # own table, not BaseResolver's

    def resolve(self, kind: type, value: Any, implicit: tuple[bool, bool]) -> str:
        if kind is ScalarNode and implicit[0]:
            if _surprise(value) is not None:
                return _AMBIGUOUS
            for tag, pattern in _CORE:
                if pattern.match(value):
                    return tag
        return super().resolve(kind, value, implicit)


class _Composer(Composer):
    """Counts alias references while composing, so an alias bomb stops before it is measured."""

    def compose_document(self) -> Node | None:
        self.alias_count = 0
        return super().compose_document()

    # check_event and peek_event come from yaml's Parser, which _Loader mixes in.
    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(yaml.AliasEvent):  # type: ignore[attr-defined]
            self.alias_count += 1
            if self.alias_count > MAX_ALIASES:
                mark = self.peek_event().start_mark  # type: ignore[attr-defined]
                raise _Refused(mark.line + 1, f"more than {MAX_ALIASES} alias references (*name)")
        return super().compose_node(parent, index)

    # (the stubs type `anchor` as a dict; yaml passes the anchor's name or None)
    def compose_scalar_node(self, anchor: Any) -> ScalarNode:
        tag = self.peek_event().tag  # type: ignore[attr-defined]
        node = super().compose_scalar_node(anchor)
        # `!!int 5`: checked against the literal (an attribute of our own on yaml's node)
        node.explicit_tag = tag not in (None, "!")  # type: ignore[attr-defined]
        return node


class _Loader(Reader, Scanner, Parser, _Composer, SafeConstructor, _Resolver):
    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        _Composer.__init__(self)
        SafeConstructor.__init__(self)
        _Resolver.__init__(self)


class _Refused(Exception):
    """A rule of this module broken at `line` (1-based); turned
    into a UsageError naming the file."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _where(path: tuple[str, ...]) -> str:
    """`key 'methods.sam.tune[1]'` for a value's place in the document."""
    out = ""
    for part in path:
        out += part if part.startswith("[") else (f".{part}" if out else part)
    return f"key {_short(out, 60)!r}" if out else "the top level"


def _tag_text(tag: str) -> str:
    return _short("!!" + tag[len(_TAG):] if tag.startswith(_TAG) else tag)


def _check(root: Node) -> None:
    """Walk the composed node graph once per node: sizes (with aliases expanded, counted without
    expanding), cycles, tags, ambiguous literals, duplicate and non-scalar keys."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def visit(node: Node, path: tuple[str, ...]) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        line = node.start_mark.line + 1
        if key in active:
            raise _Refused(line, f"an alias at {_where(path)} refers to a node that contains it")
        if node.tag not in ALLOWED_TAGS and node.tag != _AMBIGUOUS:
            raise _Refused(line, f"tag {_tag_text(node.tag)} at {_where(path)} is not allowed "
                                 "(only the standard tags: !!str, !!int, !!float, !!bool, !!null)")
        size = 1
        if isinstance(node, ScalarNode):
            _check_scalar(node, path, line)
        else:
            active.add(key)
            if isinstance(node, SequenceNode):
                for i, item in enumerate(node.value):
                    size += visit(item, (*path, f"[{i}]"))
            else:
                seen: dict[tuple[str, Any], int] = {}
                for k, v in node.value:
                    if not isinstance(k, ScalarNode):
                        raise _Refused(k.start_mark.line + 1,
                                       f"a key under {_where(path)} is a list or mapping; keys "
                                       "must be scalars")
                    _check_scalar(k, path, k.start_mark.line + 1)
                    name = _short(k.value)
                    same = _key_identity(k)
                    if k.tag != _MERGE:
                        if same in seen:
                            raise _Refused(k.start_mark.line + 1,
                                           f"duplicate key {name!r} (first on line {seen[same]})")
                        seen[same] = k.start_mark.line + 1
                    size += 1 + visit(v, (*path, name))
            active.discard(key)
        if size > MAX_NODES:
            raise _Refused(line, f"{_where(path)} expands to more than {MAX_NODES} nodes "
                                 "through aliases (an alias bomb?)")
        sizes[key] = size
        return size

    visit(root, ())


def _key_identity(key: ScalarNode) -> tuple[str, Any]:
    """Equal for two key literals that construct equal keys (`True`/`true`, `1`/`+1`)."""
    if key.tag in (_BOOL, _NULL):
        return key.tag, key.value.lower()
    if key.tag == _INT and _CORE[2][1].match(key.value):
        return key.tag, int(key.value)
    return key.tag, key.value


def _check_scalar(node: ScalarNode, path: tuple[str, ...], line: int) -> None:
    where = _where(path)
    if node.tag == _AMBIGUOUS:
        raise _Refused(line, f"{where}: {_short(node.value)} is {_surprise(node.value)}")
    if node.tag in (_INT, _FLOAT) and len(node.value) > MAX_NUMBER_CHARS:
        raise _Refused(line, f"{where}: a number of {len(node.value)} characters "
                             f"(at most {MAX_NUMBER_CHARS})")
    if node.tag in (_NULL, _BOOL, _INT, _FLOAT) and getattr(node, "explicit_tag", False):
        # An explicit !!int / !!float / !!bool / !!null: the literal must be one by the core schema.
        why = _surprise(node.value)
        if why is not None:
            raise _Refused(line, f"{where}: {_short(node.value)} is {why}")
        tag = next((t for t, p in _CORE if p.match(node.value)), None)
        if tag != node.tag and not (node.tag == _FLOAT and tag == _INT):
            name = node.tag[len(_TAG):]
            raise _Refused(line, f"{where}: {_short(node.value)!r} is not a plain {name} literal")


def parse_yaml(text: str, source: str) -> Any:
    """The one document in `text` (None when empty), by the rules in the module docstring.

    `source` names the text in errors (a file name, "the saved config", ...).
    """
    loader = None
    try:
        loader = _Loader(text)  # checks for non-printable characters up front
        node = loader.get_single_node()
        if node is None:
            return None
        _check(node)
        return loader.construct_document(node)
    except _Refused as exc:
        raise UsageError(f"{source} line {exc.line}: {exc}") from None
    except RecursionError:
        raise UsageError(f"{source} is nested too deeply to be a config") from None
    except yaml.reader.ReaderError as exc:
        raise UsageError(f"{source} is not UTF-8 text (control character #x{exc.character:04x} "
                         f"at character {exc.position})") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = (exc.problem or exc.context or "syntax error").strip()
        raise UsageError(f"{source}{where} is not valid YAML: {_short(problem, 80)}") from None
    except yaml.YAMLError as exc:  # pragma: no cover - PyYAML raises marked errors above
        raise UsageError(f"{source} is not valid YAML: "
                         f"{_short(str(exc).splitlines()[0], 80)}") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: str | Path, *, what: str = "config file") -> dict[str, Any]:
    """The mapping in the YAML file at `path` ({} for an empty file); UsageError otherwise.

    `what` names the file's role in every message: "config file X line 3: ...".
    """
    path = Path(path)
    source = f"{what} {path}"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise UsageError(f"{source} is larger than {MAX_BYTES // 2**20} MiB; not a config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{source} is not UTF-8 text (byte {exc.start})") from None
    if "\x00" in text:
        raise UsageError(f"{source} is not UTF-8 text (a NUL byte at character "
                         f"{text.index(chr(0))})")
    value = parse_yaml(text.removeprefix("\ufeff"), source)
    if value is None:
        return {}
    if not isinstance(value, dict):
        kind = "a list" if isinstance(value, list) else f"a single {type(value).__name__}"
        raise UsageError(f"{source} must hold a mapping of keys to values, got {kind}")
    return value
