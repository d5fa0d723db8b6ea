"""The sweep: one folder per run, finished runs skipped, killed runs never look finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from negmerge_cli.errors import CheckpointError, UsageError
from negmerge_cli.io import load_state_dict, save_state_dict
from negmerge_cli.recipes import load_recipe
from negmerge_cli.train.sweep import (
    MODEL_FILE,
    RUN_FILE,
    file_sha256,
    finished_runs,
    is_finished,
    pretrained_path,
    run_dir,
    run_sweep,
)

TINY = [
    "seeds=[0]",
    "pretrain.epochs=2",
    "sweep.grid={lr: [0.01], epochs: [1, 2], augment: [none, shift]}",
]


def tiny(output: Path, *extra: str):
    return load_recipe("digits", [*TINY, f"output={output}", *extra])


def test_a_sweep_writes_every_run_with_its_model_and_run_json(tmp_path: Path):
    recipe = tiny(tmp_path / "out")
    summary = run_sweep(recipe, quiet=True)
    assert (summary.trained, summary.skipped) == (5, 0)  # pre-training + 4 fine-tunes
    base = pretrained_path(recipe, 0)
    for run in recipe.sweep.runs:
        folder = run_dir(recipe, 0, run)
        info = json.loads((folder / RUN_FILE).read_text())
        assert info["kind"] == "finetune" and info["run_id"] == run.run_id
        assert info["hyperparameters"]["lr"] == run.params.lr
        assert info["hyperparameters"]["augment"] == run.params.augment
        assert info["seed"] == 0
        assert info["base_sha256"] == file_sha256(base)
        assert info["train_samples"] == 214  # the images of classes 3 and 8 in training
        assert set(info["metrics"]) == {"loss", "accuracy", "seconds"}
        state = load_state_dict(folder / MODEL_FILE)
        assert set(state) == {f"{layer}.{p}" for layer in ("conv1", "conv2", "fc1", "fc2")
                              for p in ("weight", "bias")}  # fmt: skip
    assert not [p for p in (tmp_path / "out").rglob(".tmp-*")]
    assert finished_runs(recipe, 0) == [
        run_dir(recipe, 0, r) / MODEL_FILE for r in recipe.sweep.runs
    ]


def test_a_second_sweep_skips_finished_runs_and_leaves_them_untouched(tmp_path: Path):
    recipe = tiny(tmp_path / "out")
    run_sweep(recipe, quiet=True)
    files = sorted((tmp_path / "out").rglob(MODEL_FILE))
    before = {p: p.stat().st_mtime_ns for p in files}
    summary = run_sweep(recipe, quiet=True)
    assert (summary.trained, summary.skipped) == (0, 5)
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_the_same_recipe_and_seed_give_the_same_checkpoints(tmp_path: Path):
    a, b = tiny(tmp_path / "a"), tiny(tmp_path / "b")
    run_sweep(a, quiet=True)
    run_sweep(b, quiet=True)
    for run in a.sweep.runs:
        assert (run_dir(a, 0, run) / MODEL_FILE).read_bytes() == (
            run_dir(b, 0, run) / MODEL_FILE
        ).read_bytes()


def test_an_interrupted_sweep_keeps_finished_runs_and_resumes(tmp_path: Path):
    recipe = tiny(tmp_path / "out")
    calls = []

    def interrupt(epoch: int, epochs: int, loss: float) -> None:
        calls.append(epoch)
        if len(calls) == 2 + 1 + 1:  # pre-training (2 epochs), run 00 (1), first of run 01
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(recipe, quiet=True, on_epoch=interrupt)
    first, second = (run_dir(recipe, 0, r) for r in recipe.sweep.runs[:2])
    assert is_finished(first)
    assert not second.exists()
    with pytest.raises(UsageError, match="3 of 4 runs not finished"):
        finished_runs(recipe, 0)
    summary = run_sweep(recipe, quiet=True)
    assert (summary.trained, summary.skipped) == (3, 2)
    assert len(finished_runs(recipe, 0)) == 4


KILL_DURING_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    import negmerge_cli.train.sweep as sweep
    from negmerge_cli.recipes import load_recipe

    real_replace = os.replace
    def replace(src, dst):
        # SIGKILL the moment the second fine-tune's run.json would be put in place:
        # its model file is written, its run.json is not.
        if str(dst).endswith("run.json") and "/.tmp-01-" in str(dst):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)
    sweep.os.replace = replace
    recipe = load_recipe("digits", sys.argv[2:] + ["output=" + sys.argv[1]])
    sweep.run_sweep(recipe, quiet=True)
    """
)


