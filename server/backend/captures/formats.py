"""Download encodings of a stored capture: safetensors (as stored), npz, json.

Each encoder takes an open handle on the stored safetensors file (which stays
readable even if the capture is deleted meanwhile) and returns the body as an
iterator of byte chunks plus its length.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

from ...core.storage import read_safetensors
from .store import CaptureRecord

CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough to stay responsive
MEDIA_TYPES = {
    "safetensors": "application/octet-stream",
    "npz": "application/x-npz",
    "json": "application/json",
}


def _chunks(f: BinaryIO, start: int = 0) -> Iterator[bytes]:
    with f:
        f.seek(start)
        while chunk := f.read(CHUNK):
            yield chunk


def download_name(record: CaptureRecord, fmt: str) -> str:
    """A safe file name: the capture's name (or id) reduced to [A-Za-z0-9._-], plus the format.

    >>> from datetime import datetime
    >>> rec = CaptureRecord("abc", "demo", "my run/1", datetime.now(), {}, 0, 0)
    >>> download_name(rec, "npz")
    'my_run_1.npz'
    """
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", record.name or "").strip("._") or record.id
    return f"{stem[:100]}.{fmt}"


def encode_safetensors(f: BinaryIO) -> tuple[Iterator[bytes], int]:
    """The stored file as is."""
    f.seek(0, 2)
    return _chunks(f), f.tell()


def encode_npz(f: BinaryIO) -> tuple[Iterator[bytes], int]:
    """An uncompressed ``np.savez`` archive of every tensor (spooled to disk when large)."""
    with f:
        arrays = dict(read_safetensors(f))
    out = tempfile.SpooledTemporaryFile(max_size=64 * CHUNK)  # noqa: SIM115 (_chunks closes)
    np.savez(out, **arrays)
    size = out.tell()
    return _chunks(out), size


def _jsonable(array: np.ndarray) -> Any:
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            array = array.astype(object)
            array[bad] = None
    return array.tolist()


def encode_json(f: BinaryIO, record: CaptureRecord) -> tuple[Iterator[bytes], int]:
    """``{"id", "run", "tensors": {name: {"shape", "dtype", "data"}}}``; non-finite -> null."""
    with f:
        tensors = {
            name: {"shape": list(a.shape), "dtype": str(a.dtype), "data": _jsonable(a)}
            for name, a in read_safetensors(f)
        }
    body = json.dumps({"id": record.id, "run": record.run, "tensors": tensors},
                      separators=(",", ":")).encode()
    return iter([body]), len(body)
