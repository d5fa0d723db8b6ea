"""Hugging Face sharded checkpoints: ``*.index.json`` with a ``weight_map`` of shard files."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import torch

from negmerge_cli.errors import CheckpointError
from negmerge_cli.io.base import CheckpointReader
from negmerge_cli.io.safetensors_reader import reject_duplicate_keys


class ShardedReader(CheckpointReader):
    """All shards of one index, seen as one checkpoint in the order of the shards."""

    def __init__(
        self, index_path: str | os.PathLike[str], open_file: Callable[[Path], CheckpointReader]
    ) -> None:
        self.path = Path(index_path)
        where = str(self.path)
        try:
            index = json.loads(
                self.path.read_text("utf-8"), object_pairs_hook=reject_duplicate_keys
            )
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"{where}: not a valid index file ({exc})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f'{where}: needs a "weight_map" object of key -> shard file')
        shard_names = list(dict.fromkeys(weight_map.values()))
        for shard in shard_names:
            parts = PurePosixPath(shard).parts
            if PurePosixPath(shard).is_absolute() or os.path.isabs(shard) or ".." in parts:
                raise CheckpointError(
                    f"{where}: shard path {shard!r} must be relative to the index's folder"
                )
        self._shards: dict[str, CheckpointReader] = {}
        try:
            for shard in shard_names:
                shard_path = self.path.parent / shard
                if not shard_path.is_file():
                    raise CheckpointError(f"{where}: shard {shard!r} is missing")
                self._shards[shard] = open_file(shard_path)
            self._owner: dict[str, CheckpointReader] = {}
            self.tensors = {}
            for shard, reader in self._shards.items():
                for name, info in reader.tensors.items():
                    listed = weight_map.get(name)
                    if listed is None:
                        raise CheckpointError(
                            f"{where}: tensor {name!r} is in shard {shard!r} "
                            "but not in the weight_map"
                        )
                    if listed != shard:
                        raise CheckpointError(
                            f"{where}: tensor {name!r} is in shard {shard!r} "
                            f"but the weight_map puts it in {listed!r}"
                        )
                    self._owner[name] = reader
                    self.tensors[name] = info
            missing = [k for k in weight_map if k not in self._owner]
            if missing:
                raise CheckpointError(
                    f"{where}: tensor {missing[0]!r} is missing from its shard "
                    f"{weight_map[missing[0]]!r}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                )
        except BaseException:
            self.close()
            raise
        metadata = index.get("metadata") or {}
        self.metadata = (
            {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
        )

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._owner[name].read(name, start, stop)

    def read_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        return self._owner[name].read_into(name, start, out)

    @property
    def files(self) -> list[Path]:
        return [self.path, *(f for r in self._shards.values() for f in r.files)]

    def close(self) -> None:
        for reader in self._shards.values():
            reader.close()
