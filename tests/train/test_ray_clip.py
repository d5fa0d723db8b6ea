"""The CLIP sweep on a local Ray instance: the zero-shot base, then one task per fine-tune."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("open_clip")
pytest.importorskip("torchvision")
ray = pytest.importorskip("ray")

from negmerge_cli.cli import main  # noqa: E402
from negmerge_cli.recipes import load_recipe  # noqa: E402
from negmerge_cli.train.ray_sweep import absolute_paths, run_sweep_on_ray  # noqa: E402
from negmerge_cli.train.sweep import RUN_FILE, run_sweep, sweep_jobs  # noqa: E402
from tests.train.test_clip import RECIPE  # noqa: E402
from tests.vision_helpers import (  # noqa: E402
    register_tiny_clip,
    save_tiny_clip_weights,
    write_dataset,
)

SEEDS = ["seeds=[0, 1]"]


@pytest.fixture(scope="module")
def cluster():
    # Ray's workers know the tiny open_clip config only once they have registered it.
    context = ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {"PYTHONPATH": str(Path(__file__).parents[2])},  # `tests` importable
            "worker_process_setup_hook": register_tiny_clip,
        },
    )
    yield context
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny CLIP weights, EuroSAT (3 classes), ImageNet (2), and the recipe file; the
    weights are named by a path relative to ``root`` (the local sweep runs there)."""
    register_tiny_clip()
    root = tmp_path_factory.mktemp("world")
    save_tiny_clip_weights(root / "weights" / "tiny.safetensors")
    write_dataset(root / "data", "eurosat", ["forest", "river", "sea_lake"])
    write_dataset(root / "data", "imagenet", ["goldfish", "tabby cat"], test_folder="val")
    recipe = root / "tiny-clip.yaml"
    text = RECIPE.format(out=root / "out", root=root / "data", weights="weights/tiny.safetensors")
    recipe.write_text(text)
    return {"root": root, "recipe": recipe}


def clip_recipe(world: dict[str, Path], output: Path, *extra: str):
    return load_recipe(world["recipe"], [*SEEDS, f"output={output}", *extra])


def models(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))
    }


@pytest.fixture(scope="module")
def local_runs(world) -> Path:
    """The local backend's sweep (run from ``root``: the weights path is relative)."""
    out = world["root"] / "local"
    here = os.getcwd()
    os.chdir(world["root"])
    try:
        run_sweep(clip_recipe(world, out), quiet=True)
    finally:
        os.chdir(here)
    return out


def test_a_clip_sweep_on_ray_writes_the_local_backends_checkpoints_and_resumes(
    cluster, world, local_runs, tmp_path, monkeypatch
):
    monkeypatch.chdir(world["root"])
    recipe = clip_recipe(world, tmp_path / "out")
    stream = io.StringIO()
    summary = run_sweep_on_ray(recipe, stream=stream)
    assert (summary.trained, summary.skipped, summary.failed) == (5, 0, ())
    ours, theirs = models(tmp_path / "out"), models(local_runs)
    # The zero-shot encoder, the heads and 2 x 2 fine-tunes: the same bytes.
    assert len(ours) == 6 and ours == theirs
    for job in sweep_jobs(absolute_paths(recipe))[1:]:
        info = json.loads((job.folder / RUN_FILE).read_text())
        local = json.loads((local_runs / job.folder.relative_to(tmp_path / "out") / RUN_FILE)
                           .read_text())  # fmt: skip
        for key in ("kind", "hyperparameters", "train_seed", "base_sha256", "metrics",
                    "dataset", "finetune", "class_names_sha256"):  # fmt: skip
            if key == "metrics":
                del info[key]["seconds"], local[key]["seconds"]
            assert info[key] == local[key], key
    assert not list((tmp_path / "out").rglob(".tmp-*"))
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("sweep on Ray: 5 run(s) over 2 seed(s), up to 2 at once")
    assert any(line.startswith("[1/5 done, ") and "] zero-shot base: done in" in line
               for line in lines)  # fmt: skip
    assert lines[-1].startswith("sweep: 5 run(s) trained, 0 skipped (finished earlier), 0 failed")

    # Finished runs are skipped. The local sweep named the weights by a relative path in
    # its zero-shot base; named absolutely (as the Ray driver names them) they are the same.
    again = run_sweep_on_ray(recipe, quiet=True)
    assert (again.trained, again.skipped, again.failed) == (0, 5, ())
    local_again = run_sweep(absolute_paths(clip_recipe(world, local_runs)), quiet=True)
    assert (local_again.trained, local_again.skipped) == (0, 4)


def test_linear_fine_tunes_on_ray_through_the_cli_match_the_local_backend(
    cluster, world, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(world["root"])
    sets = ["seeds=[0]", "model.finetune=linear", "sweep.grid={randaug_magnitude: [1]}"]
    argv = ["sweep", str(world["recipe"]), *(f"--set={s}" for s in sets), "-q"]
    for backend, out in (("local", tmp_path / "local"), ("ray", tmp_path / "ray")):
        with pytest.raises(SystemExit) as stop:
            main([*argv, "-o", str(out), "--backend", backend])
        assert stop.value.code in (0, None), capsys.readouterr().err
    info = json.loads((tmp_path / "ray" / "seed-0" / "runs" / "00-m1" / RUN_FILE).read_text())
    assert info["finetune"] == "linear"
    assert models(tmp_path / "ray") == models(tmp_path / "local")


def test_a_failed_zero_shot_base_fails_every_fine_tune_and_is_listed(
    cluster, world, tmp_path, monkeypatch
):
    monkeypatch.chdir(world["root"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "zeroshot").write_text("a file where the zero-shot base goes")
    summary = run_sweep_on_ray(clip_recipe(world, out), quiet=True)
    assert summary.trained == 0
    assert summary.failed[0][0] == "zero-shot base"
    assert summary.failed[0][1].startswith("NotADirectoryError")
    assert summary.failed[1:] == tuple(
        (f"seed {seed} run {run}", "its zero-shot base failed (zero-shot base)")
        for seed in (0, 1)
        for run in ("00-m1", "01-m9")
    )
    assert not (out / "seed-0").exists()
