"""Reliability: every case of shared/RELIABILITY.md that applies to merge, apply and inspect.

Each test builds a real bad input in ``tmp_path`` and runs the real command. A failure must
be one line on stderr (``negmerge: error: ...``) naming the file (and tensor), a non-zero
exit, no traceback, no output and no temporary file left behind, and an earlier output at
the same path byte-identical afterwards. Most tests call the CLI's error boundary
(``negmerge_cli.cli.main``) in-process; signals, ``ulimit -f`` and crashes (SIGBUS) run
``python -m negmerge_cli`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shlex
import signal
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch

from negmerge_cli import engine
from negmerge_cli.cli import main
from negmerge_cli.errors import CheckpointError
from negmerge_cli.io import load_state_dict, open_checkpoint, save_state_dict

REPO = Path(__file__).resolve().parents[1]
PARTIAL_SUFFIX = ".negmerge-partial"
# Warnings that a plain `python` run does not print; anything else would reach stderr.
HIDDEN_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
EARLIER_OUTPUT = safetensors.torch.save({"earlier": torch.arange(6, dtype=torch.float32)})
CONVERT_HINT = "model.state_dict()"


# ---------------------------------------------------------------------------- helpers


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    warnings: list[str]

    @property
    def stderr_lines(self) -> list[str]:
        """What a user would see on stderr: printed lines and every visible warning."""
        return self.err.splitlines() + self.warnings


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> Outcome:
    """Run ``negmerge ARGS`` through the CLI's error boundary, in this process."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    captured = capsys.readouterr()
    shown = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if not issubclass(w.category, HIDDEN_BY_DEFAULT)
    ]
    return Outcome(code, captured.out, captured.err, shown)


def run_process(
    *args: object, timeout: float = 60, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m negmerge_cli ARGS`` in a fresh process."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("NEGMERGE_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "negmerge_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
        **kwargs,
    )


def assert_one_line_error(
    code: int, stderr_lines: list[str], *fragments: str, expected_code: int = 1
) -> str:
    """Exit status ``expected_code`` and exactly one ``negmerge: error:`` line holding
    every fragment; no traceback, no terminal escape codes."""
    assert code == expected_code, f"exit status {code}, stderr: {stderr_lines}"
    assert len(stderr_lines) == 1, f"expected one line on stderr, got {stderr_lines}"
    line = stderr_lines[0]
    assert line.startswith("negmerge: error: "), line
    assert "Traceback" not in line
    assert "\x1b" not in line, f"terminal escape codes in {line!r}"
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def assert_refused(outcome: Outcome, *fragments: str, expected_code: int = 1) -> str:
    line = assert_one_line_error(
        outcome.code, outcome.stderr_lines, *fragments, expected_code=expected_code
    )
    assert outcome.out == ""
    return line


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes); folders map to ``b"<dir>"``."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(folder.rglob("*"))
    }


def names_in(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def expect_refusal(
    capsys: pytest.CaptureFixture[str],
    folder: Path,
    command: Sequence[object],
    *fragments: str,
    output: Path | None = None,
    expected_code: int = 1,
) -> str:
    """Run ``command -o OUTPUT`` twice, first with no OUTPUT, then over an earlier OUTPUT
    with ``--force``: both refuse with one line and leave ``folder`` exactly as it was."""
    output = output or folder / "out.safetensors"
    assert not output.exists()
    before = snapshot(folder)
    line = assert_refused(
        run_cli(capsys, *command, "-o", output), *fragments, expected_code=expected_code
    )
    assert snapshot(folder) == before, "the failed run left files behind"

    output.write_bytes(EARLIER_OUTPUT)
    before = snapshot(folder)
    assert_refused(
        run_cli(capsys, *command, "-o", output, "--force"),
        *fragments,
        expected_code=expected_code,
    )
    assert snapshot(folder) == before, "the failed run changed the earlier output or left files"
    output.unlink()
    return line


def expect_inspect_refusal(
    capsys: pytest.CaptureFixture[str], folder: Path, files: Sequence[object], *fragments: str
) -> str:
    before = snapshot(folder)
    line = assert_refused(run_cli(capsys, "inspect", *files), *fragments)
    assert snapshot(folder) == before
    return line


def weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(2, 2, generator=generator),
        "layer.bias": torch.randn(4, generator=generator),
    }


@dataclass
class Models:
    folder: Path
    base: Path
    ft1: Path
    ft2: Path
    vector: Path


@pytest.fixture
def models(tmp_path: Path) -> Models:
    """A base, two fine-tuned checkpoints and a task vector, all float32 safetensors."""
    paths = {}
    for seed, name in enumerate(("base", "ft1", "ft2", "vector")):
        paths[name] = save_state_dict(weights(seed), tmp_path / f"{name}.safetensors")
    return Models(tmp_path, **paths)


def raw_safetensors(header: dict | str | bytes, data: bytes = b"") -> bytes:
    """A safetensors file with exactly this header (no validation, no padding)."""
    if isinstance(header, dict):
        header = json.dumps(header)
    raw = header.encode("utf-8") if isinstance(header, str) else header
    return struct.pack("<Q", len(raw)) + raw + data


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def reference_negmerge(base: torch.Tensor, fts: list[torch.Tensor], lam: float) -> torch.Tensor:
    taus = torch.stack([ft.float() - base.float() for ft in fts])
    agree = (taus > 0).all(0) | (taus < 0).all(0)
    merged = torch.where(agree, taus.mean(0), torch.zeros(()))
    return (base.float() - lam * merged).to(base.dtype)


def header_of(path: Path) -> dict[str, dict]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])


# ---------------------------------------------------------------------------- 1-6 malformed


def _valid_bytes() -> bytes:
    return safetensors.torch.save(
        {"a": torch.arange(4, dtype=torch.float32), "b": torch.ones(4, dtype=torch.float32)}
    )


