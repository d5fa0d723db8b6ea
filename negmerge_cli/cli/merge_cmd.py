"""``negmerge merge``, ``apply`` and ``inspect``: check flags, call the engine, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from negmerge_cli.cli.app import app
from negmerge_cli.cli.options import (
    METHOD_NAMES,
    DeviceOpt,
    ExcludeOpt,
    ForceOpt,
    IncludeOpt,
    LambdaOpt,
    QuietOpt,
    ReportOpt,
    ShardSizeOpt,
    ThreadsOpt,
    expand_paths,
)


def _human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def _write_report(report: dict[str, Any], destination: Path | None) -> None:
    if destination is None:
        return
    text = json.dumps(report, indent=2) + "\n"
    if str(destination) == "-":
        sys.stdout.write(text)
        return
    from negmerge_cli.io.writer import write_text_atomic

    write_text_atomic(destination, text)


def _summary(report: dict[str, Any]) -> str:
    totals, timings = report["totals"], report["timings"]
    seconds = timings["total_s"]
    rate = totals["bytes_read"] / seconds if seconds else 0.0
    return (
        f"{report['method']}: {totals['merged_tensors']} of {totals['tensors']} tensors merged, "
        f"{totals['merged_parameters']:,} of {totals['parameters']:,} parameters; "
        f"sign consensus {totals['consensus_fraction']:.1%}, kept {totals['kept']:,}; "
        f"{seconds:.2f} s, {_human_bytes(rate)}/s read"
    )


@app.command(no_args_is_help=True)
def merge(
    base: Annotated[
        Path, typer.Argument(metavar="BASE", help="The original (pre-trained) checkpoint.")
    ],
    finetuned: Annotated[
        list[str],
        typer.Argument(
            metavar="FT...",
            help="Checkpoints fine-tuned on the data to forget; '@list.txt' reads paths "
            "from a file, '-' from standard input.",
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Where to write base - lambda * merged."),
    ] = None,
    lam: LambdaOpt = 1.0,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            "-m",
            help=f"How task vectors are merged: {', '.join(METHOD_NAMES)}.",
        ),
    ] = "negmerge",
    density: Annotated[
        float,
        typer.Option(help="ties: fraction of each task vector kept, by magnitude.", min=0.0),
    ] = 0.2,
    density_scope: Annotated[
        str,
        typer.Option(
            help="ties: 'global' trims over the whole task vector (the reference), "
            "'tensor' per tensor."
        ),
    ] = "global",
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    merge_bn_stats: Annotated[
        bool,
        typer.Option(
            "--merge-bn-stats",
            help="Also merge BatchNorm running_mean/running_var (copied from BASE by default).",
        ),
    ] = False,
    save_vector: Annotated[
        Path | None,
        typer.Option(
            "--save-vector",
            metavar="PATH",
            help="Also write the merged task vector (float32), for 'negmerge apply'.",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    shard_size: ShardSizeOpt = None,
    backend: Annotated[
        str,
        typer.Option(
            help="'local' (one process) or 'ray': one Ray task per shard (needs --shard-size).",
        ),
    ] = "local",
    workers: Annotated[
        int | None,
        typer.Option(help="ray: at most this many shard tasks at once.", min=1),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="ray: cluster to join ('auto', or HOST:PORT); default: start a local Ray."
        ),
    ] = None,
    retries: Annotated[
        int, typer.Option(help="ray: how often a task whose worker died is run again.", min=0)
    ] = 3,
    report: ReportOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge fine-tuned checkpoints' task vectors and subtract them from BASE.

    For every floating-point tensor: tau_i = FT_i - BASE in float32; NegMerge keeps an
    element where every tau_i has the same strict sign and takes their mean there (0
    elsewhere); OUT = BASE - lambda * merged, cast once to BASE's dtype. Integer, bool
    and fp8 tensors and BatchNorm statistics are copied from BASE.

    Example: negmerge merge base.safetensors runs/*/model.safetensors -o forgot.safetensors
    """
    paths = expand_paths(finetuned)
    if output is None and save_vector is None:
        raise typer.BadParameter("give --output, --save-vector or both", param_hint="'--output'")
    if backend not in ("local", "ray"):
        raise typer.BadParameter("choose local or ray", param_hint="'--backend'")
    common = {
        "method": method,
        "lam": lam,
        "density": density,
        "density_scope": density_scope,
        "include": include or (),
        "exclude": exclude or (),
        "merge_batchnorm_stats": merge_bn_stats,
        "device": device,
        "threads": threads,
        "force": force,
        "quiet": quiet,
    }
    if backend == "ray":
        if shard_size is None or output is None or save_vector is not None:
            raise typer.BadParameter(
                "the Ray backend writes one shard per task: give -o and --shard-size, "
                "and no --save-vector",
                param_hint="'--backend'",
            )
        from negmerge_cli.ray_backend import merge_on_ray

        result = merge_on_ray(
            base,
            paths,
            output,
            shard_size=shard_size,
            workers=workers,
            address=address,
            retries=retries,
            **common,
        )
    else:
        from negmerge_cli.engine import merge as run_merge

        result = run_merge(
            base, paths, output, save_vector=save_vector, shard_size=shard_size, **common
        )
    _write_report(result, report)
    if not quiet:
        typer.echo(_summary(result), err=True)


