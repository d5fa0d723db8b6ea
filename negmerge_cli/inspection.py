"""``negmerge inspect``: what checkpoints hold, how they differ, how much their task
vectors agree in sign."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from negmerge_cli.engine import (
    PathLike,
    TaskVectorReader,
    open_inputs,
    select_merged,
    signals_as_errors,
)
from negmerge_cli.errors import UsageError
from negmerge_cli.io import CheckpointReader, TensorInfo, open_checkpoint


def _tensor_row(info: TensorInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "dtype": info.dtype,
        "shape": list(info.shape),
        "numel": info.numel,
        "bytes": info.nbytes,
    }


def _differences(readers: Sequence[CheckpointReader]) -> list[dict[str, Any]]:
    """Per key that is not the same everywhere: which files lack it, or its shapes/dtypes."""
    names = list(dict.fromkeys(n for r in readers for n in r.tensors))
    found = []
    for name in names:
        infos = [r.tensors.get(name) for r in readers]
        missing = [str(r.path) for r, i in zip(readers, infos, strict=True) if i is None]
        present = [i for i in infos if i is not None]
        if missing:
            found.append({"name": name, "missing_in": missing})
        elif len({(i.shape, i.dtype) for i in present}) > 1:
            found.append(
                {
                    "name": name,
                    "variants": {
                        str(r.path): {"dtype": i.dtype, "shape": list(i.shape)}
                        for r, i in zip(readers, present, strict=True)
                    },
                }
            )
    return found


def inspect(
    paths: Sequence[PathLike],
    *,
    base: PathLike | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    memory_budget: int | None = None,
) -> dict[str, Any]:
    """Describe checkpoints: tensors, dtypes, parameter and byte counts, and what differs.

    With ``base``, ``paths`` are fine-tuned checkpoints of it and the report adds the
    sign-consensus fraction of their task vectors per merged tensor and in total (the
    share of elements NegMerge keeps).

    Example:
        >>> inspect(["ft1.safetensors", "ft2.safetensors"], base="base.safetensors")
    """
    if not paths:
        raise UsageError("no checkpoints to inspect")
    with signals_as_errors():
        readers: list[CheckpointReader] = []
        try:
            for path in paths:
                readers.append(open_checkpoint(path))
            report: dict[str, Any] = {
                "files": [
                    {
                        "path": str(r.path),
                        "metadata": r.metadata,
                        "tensors": [_tensor_row(i) for i in r.tensors.values()],
                        "parameters": sum(i.numel for i in r.tensors.values()),
                        "bytes": sum(i.nbytes for i in r.tensors.values()),
                    }
                    for r in readers
                ],
            }
            if len(readers) > 1:
                report["differences"] = _differences(readers)
        finally:
            for reader in readers:
                reader.close()
        if base is not None:
            report["consensus"] = _consensus(base, paths, include, exclude, memory_budget)
    return report


def _consensus(
    base: PathLike,
    finetuned: Sequence[PathLike],
    include: Sequence[str],
    exclude: Sequence[str],
    memory_budget: int | None,
) -> dict[str, Any]:
    inputs = open_inputs(base, finetuned)
    try:
        infos = list(inputs.base.tensors.values())
        names = select_merged(infos, include, exclude)
        reader = TaskVectorReader(inputs, torch.device("cpu"), memory_budget)
        per_tensor = {}
        for info in infos:
            if info.name not in names:
                continue
            agree = sum(
                int(reader.read(info, s, e).consensus.sum()) for s, e in reader.ranges(info)
            )
            per_tensor[info.name] = {
                "numel": info.numel,
                "consensus": agree,
                "fraction": agree / info.numel if info.numel else 0.0,
            }
    finally:
        inputs.close()
    total = sum(t["numel"] for t in per_tensor.values())
    agree_total = sum(t["consensus"] for t in per_tensor.values())
    return {
        "base": str(inputs.base.path),
        "finetuned": [str(r.path) for r in inputs.finetuned],
        "tensors": per_tensor,
        "merged_parameters": total,
        "consensus": agree_total,
        "fraction": agree_total / total if total else 0.0,
    }
