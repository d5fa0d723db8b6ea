"""The sweep on a local Ray instance: the local backend's checkpoints, resumable, retried."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from negmerge_cli.cli import main
from negmerge_cli.recipes import load_recipe
from negmerge_cli.train.sweep import MODEL_FILE, RUN_FILE, is_finished, run_sweep, seed_jobs
from tests.conftest import run_behind_private_tmpfs

ray = pytest.importorskip("ray")
from negmerge_cli.train.ray_sweep import absolute_paths, run_sweep_on_ray  # noqa: E402

# Two seeds, each: pre-train, the retrained reference, two fine-tunes.
TINY = [
    "seeds=[0, 1]",
    "pretrain.epochs=2",
    "reference.retrain=true",
    "sweep.grid={lr: [0.01], epochs: [1, 2]}",
]


@pytest.fixture(scope="module")
def cluster():
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context
    ray.shutdown()


def tiny(output: Path, *extra: str):
    return load_recipe("digits", [*TINY, f"output={output}", *extra])


def models(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob(MODEL_FILE))}


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory) -> Path:
    """The tiny sweep on the local backend, the reference for Ray's."""
    out = tmp_path_factory.mktemp("local") / "out"
    run_sweep(tiny(out), quiet=True)
    return out


def test_a_sweep_on_ray_writes_the_local_backends_checkpoints_and_resumes(
    cluster, local_runs, tmp_path
):
    recipe = tiny(tmp_path / "out")
    stream = io.StringIO()
    summary = run_sweep_on_ray(recipe, stream=stream)
    assert (summary.trained, summary.skipped, summary.failed) == (8, 0, ())
    ours, theirs = models(tmp_path / "out"), models(local_runs)
    assert len(ours) == 8 and ours == theirs  # seeded training: the same bytes
    for job in seed_jobs(recipe, 1):
        info = json.loads((job.folder / RUN_FILE).read_text())
        local = json.loads(
            (local_runs / job.folder.relative_to(recipe.output) / RUN_FILE).read_text()
        )
        assert info["kind"] == job.kind and info["hyperparameters"] == local["hyperparameters"]
        assert info["base_sha256"] == local["base_sha256"]
    assert not list((tmp_path / "out").rglob(".tmp-*"))
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("sweep on Ray: 8 run(s) over 2 seed(s), up to 2 at once")
    assert lines[-2].startswith("[8/8 done, 0 running, 0 failed] ")
    assert lines[-1].startswith("sweep: 8 run(s) trained, 0 skipped (finished earlier), 0 failed")

    files = sorted((tmp_path / "out").rglob(MODEL_FILE))
    before = {p: p.stat().st_mtime_ns for p in files}
    again = run_sweep_on_ray(recipe, quiet=True)
    assert (again.trained, again.skipped, again.failed) == (0, 8, ())
    assert {p: p.stat().st_mtime_ns for p in files} == before