MALFORMED: dict[str, tuple[Callable[[], bytes], tuple[str, ...]]] = {
    # 1
    "empty": (lambda: b"", ("empty",)),
    "shorter than 8 bytes": (lambda: b"\x10\x00\x00", ("too short",)),
    "header length beyond the file": (
        lambda: struct.pack("<Q", 4096) + b'{"a": 1}',
        ("header length 4096", "larger than the file"),
    ),
    "header length above 100 MB": (
        lambda: struct.pack("<Q", 200_000_000) + b"{}      ",
        ("200000000", "100 MB"),
    ),
    # 2
    "truncated data": (lambda: _valid_bytes()[:-6], ("truncated",)),
    # 3
    "trailing bytes": (lambda: _valid_bytes() + b"\x00" * 8, ("8 unexpected bytes",)),
    "overlapping offsets": (
        lambda: raw_safetensors(
            {"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 8, 24)}, bytes(24)
        ),
        ("'b'", "overlaps"),
    ),
    "aliased offsets": (
        lambda: raw_safetensors(
            {"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 0, 16)}, bytes(16)
        ),
        ("overlaps",),
    ),
    "gapped offsets": (
        lambda: raw_safetensors(
            {"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 24, 40)}, bytes(40)
        ),
        ("'b'", "gap"),
    ),
    "offsets that disagree with the shape": (
        lambda: raw_safetensors({"a": entry("F32", [4], 0, 12)}, bytes(12)),
        ("'a'", "12 bytes"),
    ),
    # 4
    "unknown dtype": (
        lambda: raw_safetensors({"a": entry("F33", [4], 0, 16)}, bytes(16)),
        ("'a'", "unsupported dtype 'F33'"),
    ),
    "lowercase dtype": (
        lambda: raw_safetensors({"a": entry("f32", [4], 0, 16)}, bytes(16)),
        ("'a'", "unsupported dtype 'f32'"),
    ),
    "dtype torch cannot load": (
        lambda: raw_safetensors({"a": entry("F8_E8M0", [4], 0, 4)}, bytes(4)),
        ("'a'", "unsupported dtype 'F8_E8M0'"),
    ),
    # 5
    "header not UTF-8": (
        lambda: raw_safetensors(b'{"a\xff\xfe": {}}', b""),
        ("not UTF-8",),
    ),
    "header not JSON": (lambda: raw_safetensors('{"a": {"dtype": ', b""), ("not valid JSON",)),
    "header a JSON list": (lambda: raw_safetensors("[1, 2, 3]", b""), ()),
    "header a JSON string": (lambda: raw_safetensors('"{}"', b""), ()),
    # 6
    "duplicate keys": (
        lambda: raw_safetensors(
            '{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
            '"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}',
            bytes(32),
        ),
        ("duplicate key 'a'",),
    ),
    "duplicate keys sharing bytes with different dtypes": (
        lambda: raw_safetensors(
            '{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
            '"a": {"dtype": "I32", "shape": [4], "data_offsets": [0, 16]}}',
            bytes(16),
        ),
        ("duplicate key 'a'",),
    ),
}

ROLES = ("merge FT", "merge BASE", "apply VECTOR", "inspect")


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_safetensors_file_is_refused_with_one_line_naming_it(
    capsys: pytest.CaptureFixture[str], models: Models, case: str, role: str
) -> None:
    make, fragments = MALFORMED[case]
    bad = models.folder / "bad.safetensors"
    bad.write_bytes(make())
    if role == "inspect":
        expect_inspect_refusal(capsys, models.folder, [models.ft1, bad], str(bad), *fragments)
        return
    command = {
        "merge FT": ["merge", models.base, models.ft1, bad],
        "merge BASE": ["merge", bad, models.ft1, models.ft2],
        "apply VECTOR": ["apply", models.base, bad, "--lambda", "0.5"],
    }[role]
    expect_refusal(capsys, models.folder, command, str(bad), *fragments)


def test_a_malformed_file_prints_one_line_and_no_traceback_in_a_real_process(
    models: Models,
) -> None:
    bad = models.folder / "bad.safetensors"
    bad.write_bytes(b"")
    output = models.folder / "out.safetensors"
    output.write_bytes(EARLIER_OUTPUT)
    before = snapshot(models.folder)
    result = run_process("merge", models.base, models.ft1, bad, "-o", output, "--force")
    assert "Traceback" not in result.stderr
    assert_one_line_error(result.returncode, result.stderr.splitlines(), str(bad), "empty")
    assert result.stdout == ""
    assert snapshot(models.folder) == before


# ---------------------------------------------------------------------------- 7 content, not name


def _merged_tensors(capsys: pytest.CaptureFixture[str], *args: object) -> dict[str, torch.Tensor]:
    outcome = run_cli(capsys, "merge", *args, "--quiet")
    assert outcome.code == 0, outcome
    output = Path(str(args[args.index("-o") + 1]))
    return load_state_dict(output)


@pytest.mark.parametrize(
    ("form", "name"),
    [
        ("safetensors", "ft2.bin"),
        ("safetensors", "ft2.pt"),
        ("torch zip", "ft2.safetensors"),
        ("torch legacy", "ft2.safetensors"),
    ],
)
def test_the_format_comes_from_the_content_not_the_file_name(
    capsys: pytest.CaptureFixture[str], models: Models, form: str, name: str
) -> None:
    expected = _merged_tensors(
        capsys, models.base, models.ft1, models.ft2, "-o", models.folder / "expected.safetensors"
    )
    odd = models.folder / "odd" / name
    odd.parent.mkdir()
    state = load_state_dict(models.ft2)
    if form == "safetensors":
        safetensors.torch.save_file(state, odd)
    else:
        torch.save(state, odd, _use_new_zipfile_serialization=form == "torch zip")

    got = _merged_tensors(capsys, models.base, models.ft1, odd, "-o", models.folder / "got.st")
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    inspected = run_cli(capsys, "inspect", odd, "--json")
    assert inspected.code == 0
    rows = json.loads(inspected.out)["files"][0]["tensors"]
    assert {r["name"]: r["shape"] for r in rows} == {"layer.weight": [2, 2], "layer.bias": [4]}


# ---------------------------------------------------------------------------- 8 sharded


def _sharded_checkpoint(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """A Hugging Face sharded layout: one shard per tensor and the index."""
    folder.mkdir()
    weight_map = {}
    names = list(state)
    for number, name in enumerate(names, 1):
        shard = f"model-{number:05d}-of-{len(names):05d}.safetensors"
        safetensors.torch.save_file({name: state[name]}, folder / shard)
        weight_map[name] = shard
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 32}, "weight_map": weight_map}))
    return index


