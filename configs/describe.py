"""Every config key with its default and meaning, read from the dataclasses themselves (`train.py --help`).

A field's meaning is its comment in the source: the comment at the end of its line, after the comment
lines right above it. Fields a subclass redefines without a comment keep their base class's.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize


def field_comments(cls) -> dict[str, str]:
    """{field name: its comment} over cls and its dataclass bases (the nearest definition wins)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or "__dataclass_fields__" not in vars(klass):
            continue
        for name, text in _own_comments(klass).items():
            if text or name not in comments:
                comments[name] = text
    return comments


def _own_comments(klass) -> dict[str, str]:
    names = set(vars(klass).get("__annotations__", {}))
    source = inspect.getsource(klass)
    out, above, line_of = {}, [], {}
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.COMMENT:
            prev = tokens[i - 1] if i else None
            trailing = prev is not None and prev.start[0] == tok.start[0] and prev.type != tokenize.INDENT
            text = tok.string.lstrip("#").strip()
            if trailing and prev.start[0] in line_of:
                name = line_of[prev.start[0]]
                out[name] = " ".join(filter(None, (text, out.get(name, ""))))  # its own line's comment first
            elif not trailing:
                above.append(text)
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names and \
                tokens[i + 1].string == ":" and tok.start[0] not in line_of:
            line_of[tok.start[0]] = tok.string
            out[tok.string] = " ".join(above)
            above = []
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT) \
                and tok.start[1] == 4:
            above = []  # a statement in between: the comments above belonged to it
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _show(value) -> str:
    """As it is typed on the command line."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def keys(cls, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default as YAML writes it, meaning) for every non-section field of `cls`, in order."""
    comments = field_comments(cls)
    return [(prefix + f.name, _show(_default(f)), comments.get(f.name, "")) for f in dataclasses.fields(cls)
            if not dataclasses.is_dataclass(_default(f))]


def config_help() -> str:
    """The text `train.py --help` ends with: every key of every section, per task."""
    from . import TASKS, LoggingConfig, RunConfig, TrainConfig

    def block(title: str, rows) -> list[str]:
        width = max(len(f"{k}={d}") for k, d, _ in rows)
        return [title, *(f"  {f'{k}={d}':<{width}}  {meaning}" for k, d, meaning in rows), ""]

    lines = ["config keys (section.key=default  meaning); override any of them as section.key=value:", ""]
    lines += block("top level:", keys(RunConfig))
    for task, (model_cls, data_cls) in TASKS.items():
        lines += block(f"model (task={task}):", keys(model_cls, "model."))
        lines += block(f"data (task={task}):", keys(data_cls, "data."))
    lines += block("train:", keys(TrainConfig, "train."))
    lines += block("logging:", keys(LoggingConfig, "logging."))
    return "\n".join(lines)
