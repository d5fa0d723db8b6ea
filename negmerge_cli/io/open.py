"""Open any supported checkpoint; the format comes from the leading bytes, not the name."""

from __future__ import annotations

import os
from pathlib import Path

from negmerge_cli.errors import CheckpointError
from negmerge_cli.io.base import CheckpointReader
from negmerge_cli.io.safetensors_reader import SafetensorsReader
from negmerge_cli.io.sharded import ShardedReader
from negmerge_cli.io.torch_reader import TorchReader

FOLDER_CANDIDATES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def detect_format(path: Path) -> str:
    """``safetensors``, ``torch-zip``, ``torch-pickle`` or ``index`` from the first bytes."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open: {exc.strerror}") from None
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    # Before the pickle test: a safetensors header of 0x380 bytes starts with 80 03, as a
    # protocol-3 pickle does. A pickle's ninth byte is never "{" (torch's legacy files have
    # their magic number there, protocol-4 pickles the high bytes of a frame length).
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch-pickle"
    if head.lstrip().startswith(b"{"):
        return "index"
    if len(head) < 8:
        return "safetensors"  # let the safetensors reader say "empty or too short"
    raise CheckpointError(
        f"{path}: not a safetensors, PyTorch or index file (starts with {head[:8]!r})"
    )


def _open_file(path: Path) -> CheckpointReader:
    kind = detect_format(path)
    if kind == "safetensors":
        return SafetensorsReader(path)
    if kind == "index":
        return ShardedReader(path, _open_shard)
    return TorchReader(path)


def _open_shard(path: Path) -> CheckpointReader:
    if detect_format(path) == "index":
        raise CheckpointError(f"{path}: a shard cannot itself be an index")
    return _open_file(path)


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A file as given, or the checkpoint file inside a Hugging Face model folder."""
    path = Path(path)
    if path.is_dir():
        for name in FOLDER_CANDIDATES:
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise CheckpointError(
            f"{path}: folder holds no model.safetensors, *.index.json or pytorch_model.bin"
            if not found
            else f"{path}: folder holds {len(found)} .safetensors files and no index; name one"
        )
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    return path


def open_checkpoint(path: str | os.PathLike[str]) -> CheckpointReader:
    """Open a safetensors file, sharded index, HF folder or weights-only PyTorch file."""
    return _open_file(resolve_checkpoint(path))
