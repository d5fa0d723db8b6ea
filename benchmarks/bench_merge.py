"""Benchmark ``negmerge merge`` against the read floor, a naive in-memory merge and peers.

Generates two synthetic sets (reused when present under ``--data``):

* ``vit``: CLIP ViT-B/32 image encoders as task-vector checkpoints hold them (the whole
  visual tower plus the text tower's small heads; the text transformer and its token
  embedding are not fine-tuned, so they are left out), float32, about 352 MB each:
  a base and 8 fine-tunes.
* ``llm``: a Llama-shaped bfloat16 model 2048 wide (TinyLlama's shapes: a 32000 x 2048
  embedding and lm_head, ``--llm-layers`` decoder layers, RMSNorm weights), as Hugging Face
  folders (``model.safetensors`` + ``config.json``): a base and N fine-tunes.

Fine-tunes are ``base + 1e-3 * (0.65 * shared + own noise)``, so that about 10% of the
elements have sign consensus at N=8, as the NegMerge paper observes on CLIP.

Each case runs in a fresh process with a warm page cache (every input is read once just
before). Measured per case:

* wall: from process start to exit, interpreter and imports included;
* beyond start-up: wall minus the wall of ``python -c "import torch"`` alone;
* GB/s: bytes of all inputs divided by the time beyond start-up;
* peak anon: the largest ``RssAnon`` of ``/proc/PID/status`` (private anonymous memory:
  heap and tensors, not the page cache nor file-backed mappings), sampled by this process
  every 2 ms, so a spike shorter than that can be missed; "beyond torch" subtracts the
  peak of ``import torch`` alone;
* peak RSS: ``ru_maxrss`` of the finished process (VmHWM: includes file-backed pages,
  so a memory-mapped reader looks bigger here than it is).

Cases: (a) the floor, every tensor of every input read once with safetensors'
``safe_open(...).get_tensor`` and copied into one reused buffer (``get_tensor`` only maps
the file: without the copy no byte would be read); (a') the same bytes with ``os.preadv``
into a reused buffer, the floor of negmerge's own reader; (b) naive: ``load_file``
everything, NegMerge in memory, ``save_file``; (c) ``negmerge_cli.merge`` for each method,
NegMerge again with ``OMP_NUM_THREADS=1`` (one intra-op thread), and the ``negmerge merge``
command for NegMerge; (d) mergekit's ``task_arithmetic`` when ``import mergekit`` works
(LLM set only: mergekit needs a known architecture).

The machine's load average is printed with each table: on a shared 2-core machine another
busy process makes torch's second intra-op thread wait for a core at every operation,
which the OMP_NUM_THREADS=1 row shows. Compare ratios within one run, not seconds across
runs.

Usage::

    .venv/bin/python benchmarks/bench_merge.py                      # both sets, N=8
    .venv/bin/python benchmarks/bench_merge.py --sets vit --repeat 3 --keep-data
    .venv/bin/python benchmarks/bench_merge.py --sets llm --llm-n 2,8,16
    .venv/bin/python benchmarks/bench_merge.py --sets vit --methods negmerge --budgets 2,4,8,12

Generated data is deleted at the end unless ``--keep-data``; outputs are deleted after
each case. Disk: about 3.2 GB for the ViT set, 9 x 438 MB for the LLM set at N=8 with two
layers; sets are generated and measured one after the other.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = ("negmerge", "mean", "magmax", "ties")
LAMBDA = 1.0
STARTUP = 'start-up: `python -c "import torch"`'
SAMPLE_S = 0.002
MB = 1e6
GB = 1e9

# The targets (NegMerge, N=8, 2-core machine, warm page cache).
TARGET_WALL_RATIO = 1.5
TARGET_ANON_MB = {"vit": 150, "llm": 250}


# ------------------------------------------------------------------------------ shapes


def vit_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """open_clip ViT-B/32 names and shapes: visual tower (width 768, 12 blocks, patch 32,
    224 px) and the text tower's heads (width 512, context 77)."""
    width, text_width, embed = 768, 512, 512
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("positional_embedding", (77, text_width)),
        ("text_projection", (text_width, embed)),
        ("logit_scale", ()),
        ("ln_final.weight", (text_width,)),
        ("ln_final.bias", (text_width,)),
        ("visual.class_embedding", (width,)),
        ("visual.positional_embedding", (50, width)),
        ("visual.proj", (width, embed)),
        ("visual.conv1.weight", (width, 3, 32, 32)),
        ("visual.ln_pre.weight", (width,)),
        ("visual.ln_pre.bias", (width,)),
    ]
    for i in range(12):
        p = f"visual.transformer.resblocks.{i}."
        shapes += [
            (p + "ln_1.weight", (width,)),
            (p + "ln_1.bias", (width,)),
            (p + "attn.in_proj_weight", (3 * width, width)),
            (p + "attn.in_proj_bias", (3 * width,)),
            (p + "attn.out_proj.weight", (width, width)),
            (p + "attn.out_proj.bias", (width,)),
            (p + "ln_2.weight", (width,)),
            (p + "ln_2.bias", (width,)),
            (p + "mlp.c_fc.weight", (4 * width, width)),
            (p + "mlp.c_fc.bias", (4 * width,)),
            (p + "mlp.c_proj.weight", (width, 4 * width)),
            (p + "mlp.c_proj.bias", (width,)),
        ]
    shapes += [("visual.ln_post.weight", (width,)), ("visual.ln_post.bias", (width,))]
    return shapes


