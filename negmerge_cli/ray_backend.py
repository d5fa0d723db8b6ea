"""Merging on a Ray cluster: one task per output shard, the index written last.

The driver validates every header and plans the shards exactly as the single-process
sharded merge does (contiguous groups of at most ``shard_size`` bytes), so the shards that
Ray tasks write are bit for bit the ones ``merge(..., shard_size=...)`` writes. Each task
streams its tensors from the inputs and renames its shard into place; the driver writes
``model.safetensors.index.json`` only after every task succeeded and removes every shard
otherwise. TIES with a global density needs each task vector's magnitude threshold over
the whole model: tasks count their share of the radix-select histograms, the driver adds
them up.

Ray is an optional dependency (``pip install 'negmerge[ray]'``), imported only here.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from negmerge_cli.engine import (
    PathLike,
    Progress,
    TaskVectorReader,
    TrimStatistics,
    _NoProgress,
    _sign,
    check_merge_arguments,
    check_output,
    count_votes,
    default_progress,
    feed_selector,
    merge_report,
    merge_tensors,
    open_inputs,
    provenance,
    resolve_device,
    select_merged,
    signals_as_errors,
)
from negmerge_cli.errors import Interrupted, NegmergeError, OutputError, UsageError
from negmerge_cli.io import TensorInfo, file_identity
from negmerge_cli.io.writer import (
    SafetensorsWriter,
    commit_index,
    plan_shards,
    remove_partials,
    shard_name,
)
from negmerge_cli.methods import get_method
from negmerge_cli.methods.select import MagnitudeSelector, trim_rank

DEFAULT_RETRIES = 3


class RayError(NegmergeError):
    """Ray is missing, unreachable, or a task failed for good."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayError(
            "the Ray backend needs Ray: pip install 'negmerge[ray]' (or pip install ray)"
        ) from None
    return ray


def connect(address: str | None) -> Any:
    """Join the cluster at ``address`` (``auto``: the one this machine belongs to), or start
    a local Ray instance when ``address`` is None and none is running."""
    ray = import_ray()
    if not ray.is_initialized():
        # ray.init installs its own SIGTERM handler (it aborts the process); keep the
        # caller's, which stops the work cleanly.
        on_term = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayError(
                f"cannot connect to Ray at {address or 'a local instance'}: {exc}"
            ) from None
        finally:
            if callable(on_term) and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, on_term)
    return ray


def _read_marker(path: str) -> str | None:
    try:
        return Path(path).read_text("utf-8")
    except OSError:
        return None


def check_shared_folder(folder: Path) -> None:
    """Fail unless a Ray task sees ``folder``: the driver writes a marker, a task reads it.

    On a cluster the output must be on storage every node mounts at the same path (NFS,
    a parallel file system); a node's local disk would scatter the shards.
    """
    ray = import_ray()
    token = secrets.token_hex(16)
    marker = folder / f".negmerge-shared-check-{token}"
    marker.write_text(token, "utf-8")
    try:
        seen = ray.get(ray.remote(num_cpus=0.1)(_read_marker).remote(str(marker.resolve())))
    finally:
        marker.unlink(missing_ok=True)
    if seen != token:
        raise OutputError(
            f"{folder}: Ray workers cannot see this folder; put the output on storage "
            "that every node mounts at the same path"
        )


@dataclass(frozen=True)
class ShardJob:
    """What a worker needs to merge part of the model: plain data, cheap to send."""

    base: str
    finetuned: tuple[str, ...]
    method: str
    lam: float
    density: float
    merged: frozenset[str]
    device: str
    memory_budget: int | None
    threads: int | None


def _open(job: ShardJob) -> tuple[Any, TaskVectorReader]:
    inputs = open_inputs(job.base, job.finetuned)
    device = resolve_device(job.device)
    if device.type == "cpu":
        torch.set_num_threads(job.threads or 1)  # a worker process of its own
    return inputs, TaskVectorReader(inputs, device, job.memory_budget)


def _selector_task(
    job: ShardJob, names: list[str], selector: MagnitudeSelector, stage: str
) -> MagnitudeSelector:
    inputs, reader = _open(job)
    try:
        infos = [inputs.base.tensors[n] for n in names]
        return feed_selector(reader, infos, selector.partial(), stage)
    finally:
        inputs.close()


def _votes_task(job: ShardJob, names: list[str], thresholds: torch.Tensor) -> int:
    inputs, reader = _open(job)
    try:
        return count_votes(reader, [inputs.base.tensors[n] for n in names], thresholds)
    finally:
        inputs.close()


def _shard_task(
    job: ShardJob,
    names: list[str],
    destination: str,
    trim: TrimStatistics | None,
    metadata: dict[str, str],
) -> dict[str, Any]:
    """Merge one shard's tensors and rename the shard into place."""
    inputs, reader = _open(job)
    writer = None
    try:
        infos = [inputs.base.tensors[n] for n in names]
        writer = SafetensorsWriter(Path(destination), infos, metadata)
        reports = merge_tensors(
            reader,
            infos,
            job.merged,
            get_method(job.method),
            lam=job.lam,
            density=job.density,
            global_trim=trim,
            out_writer=writer,
            vec_writer=None,
            progress=_NoProgress(),
        )
        inputs.check_unchanged()
        writer.finish()
        writer.rename()
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    finally:
        inputs.close()
    copied = sum(i.nbytes for i in infos if i.name not in job.merged)
    return {
        "tensors": reports,
        "bytes_read": reader.bytes_read + copied,
        "bytes_written": writer.bytes_written,
    }


