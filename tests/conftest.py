"""Shared fixtures: tiny real checkpoints written by the real writer in tmp_path."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from negmerge_cli.io import save_state_dict


def make_family(
    folder: Path,
    base: dict[str, torch.Tensor],
    count: int,
    *,
    scale: float = 0.1,
    seed: int = 0,
) -> tuple[Path, list[Path]]:
    """Write ``base`` and ``count`` fine-tunes (float tensors plus noise, others unchanged)."""
    generator = torch.Generator().manual_seed(seed)
    base_path = folder / "base.safetensors"
    save_state_dict(base, base_path)
    paths = []
    for i in range(count):
        tuned = {
            name: (
                (t.float() + scale * torch.randn(t.shape, generator=generator)).to(t.dtype)
                if t.is_floating_point()
                else t.clone()
            )
            for name, t in base.items()
        }
        path = folder / f"ft{i}.safetensors"
        save_state_dict(tuned, path)
        paths.append(path)
    return base_path, paths


@pytest.fixture
def cli(capsys):
    """``cli(*argv) -> (exit code, stdout, stderr)`` through the real entry point, error
    boundary included."""
    from negmerge_cli.cli import main

    def invoke(*argv: object) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as stop:
            main([str(a) for a in argv])
        captured = capsys.readouterr()
        return stop.value.code or 0, captured.out, captured.err

    return invoke


@pytest.fixture
def family(tmp_path: Path) -> Callable[..., tuple[Path, list[Path]]]:
    """``family(base_dict, count)`` writes a base and fine-tunes into tmp_path."""

    def build(base: dict[str, torch.Tensor], count: int = 3, **kwargs) -> tuple[Path, list[Path]]:
        return make_family(tmp_path, base, count, **kwargs)

    return build


def small_model(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the awkward cases: bf16/fp16, 0-d, odd shapes, ints, bools, BN."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(13, 7, generator=g),
        "block.0.attn.weight": torch.randn(7, 7, generator=g).to(torch.bfloat16),
        "block.0.mlp.weight": torch.randn(3, 5, 2, generator=g).to(torch.float16),
        "block.0.scale": torch.randn((), generator=g),
        "block.0.bias": torch.zeros(7),
        "bn.running_mean": torch.randn(7, generator=g),
        "bn.running_var": torch.rand(7, generator=g),
        "bn.num_batches_tracked": torch.tensor(12),
        "position_ids": torch.arange(9),
        "mask": torch.tensor([True, False, True]),
        "quant": torch.tensor([1, 255, 7], dtype=torch.uint8),
    }


def run_behind_private_tmpfs(folder: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``negmerge ARGV`` in a mount namespace of its own with a private tmpfs on
    ``folder``: a Ray cluster started outside sees an empty folder where this driver writes,
    as nodes do without shared storage. Skips when the namespace cannot be made."""
    command = (
        f'mount -t tmpfs tmpfs {folder} || exit 97; exec {sys.executable} -m negmerge_cli "$@"'
    )
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", command, "sh", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode == 97 or "unshare failed" in done.stderr:
        pytest.skip("cannot make a private mount namespace here")
    return done
