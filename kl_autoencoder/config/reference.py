"""The configuration reference (docs/configuration.md), generated from the config dataclasses themselves.

    python -m kl_autoencoder.config.reference > docs/configuration.md

Every key of `TrainConfig` with its type, default and meaning. The meaning is the field's comment in
schema.py: the comment on its line and the comment lines right above it; a section's docstring introduces its
table. The test suite
regenerates the page and fails when it differs from the file, or when a key has no comment.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import sys
import tokenize
from typing import Any

from kl_autoencoder.config.schema import TrainConfig

HEADER = """# Configuration reference

Every key a training config (`configs/*.yaml`, `training/train.py --config FILE`, `kl-autoencoder distill`) takes,
generated from `kl_autoencoder/config/schema.py` by `python -m kl_autoencoder.config.reference > docs/configuration.md`.
Keys are set in the YAML file by section (`train:` then `max_steps: 20`) or on the command line as dotted overrides
(`train.max_steps=20`); unknown keys, wrong types and values out of range are refused when the config loads, naming
the key. `null` is Python's None: the meaning says what it stands for.
"""


def _comments_by_line(source: str) -> dict[int, str]:
    """1-based line number -> the text of the comment on it (tokenize: a '#' inside a string is no comment)."""
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    return comments


def field_comments(cls: type) -> dict[str, str]:
    """Each field of dataclass `cls` -> its comment: the comment lines right above it, then the one on its line."""
    source = inspect.getsource(cls)
    lines, comments = source.splitlines(), _comments_by_line(source)
    found = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign):
            continue
        above, line = [], node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        found[node.target.id] = " ".join(above + ([comments[node.lineno]] if node.lineno in comments else []))
    return found


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value) if isinstance(value, (list, dict, str)) else repr(value)


def _type_name(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return text.replace("Literal", "one of ").replace("typing.", "")


def sections(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, type, list[tuple[str, str, str, str]]]]:
    """(dotted section name, its class, rows of (key, type, default, meaning)) for `cls` and every nested section."""
    defaults, comments = cls(), field_comments(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            nested += sections(type(value), f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", _type_name(f.type), _yaml_value(value), comments.get(f.name, "")))
    return ([(prefix.rstrip("."), cls, rows)] if rows else []) + nested


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference() -> str:
    """The whole page, as docs/configuration.md holds it."""
    out = [HEADER]
    for name, cls, rows in sections():
        out.append(f"\n## `{name}`\n")
        doc = inspect.getdoc(cls)
        if doc and cls.__module__ == TrainConfig.__module__ and not doc.startswith(cls.__name__ + "("):
            out.append(" ".join(doc.split()) + "\n")
        out.append("| key | type | default | meaning |\n| --- | --- | --- | --- |")
        out += [f"| `{key}` | {_cell(kind)} | `{_cell(default)}` | {_cell(meaning)} |"
                for key, kind, default, meaning in rows]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