def _failure(exc: BaseException) -> str:
    """The last line of a failed task's error."""
    text = str(getattr(exc, "cause", None) or exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


CANCEL_WAIT_S = 10.0


class StopRequest:
    """Set by SIGINT or SIGTERM; the driver raises :class:`Interrupted` at a safe point."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:  # a second signal: do not wait for the loop
            raise Interrupted(f"stopped by {name}")
        self.signal = name

    def check(self) -> None:
        if self.signal is not None:
            raise Interrupted(f"stopped by {self.signal}; no output was written")


@contextlib.contextmanager
def signals_deferred() -> Iterator[StopRequest]:
    """SIGINT and SIGTERM only note the request while the driver talks to Ray: an exception
    raised inside a Ray call (``ray.get`` as a result arrives) can leave Ray's task
    bookkeeping inconsistent, and Ray 2.60 then aborts the driver ("Tried to complete task
    that was not pending") instead of letting it cancel the tasks."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, stop.handle)
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def cancel_and_wait(ray: Any, refs: list[Any]) -> None:
    """Stop tasks in flight and wait until they are gone, so that none writes after the
    driver has cleaned up. A plain cancel raises KeyboardInterrupt in the task, which
    removes its temp file on the way out; a task still running after a while is killed
    (killing first can crash Ray 2.60's driver when the kill races a retry)."""
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=False)
    with contextlib.suppress(Exception):
        _, refs = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_S)
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
    with contextlib.suppress(Exception):
        ray.wait(refs, num_returns=len(refs), timeout=60)


def _run_all(
    ray: Any, calls: list[Any], workers: int | None, progress_sizes: list[int], progress: Progress
) -> list[Any]:
    """Submit ``calls`` (thunks returning ObjectRefs) with at most ``workers`` in flight;
    results come back in submission order.

    After a failure or a first SIGINT/SIGTERM nothing new is submitted and the tasks in
    flight are waited for rather than cancelled: a shard ends on its own, and cancelling
    races Ray 2.60 into aborting the driver ("Tried to complete task that was not
    pending"). A second signal stops at once.
    """
    results: dict[int, Any] = {}
    pending: dict[Any, int] = {}
    queue = list(enumerate(calls))
    limit = workers or len(calls) or 1
    failure: BaseException | None = None
    with signals_deferred() as stop:
        while pending or (queue and failure is None and stop.signal is None):
            while queue and failure is None and stop.signal is None and len(pending) < limit:
                index, call = queue.pop(0)
                pending[call()] = index
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in done:
                index = pending.pop(ref)
                try:
                    results[index] = _get(ray, ref)
                except NegmergeError as exc:
                    failure = failure or exc
                    continue
                progress.advance(progress_sizes[index])
        if failure is not None:
            raise failure
        stop.check()
    return [results[i] for i in range(len(calls))]


