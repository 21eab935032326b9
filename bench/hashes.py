"""What a checkpoint's content hashes cost: the candidate hashes over one file of a model's size.

    python -m bench.hashes                 # a 135M-parameter fp32 file (538 MB), SmolLM2-135M's size
    python -m bench.hashes --mb 2000

The file is random bytes written to a temp dir and read once before timing, so the numbers are
hashing over the page cache (what a resume right after a save sees), read in the 4 MiB chunks
trainer/checkpoint.py's `file_hash` uses. The checkpoint manifest uses xxh3-64, the fastest here.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
import zlib
from pathlib import Path

CHUNK = 1 << 22
SMOLLM2_135M_FP32_MB = 134_515_008 * 4 / 1e6  # parameters x 4 bytes


def _object(factory):
    def run(path: Path) -> str:
        h = factory()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h.hexdigest()
    return run


def _crc32(path: Path) -> str:
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def _read_only(path: Path) -> str:
    with open(path, "rb") as f:
        while f.read(CHUNK):
            pass
    return ""


def candidates() -> dict:
    import xxhash

    return {"read only": _read_only, "xxh3_64": _object(xxhash.xxh3_64), "crc32": _crc32,
            "sha256": _object(hashlib.sha256), "blake2b": _object(hashlib.blake2b)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=SMOLLM2_135M_FP32_MB, help="file size in MB (default: 135M fp32)")
    p.add_argument("--repeats", type=int, default=3, help="timings per hash; the best is reported")
    args = p.parse_args(argv)
    size = int(args.mb * 1e6)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.bin"
        with open(path, "wb") as f:
            for start in range(0, size, CHUNK):
                f.write(os.urandom(min(CHUNK, size - start)))
        _read_only(path)  # into the page cache
        print(f"| hash | seconds for {size / 1e6:.0f} MB | GB/s |\n|---|---|---|")
        for name, run in candidates().items():
            best = min(_timed(run, path) for _ in range(args.repeats))
            print(f"| {name} | {best:.3f} | {size / best / 1e9:.2f} |")
    return 0


def _timed(run, path: Path) -> float:
    t0 = time.perf_counter()
    run(path)
    return time.perf_counter() - t0


if __name__ == "__main__":
    raise SystemExit(main())
