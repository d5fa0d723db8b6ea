"""The fine-tuning sweep on a Ray cluster: one Ray task per run, the driver keeps the order.

Each run of the sweep (a seed's pre-training, its retrained reference, every fine-tune; for
CLIP the zero-shot base and every fine-tune) is one Ray task asking for the recipe's
``resources`` (``cpus``, ``gpus``); a fine-tune is submitted once the model it starts from
exists (its seed's pre-trained model, or CLIP's zero-shot encoder shared by every seed).
A task runs exactly what the local backend runs for that run
(:func:`negmerge_cli.train.sweep.run_job`), so the checkpoints are the same bytes, and
writes it the same way: into ``.tmp-<run>-<pid>/``, renamed into place when complete.
Hence the same resumability: finished runs are skipped (checked on the driver before
submitting, and again by the task), a run whose worker died is started again up to
``resources.retries`` times and first removes what the dead attempt left, and a run that
fails for good is listed in the summary while the others go on (with the fine-tunes that
start from its model, when it is a pre-training or a zero-shot base).

The output folder must be on storage every node mounts at the same path: the driver checks
that a task sees it before any work. Paths in the recipe are made absolute on the driver,
so workers started elsewhere find the same files.

Ray is an optional dependency (``pip install 'negmerge[ray]'``), imported only here and in
:mod:`negmerge_cli.ray_backend`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO

from negmerge_cli.errors import Interrupted, NegmergeError, RunsFailed
from negmerge_cli.ray_backend import (
    RayError,
    cancel_and_wait,
    check_shared_folder,
    connect,
    signals_deferred,
)
from negmerge_cli.recipes import Recipe, ResourcesConfig
from negmerge_cli.train.sweep import (
    MODEL_FILE,
    SweepJob,
    SweepProgress,
    SweepSummary,
    file_sha256,
    job_is_finished,
    pretrained_path,
    remove_run_leftovers,
    run_job,
    seed_dir,
    sweep_data,
    sweep_jobs,
)

TASK_PREFIX = "negmerge-sweep"
"""Ray task names (and worker process titles, ``ray::negmerge-sweep seed 0 run 03-...``)."""

SLOTS_REFRESH_S = 10.0
BASE_KINDS = {"pretrain": "pre-training", "zeroshot": "zero-shot base"}
"""Jobs whose model other jobs start from, and how a failure of one is named."""


# --------------------------------------------------------------------------- worker side

_DATA: dict[str, Any] = {}


def _data_for(recipe: Recipe) -> Any:
    """The recipe's data, loaded once per worker process (workers are reused by Ray)."""
    if recipe.model.arch == "clip":
        return None  # CLIP runs read their images as they train
    key = repr((recipe.data, recipe.model))
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = sweep_data(recipe)
    return _DATA[key]


def run_job_task(recipe: Recipe, job: SweepJob) -> dict[str, Any]:
    """Run one job inside a Ray worker; what it did, for the driver's progress view."""
    from negmerge_cli.train.loop import torch_threads

    began = time.perf_counter()
    with torch_threads(recipe.threads):
        # Only this task runs this run now: whatever an earlier attempt left (a worker that
        # died, on this node or another) is garbage, whatever pid its name carries.
        removed = remove_run_leftovers(job.folder)
        result = run_job(recipe, job, _data_for(recipe), SweepProgress(quiet=True))
    return {
        "trained": result is not None,
        "metrics": result.as_dict() if result is not None else None,
        "host": socket.gethostname(),
        "removed": [str(p) for p in removed],
        "seconds": time.perf_counter() - began,
    }


# --------------------------------------------------------------------------- driver side


def absolute_paths(value: Any) -> Any:
    """``value`` (a recipe, or any of its sections) with every relative Path made absolute
    against the driver's working directory: a worker's directory is not the driver's."""
    if isinstance(value, Path):
        return value.absolute()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for f in dataclasses.fields(value):
            current = getattr(value, f.name)
            updated = absolute_paths(current)
            if updated is not current:
                changes[f.name] = updated
        return dataclasses.replace(value, **changes) if changes else value
    if isinstance(value, tuple) and any(isinstance(v, Path) for v in value):
        return tuple(absolute_paths(v) for v in value)
    return value


