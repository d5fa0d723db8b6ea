"""scripts/gpu_check.py's dry run: the same code path on a 2-layer model on the CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("open_clip")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


def test_the_gpu_check_dry_run_times_every_step_and_prints_a_table(tmp_path: Path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = tmp_path / "timings.json"
    assert module.main(["--device", "cpu", "--tiny", "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["rows"]
    labels = [row[0] for row in rows]
    assert labels[0].startswith("build gpu-check-tiny")
    assert any(label.startswith("fine-tune: ") for label in labels)
    assert any(label.startswith("linearized fine-tune") for label in labels)
    assert labels[-1] == "NegMerge of 8 checkpoints on cpu"
    assert all(row[1] >= 0 for row in rows)
    assert "step" in capsys.readouterr().out