@app.command(no_args_is_help=True)
def apply(
    base: Annotated[Path, typer.Argument(help="The original checkpoint the vector was made for.")],
    vector: Annotated[Path, typer.Argument(help="A task vector written by merge --save-vector.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the result.")],
    lam: LambdaOpt = 1.0,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    shard_size: ShardSizeOpt = None,
    report: ReportOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write BASE - lambda * VECTOR: try another lambda without reading every FT again.

    Example: negmerge apply base.safetensors vector.safetensors -o out.safetensors --lambda 0.6
    """
    from negmerge_cli.engine import apply as run_apply

    result = run_apply(
        base,
        vector,
        output,
        lam=lam,
        device=device,
        threads=threads,
        shard_size=shard_size,
        force=force,
        quiet=quiet,
    )
    _write_report(result, report)
    if not quiet:
        totals = result["totals"]
        typer.echo(
            f"applied {totals['applied_tensors']} of {totals['tensors']} tensors "
            f"with lambda {result['lambda']:g} in {result['timings']['total_s']:.2f} s",
            err=True,
        )


def _print_inspection(report: dict[str, Any]) -> None:
    for entry in report["files"]:
        typer.echo(
            f"{entry['path']}: {len(entry['tensors'])} tensors, "
            f"{entry['parameters']:,} parameters, {_human_bytes(entry['bytes'])}"
        )
        width = max((len(t["name"]) for t in entry["tensors"]), default=4)
        for row in entry["tensors"]:
            shape = "x".join(str(d) for d in row["shape"]) or "scalar"
            typer.echo(
                f"  {row['name']:<{width}}  {row['dtype']:<7} {shape:<18} {row['numel']:>14,}"
            )
    differences = report.get("differences")
    if differences is not None:
        if not differences:
            typer.echo("all files have the same keys, shapes and dtypes")
        for diff in differences:
            if "missing_in" in diff:
                typer.echo(f"differs: {diff['name']!r} missing in {', '.join(diff['missing_in'])}")
            else:
                variants = "; ".join(
                    f"{path}: {v['dtype']} {v['shape']}" for path, v in diff["variants"].items()
                )
                typer.echo(f"differs: {diff['name']!r}: {variants}")
    consensus = report.get("consensus")
    if consensus is not None:
        typer.echo(f"sign consensus of {len(consensus['finetuned'])} task vectors per tensor:")
        for name, row in consensus["tensors"].items():
            typer.echo(f"  {name:<40} {row['fraction']:7.2%} of {row['numel']:,}")
        typer.echo(
            f"total: {consensus['fraction']:.2%} of {consensus['merged_parameters']:,} "
            "merged parameters agree in sign"
        )


@app.command(name="inspect", no_args_is_help=True)
def inspect_command(
    files: Annotated[
        list[str],
        typer.Argument(
            metavar="FILE...", help="Checkpoints to describe ('@list.txt' and '-' work too)."
        ),
    ],
    base: Annotated[
        Path | None,
        typer.Option(help="Treat FILEs as fine-tunes of BASE and report their sign consensus."),
    ] = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List tensors, dtypes, parameter and byte counts; what differs between files; and,
    with --base, the share of elements whose task vectors agree in sign."""
    from negmerge_cli.inspection import inspect as run_inspect

    report = run_inspect(
        expand_paths(files), base=base, include=include or (), exclude=exclude or ()
    )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_inspection(report)