def test_a_sharded_checkpoint_merges_like_the_single_file(
    capsys: pytest.CaptureFixture[str], models: Models
) -> None:
    index = _sharded_checkpoint(models.folder / "sharded", load_state_dict(models.ft2))
    expected = _merged_tensors(
        capsys, models.base, models.ft1, models.ft2, "-o", models.folder / "a.safetensors"
    )
    for given in (index, index.parent):
        out = models.folder / f"{given.name}.out.safetensors"
        got = _merged_tensors(capsys, models.base, models.ft1, given, "-o", out)
        assert all(torch.equal(got[k], v) for k, v in expected.items())


SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"


def _break_index(case: str, index: Path, models: Models) -> tuple[str, ...]:
    """Damage the sharded checkpoint in place; returns the fragments the error must hold."""
    folder = index.parent
    listing = json.loads(index.read_text())
    if case == "bad JSON":
        index.write_text('{"weight_map": {"layer.weight": ')
        return ("not a valid index",)
    if case == "no weight_map":
        index.write_text('{"metadata": {}}')
        return ("weight_map",)
    if case == "missing shard":
        (folder / SHARD_2).unlink()
        return (repr(SHARD_2), "missing")
    if case == "shard path with ..":
        listing["weight_map"]["layer.bias"] = "../ft1.safetensors"
        index.write_text(json.dumps(listing))
        return ("'../ft1.safetensors'", "relative")
    if case == "absolute shard path":
        listing["weight_map"]["layer.bias"] = str(models.ft1)
        index.write_text(json.dumps(listing))
        return (repr(str(models.ft1)), "relative")
    if case == "key missing from its shard":
        listing["weight_map"]["extra.weight"] = SHARD_1
        index.write_text(json.dumps(listing))
        return ("'extra.weight'", "missing from its shard", repr(SHARD_1))
    if case == "key in two shards":
        safetensors.torch.save_file(
            {"layer.bias": torch.zeros(4), "layer.weight": torch.zeros(2, 2)}, folder / SHARD_2
        )
        return ("'layer.weight'", repr(SHARD_2))
    if case == "key listed twice":
        text = index.read_text().replace(
            '"weight_map": {', f'"weight_map": {{"layer.bias": "{SHARD_1}", ', 1
        )
        index.write_text(text)
        return ("duplicate key 'layer.bias'",)
    raise AssertionError(case)


@pytest.mark.parametrize("role", ["merge FT", "inspect"])
@pytest.mark.parametrize(
    "case",
    [
        "bad JSON",
        "no weight_map",
        "missing shard",
        "shard path with ..",
        "absolute shard path",
        "key missing from its shard",
        "key in two shards",
        "key listed twice",
    ],
)
def test_a_broken_sharded_checkpoint_is_refused_naming_its_index(
    capsys: pytest.CaptureFixture[str], models: Models, case: str, role: str
) -> None:
    index = _sharded_checkpoint(models.folder / "sharded", load_state_dict(models.ft2))
    fragments = _break_index(case, index, models)
    if role == "inspect":
        expect_inspect_refusal(capsys, models.folder, [index], str(index), *fragments)
    else:
        expect_refusal(
            capsys, models.folder, ["merge", models.base, models.ft1, index], str(index), *fragments
        )


# ---------------------------------------------------------------------------- 9 changed while read


def test_a_safetensors_file_truncated_after_opening_raises_instead_of_crashing(
    tmp_path: Path,
) -> None:
    path = save_state_dict(
        {"first": torch.ones(16), "second": torch.arange(4096, dtype=torch.float32)},
        tmp_path / "model.safetensors",
    )
    with open_checkpoint(path) as reader:
        assert torch.equal(reader.read("first"), torch.ones(16))
        os.truncate(path, 200)
        with pytest.raises(CheckpointError) as caught:
            reader.read("second")
    message = str(caught.value)
    assert str(path) in message and "'second'" in message and "ended early" in message


class _Tamper:
    """A progress sink that damages an input once the first tensor has been written."""

    def __init__(self, victim: Path, how: str) -> None:
        self.victim, self.how, self.done = victim, how, False

    def start(self, total: int, label: str) -> None:
        pass

    def advance(self, amount: int) -> None:
        if self.done:
            return
        self.done = True
        if self.how == "truncate":
            os.truncate(self.victim, 256)
        else:  # same size, new bytes (a checkpoint re-saved in place)
            data = bytearray(self.victim.read_bytes())
            data[-4:] = b"\x00\x00\x80\x3f"
            time.sleep(0.01)
            self.victim.write_bytes(bytes(data))

    def stop(self) -> None:
        pass