def _per_node(node: dict[str, Any], resources: ResourcesConfig) -> int:
    have = node.get("Resources", {})
    fits = math.inf
    for amount, name in ((resources.cpus, "CPU"), (resources.gpus, "GPU")):
        if amount > 0:
            fits = min(fits, math.floor(have.get(name, 0.0) / amount + 1e-9))
    return fits  # type: ignore[return-value]


def run_slots(ray: Any, resources: ResourcesConfig, jobs: int) -> int:
    """How many runs the cluster can hold at once (the driver keeps that many in flight,
    so "running" means running); an error when no node can hold even one."""
    nodes = [n for n in ray.nodes() if n.get("Alive", n.get("alive", False))]
    slots = sum(_per_node(n, resources) for n in nodes)
    if slots == 0:
        amounts = [n.get("Resources", {}) for n in nodes]
        have = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in amounts)
        raise RayError(
            f"no node of the Ray cluster can run one run of the sweep: each asks for "
            f"{resources.cpus:g} CPU(s) and {resources.gpus:g} GPU(s) (the recipe's resources), "
            f"the nodes have {have or 'nothing'}"
        )
    return max(1, min(jobs, slots)) if math.isfinite(slots) else max(1, jobs)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class RaySweepProgress:
    """One view of the whole sweep on stderr: runs done, running, failed and time left.

    On a terminal the status line is redrawn in place under a line per finished run; in a
    log file every finished, skipped or failed run is one line starting with the status.
    """

    def __init__(self, total: int, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total = total
        self.trained = self.skipped = self.failed = self.running = 0
        self.began = time.perf_counter()

    def status(self) -> str:
        done = self.trained + self.skipped
        text = f"{done}/{self.total} done"
        if self.skipped:
            text += f" ({self.skipped} skipped)"
        text += f", {self.running} running, {self.failed} failed"
        left = self.total - done - self.failed
        if left == 0:
            return text
        if self.trained == 0:
            return text + ", time left: estimating"
        rate = self.trained / (time.perf_counter() - self.began)
        return text + f", ~{_duration(left / rate)} left"

    def _write(self, line: str | None) -> None:
        if self.quiet:
            return
        if self.tty:
            event = f"\r{line}\x1b[K\n" if line is not None else "\r"
            self.stream.write(f"{event}[ray sweep] {self.status()}\x1b[K")
        elif line is not None:
            self.stream.write(line + "\n")
        self.stream.flush()

    def event(self, label: str, message: str) -> None:
        # On a terminal the status line under the events already says where the sweep is.
        self._write(f"{label}: {message}" if self.tty else f"[{self.status()}] {label}: {message}")

    def tick(self) -> None:
        """Redraw the status line (a terminal only; a log file gets the events)."""
        if self.tty:
            self._write(None)

    def note(self, message: str) -> None:
        if self.quiet:
            return
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(message + "\n")
        self.stream.flush()


def _reason(ray: Any, exc: BaseException, retries: int) -> str:
    """Why a task failed for good, in one line."""
    errors = ray.exceptions
    if isinstance(exc, errors.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, NegmergeError):
            return str(cause).strip().splitlines()[0]
        if cause is not None:
            first = str(cause).strip().splitlines()
            return f"{type(cause).__name__}: {first[0]}" if first else type(cause).__name__
    if isinstance(exc, (errors.WorkerCrashedError, errors.NodeDiedError)) or "died" in str(exc):
        return (
            f"its worker died {retries + 1} time(s) (resources.retries: {retries}); "
            f"{type(exc).__name__}"
        )
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".rstrip(": ")


def run_sweep_on_ray(
    recipe: Recipe,
    *,
    address: str | None = None,
    quiet: bool = False,
    stream: TextIO | None = None,
) -> SweepSummary:
    """Run (or resume) the recipe's sweep with one Ray task per run.

    ``address``: ``auto`` (the cluster this machine belongs to), ``HOST:PORT``, or None to
    start a local Ray instance when none is running. Returns the summary; runs that failed
    for good are in ``summary.failed`` (the others are finished).

    Example:
        >>> run_sweep_on_ray(load_recipe("digits"), address="auto")  # doctest: +SKIP
    """
    started = time.perf_counter()
    recipe = absolute_paths(recipe)
    ray = connect(address)
    created = not recipe.output.exists()
    recipe.output.mkdir(parents=True, exist_ok=True)
    try:
        check_shared_folder(recipe.output)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                recipe.output.rmdir()
        raise
    jobs = sweep_jobs(recipe)
    total = len(jobs)
    slots = run_slots(ray, recipe.resources, total)
    progress = RaySweepProgress(total, stream, quiet)
    progress.note(
        f"sweep on Ray: {total} run(s) over {len(recipe.seeds)} seed(s), up to {slots} at once, "
        f"each with {recipe.resources.cpus:g} CPU(s) and {recipe.resources.gpus:g} GPU(s)"
    )
    driver = _Driver(ray, recipe, progress, slots)
    driver.add(jobs)
    driver.run()
    seconds = time.perf_counter() - started
    progress.note(
        f"sweep: {progress.trained} run(s) trained, {progress.skipped} skipped (finished "
        f"earlier), {progress.failed} failed in {seconds:.1f}s on Ray -> {recipe.output}"
    )
    for label, reason in driver.failed:
        progress.note(f"  failed: {label}: {reason}")
    return SweepSummary(
        progress.trained,
        progress.skipped,
        seconds,
        tuple(seed_dir(recipe, s) for s in recipe.seeds),
        tuple(driver.failed),
    )


class _Driver:
    """Submits ready jobs, at most ``slots`` in flight, and releases the fine-tunes once
    the model they start from is there (written by a job of :data:`BASE_KINDS`, or given)."""

    def __init__(self, ray: Any, recipe: Recipe, progress: RaySweepProgress, slots: int) -> None:
        self.ray = ray
        self.recipe = recipe
        self.progress = progress
        self.slots = slots
        self.ready: deque[SweepJob] = deque()
        self.waiting: dict[Path, list[SweepJob]] = {}
        """Fine-tunes by the model file they start from."""
        self.running: dict[Any, SweepJob] = {}
        self.failed: list[tuple[str, str]] = []
        resources = recipe.resources
        self.task = ray.remote(run_job_task)
        self.options = {
            "num_cpus": resources.cpus,
            "num_gpus": resources.gpus,
            "max_retries": resources.retries,
            "retry_exceptions": False,
        }
        self.recipe_ref = ray.put(recipe)
        self.total = 0

    def add(self, jobs: list[SweepJob]) -> None:
        self.total += len(jobs)
        for job in jobs:
            if job.kind == "finetune":
                self.waiting.setdefault(pretrained_path(self.recipe, job.seed), []).append(job)
        made = {j.folder / MODEL_FILE for j in jobs if j.kind in BASE_KINDS}
        for job in jobs:
            if job.kind != "finetune":
                self._offer(job)
        for path in list(self.waiting):
            if path not in made:  # the recipe's own file
                self._release(path)

    def _fail(self, job: SweepJob, reason: str) -> None:
        self.failed.append((job.label, reason))
        self.progress.failed += 1
        self.progress.event(job.label, f"FAILED: {reason}")

    def _offer(self, job: SweepJob, base_sha256: str | None = None) -> None:
        """Queue ``job`` unless it finished earlier (checked here, saving a task)."""
        try:
            finished = job_is_finished(job, base_sha256)
        except NegmergeError as exc:
            self._fail(job, str(exc))
            self._abandon(job)
            return
        if finished:
            self.progress.skipped += 1
            self.progress.event(job.label, "finished earlier, skipped")
            if job.kind in BASE_KINDS:
                self._release(job.folder / MODEL_FILE)
        else:
            self.ready.append(job)

    def _release(self, path: Path) -> None:
        """The model at ``path`` exists: the fine-tunes starting from it can go."""
        jobs = self.waiting.pop(path, [])
        if not jobs:
            return
        try:
            base_sha = file_sha256(path)
        except OSError as exc:
            for job in jobs:
                self._fail(job, f"cannot read the pre-trained model: {exc}")
            return
        for job in jobs:
            self._offer(job, base_sha)

    def _abandon(self, job: SweepJob) -> None:
        """``job`` failed for good: so do the fine-tunes that start from its model."""
        if job.kind in BASE_KINDS:
            reason = f"its {BASE_KINDS[job.kind]} failed ({job.label})"
            for waiting in self.waiting.pop(job.folder / MODEL_FILE, []):
                self._fail(waiting, reason)

    def _submit(self) -> None:
        while self.ready and len(self.running) < self.slots:
            job = self.ready.popleft()
            ref = self.task.options(name=f"{TASK_PREFIX} {job.label}", **self.options).remote(
                self.recipe_ref, job
            )
            self.running[ref] = job
        self.progress.running = len(self.running)

    def _collect(self, ref: Any) -> None:
        job = self.running.pop(ref)
        self.progress.running = len(self.running)
        try:
            outcome = self.ray.get(ref)
        except Exception as exc:  # a task's error or Ray's: this run failed for good
            self._fail(job, _reason(self.ray, exc, self.recipe.resources.retries))
            self._abandon(job)
            return
        for leftover in outcome["removed"]:
            self.progress.note(f"removed the leftover of an interrupted run: {leftover}")
        if outcome["trained"]:
            self.progress.trained += 1
            metrics = outcome["metrics"]
            message = f"done in {metrics['seconds']:.1f}s on {outcome['host']}"
            if job.kind != "zeroshot":  # extracted, not trained
                message += f" (loss {metrics['loss']:.3f}, train acc {metrics['accuracy']:.3f})"
            self.progress.event(job.label, message)
        else:  # finished by an attempt whose worker died after the rename
            self.progress.skipped += 1
            self.progress.event(job.label, "finished earlier, skipped")
        if job.kind in BASE_KINDS:
            self._release(job.folder / MODEL_FILE)

    def run(self) -> None:
        refreshed = time.monotonic()
        try:
            with signals_deferred() as stop:
                self._submit()
                while self.running:
                    stop.check()
                    done, _ = self.ray.wait(list(self.running), num_returns=1, timeout=1.0)
                    stop.check()
                    for ref in done:
                        self._collect(ref)
                    if time.monotonic() - refreshed > SLOTS_REFRESH_S:
                        # A cluster may grow (autoscaling) or lose nodes during the sweep.
                        with contextlib.suppress(RayError):
                            self.slots = run_slots(self.ray, self.recipe.resources, self.total)
                        refreshed = time.monotonic()
                    self._submit()
                    self.progress.tick()
        except (Interrupted, KeyboardInterrupt):
            # Not cancelled: the tasks end with this driver (Ray stops a job's tasks when
            # its driver exits) and a resumed sweep removes what they left. Cancelling
            # while a task completes makes Ray 2.60 abort the driver ("Tried to complete
            # task that was not pending"), which the signal's clean exit must not risk.
            raise
        except BaseException:
            self._cancel()
            raise

    def _cancel(self) -> None:
        """Stop every task in flight and wait until they are gone (a cancelled task removes
        its temp folder on the way out; a killed one's leftover goes at the next attempt)."""
        cancel_and_wait(self.ray, list(self.running))


def failure_error(summary: SweepSummary, output: Path) -> RunsFailed:
    """The one-line error for a sweep with failed runs (the CLI exits with status 1)."""
    shown = "; ".join(f"{label}: {reason}" for label, reason in summary.failed[:3])
    more = f"; and {len(summary.failed) - 3} more" if len(summary.failed) > 3 else ""
    total = summary.trained + summary.skipped + len(summary.failed)
    return RunsFailed(
        f"{len(summary.failed)} of {total} run(s) failed ({shown}{more}); the finished runs "
        f"in {output} are kept, run the sweep again to retry the others"
    )
