"""Reader and writer round trips, against the safetensors library in both directions."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from negmerge_cli.errors import CheckpointError, OutputError
from negmerge_cli.io import detect_format, load_state_dict, open_checkpoint, save_state_dict
from negmerge_cli.io.base import TensorInfo
from negmerge_cli.io.writer import PARTIAL_SUFFIX, OutputWriter, plan_shards
from tests.conftest import small_model


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def test_files_written_here_read_back_in_the_safetensors_library(tmp_path):
    model = small_model()
    save_state_dict(model, tmp_path / "m.safetensors", metadata={"note": "x"})
    assert same(load_file(tmp_path / "m.safetensors"), model)


def test_files_written_by_the_safetensors_library_read_back_here(tmp_path):
    model = small_model()
    save_file(model, tmp_path / "m.safetensors")
    assert same(load_state_dict(tmp_path / "m.safetensors"), model)


def test_ranged_reads_return_exactly_the_requested_elements(tmp_path):
    weights = torch.arange(100, dtype=torch.float32).reshape(10, 10)
    save_file({"w": weights, "h": weights.to(torch.bfloat16)}, tmp_path / "m.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as reader:
        assert reader.read("w", 17, 23).tolist() == list(range(17, 23))
        assert reader.read("h", 95).tolist() == [95.0, 96.0, 97.0, 98.0, 99.0]
        out = torch.empty(4)
        assert reader.read_into("h", 2, out).tolist() == [2.0, 3.0, 4.0, 5.0]


def test_format_is_detected_from_content_not_name(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "weights.bin")
    torch.save({"w": torch.ones(2)}, tmp_path / "zip.safetensors")
    assert detect_format(tmp_path / "weights.bin") == "safetensors"
    assert detect_format(tmp_path / "zip.safetensors") == "torch-zip"
    assert load_state_dict(tmp_path / "zip.safetensors")["w"].tolist() == [1.0, 1.0]


def test_save_refuses_to_replace_without_force_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_state_dict({"w": torch.ones(1)}, path)
    with pytest.raises(OutputError, match="already exists"):
        save_state_dict({"w": torch.zeros(1)}, path)
    save_state_dict({"w": torch.zeros(1)}, path, force=True)
    assert load_file(path)["w"].tolist() == [0.0]
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_output_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        save_state_dict({"w": torch.ones(1)}, tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o640


def test_a_discarded_output_leaves_nothing_behind(tmp_path):
    infos = [TensorInfo("a", "F32", (3,)), TensorInfo("b", "F32", (3,))]
    writer = OutputWriter(tmp_path / "shards", infos, shard_bytes=12)
    writer.write("a", torch.ones(3))
    assert any(p.name.endswith(PARTIAL_SUFFIX) for p in (tmp_path / "shards").iterdir())
    writer.discard()
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_an_incomplete_output(tmp_path):
    writer = OutputWriter(tmp_path / "o.safetensors", [TensorInfo("a", "F32", (3,))])
    writer.write("a", torch.ones(2))
    with pytest.raises(RuntimeError, match="incomplete"):
        writer.finish()
    writer.discard()
    assert list(tmp_path.iterdir()) == []


def test_shards_are_contiguous_groups_and_a_large_tensor_stands_alone():
    infos = [TensorInfo(n, "F32", (s,)) for n, s in [("a", 2), ("b", 2), ("c", 10), ("d", 1)]]
    groups = plan_shards(infos, 16)
    assert [[t.name for t in g] for g in groups] == [["a", "b"], ["c"], ["d"]]


def test_sharded_index_reads_as_one_checkpoint(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "s1.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "s2.safetensors")
    index = {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    state = load_state_dict(tmp_path)
    assert state["a"].tolist() == [1.0, 1.0] and state["b"].tolist() == [0.0] * 3


def test_a_folder_with_several_files_and_no_index_is_ambiguous(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "x.safetensors")
    save_file({"a": torch.ones(2)}, tmp_path / "y.safetensors")
    with pytest.raises(CheckpointError, match=r"2 \.safetensors files"):
        open_checkpoint(tmp_path)


def test_tied_weights_in_a_pickle_are_written_as_independent_tensors(tmp_path):
    shared = torch.randn(4, 3)
    torch.save({"embed": shared, "lm_head": shared}, tmp_path / "tied.pt")
    state = load_state_dict(tmp_path / "tied.pt")
    save_state_dict(state, tmp_path / "untied.safetensors")
    again = load_file(tmp_path / "untied.safetensors")
    assert torch.equal(again["embed"], shared) and torch.equal(again["lm_head"], shared)


def test_a_safetensors_header_that_starts_like_a_pickle_is_still_safetensors(tmp_path):
    # header length 0x380 = 896: the file starts with bytes 80 03, a protocol-3 pickle's
    path = tmp_path / "m.safetensors"
    for pad in range(700, 900):
        save_state_dict({"w": torch.ones(2)}, path, metadata={"pad": "x" * pad}, force=True)
        if path.read_bytes()[:2] == b"\x80\x03":
            break
    else:
        pytest.fail("no padding produced a 0x380-byte header")
    assert detect_format(path) == "safetensors"
    assert load_state_dict(path)["w"].tolist() == [1.0, 1.0]