@pytest.mark.parametrize("how", ["truncate", "rewrite"])
def test_an_input_changed_during_the_merge_fails_cleanly_and_leaves_no_output(
    tmp_path: Path, how: str
) -> None:
    def state(seed: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return {f"t{i}": torch.randn(1024, generator=generator) for i in range(4)}

    base = save_state_dict(state(0), tmp_path / "base.safetensors")
    ft1 = save_state_dict(state(1), tmp_path / "ft1.safetensors")
    ft2 = save_state_dict(state(2), tmp_path / "ft2.safetensors")
    output = tmp_path / "out.safetensors"
    output.write_bytes(EARLIER_OUTPUT)
    with pytest.raises(CheckpointError) as caught:
        engine.merge(
            base,
            [ft1, ft2],
            output,
            force=True,
            progress=_Tamper(ft2, how),
            memory_budget=4096,
        )
    assert str(ft2) in str(caught.value)
    assert output.read_bytes() == EARLIER_OUTPUT
    assert names_in(tmp_path) == {
        "base.safetensors",
        "ft1.safetensors",
        "ft2.safetensors",
        output.name,
    }


TRUNCATED_PT_SCRIPT = """
import os, sys, torch
from pathlib import Path
from negmerge_cli import engine
from negmerge_cli.errors import NegmergeError

folder = Path(sys.argv[1])
def state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"small": torch.randn(16, generator=g), "large": torch.randn(1 << 16, generator=g)}
for i, name in enumerate(["base", "ft1", "ft2"]):
    torch.save(state(i), folder / f"{name}.pt")

class Truncate:
    def start(self, total, label): pass
    def stop(self): pass
    def advance(self, amount):
        os.truncate(folder / "ft2.pt", 4096)

try:
    engine.merge(folder / "base.pt", [folder / "ft1.pt", folder / "ft2.pt"],
                 folder / "out.safetensors", progress=Truncate(), memory_budget=4096)
except NegmergeError as exc:
    print(exc, file=sys.stderr)
    sys.exit(1)
sys.exit(0)
"""


def test_a_pytorch_file_truncated_during_the_merge_is_an_error_not_sigbus(
    tmp_path: Path,
) -> None:
    script = tmp_path / "truncate_during_merge.py"
    script.write_text(TRUNCATED_PT_SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, script, work], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode != -signal.SIGBUS, "the reader died of SIGBUS (memory-mapped .pt)"
    assert result.returncode == 1, result.stderr
    assert "ft2.pt" in result.stderr
    assert names_in(work) == {"base.pt", "ft1.pt", "ft2.pt"}


# ---------------------------------------------------------------------------- 10-12 mismatches


def test_different_key_sets_are_listed_with_a_count(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    base_state = {f"w{i}": torch.randn(2) for i in range(8)} | {"shared": torch.randn(2)}
    base = save_state_dict(base_state, tmp_path / "base.safetensors")
    ft1 = save_state_dict({k: v + 1 for k, v in base_state.items()}, tmp_path / "ft1.safetensors")
    odd = save_state_dict(
        {"w7": torch.randn(2), "shared": torch.randn(2), "new.weight": torch.randn(2)},
        tmp_path / "odd.safetensors",
    )
    line = expect_refusal(
        capsys,
        tmp_path,
        ["merge", base, ft1, odd],
        str(odd),
        "lacks 7",
        "'w0'",
        "'w4'",
        "and 2 more",
        "the base lacks",
        "'new.weight'",
    )
    assert "'w5'" not in line  # the first few, not all of them

    inspected = run_cli(capsys, "inspect", base, odd, "--json")
    assert inspected.code == 0
    missing = {d["name"] for d in json.loads(inspected.out)["differences"]}
    assert missing == {f"w{i}" for i in range(7)} | {"new.weight"}
    expect_inspect_refusal(
        capsys, tmp_path, ["--base", base, ft1, odd], str(odd), "lacks 7", "'new.weight'"
    )


@pytest.mark.parametrize(
    ("theirs", "shown"),
    [((4, 1), "[4, 1]"), ((1, 4), "[1, 4]"), ((2, 2), "[2, 2]"), ((), "[]")],
)
def test_shapes_must_match_exactly_even_when_they_would_broadcast(
    capsys: pytest.CaptureFixture[str], models: Models, theirs: tuple[int, ...], shown: str
) -> None:
    state = load_state_dict(models.ft2)
    state["layer.bias"] = torch.ones(theirs)
    odd = save_state_dict(state, models.folder / "odd.safetensors")
    expect_refusal(
        capsys,
        models.folder,
        ["merge", models.base, models.ft1, odd],
        str(odd),
        "'layer.bias'",
        f"shape {shown}",
        "[4]",
    )
    expect_refusal(
        capsys,
        models.folder,
        ["apply", models.base, odd],
        str(odd),
        "'layer.bias'",
        f"shape {shown}",
    )


@pytest.mark.parametrize(
    ("dtype", "name"), [(torch.float16, "F16"), (torch.bfloat16, "BF16"), (torch.float64, "F64")]
)
def test_a_dtype_mismatch_across_checkpoints_is_refused(
    capsys: pytest.CaptureFixture[str], models: Models, dtype: torch.dtype, name: str
) -> None:
    state = load_state_dict(models.ft2)
    state["layer.weight"] = state["layer.weight"].to(dtype)
    odd = save_state_dict(state, models.folder / "odd.safetensors")
    expect_refusal(
        capsys,
        models.folder,
        ["merge", models.base, models.ft1, odd],
        str(odd),
        "'layer.weight'",
        name,
        "F32",
    )


# ---------------------------------------------------------------------------- 13-14 what is merged


def _with_buffers(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(3, 3, generator=generator),
        "position_ids": torch.arange(8, dtype=torch.int64) + seed,
        "attention.mask": torch.tensor([True, False, seed % 2 == 0]),
        "quant.zero_point": torch.tensor([1, 255, 0, 7 + seed], dtype=torch.uint8),
        "quant.scale": (torch.randn(4, generator=generator)).to(torch.float8_e4m3fn),
        "counts": torch.tensor([seed, -seed, 3], dtype=torch.int32),
    }


def _bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize(
    "flags", [[], ["--include", "."], ["--merge-bn-stats"], ["--method", "mean"]]
)
def test_non_float_tensors_are_copied_from_the_base_bit_for_bit(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str]
) -> None:
    states = [_with_buffers(seed) for seed in range(3)]
    base, ft1, ft2 = (
        save_state_dict(s, tmp_path / f"{n}.safetensors")
        for s, n in zip(states, ("base", "ft1", "ft2"), strict=True)
    )
    output = tmp_path / "out.safetensors"
    outcome = run_cli(capsys, "merge", base, ft1, ft2, "-o", output, "-l", "0.7", "-q", *flags)
    assert outcome.code == 0, outcome
    got = load_state_dict(output)
    for name in ("position_ids", "attention.mask", "quant.zero_point", "quant.scale", "counts"):
        assert got[name].dtype == states[0][name].dtype, name
        assert _bits(got[name]) == _bits(states[0][name]), name
    assert not torch.equal(got["layer.weight"], states[0]["layer.weight"])
    if "mean" not in flags:
        expected = reference_negmerge(
            states[0]["layer.weight"], [s["layer.weight"] for s in states[1:]], 0.7
        )
        torch.testing.assert_close(got["layer.weight"], expected, rtol=1e-6, atol=1e-6)


def test_apply_copies_non_float_tensors_and_refuses_a_vector_that_holds_them(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    states = [_with_buffers(seed) for seed in range(3)]
    base, ft1, ft2 = (
        save_state_dict(s, tmp_path / f"{n}.safetensors")
        for s, n in zip(states, ("base", "ft1", "ft2"), strict=True)
    )
    vector = tmp_path / "vector.safetensors"
    assert run_cli(capsys, "merge", base, ft1, ft2, "--save-vector", vector, "-q").code == 0
    assert set(header_of(vector)) - {"__metadata__"} == {"layer.weight"}
    output = tmp_path / "applied.safetensors"
    assert run_cli(capsys, "apply", base, vector, "-o", output, "-q").code == 0
    got = load_state_dict(output)
    for name in ("position_ids", "attention.mask", "quant.zero_point", "quant.scale", "counts"):
        assert _bits(got[name]) == _bits(states[0][name]), name
    output.unlink()

    crafted = save_state_dict(
        {"quant.zero_point": torch.ones(4, dtype=torch.uint8)}, tmp_path / "crafted.safetensors"
    )
    expect_refusal(
        capsys, tmp_path, ["apply", base, crafted], str(crafted), "'quant.zero_point'", "U8"
    )


def _batchnorm(seed: int, var: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 2, generator=generator),
        "bn.weight": torch.ones(4) + seed,
        "bn.bias": torch.zeros(4) - seed,
        "bn.running_mean": torch.full((4,), float(seed)),
        "bn.running_var": torch.full((4,), var),
        "bn.num_batches_tracked": torch.tensor(100 + seed),
    }


def test_batchnorm_statistics_are_copied_unless_asked_and_merged_when_asked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    states = [_batchnorm(0, 1.0), _batchnorm(1, 3.0), _batchnorm(2, 3.0)]
    paths = [
        save_state_dict(s, tmp_path / f"{n}.safetensors")
        for s, n in zip(states, ("base", "ft1", "ft2"), strict=True)
    ]
    default = tmp_path / "default.safetensors"
    assert run_cli(capsys, "merge", *paths, "-o", default, "-q").code == 0
    got = load_state_dict(default)
    for name in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert _bits(got[name]) == _bits(states[0][name]), name
    assert bool((got["bn.running_var"] > 0).all())
    # bn.weight and bn.bias are weights: merged (tau +1/+2 and -1/-2 agree in sign).
    assert torch.equal(got["bn.weight"], torch.full((4,), 1.0 - 1.5))
    assert torch.equal(got["bn.bias"], torch.full((4,), 1.5))

    opted_in = tmp_path / "opted_in.safetensors"
    assert run_cli(capsys, "merge", *paths, "-o", opted_in, "-q", "--merge-bn-stats").code == 0
    got = load_state_dict(opted_in)
    assert torch.equal(got["bn.running_var"], torch.full((4,), -1.0))  # 1 - mean(2, 2)
    assert torch.equal(got["bn.running_mean"], torch.full((4,), -1.5))  # 0 - mean(1, 2)
    assert _bits(got["bn.num_batches_tracked"]) == _bits(states[0]["bn.num_batches_tracked"])


# ---------------------------------------------------------------------------- 15-18 pickles


class SystemPayload:
    """Runs a shell command when unpickled (harmless: it creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class EvalPayload:
    """Evaluates Python code when unpickled (harmless: it creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


class CustomConfig:
    """A custom class pickled alongside the tensors."""

    def __init__(self) -> None:
        self.hidden = 4


def _write_pickle(path: Path, payload: object, form: str) -> None:
    if form == "zip":
        torch.save(payload, path)
    elif form == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload))


