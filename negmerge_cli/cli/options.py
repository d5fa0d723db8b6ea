"""Option types and parsers shared by the command modules. Nothing here imports torch."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

# Kept in step with negmerge_cli.methods.METHODS (a test checks); listed here so that
# --help does not import torch.
METHOD_NAMES = ("negmerge", "mean", "magmax", "ties")

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """``5GB`` (10^9), ``100KB``, ``2GiB`` (2^30) or plain bytes, as in Hugging Face."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise typer.BadParameter(f"{text!r} is not a size like 5GB, 500MB or 2GiB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise typer.BadParameter("the size must be positive")
    return value


def parse_lambda(text: str) -> float:
    """A finite float; NaN, Inf and text are usage errors."""
    try:
        value = float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise typer.BadParameter(f"{text!r} is not finite")
    return value


def expand_paths(items: list[str]) -> list[Path]:
    """Paths as given, plus ``@list.txt`` (one path a line) and ``-`` (the same on stdin).

    Blank lines and lines starting with ``#`` are skipped.
    """
    paths: list[Path] = []
    for item in items:
        if item == "-":
            lines = sys.stdin.read().splitlines()
        elif item.startswith("@"):
            try:
                lines = Path(item[1:]).read_text("utf-8").splitlines()
            except OSError as exc:
                raise typer.BadParameter(
                    f"cannot read list file {item[1:]}: {exc.strerror}"
                ) from None
        else:
            paths.append(Path(item))
            continue
        paths.extend(
            Path(line.strip()) for line in lines if line.strip() and not line.startswith("#")
        )
    return paths


LambdaOpt = Annotated[
    float,
    typer.Option(
        "--lambda",
        "-l",
        parser=parse_lambda,
        metavar="FLOAT",
        help="Scaling of the merged task vector: output = base - lambda * merged.",
    ),
]
ShardSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--shard-size",
        parser=parse_size,
        metavar="SIZE",
        help="Write OUT as a folder of shards of at most SIZE (5GB, 500MB, 2GiB) "
        "with a Hugging Face model.safetensors.index.json.",
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        help="Where to compute: auto (a CUDA GPU when there is one), cpu, cuda or cuda:N.",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="CPU threads for the arithmetic (default 1: the merge is memory-bound and "
        "streams cache-sized chunks).",
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output.")]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar and no summary on stderr.")
]
ReportOpt = Annotated[
    Path | None,
    typer.Option(
        "--report",
        metavar="PATH",
        help="Write the JSON report here ('-' for standard output).",
    ),
]
IncludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--include",
        metavar="REGEX",
        help="Merge only tensors whose name matches (repeatable).",
    ),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        metavar="REGEX",
        help="Do not merge tensors whose name matches (repeatable); they are copied from BASE.",
    ),
]