def test_a_run_killed_while_writing_leaves_nothing_that_looks_finished(tmp_path: Path):
    out = tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DURING_WRITE, str(out), *TINY],
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr
    recipe = tiny(out)
    runs_folder = out / "seed-0" / "runs"
    leftovers = list(runs_folder.glob(".tmp-01-*"))
    assert len(leftovers) == 1 and (leftovers[0] / MODEL_FILE).is_file()
    assert not (leftovers[0] / RUN_FILE).exists()
    assert is_finished(run_dir(recipe, 0, recipe.sweep.runs[0]))
    assert not run_dir(recipe, 0, recipe.sweep.runs[1]).exists()

    summary = run_sweep(recipe, quiet=True)
    assert (summary.trained, summary.skipped) == (3, 2)
    assert not list(runs_folder.glob(".tmp-*"))
    # The resumed sweep equals an uninterrupted one bit for bit.
    clean = tiny(tmp_path / "clean")
    run_sweep(clean, quiet=True)
    for run in recipe.sweep.runs:
        assert (run_dir(recipe, 0, run) / MODEL_FILE).read_bytes() == (
            run_dir(clean, 0, run) / MODEL_FILE
        ).read_bytes()


def test_a_run_folder_without_run_json_is_trained_again(tmp_path: Path):
    recipe = tiny(tmp_path / "out")
    folder = run_dir(recipe, 0, recipe.sweep.runs[0])
    folder.mkdir(parents=True)
    (folder / MODEL_FILE).write_bytes(b"half a file")
    summary = run_sweep(recipe, quiet=True)
    assert summary.trained == 5
    assert is_finished(folder)
    assert torch.isfinite(load_state_dict(folder / MODEL_FILE)["fc2.weight"]).all()


def test_a_finished_run_made_with_other_settings_is_refused(tmp_path: Path):
    run_sweep(tiny(tmp_path / "out"), quiet=True)
    changed = tiny(tmp_path / "out", "sweep.base.momentum=0.5")  # not part of the run names
    with pytest.raises(UsageError, match="holds a finished run made with other settings"):
        run_sweep(changed, quiet=True)


def test_progress_goes_to_the_given_stream_and_quiet_silences_it(tmp_path: Path):
    import io

    stream = io.StringIO()
    recipe = tiny(tmp_path / "out", "sweep.grid={lr: [0.01]}")
    run_sweep(recipe, stream=stream)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[1/2] seed 0 pre-train: done in")
    assert lines[1].startswith("[2/2] seed 0 run 00-lr0.01: done in")
    assert lines[-1].startswith("sweep: 2 run(s) trained, 0 skipped")
    quiet = io.StringIO()
    run_sweep(recipe, stream=quiet, quiet=True)
    assert quiet.getvalue() == ""


def test_pretrained_weights_from_a_file_are_used_instead_of_pretraining(tmp_path: Path):
    first = tiny(tmp_path / "a", "sweep.grid={lr: [0.01]}")
    run_sweep(first, quiet=True)
    weights = pretrained_path(first, 0)
    second = tiny(tmp_path / "b", "sweep.grid={lr: [0.01]}", f"model.pretrained={weights}")
    summary = run_sweep(second, quiet=True)
    assert summary.trained == 1  # the fine-tune only
    assert not (tmp_path / "b" / "seed-0" / "pretrained").exists()
    assert os.path.samefile(pretrained_path(second, 0), weights)


def test_pretrained_weights_that_do_not_fit_the_model_are_refused_with_the_file_name(
    tmp_path: Path,
):
    weights = tmp_path / "other.safetensors"
    save_state_dict({"fc.weight": torch.zeros(3, 3)}, weights)
    recipe = tiny(tmp_path / "o", "sweep.grid={lr: [0.01]}", f"model.pretrained={weights}")
    with pytest.raises(CheckpointError, match=f"{weights}: does not fit model small_cnn"):
        run_sweep(recipe, quiet=True)


def test_the_sweep_restores_the_callers_thread_count(tmp_path: Path):
    before = torch.get_num_threads()
    run_sweep(tiny(tmp_path / "o", "sweep.grid={lr: [0.01]}", "threads=3"), quiet=True)
    assert torch.get_num_threads() == before