@pytest.mark.parametrize("name", ["evil.pt", "evil.bin", "evil.safetensors"])
@pytest.mark.parametrize("payload", [SystemPayload, EvalPayload])
@pytest.mark.parametrize("form", ["zip", "legacy", "raw pickle"])
def test_a_pickle_that_runs_code_is_refused_and_never_run(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    models: Models,
    form: str,
    payload: type,
    name: str,
) -> None:
    # This variable makes torch.load unsafe by default; negmerge must not depend on the default.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = models.folder.parent / f"{models.folder.name}-pwned"
    evil = models.folder / name
    _write_pickle(evil, {**load_state_dict(models.ft2), "extra": payload(marker)}, form)

    line = expect_refusal(
        capsys,
        models.folder,
        ["merge", models.base, models.ft1, evil],
        str(evil),
        "refused",
        CONVERT_HINT,
    )
    assert "set to `False`" not in line, "the refusal must not suggest unsafe loading"
    expect_inspect_refusal(capsys, models.folder, [evil], str(evil), "refused")
    assert not marker.exists(), "the payload ran"


def test_a_raw_pickle_refusal_is_one_line_in_a_real_process(models: Models) -> None:
    marker = models.folder.parent / f"{models.folder.name}-pwned-raw"
    evil = models.folder / "evil.bin"
    evil.write_bytes(pickle.dumps({"layer.weight": torch.ones(2, 2), "x": SystemPayload(marker)}))
    before = snapshot(models.folder)
    result = run_process("merge", models.base, models.ft1, evil, "-o", models.folder / "o.st")
    assert_one_line_error(result.returncode, result.stderr.splitlines(), str(evil), "refused")
    assert snapshot(models.folder) == before
    assert not marker.exists()


def _torchscript(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit itself is deprecated
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)


NOT_A_STATE_DICT: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    # 16
    "a TorchScript archive": (_torchscript, ()),
    "a pickled nn.Module": (lambda p: torch.save(torch.nn.Linear(2, 2), p), ()),
    "a numpy array": (lambda p: torch.save(__import__("numpy").arange(4), p), ()),
    "a dict of numpy arrays": (
        lambda p: torch.save({"layer.weight": __import__("numpy").ones((2, 2))}, p),
        (),
    ),
    "a custom class": (
        lambda p: torch.save({"layer.weight": torch.ones(2, 2), "config": CustomConfig()}, p),
        (),
    ),
    # 17
    "a nested dict": (
        lambda p: torch.save({"model": {"layer.weight": torch.ones(2, 2)}}, p),
        ("'model'",),
    ),
    "a non-tensor value": (
        lambda p: torch.save({"layer.weight": torch.ones(2, 2), "step": 3}, p),
        ("'step'", "int"),
    ),
    "a list of tensors": (lambda p: torch.save([torch.ones(2)], p), ("list",)),
    "a bare tensor": (lambda p: torch.save(torch.ones(2), p), ("Tensor",)),
}