def _worker_running(title: bytes) -> int | None:
    """The pid of the Ray worker whose process title starts with ``title``."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    if handle.read().startswith(title):
                        return int(pid)
            except OSError:
                continue
    return None


# Pre-training long enough (~2 s) to be caught in the middle.
KILLABLE = ["seeds=[0]", "pretrain.epochs=16", "reference.retrain=false"]


def sweep_killing_the_pretraining(recipe, stream: io.StringIO):
    """Run the sweep on Ray, SIGKILL the worker pre-training seed 0 half a second into
    the run, and return the summary."""
    result: dict = {}

    def sweep() -> None:
        result["summary"] = run_sweep_on_ray(recipe, stream=stream)

    thread = threading.Thread(target=sweep)
    thread.start()
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        killed = _worker_running(b"ray::negmerge-sweep seed 0 pre-train")
        time.sleep(0.02)
    assert killed is not None, "no worker was caught pre-training"
    time.sleep(0.5)  # well into training
    assert not is_finished(seed_jobs(recipe, 0)[0].folder)
    os.kill(killed, signal.SIGKILL)
    thread.join(timeout=120)
    return result["summary"]


def test_a_worker_killed_in_the_middle_of_a_run_is_retried_and_the_sweep_completes(
    cluster, tmp_path
):
    recipe = tiny(tmp_path / "ray", *KILLABLE)
    # A worker that died on another node while writing a fine-tune left its temp folder.
    first_run = seed_jobs(recipe, 0)[1].folder
    leftover = first_run.parent / f".tmp-{first_run.name}-99999999"
    leftover.mkdir(parents=True)
    (leftover / MODEL_FILE).write_bytes(b"half a model")
    stream = io.StringIO()
    summary = sweep_killing_the_pretraining(recipe, stream)
    assert (summary.trained, summary.failed) == (3, ())
    assert all(is_finished(job.folder) for job in seed_jobs(recipe, 0))
    assert not list((tmp_path / "ray").rglob(".tmp-*"))
    assert f"removed the leftover of an interrupted run: {leftover}" in stream.getvalue()
    local = tiny(tmp_path / "local", *KILLABLE)
    run_sweep(local, quiet=True)
    assert models(tmp_path / "ray") == models(tmp_path / "local")


def test_without_retries_a_killed_worker_fails_its_run_and_what_depends_on_it(cluster, tmp_path):
    recipe = tiny(tmp_path / "out", *KILLABLE, "resources.retries=0")
    summary = sweep_killing_the_pretraining(recipe, io.StringIO())
    assert summary.trained == 0
    assert summary.failed == (
        ("seed 0 pre-train", "its worker died 1 time(s) (resources.retries: 0); "
                             "WorkerCrashedError"),
        ("seed 0 run 00-lr0.01-ep1", "its pre-training failed (seed 0 pre-train)"),
        ("seed 0 run 01-lr0.01-ep2", "its pre-training failed (seed 0 pre-train)"),
    )  # fmt: skip
    assert not (tmp_path / "out" / "seed-0" / "pretrained").exists()


def test_runs_that_fail_for_good_are_listed_while_the_others_finish(cluster, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = tiny(out)
    # A file where a run's folder goes: the run trains, then cannot be put in place.
    broken = seed_jobs(recipe, 0)[2].folder  # seed 0's first fine-tune
    broken_base = seed_jobs(recipe, 1)[0].folder  # seed 1's pre-training
    for path in (broken, broken_base):
        path.parent.mkdir(parents=True)
        path.write_text("a file where the run's folder goes")
    argv = ["sweep", "digits", *(f"--set={s}" for s in TINY), "-o", str(out), "--backend", "ray"]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 1
    assert f"  failed: seed 0 run {broken.name}: NotADirectoryError" in err
    assert "  failed: seed 1 pre-train: NotADirectoryError" in err
    for run in ("00-lr0.01-ep1", "01-lr0.01-ep2"):  # seed 1's fine-tunes need its model
        assert f"  failed: seed 1 run {run}: its pre-training failed (seed 1 pre-train)" in err
    assert "sweep: 4 run(s) trained, 0 skipped (finished earlier), 4 failed" in err
    assert "negmerge: error: 4 of 8 run(s) failed (" in err
    assert "; and 1 more); the finished runs in" in err
    assert "run the sweep again to retry the others" in err
    finished = [seed_jobs(recipe, 0)[i] for i in (0, 1, 3)] + [seed_jobs(recipe, 1)[1]]
    assert all(is_finished(job.folder) for job in finished)


def test_the_backend_and_address_flags_are_checked(cli_error):
    assert "choose local or ray" in cli_error("sweep", "digits", "--backend", "slurm")
    assert "only with --backend ray" in cli_error("run", "digits", "--address", "auto")


@pytest.fixture
def cli_error(capsys):
    def invoke(*argv: str) -> str:
        with pytest.raises(SystemExit) as stop:
            main(list(argv))
        assert stop.value.code == 2
        return capsys.readouterr().err

    return invoke


def test_an_output_folder_the_workers_cannot_see_is_refused(cluster, tmp_path):
    """The driver runs in its own mount namespace with a private tmpfs: Ray's workers,
    started outside it, see an empty folder where the driver writes the output."""
    private = tmp_path / "private"
    private.mkdir()
    address = cluster.address_info["address"]
    argv = ["sweep", "digits", *(f"--set={s}" for s in TINY), "-o", str(private / "out"),
            "--backend", "ray", "--address", address]  # fmt: skip
    done = run_behind_private_tmpfs(private, argv)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Ray workers cannot see this folder" in done.stderr
    assert "run(s) trained" not in done.stderr
    assert list(private.iterdir()) == []


def test_relative_paths_of_a_recipe_are_made_absolute_for_the_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    recipe = absolute_paths(tiny(Path("out"), "model.pretrained=w.safetensors"))
    assert recipe.output == tmp_path / "out"
    assert recipe.model.pretrained == weights
    assert recipe.sweep == tiny(Path("out")).sweep


def test_sigterm_stops_a_sweep_on_ray_cleanly_and_it_resumes(cluster, tmp_path):
    out = tmp_path / "out"
    # Neither --address nor RAY_ADDRESS: the driver starts its own Ray, which installs a
    # SIGTERM handler that aborts the process (exit 134) unless negmerge puts its own back.
    argv = ["sweep", "digits", *(f"--set={s}" for s in TINY), "-o", str(out),
            "--backend", "ray"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "negmerge_cli", *argv], stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.monotonic() + 60
    while not (out / "seed-0" / "pretrained" / RUN_FILE).exists():
        assert driver.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=60)
    lines = [line for line in err.splitlines() if not line.startswith(("/", " "))]
    assert driver.returncode == 130, "\n".join(lines)[-3000:]
    assert "sweep interrupted; finished runs in" in err
    summary = run_sweep_on_ray(tiny(out), quiet=True)
    assert summary.failed == () and summary.skipped >= 1
    assert summary.trained + summary.skipped == 8
    assert not list(out.rglob(".tmp-*"))
