"""The fine-tuning sweep: pre-train (or load) the model, retrain a reference, fine-tune N times.

Layout of a recipe's output folder, one sub-folder per seed::

    seed-0/pretrained/{model.safetensors, run.json}   the model to unlearn from
    seed-0/retrained/{model.safetensors, run.json}    reference trained without the forget set
    seed-0/runs/<run-id>/{model.safetensors, run.json}

A run is written into ``runs/.tmp-<run-id>-<pid>/`` (model first, ``run.json`` last) and
renamed into place only when complete, so a killed sweep never leaves a folder that looks
finished; the next sweep removes the leftover and redoes that run. A finished run whose
``run.json`` records other settings than the recipe's is refused rather than reused.
Two sweeps writing to the same output folder at once are not supported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import torch

from negmerge_cli import __version__
from negmerge_cli.errors import CheckpointError, UsageError
from negmerge_cli.recipes import Recipe, RunSpec, TrainConfig
from negmerge_cli.train.data import UnlearningData, load_data
from negmerge_cli.train.loop import TrainResult, resolve_device, torch_threads, train_model
from negmerge_cli.train.models import build_model

MODEL_FILE = "model.safetensors"
RUN_FILE = "run.json"
RUN_FORMAT = "negmerge-run/1"
TEMP_PREFIX = ".tmp-"


# --------------------------------------------------------------------------- layout


def seed_dir(recipe: Recipe, seed: int) -> Path:
    """The folder holding everything one seed of a recipe produces."""
    return recipe.output / f"seed-{seed}"


def pretrained_path(recipe: Recipe, seed: int) -> Path:
    """The model to unlearn from: the recipe's file, or the one pre-trained for this seed.

    For CLIP it is the zero-shot image encoder the sweep extracts once for all seeds.
    """
    if recipe.model.arch == "clip":
        return recipe.output / "zeroshot" / MODEL_FILE
    if recipe.model.pretrained is not None:
        return recipe.model.pretrained
    return seed_dir(recipe, seed) / "pretrained" / MODEL_FILE


def retrained_path(recipe: Recipe, seed: int) -> Path:
    """The reference model trained from scratch on the retain set only."""
    return seed_dir(recipe, seed) / "retrained" / MODEL_FILE


def run_dir(recipe: Recipe, seed: int, run: RunSpec) -> Path:
    """Where one fine-tune of the sweep lives."""
    return seed_dir(recipe, seed) / "runs" / run.run_id


def derive_seed(seed: int, label: str) -> int:
    """A stable 31-bit seed for one run: same recipe seed and run name, same number."""
    digest = hashlib.sha256(f"{seed}:{label}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file (ties each fine-tune to the exact model it started from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_finished(folder: Path) -> bool:
    """True when ``folder`` holds a complete run: a readable run.json and the model file."""
    return read_run(folder) is not None and (folder / MODEL_FILE).is_file()


def read_run(folder: Path) -> dict[str, Any] | None:
    """The parsed run.json of a finished run, or None when there is none (or it is broken)."""
    try:
        info = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
        return None
    return info


def finished_runs(recipe: Recipe, seed: int) -> list[Path]:
    """Model files of the recipe's runs for one seed; an error names any missing run."""
    missing = [
        run.run_id for run in recipe.sweep.runs if not is_finished(run_dir(recipe, seed, run))
    ]
    if missing or not pretrained_path(recipe, seed).is_file():
        what = (
            f"{len(missing)} of {len(recipe.sweep.runs)} runs"
            if missing
            else "the pre-trained model"
        )
        raise UsageError(
            f"{seed_dir(recipe, seed)}: {what} not finished for seed {seed} "
            f"(first: {missing[0] if missing else 'pretrained'}); run `negmerge sweep` first"
        )
    return [run_dir(recipe, seed, run) / MODEL_FILE for run in recipe.sweep.runs]