def test_a_sparse_tensor_is_refused_naming_it(
    capsys: pytest.CaptureFixture[str], models: Models
) -> None:
    odd = models.folder / "sparse.pt"
    torch.save({"layer.weight": torch.eye(2).to_sparse(), "layer.bias": torch.ones(4)}, odd)
    expect_refusal(
        capsys,
        models.folder,
        ["merge", models.base, models.ft1, odd],
        str(odd),
        "'layer.weight'",
        "layout",
    )


@pytest.mark.parametrize("case", list(NOT_A_STATE_DICT))
def test_a_file_that_is_not_a_flat_state_dict_is_refused_with_a_hint(
    capsys: pytest.CaptureFixture[str], models: Models, case: str
) -> None:
    write, fragments = NOT_A_STATE_DICT[case]
    odd = models.folder / "odd.pt"
    write(odd)
    expect_refusal(
        capsys,
        models.folder,
        ["merge", models.base, models.ft1, odd],
        str(odd),
        CONVERT_HINT,
        *fragments,
    )
    expect_inspect_refusal(capsys, models.folder, [odd], str(odd), CONVERT_HINT)


def test_a_state_dict_wrapper_is_unwrapped(
    capsys: pytest.CaptureFixture[str], models: Models
) -> None:
    wrapped = models.folder / "wrapped.pt"
    torch.save({"state_dict": load_state_dict(models.ft2), "epoch": 3}, wrapped)
    expected = _merged_tensors(
        capsys, models.base, models.ft1, models.ft2, "-o", models.folder / "a.safetensors"
    )
    got = _merged_tensors(
        capsys, models.base, models.ft1, wrapped, "-o", models.folder / "b.safetensors"
    )
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def _tied(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embedding = torch.randn(4, 3, generator=generator)
    packed = torch.randn(2, 5, generator=generator)
    return {
        "embed.weight": embedding,
        "lm_head.weight": embedding,  # the same tensor under two names
        "qkv.q": packed[0],  # views into one storage
        "qkv.k": packed[1],
    }


def test_tied_weights_in_pytorch_files_are_merged_once_and_written_separately(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    states = [_tied(seed) for seed in range(3)]
    paths = []
    for state, name in zip(states, ("base", "ft1", "ft2"), strict=True):
        torch.save(state, tmp_path / f"{name}.pt")
        paths.append(tmp_path / f"{name}.pt")
    inputs_before = {p.name: p.read_bytes() for p in paths}
    output = tmp_path / "out.safetensors"
    assert run_cli(capsys, "merge", *paths, "-o", output, "-q", "-l", "0.5").code == 0

    got = load_state_dict(output)
    for name in ("embed.weight", "lm_head.weight", "qkv.q", "qkv.k"):
        expected = reference_negmerge(states[0][name], [s[name] for s in states[1:]], 0.5)
        torch.testing.assert_close(got[name], expected, rtol=1e-6, atol=1e-6, msg=name)
    spans = [tuple(v["data_offsets"]) for k, v in header_of(output).items() if k != "__metadata__"]
    assert len(set(spans)) == 4, "tied tensors must be written as separate tensors"
    assert {p.name: p.read_bytes() for p in paths} == inputs_before, "an input was modified"


# ---------------------------------------------------------------------------- 19 non-finite


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["ft2", "base"])
def test_nan_or_inf_in_an_input_is_an_error_naming_file_and_tensor(
    capsys: pytest.CaptureFixture[str], models: Models, value: float, where: str
) -> None:
    path = getattr(models, where)
    state = load_state_dict(path)
    state["layer.bias"][2] = value
    save_state_dict(state, path, force=True)
    expect_refusal(
        capsys,
        models.folder,
        ["merge", models.base, models.ft1, models.ft2],
        str(path),
        "'layer.bias'",
        "NaN or Inf",
    )


def test_nan_in_a_task_vector_is_an_error_for_apply(
    capsys: pytest.CaptureFixture[str], models: Models
) -> None:
    state = load_state_dict(models.vector)
    state["layer.weight"][0, 1] = float("nan")
    save_state_dict(state, models.vector, force=True)
    expect_refusal(
        capsys,
        models.folder,
        ["apply", models.base, models.vector],
        str(models.vector),
        "'layer.weight'",
        "NaN or Inf",
    )


@pytest.mark.parametrize(
    ("dtype", "base_value", "ft_value", "lam"),
    [
        (torch.float32, 1e38, 2e38, "10"),  # overflows in float32
        (torch.float16, 60000.0, 50000.0, "1"),  # fits float32, overflows when cast to fp16
        (torch.bfloat16, 3e38, 2e38, "2"),
    ],
    ids=["F32 in float32", "F16 on the cast back", "BF16 in float32"],
)
def test_a_result_that_overflows_is_an_error_not_an_inf_in_the_output(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    dtype: torch.dtype,
    base_value: float,
    ft_value: float,
    lam: str,
) -> None:
    def state(value: float) -> dict[str, torch.Tensor]:
        return {"big.weight": torch.full((4,), value, dtype=dtype), "ok": torch.ones(2)}

    base = save_state_dict(state(base_value), tmp_path / "base.safetensors")
    ft1 = save_state_dict(state(ft_value), tmp_path / "ft1.safetensors")
    ft2 = save_state_dict(state(ft_value), tmp_path / "ft2.safetensors")
    expect_refusal(
        capsys, tmp_path, ["merge", base, ft1, ft2, "-l", lam], "'big.weight'", "not finite"
    )


# ---------------------------------------------------------------------------- 21 lambda


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e400", "abc", ""])
@pytest.mark.parametrize("command", ["merge", "apply"])
def test_a_lambda_that_is_not_a_finite_number_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], models: Models, value: str, command: str
) -> None:
    inputs = [models.ft1, models.ft2] if command == "merge" else [models.vector]
    before = snapshot(models.folder)
    outcome = run_cli(
        capsys, command, models.base, *inputs, "-o", models.folder / "out.st", "--lambda", value
    )
    assert outcome.code == 2, outcome
    assert "--lambda" in outcome.err
    assert "not finite" in outcome.err or "not a number" in outcome.err
    assert "Traceback" not in outcome.err
    assert snapshot(models.folder) == before


