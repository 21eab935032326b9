"""A local on-disk copy of a document stream, read back as often as needed in constant memory.

Preparing needs several passes over the corpus (count the documents to split them, train the
tokenizer, encode), and a hub dataset should be downloaded once, so the stream is written once
to a spool file: each document as an 8-byte little-endian length followed by its UTF-8 bytes.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

_LENGTH = struct.Struct("<Q")


def write_spool(documents: Iterable[str], path: Path, on_document=None) -> int:
    """Write every document to `path`; return how many there were."""
    n = 0
    with open(path, "wb") as f:
        for doc in documents:
            data = doc.encode("utf-8")
            f.write(_LENGTH.pack(len(data)))
            f.write(data)
            n += 1
            if on_document is not None:
                on_document()
    return n


def read_spool(path: Path) -> Iterator[str]:
    """The documents of a spool file, in the order they were written."""
    with open(path, "rb", buffering=1 << 20) as f:
        while header := f.read(_LENGTH.size):
            (size,) = _LENGTH.unpack(header)
            yield f.read(size).decode("utf-8")
