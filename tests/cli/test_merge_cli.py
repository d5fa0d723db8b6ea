"""The merge, apply and inspect commands, through the real entry point."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from negmerge_cli.cli.options import expand_paths, parse_size
from negmerge_cli.engine import merge
from tests.conftest import small_model


def test_help_lists_the_commands_without_importing_torch():
    code = (
        "import sys\n"
        "from negmerge_cli.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for command in ("merge", "apply", "inspect"):
        assert command in done.stdout


def test_merge_help_explains_methods_and_lambda(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = cli("merge", "--help")
    assert code == 0
    assert "negmerge, mean, magmax, ties" in out and "--lambda" in out and "--shard-size" in out


def test_merge_writes_the_output_and_a_summary(cli, tmp_path, family):
    base, tunes = family(small_model(), 3)
    out = tmp_path / "out.safetensors"
    code, stdout, stderr = cli("merge", base, *tunes, "-o", out, "--lambda", "0.5")
    assert code == 0 and stdout == ""
    assert "negmerge: 5 of 11 tensors merged" in stderr and "sign consensus" in stderr
    expected = tmp_path / "expected.safetensors"
    merge(base, tunes, expected, lam=0.5)
    assert all(torch.equal(load_file(out)[k], v) for k, v in load_file(expected).items())


def test_quiet_prints_nothing_and_report_dash_prints_json(cli, tmp_path, family):
    base, tunes = family(small_model(), 2)
    code, stdout, stderr = cli(
        "merge", base, *tunes, "-o", tmp_path / "o.safetensors", "-q", "--report", "-"
    )
    assert code == 0 and stderr == ""
    report = json.loads(stdout)
    assert report["method"] == "negmerge" and report["totals"]["merged_tensors"] == 5


def test_report_file_is_written(cli, tmp_path, family):
    base, tunes = family(small_model(), 2)
    report = tmp_path / "report.json"
    cli("merge", base, *tunes, "-o", tmp_path / "o.safetensors", "-q", "--report", report)
    assert json.loads(report.read_text())["lambda"] == 1.0


def test_finetuned_paths_come_from_a_list_file_or_stdin(tmp_path, monkeypatch):
    listing = tmp_path / "runs.txt"
    listing.write_text("# runs\na.safetensors\n\nb.safetensors\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("c.safetensors\n"))
    names = [p.name for p in expand_paths(["x.safetensors", f"@{listing}", "-"])]
    assert names == ["x.safetensors", "a.safetensors", "b.safetensors", "c.safetensors"]


@pytest.mark.parametrize(
    ("text", "size"), [("5GB", 5 * 10**9), ("100KB", 10**5), ("2GiB", 2 * 2**30), ("123", 123)]
)
def test_shard_sizes_parse_like_hugging_face(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "abc"])
def test_a_lambda_that_is_not_a_finite_number_is_a_usage_error(cli, tmp_path, family, value):
    base, tunes = family(small_model(), 2)
    code, _, stderr = cli(
        "merge", base, *tunes, "-o", tmp_path / "o.safetensors", "--lambda", value
    )
    assert code == 2 and "--lambda" in stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_a_bad_shard_size_is_a_usage_error(cli, tmp_path, family):
    base, tunes = family(small_model(), 2)
    code, _, stderr = cli("merge", base, *tunes, "-o", tmp_path / "o", "--shard-size", "5 parsecs")
    assert code == 2 and "5GB" in stderr


def test_an_unknown_method_is_one_line_listing_the_valid_ones(cli, tmp_path, family):
    base, tunes = family(small_model(), 2)
    code, _, stderr = cli("merge", base, *tunes, "-o", tmp_path / "o.safetensors", "-m", "tie")
    assert code == 1
    assert stderr.count("\n") == 1 and "negmerge, mean, magmax, ties" in stderr


def test_merge_without_any_output_is_a_usage_error(cli, tmp_path, family):
    base, tunes = family(small_model(), 2)
    code, _, stderr = cli("merge", base, *tunes)
    assert code == 2 and "--output" in stderr


def test_apply_with_the_saved_vector_matches_merge(cli, tmp_path, family):
    base, tunes = family(small_model(), 2)
    vector, merged, applied = (
        tmp_path / n for n in ("v.safetensors", "m.safetensors", "a.safetensors")
    )
    assert cli("merge", base, *tunes, "--save-vector", vector, "-q")[0] == 0
    assert cli("merge", base, *tunes, "-o", merged, "-q", "--lambda", "0.25")[0] == 0
    code, _, stderr = cli("apply", base, vector, "-o", applied, "--lambda", "0.25")
    assert code == 0 and "applied 5 of 11 tensors" in stderr
    assert all(torch.equal(load_file(applied)[k], v) for k, v in load_file(merged).items())


def test_apply_refuses_a_vector_from_another_model(cli, tmp_path, family):
    base, _ = family(small_model(), 2)
    vector = tmp_path / "v.safetensors"
    from negmerge_cli.io import save_state_dict

    save_state_dict({"other.weight": torch.ones(2)}, vector)
    code, _, stderr = cli("apply", base, vector, "-o", tmp_path / "a.safetensors")
    assert code == 1 and "other.weight" in stderr and str(vector) in stderr


def test_inspect_prints_tensors_and_consensus(cli, tmp_path, family):
    base, tunes = family(small_model(), 2)
    code, out, _ = cli("inspect", *tunes, "--base", base)
    assert code == 0
    assert "embed.weight" in out and "BF16" in out and "same keys, shapes and dtypes" in out
    assert "merged parameters agree in sign" in out


def test_inspect_json_is_machine_readable(cli, tmp_path, family):
    base, _ = family(small_model(), 1)
    code, out, _ = cli("inspect", base, "--json")
    report = json.loads(out)
    assert code == 0 and report["files"][0]["parameters"] == sum(
        t.numel() for t in small_model().values()
    )


def test_version_flag(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("negmerge ")
