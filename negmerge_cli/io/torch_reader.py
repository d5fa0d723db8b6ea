"""PyTorch ``.pt``/``.bin`` state dicts, loaded with ``weights_only=True`` and nothing else.

A pickle can run code when it is loaded; ``weights_only=True`` restricts it to tensors and
plain containers. It is passed explicitly (an environment variable can flip the default)
and a refusal is final: there is no retry with unsafe loading.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from negmerge_cli.errors import CheckpointError
from negmerge_cli.io.base import CheckpointReader, TensorInfo
from negmerge_cli.io.dtypes import TORCH_TO_SAFETENSORS

CONVERT_HINT = (
    "save a plain state dict instead: torch.save(model.state_dict(), path), "
    "or safetensors.torch.save_file(model.state_dict(), path)"
)


def _unwrap(payload: object, where: str) -> dict[str, torch.Tensor]:
    """Accept ``{name: Tensor}``, or that dict under a ``"state_dict"`` key; refuse the rest."""
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"{where}: holds a {type(payload).__name__}, not a state dict of tensors; "
            + CONVERT_HINT
        )
    for key, value in payload.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{where}: key {key!r} is not a string; " + CONVERT_HINT)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{where}: entry {key!r} holds a {type(value).__name__}, not a tensor; "
                + CONVERT_HINT
            )
        if value.layout != torch.strided or value.dtype not in TORCH_TO_SAFETENSORS:
            raise CheckpointError(
                f"{where}: tensor {key!r} has an unsupported layout or dtype ({value.dtype})"
            )
    return payload


def _refusal(message: str) -> str:
    """What the weights-only unpickler objected to, without torch's advice to retry unsafely."""
    found = re.search(r"unsupported GLOBAL ([\w.]+)|Unsupported global: GLOBAL ([\w.]+)", message)
    if found:
        return f"it references {found.group(1) or found.group(2)}, which is not a tensor type"
    found = re.search(r"Unsupported operand (\d+)", message)
    if found:
        return f"it uses pickle opcode {found.group(1)}, which tensor files never need"
    return "it holds objects other than tensors"


class TorchReader(CheckpointReader):
    """A pickled state dict, read whole into memory.

    Not memory-mapped: a mapped file truncated during a merge kills the process with
    SIGBUS, leaving no chance to clean up. Large checkpoints stream better as safetensors.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        where = str(self.path)
        try:
            # An open file, not the path: torch.load given a path that ends in
            # .safetensors hands it to safetensors, whatever it holds.
            with open(self.path, "rb") as handle, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # protocol and TorchScript notices
                payload = torch.load(handle, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{where}: refused to unpickle (weights_only=True): {_refusal(str(exc))}; "
                + CONVERT_HINT
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "TorchScript" in message:
                raise CheckpointError(
                    f"{where}: a TorchScript archive, not a state dict; load it with "
                    "torch.jit.load, then " + CONVERT_HINT
                ) from None
            raise CheckpointError(
                f"{where}: cannot load as a PyTorch state dict: {message[:200]}"
            ) from None
        self._tensors = _unwrap(payload, where)
        self.tensors = {
            name: TensorInfo(name, TORCH_TO_SAFETENSORS[t.dtype], tuple(t.shape))
            for name, t in self._tensors.items()
        }
        self.metadata = {}

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        flat = self._tensors[name].reshape(-1)
        return flat[start:stop]

    def close(self) -> None:
        self._tensors = {}
