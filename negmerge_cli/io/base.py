"""What every checkpoint reader offers: a table of tensors and flat reads of element ranges."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from negmerge_cli.io.dtypes import SAFETENSORS_DTYPES


@dataclass(frozen=True)
class TensorInfo:
    """Name, safetensors dtype and shape of one stored tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * SAFETENSORS_DTYPES[self.dtype].itemsize


class CheckpointReader:
    """A checkpoint opened for streaming: ``tensors`` in storage order and ranged reads.

    ``read(name, start, stop)`` returns elements ``[start, stop)`` of the flattened tensor
    in its stored dtype. Subclasses also list the files they read (``files``) so that the
    engine can refuse an output that is one of them and notice one that changed.
    """

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def read_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Read ``out.numel()`` elements from ``start`` into ``out`` when dtypes allow;
        returns the tensor holding the data (``out`` or a fresh one)."""
        data = self.read(name, start, start + out.numel())
        out.copy_(data)
        return out

    @property
    def files(self) -> list[Path]:
        return [self.path]

    def close(self) -> None:
        """Release file handles; reading after close is an error."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def file_identity(path: Path) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime) to tell whether a file changed while it was read."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