def _get(ray: Any, ref: Any) -> Any:
    """A task's result; its NegmergeError comes back as itself (one clear line), anything
    Ray raises (a worker that died more often than retried, a lost node) as RayError."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, NegmergeError):
            raise cause from None
        raise RayError(f"a Ray task failed: {_failure(exc)}") from None


def merge_on_ray(
    base: PathLike,
    finetuned: Sequence[PathLike],
    output: PathLike,
    *,
    shard_size: int,
    workers: int | None = None,
    address: str | None = None,
    retries: int = DEFAULT_RETRIES,
    method: str = "negmerge",
    lam: float = 1.0,
    density: float = 0.2,
    density_scope: str = "global",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    merge_batchnorm_stats: bool = False,
    device: str = "cpu",
    force: bool = False,
    quiet: bool = True,
    progress: Progress | None = None,
    memory_budget: int | None = None,
    threads: int | None = None,
    cpus_per_task: float = 1.0,
) -> dict[str, Any]:
    """``merge(..., shard_size=...)`` with one Ray task per shard; the same bytes out.

    ``workers`` caps the tasks running at once (default: as many as Ray schedules);
    ``retries`` is how often a task whose worker died is run again.

    Example:
        >>> merge_on_ray("base", ["ft1", "ft2"], "out/", shard_size=5 * 10**9,
        ...              workers=4, address="auto")  # doctest: +SKIP
    """
    started = time.perf_counter()
    chosen, lam, options = check_merge_arguments(method, lam, density, density_scope, shard_size)
    if shard_size is None:
        raise UsageError("the Ray backend writes one shard per task: give --shard-size")
    if workers is not None and workers < 1:
        raise UsageError("workers must be at least 1")
    progress = progress or (_NoProgress() if quiet else default_progress())
    folder = Path(output)
    with signals_as_errors():
        inputs = open_inputs(base, finetuned)
        try:
            infos = list(inputs.base.tensors.values())
            merged = frozenset(select_merged(infos, include, exclude, merge_batchnorm_stats))
            check_output(folder, inputs.files, sharded=True, force=force)
            metadata = provenance(inputs, chosen.name, options, lam)
            identities = dict(inputs.identities)
            base_path, tune_paths = inputs.base.path, [r.path for r in inputs.finetuned]
        finally:
            inputs.close()
        job = ShardJob(
            str(Path(base).resolve()),
            tuple(str(Path(p).resolve()) for p in finetuned),
            chosen.name,
            lam,
            density,
            merged,
            device,
            memory_budget,
            threads,
        )
        groups = plan_shards(infos, shard_size)
        names = [shard_name(n, len(groups)) for n in range(1, len(groups) + 1)]
        ray = connect(address)
        created = not folder.exists()
        folder.mkdir(exist_ok=True)
        try:
            check_shared_folder(folder)
            report = _distribute(
                ray,
                job,
                infos,
                groups,
                names,
                folder,
                metadata,
                chosen.trims and density_scope == "global",
                retries,
                workers,
                cpus_per_task,
                progress,
            )
            for path, identity in identities.items():
                if file_identity(path) != identity:
                    raise NegmergeError(f"{path}: changed while it was being read; merge again")
            commit_index(folder, groups, metadata)
        except BaseException:
            progress.stop()
            for name in names:
                (folder / name).unlink(missing_ok=True)
            remove_partials(folder, names)
            if created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        remove_partials(folder, names)
    tensor_reports = {k: v for part in report["parts"] for k, v in part["tensors"].items()}
    result = merge_report(
        base_path,
        tune_paths,
        infos,
        tensor_reports,
        chosen,
        options,
        lam,
        bytes_read=sum(p["bytes_read"] for p in report["parts"]),
        bytes_written=sum(p["bytes_written"] for p in report["parts"]),
        device=torch.device(device) if device != "auto" else torch.device("cpu"),
    )
    result.update(output=str(folder), vector=None, backend="ray", shards=len(groups))
    result["timings"] = {
        "stats_s": report["stats_s"],
        "merge_s": report["merge_s"],
        "total_s": time.perf_counter() - started,
    }
    return result


def _distribute(
    ray: Any,
    job: ShardJob,
    infos: list[TensorInfo],
    groups: list[list[TensorInfo]],
    names: list[str],
    folder: Path,
    metadata: dict[str, str],
    global_ties: bool,
    retries: int,
    workers: int | None,
    cpus_per_task: float,
    progress: Progress,
) -> dict[str, Any]:
    options = {"max_retries": retries, "num_cpus": cpus_per_task}
    if job.device.startswith("cuda"):
        options["num_gpus"] = 1
    selector_task = ray.remote(_selector_task).options(**options)
    votes_task = ray.remote(_votes_task).options(**options)
    shard_task = ray.remote(_shard_task).options(**options)
    merged_groups = [[i.name for i in g if i.name in job.merged] for g in groups]
    sizes = [sum(i.nbytes for i in g) * (len(job.finetuned) + 1) for g in groups]
    job_ref = ray.put(job)
    trim = None
    began = time.perf_counter()
    if global_ties:
        numel = sum(i.numel for i in infos if i.name in job.merged)
        selector = MagnitudeSelector([trim_rank(numel, job.density)] * len(job.finetuned))
        progress.start(sum(sizes) * 3, "TIES thresholds")
        if selector.needed:
            for stage in ("coarse", "fine"):
                parts = _run_all(
                    ray,
                    [
                        (lambda g=g, s=stage: selector_task.remote(job_ref, g, selector, s))
                        for g in merged_groups
                    ],
                    workers,
                    sizes,
                    progress,
                )
                for part in parts:
                    selector.absorb(part)
                if stage == "coarse":
                    selector.end_coarse()
        thresholds = selector.thresholds()
        votes = _run_all(
            ray,
            [(lambda g=g: votes_task.remote(job_ref, g, thresholds)) for g in merged_groups],
            workers,
            sizes,
            progress,
        )
        trim = TrimStatistics(thresholds, _sign(sum(votes)))
        progress.stop()
    stats_s = time.perf_counter() - began
    began = time.perf_counter()
    progress.start(sum(sizes), f"merging {len(groups)} shards on Ray")
    try:
        parts = _run_all(
            ray,
            [
                (
                    lambda g=g, n=n: shard_task.remote(
                        job_ref, [i.name for i in g], str(folder / n), trim, metadata
                    )
                )
                for g, n in zip(groups, names, strict=True)
            ],
            workers,
            sizes,
            progress,
        )
    except NegmergeError:
        raise
    except Exception as exc:
        if (
            type(exc).__name__ in ("RayTaskError", "WorkerCrashedError")
            or "ray" in type(exc).__module__
        ):
            raise RayError(f"a merge task failed: {_failure(exc)}") from None
        raise
    finally:
        progress.stop()
    return {"parts": parts, "stats_s": stats_s, "merge_s": time.perf_counter() - began}
