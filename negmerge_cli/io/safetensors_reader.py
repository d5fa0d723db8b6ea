"""A strict safetensors reader that validates the header itself and reads with pread.

Why not ``safetensors.safe_open``: it silently keeps the last of two duplicate keys, and
its memory map turns a file truncated during a merge into SIGBUS (exit 135, no clean-up).
``os.preadv`` instead returns a short read, which becomes a clear error, and reads straight
into the buffer the merge computes in.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from negmerge_cli.errors import CheckpointError
from negmerge_cli.io.base import CheckpointReader, TensorInfo
from negmerge_cli.io.dtypes import SAFETENSORS_DTYPES

MAX_HEADER_BYTES = 100_000_000
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: a key given twice is an error, not "the last one wins"."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_header(raw: bytes, data_size: int, where: str) -> tuple[dict[str, tuple], dict]:
    """Validate a header; returns ``{name: (dtype, shape, begin, end)}`` and the metadata.

    Checks every rule of the format: known dtypes, sizes that match shapes, offsets that
    tile the data section exactly (no gaps, overlaps, aliases or trailing bytes).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{where}: header is not UTF-8") from None
    try:
        header = json.loads(text, object_pairs_hook=reject_duplicate_keys)
    except ValueError as exc:
        raise CheckpointError(f"{where}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings")

    entries: dict[str, tuple] = {}
    for name, entry in header.items():
        at = f"{where}: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
            raise CheckpointError(f"{at}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            known = ", ".join(SAFETENSORS_DTYPES)
            raise CheckpointError(f"{at}: unsupported dtype {dtype!r} (known: {known})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{at}: shape {shape!r} is not a list of sizes")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(f"{at}: data_offsets {offsets!r} are not [begin, end]")
        info = TensorInfo(name, dtype, tuple(shape))
        if offsets[1] - offsets[0] != info.nbytes:
            raise CheckpointError(
                f"{at}: data_offsets span {offsets[1] - offsets[0]} bytes, "
                f"but {dtype} {list(shape)} needs {info.nbytes}"
            )
        entries[name] = (dtype, tuple(shape), offsets[0], offsets[1])

    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != position:
            kind = "overlaps another tensor" if begin < position else "leaves a gap before it"
            raise CheckpointError(f"{where}: tensor {name!r} {kind} (offset {begin})")
        position = end
    if position > data_size:
        raise CheckpointError(
            f"{where}: data section is truncated: header needs {position} bytes, "
            f"the file holds {data_size} (an unfinished download or copy?)"
        )
    if position < data_size:
        raise CheckpointError(
            f"{where}: {data_size - position} unexpected bytes after the last tensor"
        )
    return entries, metadata


class SafetensorsReader(CheckpointReader):
    """One ``.safetensors`` file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        where = str(self.path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"{where}: cannot open: {exc.strerror}") from None
        try:
            size = os.fstat(self._fd).st_size
            if size < 8:
                raise CheckpointError(
                    f"{where}: file is {'empty' if size == 0 else 'too short'} "
                    f"({size} bytes), not a safetensors file"
                )
            (header_len,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{where}: header length {header_len} exceeds the 100 MB limit"
                )
            if 8 + header_len > size:
                raise CheckpointError(
                    f"{where}: header length {header_len} is larger than the file ({size} bytes)"
                )
            raw = os.pread(self._fd, header_len, 8)
            self._data_start = 8 + header_len
            entries, self.metadata = parse_header(raw, size - self._data_start, where)
        except BaseException:
            os.close(self._fd)
            raise
        self._staging: torch.Tensor | None = None
        ordered = sorted(entries.items(), key=lambda kv: kv[1][2])
        self.tensors = {name: TensorInfo(name, e[0], e[1]) for name, e in ordered}
        self._offsets = {name: e[2] for name, e in ordered}

    def _pread_into(self, name: str, buffer: memoryview, offset: int) -> None:
        position = self._data_start + offset
        done = 0
        while done < len(buffer):
            count = os.preadv(self._fd, [buffer[done:]], position + done)
            if count == 0:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r}: file ended early "
                    "(truncated or replaced while being read)"
                )
            done += count

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        info = self.tensors[name]
        stop = info.numel if stop is None else stop
        dtype = SAFETENSORS_DTYPES[info.dtype]
        out = torch.empty(stop - start, dtype=dtype)
        self._read_range(name, start, out)
        return out

    def read_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        dtype = SAFETENSORS_DTYPES[self.tensors[name].dtype]
        if out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu":
            self._read_range(name, start, out)
            return out
        # Another dtype (bf16 stored, float32 wanted): read into a staging buffer that is
        # kept between calls, then convert; no allocation per chunk.
        count = out.numel()
        if self._staging is None or self._staging.dtype != dtype or self._staging.numel() < count:
            self._staging = torch.empty(count, dtype=dtype)
        staging = self._staging[:count]
        self._read_range(name, start, staging)
        out.copy_(staging.view(out.shape))
        return out

    def _read_range(self, name: str, start: int, out: torch.Tensor) -> None:
        if out.numel() == 0:
            return
        itemsize = out.element_size()
        raw = out.view(-1).view(torch.uint8)
        self._pread_into(name, memoryview(raw.numpy()), self._offsets[name] + start * itemsize)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