LLM_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def llm_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Llama names and TinyLlama-1.1B shapes (grouped-query attention: 4 KV heads of 64)."""
    hidden, inter, vocab = 2048, 5632, 32000
    kv = hidden // LLM_CONFIG["num_attention_heads"] * LLM_CONFIG["num_key_value_heads"]
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


# ------------------------------------------------------------------------------ data


@dataclass
class BenchSet:
    """One generated set: the paths of the base and fine-tuned files."""

    name: str
    base: Path
    finetuned: list[Path]
    folders: bool  # Hugging Face folders (config.json next to model.safetensors)

    def files(self, count: int) -> list[Path]:
        return [self.base, *self.finetuned[:count]]

    def nbytes(self, count: int) -> int:
        return sum(f.stat().st_size for f in self.files(count))


def _checkpoint_path(root: Path, label: str, folders: bool) -> Path:
    return root / label / "model.safetensors" if folders else root / f"{label}.safetensors"


def bench_set(name: str, root: Path, count: int) -> BenchSet:
    folders = name == "llm"
    labels = ["base"] + [f"ft-{i}" for i in range(count)]
    paths = [_checkpoint_path(root, label, folders) for label in labels]
    return BenchSet(name, paths[0], paths[1:], folders)


def generate(name: str, root: str, count: int, layers: int) -> None:
    """Write base and ``count`` fine-tunes into ``root``, reusing complete files.

    Runs in a child process: the parent must stay small, since a child's peak RSS
    (``ru_maxrss``) starts from the parent's size at fork.
    """
    import torch

    from negmerge_cli.io import save_state_dict

    shapes = vit_shapes() if name == "vit" else llm_shapes(layers)
    torch_dtype = torch.float32 if name == "vit" else torch.bfloat16
    bench = bench_set(name, Path(root), count)
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    spec = json.dumps({"shapes": shapes, "dtype": str(torch_dtype)})
    marker = folder / "shapes.json"
    if marker.exists() and marker.read_text() != spec:  # another layer count: start over
        shutil.rmtree(folder)
        folder.mkdir(parents=True)
    marker.write_text(spec)
    paths = bench.files(count)
    missing = [p for p in paths if not p.exists()]
    if not missing:
        return
    started = time.perf_counter()
    print(f"generating {len(missing)} {name} checkpoint(s) in {root} ...", flush=True)
    generator = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=generator) * 0.02).to(torch_dtype) for k, s in shapes}
    shared = {k: torch.randn(s, generator=generator) for k, s in shapes}
    for index, path in enumerate(paths):
        if path.exists():
            continue
        if bench.folders:
            path.parent.mkdir(exist_ok=True)
            config = {**LLM_CONFIG, "num_hidden_layers": layers}
            (path.parent / "config.json").write_text(json.dumps(config, indent=2))
        if index == 0:
            state = base
        else:
            generator.manual_seed(index)
            state = {
                k: (
                    base[k].float()
                    + 1e-3 * (0.65 * shared[k] + torch.randn(s, generator=generator))
                ).to(torch_dtype)
                for k, s in shapes
            }
        save_state_dict(state, path, force=True)
        del state
    print(f"  done in {time.perf_counter() - started:.1f} s", flush=True)


def warm(files: list[Path]) -> None:
    """Read every file once so that the page cache holds it."""
    buffer = bytearray(16 * 2**20)
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


# ------------------------------------------------------------------------------ children
# Each case runs as `python bench_merge.py --child KIND JSON`; the module's top level
# imports only the standard library, so the child pays what the case itself imports.


def child_floor(files: list[str]) -> dict:
    """Every tensor of every input through ``safe_open(...).get_tensor``, each copied into
    one reused buffer: ``get_tensor`` maps the file without touching it, so without the
    copy nothing would be read at all."""
    import torch
    from safetensors import safe_open

    total = 0
    buffer = torch.empty(0, dtype=torch.uint8)
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                raw = handle.get_tensor(key).reshape(-1).view(torch.uint8)
                if raw.numel() > buffer.numel():
                    buffer = torch.empty(raw.numel(), dtype=torch.uint8)
                buffer[: raw.numel()].copy_(raw)
                total += raw.numel()
    return {"bytes": total}


def child_pread(files: list[str]) -> dict:
    """The same bytes with ``os.preadv`` into one reused torch buffer (no mapping): the
    floor of a pread-based reader such as negmerge's. Imports torch like the other cases,
    so that its start-up is the same."""
    import torch

    buffer = torch.empty(64 * 2**20, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    total = 0
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            position = 0
            while count := os.preadv(fd, [view], position):
                position += count
            total += position
        finally:
            os.close(fd)
    return {"bytes": total}


def child_naive(files: list[str], output: str) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    base, *finetuned = (load_file(f) for f in files)
    merged = {}
    for key, value in base.items():
        if not value.is_floating_point():
            merged[key] = value
            continue
        base32 = value.float()
        taus = torch.stack([ft[key].float() - base32 for ft in finetuned])
        consensus = (taus > 0).all(0) | (taus < 0).all(0)
        vector = torch.where(consensus, taus.mean(0), torch.zeros(()))
        merged[key] = (base32 - LAMBDA * vector).to(value.dtype)
    save_file(merged, output)
    return {}


def child_api(files: list[str], output: str, method: str, budget: int | None = None) -> dict:
    from negmerge_cli import merge

    report = merge(
        files[0], files[1:], output, method=method, lam=LAMBDA, quiet=True, memory_budget=budget
    )
    return {"timings": report["timings"]}


def child_mergekit(folders: list[str], output: str) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    weight = -LAMBDA / (len(folders) - 1)  # base - lambda * mean(tau): NegMerge's "mean"
    config = MergeConfiguration.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": folders[0],
            "models": [{"model": f, "parameters": {"weight": weight}} for f in folders[1:]],
            "dtype": "bfloat16",
        }
    )
    run_merge(config, output, options=MergeOptions(copy_tokenizer=False, lazy_unpickle=True))
    return {}


def run_child(kind: str, spec: dict) -> None:
    started = time.perf_counter()
    if kind == "generate":
        generate(spec["name"], spec["root"], spec["count"], spec["layers"])
        return
    if kind == "floor":
        extra = child_floor(spec["files"])
    elif kind == "pread":
        extra = child_pread(spec["files"])
    elif kind == "naive":
        extra = child_naive(spec["files"], spec["output"])
    elif kind == "api":
        extra = child_api(spec["files"], spec["output"], spec["method"], spec.get("budget"))
    elif kind == "mergekit":
        extra = child_mergekit(spec["folders"], spec["output"])
    else:
        raise SystemExit(f"unknown child kind {kind!r}")
    print(json.dumps({"in_process_s": time.perf_counter() - started, **extra}))


# ------------------------------------------------------------------------------ measuring


@dataclass
class Sample:
    wall_s: float
    peak_anon: int  # bytes
    peak_rss: int  # bytes
    detail: dict = field(default_factory=dict)


def _rss_anon(fd: int) -> int | None:
    try:
        text = os.pread(fd, 4096, 0).decode()
    except OSError:
        return None
    at = text.find("RssAnon:")
    if at < 0:
        return None
    return int(text[at + 8 : text.index("kB", at)]) * 1024


def measure(command: list[str], env: dict[str, str] | None = None) -> Sample:
    """Run ``command`` to completion, sampling its anonymous memory; raise on failure."""
    environment = {**os.environ, **(env or {})}
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, cwd=REPO, env=environment)
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            try:
                fd = os.open(f"/proc/{process.pid}/status", os.O_RDONLY)
            except OSError:
                return
            try:
                while not done.is_set():
                    value = _rss_anon(fd)
                    if value is None:
                        break
                    peak = max(peak, value)
                    done.wait(SAMPLE_S)
            finally:
                os.close(fd)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read().decode(), stderr.read().decode()
    if process.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(command)} exited {process.returncode}:\n{err.strip()[-2000:]}"
        )
    lines = out.strip().splitlines()
    detail = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return Sample(wall, peak, usage.ru_maxrss * 1024, detail)


def median_sample(samples: list[Sample]) -> Sample:
    return Sample(
        statistics.median(s.wall_s for s in samples),
        int(statistics.median(s.peak_anon for s in samples)),
        int(statistics.median(s.peak_rss for s in samples)),
        samples[len(samples) // 2].detail,
    )


def child_command(kind: str, spec: dict) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(spec)]


@dataclass
class Case:
    label: str
    command: list[str]
    output: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    runs: int = 1  # per round: the start-up is short and noisy, so it runs thrice


def cases_for(
    bench: BenchSet, count: int, methods: list[str], out_dir: Path, budgets: list[float]
) -> list[Case]:
    files = [str(f) for f in bench.files(count)]
    out = out_dir / "bench-output.safetensors"
    cases = [
        Case(STARTUP, [sys.executable, "-c", "import torch"], runs=3),
        Case("(a) floor: safe_open + get_tensor", child_command("floor", {"files": files})),
        Case("(a') os.preadv into a reused buffer", child_command("pread", {"files": files})),
        Case(
            "(b) naive: load_file, merge, save_file",
            child_command("naive", {"files": files, "output": str(out)}),
            out,
        ),
    ]
    for method in methods:
        spec = {"files": files, "output": str(out), "method": method}
        cases.append(Case(f"(c) negmerge_cli.merge {method}", child_command("api", spec), out))
    if "negmerge" in methods:
        spec = {"files": files, "output": str(out), "method": "negmerge"}
        cases.append(
            Case(
                "(c) negmerge_cli.merge negmerge, OMP_NUM_THREADS=1",
                child_command("api", spec),
                out,
                {"OMP_NUM_THREADS": "1"},
            )
        )
        for mib in budgets:
            label = f"(c) negmerge_cli.merge negmerge, memory budget {mib:g} MiB"
            budget_spec = {**spec, "budget": int(mib * 2**20)}
            cases.append(Case(label, child_command("api", budget_spec), out))
        script = Path(sys.executable).with_name("negmerge")
        command = [str(script), "merge", *files, "-o", str(out), "--method", "negmerge", "-q"]
        cases.append(Case("(c) `negmerge merge` CLI negmerge", command, out))
    return cases


def mergekit_case(bench: BenchSet, count: int, out_dir: Path) -> Case | str:
    """mergekit's task_arithmetic, or why it is not run."""
    check = subprocess.run(
        [sys.executable, "-c", "import mergekit"], capture_output=True, cwd=REPO, check=False
    )
    if check.returncode != 0:
        return "mergekit: not installed (`import mergekit` fails), peer not run"
    if not bench.folders:
        return "mergekit: needs a known architecture (config.json); not run on the ViT set"
    folders = [str(f.parent) for f in bench.files(count)]
    out = out_dir / "bench-mergekit"
    spec = {"folders": folders, "output": str(out)}
    return Case("(d) mergekit task_arithmetic (= mean)", child_command("mergekit", spec), out)


