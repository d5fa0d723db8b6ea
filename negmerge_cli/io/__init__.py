"""Reading and writing checkpoints. Knows formats and files, no merge math.

Readers stream element ranges of one tensor at a time (:func:`open_checkpoint`); the
writer streams tensors into an atomic single file or sharded folder
(:class:`OutputWriter`). :func:`load_state_dict` and :func:`save_state_dict` are the
whole-dict conveniences for small models (the training pipeline, tests).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from negmerge_cli.errors import CheckpointError, OutputError
from negmerge_cli.io.base import CheckpointReader, TensorInfo, file_identity
from negmerge_cli.io.dtypes import MERGEABLE, SAFETENSORS_DTYPES, TORCH_TO_SAFETENSORS
from negmerge_cli.io.open import detect_format, open_checkpoint, resolve_checkpoint
from negmerge_cli.io.writer import OutputWriter, SafetensorsWriter


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a whole checkpoint (any supported format) into memory, tensors in stored shape.

    Example:
        >>> state = load_state_dict("runs/0001/model.safetensors")  # doctest: +SKIP
    """
    with open_checkpoint(path) as reader:
        return {
            name: reader.read(name).clone().reshape(info.shape)
            for name, info in reader.tensors.items()
        }


def save_state_dict(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Write tensors to a safetensors file atomically (temp file, fsync, rename).

    Tensors that share storage are written as independent copies.

    Example:
        >>> save_state_dict(model.state_dict(), "model.safetensors")  # doctest: +SKIP
    """
    destination = Path(path)
    if destination.exists() and not force:
        raise OutputError(f"{destination}: already exists (use force=True to replace it)")
    if destination.is_dir():
        raise OutputError(f"{destination}: is a folder, not a file")
    if not destination.parent.is_dir():
        raise OutputError(f"{destination.parent}: output folder does not exist")
    infos = []
    for name, tensor in tensors.items():
        if tensor.dtype not in TORCH_TO_SAFETENSORS:
            raise CheckpointError(f"tensor {name!r}: dtype {tensor.dtype} cannot be saved")
        infos.append(TensorInfo(name, TORCH_TO_SAFETENSORS[tensor.dtype], tuple(tensor.shape)))
    writer = OutputWriter(destination, infos, dict(metadata) if metadata else None)
    try:
        for name, tensor in tensors.items():
            writer.write(name, tensor.detach().cpu())
        writer.finish()
        writer.commit()
    except BaseException:
        writer.discard()
        raise
    return destination


__all__ = [
    "MERGEABLE",
    "SAFETENSORS_DTYPES",
    "CheckpointReader",
    "OutputWriter",
    "SafetensorsWriter",
    "TensorInfo",
    "detect_format",
    "file_identity",
    "load_state_dict",
    "open_checkpoint",
    "resolve_checkpoint",
    "save_state_dict",
]