# ---------------------------------------------------------------------------- 22 write faults


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs (needs root and mount permission)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def _large_models(folder: Path, numel: int) -> list[Path]:
    paths = []
    for seed, name in enumerate(("base", "ft1", "ft2")):
        generator = torch.Generator().manual_seed(seed)
        state = {f"w{i}": torch.randn(numel // 4, generator=generator) for i in range(4)}
        paths.append(save_state_dict(state, folder / f"{name}.safetensors"))
    return paths


@pytest.mark.parametrize("shape", ["file", "sharded"])
def test_a_full_disk_fails_cleanly_and_keeps_the_earlier_output(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_disk: Path, shape: str
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    base, ft1, ft2 = _large_models(inputs, 512 * 1024)  # 2 MB each
    if shape == "file":
        expect_refusal(
            capsys,
            tiny_disk,
            ["merge", base, ft1, ft2],
            "out.safetensors",
            "No space left",
            output=tiny_disk / "out.safetensors",
        )
    else:
        before = snapshot(tiny_disk)
        outcome = run_cli(
            capsys, "merge", base, ft1, ft2, "-o", tiny_disk / "sharded", "--shard-size", "600KB"
        )
        assert_refused(outcome, "sharded", "No space left")
        assert snapshot(tiny_disk) == before


def test_a_file_size_limit_fails_cleanly_and_keeps_the_earlier_output(tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    base, ft1, ft2 = _large_models(inputs, 256 * 1024)  # 1 MB each
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    output = outputs / "out.safetensors"
    output.write_bytes(EARLIER_OUTPUT)
    before = snapshot(outputs)
    limit = 256 * 1024

    result = run_process(
        "merge",
        base,
        ft1,
        ft2,
        "-o",
        output,
        "--force",
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert result.returncode != -signal.SIGXFSZ, "killed by SIGXFSZ"
    assert_one_line_error(
        result.returncode, result.stderr.splitlines(), str(output), "File too large"
    )
    assert snapshot(outputs) == before


# ---------------------------------------------------------------------------- 23 signals


@pytest.fixture(scope="module")
def slow_merge_inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A base and four fine-tuned checkpoints of 32 MB: a merge of a few seconds."""
    folder = tmp_path_factory.mktemp("slow")
    paths = []
    generator = torch.Generator().manual_seed(0)
    for name in ("base", "ft1", "ft2", "ft3", "ft4"):
        state = {f"block{i}.weight": torch.randn(1024, 1024, generator=generator) for i in range(8)}
        safetensors.torch.save_file(state, folder / f"{name}.safetensors")
        paths.append(folder / f"{name}.safetensors")
    return paths


@pytest.mark.parametrize(
    ("signum", "moment"),
    [(signal.SIGINT, "as writing starts"), (signal.SIGTERM, "mid-write")],
    ids=["SIGINT as writing starts", "SIGTERM mid-write"],
)
def test_sigint_and_sigterm_stop_the_merge_and_remove_partial_files(
    tmp_path: Path, slow_merge_inputs: list[Path], signum: signal.Signals, moment: str
) -> None:
    output = tmp_path / "out.safetensors"
    output.write_bytes(EARLIER_OUTPUT)
    before = snapshot(tmp_path)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "negmerge_cli",
            "merge",
            *map(str, slow_merge_inputs),
            "-o",
            str(output),
            "--force",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    threshold = 0 if moment == "as writing starts" else 4 * 2**20
    deadline = time.monotonic() + 60
    sent = False
    while time.monotonic() < deadline and process.poll() is None:
        partial = [p for p in tmp_path.iterdir() if p.name.endswith(PARTIAL_SUFFIX)]
        if partial and partial[0].stat().st_size > threshold:
            process.send_signal(signum)
            sent = True
            break
        time.sleep(0.005)
    stdout, stderr = process.communicate(timeout=60)
    assert sent, f"the merge ended before the signal could be sent: {stderr}"
    assert "Traceback" not in stderr
    assert_one_line_error(
        process.returncode,
        stderr.splitlines(),
        signal.Signals(signum).name,
        expected_code=130,
    )
    assert stdout == ""
    assert snapshot(tmp_path) == before, "partial files left or the earlier output changed"


# ---------------------------------------------------------------------------- 24 output is an input


def test_an_output_that_is_an_input_is_refused_before_any_work(
    capsys: pytest.CaptureFixture[str], models: Models
) -> None:
    folder = models.folder
    (folder / "link.safetensors").symlink_to(models.ft1)
    os.link(models.base, folder / "hard.safetensors")
    before = snapshot(folder)
    cases = [
        (["merge", models.base, models.ft1, models.ft2, "-o", models.ft1], str(models.ft1)),
        (["merge", models.base, models.ft1, models.ft2, "-o", models.base], str(models.base)),
        (["merge", models.base, models.ft1, models.ft2, "-o", folder / "link.safetensors"], "link"),
        (["merge", models.base, models.ft1, models.ft2, "-o", folder / "hard.safetensors"], "hard"),
        (
            ["merge", models.base, models.ft1, models.ft2, "-o", folder, "--shard-size", "1KB"],
            str(folder),
        ),
        (
            ["merge", models.base, models.ft1, models.ft2, "--save-vector", models.ft2],
            str(models.ft2),
        ),
        (["apply", models.base, models.vector, "-o", models.vector], str(models.vector)),
        (["apply", models.base, models.vector, "-o", folder / "hard.safetensors"], "hard"),
    ]
    for args, fragment in cases:
        for extra in ([], ["--force"]):
            outcome = run_cli(capsys, *args, *extra)
            line = assert_refused(outcome, fragment)
            assert "input" in line, line
            assert snapshot(folder) == before, args


# ---------------------------------------------------------------------------- 25 output location


def test_a_missing_output_folder_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], models: Models
) -> None:
    missing = models.folder / "no" / "such"
    before = snapshot(models.folder)
    outcome = run_cli(
        capsys, "merge", models.base, models.ft1, models.ft2, "-o", missing / "out.safetensors"
    )
    assert_refused(outcome, str(missing), "does not exist")
    outcome = run_cli(capsys, "apply", models.base, models.vector, "-o", missing / "o.st")
    assert_refused(outcome, str(missing), "does not exist")
    assert snapshot(models.folder) == before


def test_an_output_path_that_is_a_folder_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], models: Models
) -> None:
    target = models.folder / "results"
    target.mkdir()
    before = snapshot(models.folder)
    for extra in ([], ["--force"]):
        outcome = run_cli(
            capsys, "merge", models.base, models.ft1, models.ft2, "-o", target, *extra
        )
        assert_refused(outcome, str(target), "is a folder")
    assert snapshot(models.folder) == before


def test_a_read_only_output_folder_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], models: Models
) -> None:
    locked = models.folder / "locked"
    locked.mkdir()
    mounted = False
    if os.geteuid() == 0:  # root writes through file modes; a read-only mount stops it
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(locked)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            pytest.skip(f"running as root and cannot mount a read-only tmpfs: {result.stderr}")
        mounted = True
    else:
        locked.chmod(0o555)
    try:
        for command in (
            ["merge", models.base, models.ft1, models.ft2],
            ["apply", models.base, models.vector],
        ):
            outcome = run_cli(capsys, *command, "-o", locked / "out.safetensors")
            assert_refused(outcome, str(locked), "not writable")
            assert names_in(locked) == set()
    finally:
        if mounted:
            subprocess.run(["umount", str(locked)], check=False)
        else:
            locked.chmod(0o755)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_mode_the_umask_asks_for(
    capsys: pytest.CaptureFixture[str], models: Models, umask: int, mode: int
) -> None:
    previous = os.umask(umask)
    try:
        out = models.folder / "out.safetensors"
        vector = models.folder / "vec.safetensors"
        report = models.folder / "report.json"
        sharded = models.folder / "sharded"
        applied = models.folder / "applied.safetensors"
        common = [models.base, models.ft1, models.ft2, "-q"]
        assert (
            run_cli(
                capsys, "merge", *common, "-o", out, "--save-vector", vector, "--report", report
            ).code
            == 0
        )
        assert run_cli(capsys, "merge", *common, "-o", sharded, "--shard-size", "20B").code == 0
        assert run_cli(capsys, "apply", models.base, vector, "-o", applied, "-q").code == 0
    finally:
        os.umask(previous)
    written = [out, vector, report, applied, *sharded.iterdir()]
    assert len(written) > 5
    for path in written:
        assert path.stat().st_mode & 0o777 == mode, path


# ---------------------------------------------------------------------------- 26 misuse


def test_no_fine_tuned_checkpoints_is_refused(
    capsys: pytest.CaptureFixture[str], models: Models
) -> None:
    before = snapshot(models.folder)
    outcome = run_cli(capsys, "merge", models.base, "-o", models.folder / "out.safetensors")
    assert outcome.code == 2
    assert "FT..." in outcome.err and "Traceback" not in outcome.err
    assert snapshot(models.folder) == before
    empty = models.folder / "empty.txt"
    empty.write_text("# no runs yet\n\n")
    before = snapshot(models.folder)
    outcome = run_cli(capsys, "merge", models.base, f"@{empty}", "-o", models.folder / "o.st")
    assert_refused(outcome, "no fine-tuned checkpoints")
    assert snapshot(models.folder) == before


def test_the_base_listed_as_a_fine_tuned_checkpoint_is_refused(
    capsys: pytest.CaptureFixture[str], models: Models
) -> None:
    (models.folder / "alias.safetensors").symlink_to(models.base)
    dotted = f"{models.folder}/./base.safetensors"  # the same file spelled differently
    for again in (models.base, models.folder / "alias.safetensors", dotted):
        expect_refusal(
            capsys,
            models.folder,
            ["merge", models.base, models.ft1, again],
            str(models.base),
            "given twice",
        )
    expect_refusal(
        capsys, models.folder, ["merge", models.base, models.ft1, models.ft1], "given twice"
    )


def test_an_existing_output_is_kept_without_force(
    capsys: pytest.CaptureFixture[str], models: Models
) -> None:
    for output, extra in (
        (models.folder / "out.safetensors", []),
        (models.folder / "vec.safetensors", ["--save-vector"]),
    ):
        output.write_bytes(EARLIER_OUTPUT)
        before = snapshot(models.folder)
        flag = extra or ["-o"]
        outcome = run_cli(capsys, "merge", models.base, models.ft1, models.ft2, *flag, output)
        assert_refused(outcome, str(output), "already exists", "--force")
        assert snapshot(models.folder) == before
    sharded = models.folder / "sharded"
    assert (
        run_cli(
            capsys,
            "merge",
            models.base,
            models.ft1,
            models.ft2,
            "-o",
            sharded,
            "--shard-size",
            "20B",
            "-q",
        ).code
        == 0
    )
    before = snapshot(models.folder)
    outcome = run_cli(
        capsys, "merge", models.base, models.ft1, models.ft2, "-o", sharded, "--shard-size", "20B"
    )
    assert_refused(outcome, str(sharded), "--force")
    assert snapshot(models.folder) == before
    outcome = run_cli(
        capsys, "apply", models.base, models.vector, "-o", models.folder / "out.safetensors"
    )
    assert_refused(outcome, "already exists", "--force")
    assert snapshot(models.folder) == before


def test_an_unknown_method_lists_the_valid_ones(
    capsys: pytest.CaptureFixture[str], models: Models
) -> None:
    expect_refusal(
        capsys,
        models.folder,
        ["merge", models.base, models.ft1, models.ft2, "--method", "average"],
        "'average'",
        "negmerge, mean, magmax, ties",
    )


def test_a_missing_input_file_is_named(capsys: pytest.CaptureFixture[str], models: Models) -> None:
    missing = models.folder / "ft3.safetensors"
    expect_refusal(
        capsys, models.folder, ["merge", models.base, models.ft1, missing], str(missing), "no such"
    )
    expect_inspect_refusal(capsys, models.folder, [missing], str(missing), "no such")