def remove(path: Path | None) -> None:
    if path is None:
        return
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def run_once(case: Case, inputs: list[Path]) -> Sample:
    remove(case.output)
    warm(inputs)
    try:
        return measure(case.command, case.env)
    finally:
        remove(case.output)


def run_cases(
    cases: list[Case], inputs: list[Path], repeat: int, title: str
) -> dict[str, Sample | str]:
    """Every case once per round, ``repeat`` rounds, the median per case: a load that comes
    and goes on a shared machine then spreads over all cases instead of a few."""
    samples: dict[str, list[Sample]] = {case.label: [] for case in cases}
    failed: dict[str, str] = {}
    for round_number in range(1, repeat + 1):
        for case in cases:
            if case.label in failed:
                continue
            print(f"  {title} [{round_number}/{repeat}] {case.label} ...", flush=True)
            try:
                for _ in range(case.runs):
                    samples[case.label].append(run_once(case, inputs))
            except RuntimeError as exc:
                failed[case.label] = f"failed: {str(exc).splitlines()[-1]}"
    return {
        case.label: failed.get(case.label) or median_sample(samples[case.label]) for case in cases
    }


# ------------------------------------------------------------------------------ report


def table(
    title: str, startup: Sample, rows: list[tuple[str, Sample | str]], nbytes: int
) -> list[str]:
    floor = next((s for label, s in rows if label.startswith("(a)")), None)
    assert isinstance(floor, Sample)
    floor_work = floor.wall_s - startup.wall_s
    lines = [
        f"### {title}",
        "",
        "| case | wall s | beyond start-up s | wall x (a) | work x (a) | input GB/s "
        "| peak anon MB | anon beyond torch MB | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {STARTUP} | {startup.wall_s:.2f} | - | - | - | - "
        f"| {startup.peak_anon / MB:.0f} | 0 | {startup.peak_rss / MB:.0f} |",
    ]
    for label, sample in rows:
        if isinstance(sample, str):
            lines.append(f"| {label} | {sample} | | | | | | | |")
            continue
        work = sample.wall_s - startup.wall_s
        rate = nbytes / work / GB if work > 0 else float("inf")
        lines.append(
            f"| {label} | {sample.wall_s:.2f} | {work:.2f} | {sample.wall_s / floor.wall_s:.2f} "
            f"| {work / floor_work:.2f} | {rate:.2f} | {sample.peak_anon / MB:.0f} "
            f"| {(sample.peak_anon - startup.peak_anon) / MB:.0f} | {sample.peak_rss / MB:.0f} |"
        )
    return lines


