"""Benchmark the Ray backends on one machine: the merge by shard, the sweep by run.

Two tables, in this order:

* sweep: runs per minute of the digits recipe at reduced settings with the local backend
  and with the Ray backend (every run one task, one CPU each), on fresh workers (the first
  sweep on a new cluster: worker start, imports, data) and again on warm ones.
* merge: wall time of ``negmerge_cli.merge(..., shard_size=...)`` in this process against
  ``merge_on_ray`` with 1 and 2 workers on a local Ray instance, on the LLM-shaped bfloat16
  set of ``bench_merge.py`` (TinyLlama's shapes, ``--layers`` decoder layers, a base and
  ``--n`` fine-tunes), with the page cache warm. Every Ray output is checked to be the
  single-process shards, byte for byte.

Ray's start-up (``ray.init``, a few seconds) is timed apart; each Ray case includes the
start of its worker processes and their imports (torch), as a first sweep or merge on a
fresh cluster pays them, except the merges: their workers are started first (timed apart),
so that 1 and 2 workers are compared on equal terms. On a 2-core machine two workers can
at best halve the time; the load average is printed, since other busy processes take cores
from either side. The single-process merge uses torch's intra-op threads (2 here), a Ray
task one (Ray sets ``OMP_NUM_THREADS`` to the task's CPUs).

Usage::

    .venv/bin/python benchmarks/bench_ray.py                    # ~1 minute on 2 cores
    .venv/bin/python benchmarks/bench_ray.py --n 8 --layers 2 --shard-size 100MB
    .venv/bin/python benchmarks/bench_ray.py --skip-merge       # the sweep table only

Generated checkpoints go to ``--data`` (default: a temp folder) and are deleted at the end
unless ``--keep-data``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def bench_merge(args: argparse.Namespace, data: Path, ray) -> str:
    from bench_merge import bench_set, generate, warm

    from negmerge_cli.engine import merge
    from negmerge_cli.ray_backend import merge_on_ray

    root = data / "llm"
    generate("llm", str(root), args.n, args.layers)
    bench = bench_set("llm", root, args.n)
    files = bench.files(args.n)
    size = sum(f.stat().st_size for f in files)
    out = data / "out"
    started = time.perf_counter()
    ray.get([_warm_worker.options(num_cpus=1).remote() for _ in range(args.cpus)])
    warmup = time.perf_counter() - started
    rows = []
    reference: dict[str, str] | None = None
    cases: list[tuple[str, int | None]] = [(f"single process ({_threads()} torch threads)", None)]
    cases += [(f"Ray, {k} worker{'s' if k > 1 else ''}", k) for k in (1, 2)]
    for label, workers in cases:
        shutil.rmtree(out, ignore_errors=True)
        warm(files)
        started = time.perf_counter()
        if workers is None:
            report = merge(bench.base, bench.finetuned, out, shard_size=args.shard_size)
        else:
            report = merge_on_ray(
                bench.base, bench.finetuned, out, shard_size=args.shard_size, workers=workers
            )
        wall = time.perf_counter() - started
        got = digest(out)
        if reference is None:
            reference, base_wall = got, wall
        same = "yes" if got == reference else "NO"
        shards = report.get("shards") or len([n for n in got if n.endswith(".safetensors")])
        rows.append(
            [label, f"{wall:.1f}", f"{size / wall / 1e9:.2f}", f"{base_wall / wall:.2f}x",
             str(shards), same]
        )  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    title = (
        f"merge: NegMerge, LLM-shaped bf16 set, {args.layers} layer(s), base + {args.n} "
        f"fine-tunes = {size / 1e9:.2f} GB read, --shard-size {args.shard_size / 1e6:.0f}MB; "
        f"Ray workers warmed first (start + imports: {warmup:.1f}s)"
    )
    return (
        title
        + "\n\n"
        + table(["case", "wall s", "GB/s read", "speed-up", "shards", "same bytes"], rows)
    )


def _warm(_: int = 0) -> int:
    """Start a worker and import what a shard task imports (timed apart from the merges)."""
    import negmerge_cli.ray_backend  # noqa: F401

    time.sleep(0.5)  # hold the worker, so that the next call starts another
    return os.getpid()


_warm_worker = None


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def bench_sweep(args: argparse.Namespace, data: Path) -> str:
    from negmerge_cli.recipes import load_recipe
    from negmerge_cli.train.ray_sweep import run_sweep_on_ray
    from negmerge_cli.train.sweep import run_sweep

    overrides = [f"seeds={args.seeds}", f"pretrain.epochs={args.pretrain_epochs}"]
    rows = []
    cases = [
        ("local", "local"),
        ("Ray, 1 CPU per run (fresh workers)", "ray"),
        ("Ray, 1 CPU per run (warm workers)", "ray"),
    ]
    for index, (label, backend) in enumerate(cases):
        recipe = load_recipe("digits", [*overrides, f"output={data / f'sweep-{index}'}"])
        started = time.perf_counter()
        if backend == "local":
            summary = run_sweep(recipe, quiet=True)
        else:
            summary = run_sweep_on_ray(recipe, quiet=True)
        wall = time.perf_counter() - started
        assert not summary.failed, summary.failed
        rows.append(
            [label, str(summary.trained), f"{wall:.1f}", f"{summary.trained / wall * 60:.0f}"]
        )
    runs = load_recipe("digits", overrides).sweep.runs
    title = (
        f"sweep: digits recipe, seeds {args.seeds}, pre-training {args.pretrain_epochs} "
        f"epochs, {len(runs)} fine-tunes per seed (2 or 5 epochs), threads 1"
    )
    return title + "\n\n" + table(["backend", "runs", "wall s", "runs/minute"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="data folder (default: temp)")
    parser.add_argument("--n", type=int, default=4, help="fine-tunes in the LLM set")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (LLM set)")
    parser.add_argument("--shard-size", default="50MB", help="output shard size")
    parser.add_argument("--seeds", default="[0,1]", help="sweep: seeds (YAML list)")
    parser.add_argument("--pretrain-epochs", type=int, default=10, help="sweep: pre-training")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--skip-merge", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--keep-data", action="store_true", help="keep generated files")
    args = parser.parse_args(argv)
    from negmerge_cli.cli.options import parse_size

    args.shard_size = parse_size(args.shard_size)
    data = args.data or Path(tempfile.mkdtemp(prefix="negmerge-bench-ray-"))
    data.mkdir(parents=True, exist_ok=True)
    import ray

    print(f"machine: {os.cpu_count()} CPUs, load average {load()}", flush=True)
    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    global _warm_worker
    _warm_worker = ray.remote(_warm)
    print(f"ray.init (local, {args.cpus} CPUs): {time.perf_counter() - started:.1f}s\n")
    try:
        # The sweep first: its first Ray pass is on workers that have imported nothing.
        if not args.skip_sweep:
            print(bench_sweep(args, data) + "\n", flush=True)
        if not args.skip_merge:
            print(bench_merge(args, data, ray) + "\n", flush=True)
    finally:
        ray.shutdown()
        if not args.keep_data:
            shutil.rmtree(data, ignore_errors=True)
    print(f"load average at the end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