# --------------------------------------------------------------------------- writing


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_run(folder: Path, state: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Write a run atomically: into a temp folder (model, then run.json), then rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = folder.parent / f"{TEMP_PREFIX}{folder.name}-{os.getpid()}"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir()
    try:
        from negmerge_cli.io import save_state_dict

        metadata = {"negmerge_run": json.dumps({k: info[k] for k in ("kind", "run_id", "seed")})}
        save_state_dict(state, temp / MODEL_FILE, metadata=metadata)
        text = json.dumps(info, indent=2, sort_keys=True) + "\n"
        (temp / (RUN_FILE + ".part")).write_text(text, encoding="utf-8")
        os.replace(temp / (RUN_FILE + ".part"), temp / RUN_FILE)
        if folder.exists():  # an unfinished or stale leftover the caller chose to replace
            shutil.rmtree(folder)
        os.rename(temp, folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete temp folders that killed runs left in ``folder`` (not those of live processes)."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        pid_text = entry.name.rsplit("-", 1)[-1]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _alive(int(pid_text)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def remove_run_leftovers(folder: Path) -> list[Path]:
    """Delete the temp folders earlier attempts at this one run left (``.tmp-<name>-<pid>``).

    Used where a process may run only this run, whatever the pid: a Ray task retried after
    its worker died (perhaps on another node, where the pid means nothing here).
    """
    removed = []
    if not folder.parent.is_dir():
        return removed
    for entry in folder.parent.iterdir():
        stem, _, pid_text = entry.name.rpartition("-")
        if stem == f"{TEMP_PREFIX}{folder.name}" and pid_text.isdigit():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- progress


class SweepProgress:
    """Progress on stderr: a line per run, with the current epoch updated in place on a TTY."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.total = 0
        self._prefix = ""

    def begin(self, total: int) -> None:
        self.total = total

    def start(self, label: str) -> None:
        self._prefix = f"[{self.done + 1}/{self.total}] {label}"
        if self.tty and not self.quiet:
            self.stream.write(f"\r{self._prefix} ...\x1b[K")
            self.stream.flush()

    def epoch(self, epoch: int, epochs: int, loss: float) -> None:
        if self.tty and not self.quiet:
            self.stream.write(f"\r{self._prefix}: epoch {epoch}/{epochs} loss {loss:.4f}\x1b[K")
            self.stream.flush()

    def finish(self, message: str) -> None:
        self.done += 1
        if self.quiet:
            return
        line = f"{self._prefix}: {message}"
        self.stream.write(f"\r{line}\x1b[K\n" if self.tty else f"{line}\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        if not self.quiet:
            self.stream.write(message + "\n")
            self.stream.flush()


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class SweepSummary:
    """What a sweep did: runs trained and skipped, and where the models are."""

    trained: int
    skipped: int
    seconds: float
    folders: tuple[Path, ...]
    failed: tuple[tuple[str, str], ...] = ()
    """``(run label, reason)`` of every run that failed for good (Ray backend; the local
    backend stops at the first error instead)."""


def _run_info(
    kind: str,
    run_id: str,
    seed: int,
    train_seed: int,
    params: TrainConfig,
    result: TrainResult,
    samples: int,
    started: str,
    varied: dict[str, Any] | None = None,
    base_sha256: str | None = None,
) -> dict[str, Any]:
    return {
        "format": RUN_FORMAT,
        "kind": kind,
        "run_id": run_id,
        "seed": seed,
        "train_seed": train_seed,
        "hyperparameters": dataclasses.asdict(params),
        "varied": varied or {},
        "base_sha256": base_sha256,
        "train_samples": samples,
        "metrics": result.as_dict(),
        "started": started,
        "finished": _now(),
        "negmerge_version": __version__,
    }


def _matches(info: dict[str, Any], params: TrainConfig, seed: int, base: str | None) -> bool:
    return (
        info.get("hyperparameters") == dataclasses.asdict(params)
        and info.get("seed") == seed
        and info.get("base_sha256") == base
    )


def _check_reusable(folder: Path, params: TrainConfig, seed: int, base: str | None) -> bool:
    """True when a finished run can be skipped; an error when it was made differently."""
    if not is_finished(folder):
        return False
    info = read_run(folder)
    assert info is not None
    if not _matches(info, params, seed, base):
        raise UsageError(
            f"{folder}: holds a finished run made with other settings (hyperparameters, seed "
            "or starting model differ from the recipe); delete it or choose another output folder"
        )
    return True


def _train_and_write(
    folder: Path,
    kind: str,
    run_id: str,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    params: TrainConfig,
    seed: int,
    train_seed: int,
    progress: SweepProgress,
    varied: dict[str, Any] | None = None,
    base_sha256: str | None = None,
    on_epoch: Callable[[int, int, float], None] | None = None,
    precision: str = "fp32",
) -> TrainResult:
    started = _now()

    def report(epoch: int, epochs: int, loss: float) -> None:
        progress.epoch(epoch, epochs, loss)
        if on_epoch is not None:
            on_epoch(epoch, epochs, loss)

    result = train_model(model, x, y, params, train_seed, report, precision)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    info = _run_info(
        kind, run_id, seed, train_seed, params, result, len(y), started, varied, base_sha256
    )
    write_run(folder, state, info)
    progress.finish(
        f"done in {result.seconds:.1f}s (loss {result.loss:.3f}, train acc {result.accuracy:.3f})"
    )
    return result


def load_model_weights(recipe: Recipe, path: Path) -> torch.nn.Module:
    """Build the recipe's model and load ``path`` into it (a clear error when it does not fit)."""
    from negmerge_cli.io import load_state_dict

    model = build_model(recipe.model, seed=0)
    state = load_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(f"{path}: does not fit model {recipe.model.arch}: {detail}") from None
    return model


@dataclass(frozen=True)
class SweepJob:
    """One training run of a sweep, as plain data (a backend may send it to another process).

    ``kind`` is ``pretrain`` (trains ``data.train`` from the seed's initialisation),
    ``retrain`` (``data.retain``, the reference) or ``finetune`` (``data.forget``, starting
    from the seed's pre-trained model, so it waits for ``pretrain``). A CLIP sweep has a
    ``zeroshot`` job (the zero-shot image encoder and heads, shared by every seed) and
    ``finetune`` jobs (the task's training images) that wait for it.
    """

    kind: str
    seed: int
    run_id: str
    label: str
    """How progress names the run: ``seed 0 run 03-lr0.003-ep2``."""
    folder: Path
    params: TrainConfig
    train_seed: int
    varied: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    expect: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """What else identifies the run (CLIP: a fine-tune's task, fine-tuning mode and class
    names, recorded in its run.json; the zero-shot base's weights and heads' class names):
    a finished run that differs is refused rather than reused."""


def sweep_jobs(recipe: Recipe) -> list[SweepJob]:
    """Every run of the sweep, in the order the local backend runs them: each seed's
    :func:`seed_jobs`; for CLIP the zero-shot base first, then every seed's fine-tunes.

    A fine-tune starts from :func:`pretrained_path`, which the seed's ``pretrain`` job (or
    CLIP's ``zeroshot`` job) writes as its model file; without such a job it is on disk.
    """
    if recipe.model.arch == "clip":
        from negmerge_cli.train.clip import clip_jobs

        return clip_jobs(recipe)
    return [job for seed in recipe.seeds for job in seed_jobs(recipe, seed)]


def seed_jobs(recipe: Recipe, seed: int) -> list[SweepJob]:
    """Every run one seed needs, in the order the local backend runs them: pre-train (when
    the recipe has no pre-trained file), retrain (when asked), then each fine-tune (for
    CLIP only the fine-tunes; the zero-shot base they start from is in :func:`sweep_jobs`)."""
    if recipe.model.arch == "clip":
        return [j for j in sweep_jobs(recipe) if j.kind == "finetune" and j.seed == seed]
    root = seed_dir(recipe, seed)
    jobs = []
    if recipe.model.pretrained is None:
        jobs.append(SweepJob("pretrain", seed, "pretrained", f"seed {seed} pre-train",
                             root / "pretrained", recipe.pretrain, seed))  # fmt: skip
    if recipe.retrain:
        jobs.append(SweepJob("retrain", seed, "retrained", f"seed {seed} retrain on retain set",
                             root / "retrained", recipe.pretrain, seed))  # fmt: skip
    for run in recipe.sweep.runs:
        jobs.append(SweepJob("finetune", seed, run.run_id, f"seed {seed} run {run.run_id}",
                             run_dir(recipe, seed, run), run.params,
                             derive_seed(seed, run.run_id), dict(run.varied)))  # fmt: skip
    return jobs


@dataclass
class StartingPoint:
    """The pre-trained model the fine-tunes of one seed start from, loaded once."""

    sha256: str
    model: torch.nn.Module
    state: dict[str, torch.Tensor]


def load_starting_point(recipe: Recipe, seed: int) -> StartingPoint:
    """Load the seed's pre-trained model (it must exist) and note its SHA-256 (for CLIP,
    the zero-shot encoder with the task's head and images:
    :func:`negmerge_cli.train.clip.load_clip_start`)."""
    if recipe.model.arch == "clip":
        from negmerge_cli.train.clip import load_clip_start

        return load_clip_start(recipe)
    path = pretrained_path(recipe, seed)
    sha = file_sha256(path)
    model = load_model_weights(recipe, path)
    return StartingPoint(sha, model, {k: v.clone() for k, v in model.state_dict().items()})


def sweep_data(recipe: Recipe) -> UnlearningData | None:
    """The data every run of ``recipe`` trains on (each backend's process loads it once);
    None for CLIP, whose runs read their images from the data folders as they train."""
    if recipe.model.arch == "clip":
        return None
    return load_data(recipe.data)


def job_is_finished(job: SweepJob, base_sha256: str | None = None) -> bool:
    """True when ``job`` finished earlier with the recipe's settings (skip it); an error
    when its folder holds a run made differently. A fine-tune needs the SHA-256 of the
    model it starts from."""
    if job.kind == "zeroshot":
        from negmerge_cli.train.clip import zeroshot_is_finished

        return zeroshot_is_finished(job)
    if job.kind == "finetune" and base_sha256 is None:
        raise ValueError("a fine-tune is checked against the model it starts from")
    if not _check_reusable(job.folder, job.params, job.seed, base_sha256):
        return False
    info = (read_run(job.folder) or {}) if job.expect else {}
    if any(info.get(k) != v for k, v in job.expect.items()):
        raise UsageError(
            f"{job.folder}: holds a run of another task, fine-tuning mode or class "
            f"names ({info.get('dataset')}, {info.get('finetune')}); delete it "
            "or choose another output folder"
        )
    return True


def run_job(
    recipe: Recipe,
    job: SweepJob,
    data: UnlearningData | None,
    progress: SweepProgress,
    start: StartingPoint | None = None,
    on_epoch: Callable[[int, int, float], None] | None = None,
) -> TrainResult | None:
    """Train and write one run unless it finished earlier; None when it was skipped.

    A fine-tune loads its starting point from disk unless ``start`` is given. The caller
    announces the run with ``progress.start`` (not CLIP's zero-shot base, which only
    notes what it does).
    """
    if job.kind == "zeroshot":
        from negmerge_cli.train.clip import run_zeroshot_job

        return run_zeroshot_job(recipe, job, progress)
    if job.kind == "finetune" and start is None:
        start = load_starting_point(recipe, job.seed)
    base_sha256 = start.sha256 if job.kind == "finetune" and start is not None else None
    if job_is_finished(job, base_sha256):
        progress.finish("finished earlier, skipped")
        return None
    if recipe.model.arch == "clip":
        from negmerge_cli.train.clip import ClipStart, run_clip_finetune

        assert isinstance(start, ClipStart) and job.kind == "finetune"
        return run_clip_finetune(recipe, job, start, progress, on_epoch)
    assert data is not None
    if job.kind == "finetune":
        assert start is not None
        model = start.model
        model.load_state_dict(start.state)
        split = data.forget
    else:
        model = build_model(recipe.model, seed=job.seed)
        split = data.train if job.kind == "pretrain" else data.retain
    model.to(resolve_device(recipe.device))
    return _train_and_write(
        job.folder, job.kind, job.run_id, model, split.x, split.y, job.params, job.seed,
        job.train_seed, progress, varied=dict(job.varied),
        base_sha256=base_sha256,
        on_epoch=on_epoch, precision=recipe.precision,
    )  # fmt: skip


def sweep_seed(
    recipe: Recipe,
    seed: int,
    data: UnlearningData,
    progress: SweepProgress,
    on_epoch: Callable[[int, int, float], None] | None = None,
) -> tuple[int, int]:
    """Pre-train, retrain and fine-tune everything one seed needs; returns (trained, skipped)."""
    root = seed_dir(recipe, seed)
    trained = skipped = 0
    for folder in (root, root / "runs"):
        for leftover in remove_leftovers(folder):
            progress.note(f"removed the leftover of an interrupted run: {leftover}")

    start = None
    for job in seed_jobs(recipe, seed):
        if job.kind != "pretrain" and start is None:
            # Loaded once per seed, and before the retrain: weights that do not fit the
            # model are refused before any training.
            start = load_starting_point(recipe, seed)
        progress.start(job.label)
        if run_job(recipe, job, data, progress, start, on_epoch) is None:
            skipped += 1
        else:
            trained += 1
    return trained, skipped


def run_sweep(
    recipe: Recipe,
    *,
    quiet: bool = False,
    stream: TextIO | None = None,
    on_epoch: Callable[[int, int, float], None] | None = None,
) -> SweepSummary:
    """Run (or resume) the whole sweep of a recipe, every seed; finished runs are skipped.

    ``on_epoch`` is called after every epoch of every run (tests use it to interrupt).
    CLIP recipes (task negation) run :func:`negmerge_cli.train.clip.run_clip_sweep`.
    """
    with torch_threads(recipe.threads):
        if recipe.model.arch == "clip":
            from negmerge_cli.train.clip import run_clip_sweep

            return run_clip_sweep(recipe, quiet=quiet, stream=stream, on_epoch=on_epoch)
        return _run_sweep(recipe, quiet, stream, on_epoch)


def _run_sweep(
    recipe: Recipe,
    quiet: bool,
    stream: TextIO | None,
    on_epoch: Callable[[int, int, float], None] | None,
) -> SweepSummary:
    start = time.perf_counter()
    data = sweep_data(recipe)
    progress = SweepProgress(stream, quiet)
    per_seed = len(recipe.sweep.runs) + (recipe.model.pretrained is None) + recipe.retrain
    progress.begin(per_seed * len(recipe.seeds))
    recipe.output.mkdir(parents=True, exist_ok=True)
    trained = skipped = 0
    for seed in recipe.seeds:
        t, s = sweep_seed(recipe, seed, data, progress, on_epoch)
        trained += t
        skipped += s
    seconds = time.perf_counter() - start
    progress.note(
        f"sweep: {trained} run(s) trained, {skipped} skipped (finished earlier) "
        f"in {seconds:.1f}s -> {recipe.output}"
    )
    return SweepSummary(trained, skipped, seconds, tuple(seed_dir(recipe, s) for s in recipe.seeds))