def verdicts(name: str, startup: Sample, rows: list[tuple[str, Sample | str]]) -> list[str]:
    found = dict(rows)
    floor = found.get("(a) floor: safe_open + get_tensor")
    ours = found.get("(c) negmerge_cli.merge negmerge")
    if not isinstance(floor, Sample) or not isinstance(ours, Sample):
        return []
    lines = []
    if name == "vit":
        ratio = ours.wall_s / floor.wall_s
        verdict = "met" if ratio <= TARGET_WALL_RATIO else "MISSED"
        lines.append(
            f"- NegMerge wall / floor wall: {ratio:.2f}x "
            f"(target <= {TARGET_WALL_RATIO}x): {verdict}"
        )
    anon = (ours.peak_anon - startup.peak_anon) / MB
    limit = TARGET_ANON_MB[name]
    verdict = "met" if anon < limit else "MISSED"
    lines.append(
        f"- NegMerge peak anonymous memory beyond `import torch`: {anon:.0f} MB "
        f"(target < {limit} MB): {verdict}"
    )
    return lines


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} CPUs, {memory:.0f} GiB RAM, Python {sys.version.split()[0]}; "
        f"warm page cache, median of the repeats"
    )


def package_version() -> str:
    """Where the children import ``negmerge_cli`` from, and a fingerprint of its sources
    (the package may be edited while a long run goes on: the numbers would mix versions)."""
    found = subprocess.run(
        [sys.executable, "-c", "import negmerge_cli; print(negmerge_cli.__file__)"],
        capture_output=True,
        text=True,
        cwd=REPO / "benchmarks",
        check=True,
    )
    package = Path(found.stdout.strip()).parent
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        digest.update(source.read_bytes())
    head = subprocess.run(
        ["git", "-C", str(package), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"{package} (git {head or 'unknown'}, sources {digest.hexdigest()[:12]})"


def changed(version: str) -> list[str]:
    """A warning when the package's sources changed (a commit elsewhere in the repository
    moves the git description only, which does not matter to the numbers)."""
    now = package_version()
    if now.rsplit("sources ", 1)[-1] == version.rsplit("sources ", 1)[-1]:
        return []
    return [f"- WARNING: negmerge_cli changed during this run ({version} -> {now})"]


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "bench-data", help="data folder")
    parser.add_argument("--sets", default="vit,llm", help="comma list of vit, llm")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (median)")
    parser.add_argument("--keep-data", action="store_true", help="keep generated files")
    parser.add_argument("--llm-n", default="8", help="fine-tunes in the LLM set (comma list)")
    parser.add_argument("--llm-layers", type=int, default=2, help="decoder layers (LLM set)")
    parser.add_argument("--vit-n", type=int, default=8, help="fine-tunes in the ViT set")
    parser.add_argument(
        "--budgets",
        default="",
        help="also run NegMerge at these CPU memory budgets in MiB (comma list; the "
        "default budget is the engine's MEMORY_BUDGET)",
    )
    args = parser.parse_args(argv)

    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [s for s in sets if s not in TARGET_ANON_MB] + [
        m for m in methods if m not in METHODS
    ]
    if unknown or args.repeat < 1:
        parser.error(f"unknown set or method {unknown}, or --repeat < 1")
    llm_counts = sorted({int(n) for n in args.llm_n.split(",")})
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]

    invoked = shlex.join(
        [os.path.relpath(sys.executable, REPO), os.path.relpath(__file__, REPO), *sys.argv[1:]]
    )
    version = package_version()
    print(f"command: {invoked}\nmachine: {machine()}\nnegmerge_cli: {version}\n", flush=True)

    report: list[str] = []
    data_existed = args.data.exists()
    try:
        for name in sets:
            if name == "vit":
                top = args.vit_n
                plans = [(top, f"ViT-B/32 set, fp32, N={top}")]
            else:
                top = llm_counts[-1]
                layers = args.llm_layers
                plans = [(n, f"LLM set, bf16, {layers} layers, N={n}") for n in llm_counts]
            root = args.data / name
            spec = {"name": name, "root": str(root), "count": top, "layers": args.llm_layers}
            subprocess.run(child_command("generate", spec), cwd=REPO, check=True)
            bench = bench_set(name, root, top)
            for count, title in plans:
                inputs = bench.files(count)
                nbytes = bench.nbytes(count)
                title += (
                    f", {nbytes / GB:.2f} GB of inputs ({nbytes / len(inputs) / MB:.0f} MB each)"
                )
                load_before = load()
                cases = cases_for(bench, count, methods, args.data, budgets)
                peer = mergekit_case(bench, count, args.data)
                if isinstance(peer, Case):
                    cases.append(peer)
                short = f"{title.split(',')[0]} N={count}"
                results = run_cases(cases, inputs, args.repeat, short)
                startup = results.pop(STARTUP)
                if isinstance(startup, str):
                    raise SystemExit(f"start-up case {startup}")
                rows: list[tuple[str, Sample | str]] = list(results.items())
                if isinstance(peer, str):
                    rows.append((peer.split(":")[0], peer.split(":", 1)[1].strip()))
                block = [
                    *table(title, startup, rows, nbytes),
                    "",
                    f"- machine {load_before} before this set, {load()} after",
                    *changed(version),
                    *verdicts(name, startup, rows),
                ]
                report += [*block, ""]
                print("\n".join(block) + "\n", flush=True)
            if not args.keep_data:
                shutil.rmtree(args.data / name)
    finally:
        if not args.keep_data and args.data.exists():
            for name in sets:
                shutil.rmtree(args.data / name, ignore_errors=True)
            if not data_existed:
                shutil.rmtree(args.data, ignore_errors=True)

    print("## Summary\n")
    print(f"command: `{invoked}`  \nmachine: {machine()}  \nnegmerge_cli: {version}\n")
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        run_child(sys.argv[2], json.loads(sys.argv[3]))
    else:
        sys.exit(main())
