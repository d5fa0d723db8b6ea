"""Merging on a local Ray instance gives the single-process sharded output, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from negmerge_cli.engine import merge
from negmerge_cli.errors import NonFiniteError
from negmerge_cli.io import save_state_dict
from tests.conftest import make_family, run_behind_private_tmpfs, small_model

ray = pytest.importorskip("ray")
from negmerge_cli.ray_backend import merge_on_ray  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context
    ray.shutdown()


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    ("method", "scope"),
    [
        ("negmerge", "global"),
        ("mean", "global"),
        ("magmax", "global"),
        ("ties", "global"),
        ("ties", "tensor"),
    ],
)
def test_ray_merge_equals_the_local_sharded_merge_bit_for_bit(cluster, tmp_path, method, scope):
    base, tunes = make_family(tmp_path, small_model(), 3)
    local, remote = tmp_path / "local", tmp_path / "remote"
    options = {"method": method, "density_scope": scope, "shard_size": 200, "lam": 0.8}
    merge(base, tunes, local, **options)
    report = merge_on_ray(base, tunes, remote, workers=2, memory_budget=100, **options)
    assert report["shards"] > 2
    assert folder_bytes(remote) == folder_bytes(local)


def test_a_failing_shard_leaves_no_index_and_no_shards(cluster, tmp_path):
    model = {"a": torch.ones(64), "b": torch.ones(64)}
    base, tunes = make_family(tmp_path, model, 2)
    broken = {"a": torch.ones(64), "b": torch.ones(64)}
    broken["b"][3] = float("nan")
    save_state_dict(broken, tunes[1], force=True)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"ft1\.safetensors: tensor 'b'"):
        merge_on_ray(base, tunes, out, shard_size=256)
    assert not out.exists()


def _holder_of(partial_prefix: Path) -> int | None:
    """The pid of the process with a file open whose path starts with ``partial_prefix``."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(str(partial_prefix)) and target.endswith(".negmerge-partial"):
                    return int(pid)
        except OSError:
            continue
    return None


def test_a_worker_killed_in_the_middle_of_a_shard_is_retried(cluster, tmp_path):
    generator = torch.Generator().manual_seed(1)
    model = {f"layer{i}": torch.randn(256, 256, generator=generator) for i in range(4)}
    base, tunes = make_family(tmp_path, model, 6)
    out, local = tmp_path / "out", tmp_path / "local"
    merge(base, tunes, local, shard_size=2**19)
    result: dict = {}

    def run() -> None:
        result["report"] = merge_on_ray(
            base, tunes, out, shard_size=2**19, workers=1, retries=2, memory_budget=4096
        )

    worker = threading.Thread(target=run)
    worker.start()
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and time.monotonic() < deadline and worker.is_alive():
        killed = _holder_of(out / ".model-")
        if killed is not None:
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    worker.join(timeout=120)
    assert killed is not None, "no worker was caught writing a shard"
    assert result["report"]["shards"] == 2
    assert folder_bytes(out) == folder_bytes(local)


def test_an_output_folder_the_workers_cannot_see_is_refused(cluster, tmp_path):
    """The driver runs in its own mount namespace with a private tmpfs: Ray's workers,
    started outside it, see an empty folder where the driver writes the output."""
    base, tunes = make_family(tmp_path, small_model(), 2)
    private = tmp_path / "private"
    private.mkdir()
    address = cluster.address_info["address"]
    argv = ["merge", str(base), *map(str, tunes), "-o", str(private / "out"),
            "--shard-size", "1MB", "--backend", "ray", "--address", address]  # fmt: skip
    done = run_behind_private_tmpfs(private, argv)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Ray workers cannot see this folder" in done.stderr
    assert list(private.iterdir()) == []


def test_sigterm_during_a_ray_merge_exits_130_and_leaves_nothing(cluster, tmp_path):
    generator = torch.Generator().manual_seed(2)
    model = {f"layer{i}": torch.randn(256, 256, generator=generator) for i in range(4)}
    base, tunes = make_family(tmp_path, model, 6)
    out = tmp_path / "out"
    address = cluster.address_info["address"]
    command = [
        sys.executable, "-m", "negmerge_cli", "merge", str(base), *map(str, tunes),
        "-o", str(out), "--shard-size", "300KB", "--backend", "ray", "--workers", "1",
        "--address", address, "-q",
    ]  # fmt: skip
    # A slow merge: the smallest chunks make every shard take a while.
    env = {**os.environ, "NEGMERGE_DEBUG": ""}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(out.glob("*.safetensors")):
        if process.poll() is not None:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the merge finished before the signal arrived")
    assert process.returncode == 130, stderr
    assert "stopped by SIGTERM" in stderr
    assert not out.exists()
