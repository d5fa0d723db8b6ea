"""The streaming engine against an in-memory computation of the same formula."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from negmerge_cli.engine import apply, merge, resolve_device, select_merged
from negmerge_cli.errors import UsageError
from negmerge_cli.inspection import inspect
from negmerge_cli.io import load_state_dict, save_state_dict
from negmerge_cli.methods import METHODS, kth_magnitude, majority_contribution
from tests.conftest import small_model

MERGED = [
    "embed.weight",
    "block.0.attn.weight",
    "block.0.mlp.weight",
    "block.0.scale",
    "block.0.bias",
]
COPIED = [
    "bn.running_mean",
    "bn.running_var",
    "bn.num_batches_tracked",
    "position_ids",
    "mask",
    "quant",
]


def expected_output(
    base: Path,
    tunes: list[Path],
    method: str,
    lam: float,
    density: float = 0.2,
    scope: str = "global",
) -> dict[str, torch.Tensor]:
    """The whole computation in memory: float32 task vectors, method, base - lam * merged."""
    b = load_state_dict(base)
    fts = [load_state_dict(p) for p in tunes]
    taus = {n: torch.stack([ft[n].float() - b[n].float() for ft in fts]) for n in MERGED}
    params: dict[str, dict] = {n: {} for n in MERGED}
    if method == "ties":
        if scope == "global":
            flat = torch.cat([taus[n].reshape(len(fts), -1) for n in MERGED], dim=1)
            thresholds = torch.tensor([kth_magnitude(t, density) for t in flat])
            votes = majority_contribution(flat, thresholds)
            shared = {"thresholds": thresholds, "majority_sign": float((votes > 0) - (votes < 0))}
            params = dict.fromkeys(MERGED, shared)
        else:
            for n in MERGED:
                thresholds = torch.tensor([kth_magnitude(t, density) for t in taus[n]])
                votes = majority_contribution(taus[n], thresholds)
                params[n] = {
                    "thresholds": thresholds,
                    "majority_sign": float((votes > 0) - (votes < 0)),
                }
    out = dict(b)
    for n in MERGED:
        merged = METHODS[method].fn(taus[n], **params[n])
        out[n] = (b[n].float() - lam * merged).to(b[n].dtype)
    return out


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert actual[name].shape == expected[name].shape, name
        # bit patterns, not values: -0.0 must stay -0.0
        bits = actual[name].reshape(-1).view(torch.uint8)
        assert torch.equal(bits, expected[name].reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("method", ["negmerge", "mean", "magmax", "ties"])
@pytest.mark.parametrize("budget", [64 * 2**20, 40])
def test_merge_equals_the_in_memory_formula_bit_for_bit(tmp_path, family, method, budget):
    base, tunes = family(small_model(), 4)
    out = tmp_path / "out.safetensors"
    merge(base, tunes, out, method=method, lam=0.7, memory_budget=budget)
    assert_same_tensors(load_file(out), expected_output(base, tunes, method, 0.7))


@pytest.mark.parametrize("budget", [64 * 2**20, 40])
def test_ties_per_tensor_scope_trims_each_tensor_on_its_own(tmp_path, family, budget):
    base, tunes = family(small_model(), 3)
    out = tmp_path / "out.safetensors"
    merge(
        base, tunes, out, method="ties", density=0.4, density_scope="tensor", memory_budget=budget
    )
    expected = expected_output(base, tunes, "ties", 1.0, density=0.4, scope="tensor")
    assert_same_tensors(load_file(out), expected)


def test_non_float_tensors_and_batchnorm_statistics_are_copied_bit_for_bit(tmp_path, family):
    base, tunes = family(small_model(), 2)
    out = tmp_path / "out.safetensors"
    report = merge(base, tunes, out, lam=1.0)
    written, original = load_file(out), load_file(base)
    for name in COPIED:
        assert torch.equal(written[name], original[name]), name
    assert sorted(report["copied"]) == sorted(COPIED)
    assert sorted(report["tensors"]) == sorted(MERGED)


@pytest.mark.parametrize("budget", [None, 256])
def test_lambda_zero_returns_the_base_bit_for_bit_even_for_negative_zero(tmp_path, family, budget):
    # With many small chunks the reader reuses its buffers while the writer thread still
    # holds earlier ones: the base's values must be copied, not handed over.
    model = small_model()
    model["embed.weight"][0, 0] = -0.0
    base, tunes = family(model, 3)
    out = tmp_path / "out.safetensors"
    merge(base, tunes, out, lam=0.0, method="mean", memory_budget=budget)
    assert_same_tensors(load_file(out), load_file(base))


def test_saved_vector_then_apply_equals_merge_at_another_lambda(tmp_path, family):
    base, tunes = family(small_model(), 3)
    vector = tmp_path / "vector.safetensors"
    merge(base, tunes, None, save_vector=vector)
    assert sorted(load_file(vector)) == sorted(MERGED)
    assert all(t.dtype == torch.float32 for t in load_file(vector).values())
    applied, merged = tmp_path / "applied.safetensors", tmp_path / "merged.safetensors"
    apply(base, vector, applied, lam=0.35)
    merge(base, tunes, merged, lam=0.35)
    assert_same_tensors(load_file(applied), load_file(merged))


def test_sharded_and_single_file_outputs_hold_the_same_tensors(tmp_path, family):
    base, tunes = family(small_model(), 2)
    single, folder = tmp_path / "single.safetensors", tmp_path / "sharded"
    merge(base, tunes, single)
    merge(base, tunes, folder, shard_size=300)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert_same_tensors(
        dict(sorted(load_state_dict(folder).items())), dict(sorted(load_file(single).items()))
    )


def test_rewriting_a_sharded_output_with_fewer_shards_removes_the_stale_ones(tmp_path, family):
    base, tunes = family(small_model(), 2)
    folder = tmp_path / "sharded"
    merge(base, tunes, folder, shard_size=200)
    merge(base, tunes, folder, shard_size=10**9, force=True)
    assert sorted(p.name for p in folder.iterdir()) == [
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    ]


def test_report_counts_consensus_and_kept_elements(tmp_path, family):
    base, tunes = family({"w": torch.zeros(1000)}, 2, seed=5)
    report = merge(base, tunes, tmp_path / "o.safetensors")
    taus = torch.stack([load_file(t)["w"] for t in tunes])
    agree = int(((taus > 0).all(0) | (taus < 0).all(0)).sum())
    row = report["tensors"]["w"]
    assert row["numel"] == 1000 and row["consensus"] == agree and row["kept"] == agree
    assert report["totals"]["consensus_fraction"] == pytest.approx(agree / 1000)
    assert row["merged_norm"] == pytest.approx(
        float(load_file(tmp_path / "o.safetensors")["w"].norm()), rel=1e-5
    )


def test_output_metadata_records_method_lambda_and_inputs(tmp_path, family):
    base, tunes = family(small_model(), 2)
    out = tmp_path / "out.safetensors"
    merge(base, tunes, out, method="ties", lam=0.5, density=0.3)
    with safe_open(out, "pt") as handle:
        meta = handle.metadata()
    assert meta["negmerge_method"] == "ties" and float(meta["negmerge_lambda"]) == 0.5
    assert json.loads(meta["negmerge_options"]) == {"density": 0.3, "density_scope": "global"}
    assert [f["name"] for f in json.loads(meta["negmerge_finetuned"])] == [
        "ft0.safetensors",
        "ft1.safetensors",
    ]
    assert json.loads(meta["negmerge_base"])["bytes"] == base.stat().st_size


def test_include_and_exclude_choose_the_merged_tensors(tmp_path, family):
    base, tunes = family(small_model(), 2)
    report = merge(
        base, tunes, tmp_path / "o.safetensors", include=[r"^block\."], exclude=[r"bias$"]
    )
    assert sorted(report["tensors"]) == [
        "block.0.attn.weight",
        "block.0.mlp.weight",
        "block.0.scale",
    ]


def test_batchnorm_statistics_merge_only_when_asked():
    infos = [
        type("I", (), {"name": n, "dtype": "F32"})()
        for n in ["bn.running_var", "bn.weight", "running_variance"]
    ]
    assert select_merged(infos) == {"bn.weight", "running_variance"}
    assert select_merged(infos, merge_batchnorm_stats=True) == {
        "bn.weight",
        "bn.running_var",
        "running_variance",
    }


def test_pytorch_and_folder_inputs_merge_like_safetensors(tmp_path, family):
    base, tunes = family(small_model(), 2)
    as_pt = tmp_path / "ft0.pt"
    torch.save({"state_dict": load_file(tunes[0])}, as_pt)
    folder = tmp_path / "hf"
    folder.mkdir()
    save_state_dict(load_file(tunes[1]), folder / "model.safetensors")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    merge(base, [as_pt, folder], a)
    merge(base, tunes, b)
    assert_same_tensors(load_file(a), load_file(b))


def test_float64_tensors_keep_their_precision(tmp_path, family):
    base, tunes = family({"w": torch.randn(50, dtype=torch.float64) * 1e-9 + 1.0}, 2, scale=1e-12)
    out = tmp_path / "o.safetensors"
    merge(base, tunes, out, method="mean")
    b = load_file(base)["w"]
    taus = torch.stack([load_file(t)["w"] - b for t in tunes])
    assert torch.equal(load_file(out)["w"], b - taus.mean(0))


def test_zero_element_tensors_pass_through(tmp_path, family):
    base, tunes = family({"empty": torch.zeros(0, 4), "w": torch.ones(3)}, 2)
    out = tmp_path / "o.safetensors"
    merge(base, tunes, out)
    assert load_file(out)["empty"].shape == (0, 4)


def test_device_auto_falls_back_to_the_cpu_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(UsageError, match="no CUDA GPU"):
        resolve_device("cuda:0")
    with pytest.raises(UsageError):
        resolve_device("tpu")


def test_inspect_reports_differences_and_consensus(tmp_path, family):
    base, tunes = family({"w": torch.randn(100), "b": torch.zeros(2)}, 2)
    other = tmp_path / "other.safetensors"
    save_state_dict({"w": torch.zeros(10), "c": torch.zeros(1)}, other)
    report = inspect([tunes[0], other])
    diffs = {d["name"]: d for d in report["differences"]}
    assert set(diffs) == {"w", "b", "c"} and "variants" in diffs["w"]
    assert diffs["b"]["missing_in"] == [str(other)]
    consensus = inspect(tunes, base=base)["consensus"]
    taus = torch.stack([load_file(t)["w"] - load_file(base)["w"] for t in tunes])
    agree = int(((taus > 0).all(0) | (taus < 0).all(0)).sum())
    assert consensus["tensors"]["w"]["consensus"] == agree


def test_header_is_aligned_and_readable_by_safetensors(tmp_path, family):
    base, tunes = family(small_model(), 2)
    out = tmp_path / "o.safetensors"
    merge(base, tunes, out)
    (length,) = struct.unpack("<Q", out.read_bytes()[:8])
    assert length % 8 == 0
    assert set(load_file(out)) == set(small_model())


@pytest.mark.parametrize("method", ["negmerge", "mean", "magmax", "ties"])
def test_results_do_not_depend_on_the_memory_budget(tmp_path, family, method):
    generator = torch.Generator().manual_seed(4)
    base, tunes = family({"w": torch.randn(70000, generator=generator)}, 6)
    outputs = []
    for budget in (10_000, 300_000, 64 * 2**20):
        out = tmp_path / f"o{budget}.safetensors"
        merge(base, tunes, out, method=method, memory_budget=budget)
        outputs.append(load_file(out)["w"].view(torch.int32))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[1], outputs[2])
