"""The streaming merge: validate every header, plan, then tensor by tensor read -> merge -> write.

Memory stays bounded whatever the model's size or the number of checkpoints: each tensor
is processed in flat element ranges sized so that the N task vectors of one range fit a
fixed budget, and outputs are written as they are produced. Nothing is written until every
header has been checked, and outputs appear only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import re
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from negmerge_cli import __version__
from negmerge_cli.errors import (
    CheckpointError,
    NonFiniteError,
    OutputError,
    UsageError,
)
from negmerge_cli.io import (
    MERGEABLE,
    SAFETENSORS_DTYPES,
    CheckpointReader,
    OutputWriter,
    TensorInfo,
    file_identity,
    open_checkpoint,
)
from negmerge_cli.io.dtypes import compute_dtype
from negmerge_cli.io.writer import INDEX_NAME, SafetensorsWriter, discard_pending
from negmerge_cli.methods import MergeMethod, get_method, kth_magnitude
from negmerge_cli.methods.common import ordered_sum
from negmerge_cli.methods.select import MagnitudeSelector, trim_rank
from negmerge_cli.methods.ties import majority_contribution
from negmerge_cli.signals import interrupts_raise

PathLike = str | os.PathLike[str]

# BatchNorm statistics are not weights: negating a running variance can make it negative.
DEFAULT_EXCLUDE = (r"(^|\.)running_mean$", r"(^|\.)running_var$", r"(^|\.)num_batches_tracked$")
MEMORY_BUDGET = 8 * 2**20
"""Bytes of working memory per chunk on the CPU: small enough that the task vectors of one
element range stay in cache between the passes over them, large enough that per-call
costs do not dominate. On the 2-core development machine 6 to 8 MiB were fastest, 2 MiB
and 12 MiB slower (``benchmarks/bench_merge.py --budgets 2,4,8,12``)."""
GPU_MEMORY_BUDGET = 256 * 2**20
"""On a GPU, large chunks amortise transfers and kernel launches."""

DENSITY_SCOPES = ("global", "tensor")


class Progress(Protocol):
    """What the engine reports progress to (the CLI draws a bar on stderr)."""

    def start(self, total: int, label: str) -> None: ...

    def advance(self, amount: int) -> None: ...

    def stop(self) -> None: ...


class _NoProgress:
    def start(self, total: int, label: str) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def stop(self) -> None:
        pass


# ---------------------------------------------------------------------------- validation


def check_lambda(lam: float) -> float:
    """A finite float, or a :class:`UsageError`."""
    try:
        value = float(lam)
    except (TypeError, ValueError):
        raise UsageError(f"lambda must be a number, got {lam!r}") from None
    if not math.isfinite(value):
        raise UsageError(f"lambda must be finite, got {lam!r}")
    return value


def resolve_device(device: str) -> torch.device:
    """``auto`` picks the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if chosen.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} asked for, but no CUDA GPU is available")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise UsageError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) found")
    return chosen


def _compile_patterns(patterns: Sequence[str], flag: str) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise UsageError(
                f"{flag} {pattern!r} is not a valid regular expression: {exc}"
            ) from None
    return compiled


def select_merged(
    tensors: Sequence[TensorInfo],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    merge_batchnorm_stats: bool = False,
) -> set[str]:
    """Names of the tensors to merge: floating point, matching ``include`` (when given),
    not matching ``exclude`` nor, by default, BatchNorm statistics."""
    keep = _compile_patterns(include, "--include")
    drop = _compile_patterns(exclude, "--exclude")
    if not merge_batchnorm_stats:
        drop += [re.compile(p) for p in DEFAULT_EXCLUDE]
    return {
        t.name
        for t in tensors
        if t.dtype in MERGEABLE
        and (not keep or any(p.search(t.name) for p in keep))
        and not any(p.search(t.name) for p in drop)
    }


def _describe_keys(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_compatible(base: CheckpointReader, others: Sequence[CheckpointReader]) -> None:
    """Same keys, exactly the same shapes and dtypes in every checkpoint (no broadcasting)."""
    for other in others:
        missing = [k for k in base.tensors if k not in other.tensors]
        extra = [k for k in other.tensors if k not in base.tensors]
        if missing or extra:
            parts = []
            if missing:
                parts.append(
                    f"lacks {len(missing)} of the base's tensors ({_describe_keys(missing)})"
                )
            if extra:
                parts.append(f"has {len(extra)} tensors the base lacks ({_describe_keys(extra)})")
            raise CheckpointError(f"{other.path}: {'; '.join(parts)} (base: {base.path})")
        for name, info in base.tensors.items():
            theirs = other.tensors[name]
            if theirs.shape != info.shape:
                raise CheckpointError(
                    f"{other.path}: tensor {name!r} has shape {list(theirs.shape)}, "
                    f"the base {base.path} has {list(info.shape)}"
                )
            if theirs.dtype != info.dtype:
                raise CheckpointError(
                    f"{other.path}: tensor {name!r} is {theirs.dtype}, the base {base.path} "
                    f"is {info.dtype}; convert the checkpoints to one dtype first"
                )


# ---------------------------------------------------------------------------- outputs


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(
    path: Path, inputs: Sequence[Path], *, sharded: bool, force: bool, what: str = "output"
) -> None:
    """Refuse an output that is an input (path, symlink or hard link) or an input's folder,
    that exists without ``force``, or whose folder is missing."""
    for source in inputs:
        if _same_file(path, source) or path.resolve() == source.resolve():
            raise UsageError(f"{what} {path} is also an input ({source}); choose another path")
        if sharded and (
            path.resolve() == source.resolve().parent or _same_file(path, source.parent)
        ):
            raise UsageError(
                f"{what} folder {path} holds the input {source}; choose another folder"
            )
    if sharded:
        if path.exists() and not path.is_dir():
            raise OutputError(f"{path}: exists and is not a folder (--shard-size writes a folder)")
        if (
            path.is_dir()
            and not force
            and ((path / INDEX_NAME).exists() or any(path.glob("model-*-of-*.safetensors")))
        ):
            raise OutputError(f"{path}: already holds a sharded model; pass --force to replace it")
    else:
        if path.is_dir():
            raise OutputError(
                f"{path}: is a folder; give a file name (or --shard-size for a folder)"
            )
        if path.exists() and not force:
            raise OutputError(f"{path}: already exists; pass --force to replace it")
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: output folder does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parent}: output folder is not writable")


@contextlib.contextmanager
def compute_threads(device: torch.device, threads: int | None) -> Iterator[None]:
    """torch's intra-op threads for the merge, restored afterwards.

    One by default on the CPU: the work is a stream of memory-bound passes over cache-sized
    chunks, where thread hand-offs cost more than they gain, and where a busy neighbour
    process makes OpenMP's spinning threads many times slower.
    """
    if threads is not None and threads < 1:
        raise UsageError("threads must be at least 1")
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads or 1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------- signals


@contextlib.contextmanager
def signals_as_errors() -> Iterator[None]:
    """Turn SIGINT/SIGTERM into :class:`Interrupted` so clean-up runs, and make a write past
    ``ulimit -f`` fail with EFBIG instead of killing the process (SIGXFSZ)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        with interrupts_raise("stopped by {signal}; no output was written"):
            yield
    except BaseException:
        # A signal can land between a temp file's creation and the code that would remove
        # it; the writer keeps a list of its open temp files for exactly this.
        discard_pending()
        raise
    finally:
        signal.signal(signal.SIGXFSZ, previous)


# ---------------------------------------------------------------------------- reading


@dataclass
class Inputs:
    """The opened base and fine-tuned checkpoints, checked to match."""

    base: CheckpointReader
    finetuned: list[CheckpointReader]
    identities: dict[Path, tuple[int, int, int, int]] = field(default_factory=dict)

    @property
    def readers(self) -> list[CheckpointReader]:
        return [self.base, *self.finetuned]

    @property
    def files(self) -> list[Path]:
        return [f for r in self.readers for f in r.files]

    def check_unchanged(self) -> None:
        """A file replaced or rewritten while being read would give a silently wrong merge."""
        for path, identity in self.identities.items():
            try:
                now = file_identity(path)
            except OSError:
                now = None
            if now != identity:
                raise CheckpointError(f"{path}: changed while it was being read; merge again")

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def open_inputs(base: PathLike, finetuned: Sequence[PathLike]) -> Inputs:
    """Open and cross-check every checkpoint; closes what it opened on any error."""
    if not finetuned:
        raise UsageError("no fine-tuned checkpoints given")
    opened: list[CheckpointReader] = []
    try:
        for path in [base, *finetuned]:
            opened.append(open_checkpoint(path))
        inputs = Inputs(opened[0], opened[1:])
        seen: dict[tuple[int, int], Path] = {}
        for reader in inputs.readers:
            key = file_identity(reader.path)[:2]
            if key in seen:
                raise UsageError(
                    f"{reader.path} is given twice (also as {seen[key]}); "
                    "the base must not be a fine-tuned checkpoint and each run counts once"
                )
            seen[key] = reader.path
        check_compatible(inputs.base, inputs.finetuned)
        inputs.identities = {f: file_identity(f) for f in inputs.files}
        return inputs
    except BaseException:
        for reader in opened:
            reader.close()
        raise


def chunk_ranges(numel: int, chunk: int) -> list[tuple[int, int]]:
    """``[start, stop)`` element ranges covering ``numel``; one empty range for 0 elements."""
    if numel == 0:
        return [(0, 0)]
    return [(s, min(s + chunk, numel)) for s in range(0, numel, chunk)]


class TaskVectorReader:
    """Reads one element range of a tensor from every input and forms the task vectors."""

    def __init__(
        self, inputs: Inputs, device: torch.device, memory_budget: int | None = None
    ) -> None:
        self.inputs = inputs
        self.device = device
        count = len(inputs.finetuned)
        if memory_budget is None:
            memory_budget = MEMORY_BUDGET if device.type == "cpu" else GPU_MEMORY_BUDGET
        # N task vectors plus about ten chunk-sized temporaries whatever N is (base,
        # running min and max, mask, mean, merged, result, ...), in float32
        self.chunk = max(1, memory_budget // ((count + 10) * 4))
        self.bytes_read = 0

    def ranges(self, info: TensorInfo) -> list[tuple[int, int]]:
        return chunk_ranges(info.numel, self.chunk)

    def base(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        values = torch.empty(stop - start, dtype=compute_dtype(info.dtype))
        values = self.inputs.base.read_into(info.name, start, values)
        self.bytes_read += (stop - start) * SAFETENSORS_DTYPES[info.dtype].itemsize
        return values

    def load(
        self, info: TensorInfo, start: int, stop: int, slot: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """I/O only: the base's and every fine-tune's values of one element range, in the
        compute dtype, on the CPU (``[n]`` and ``[N, n]``).

        ``slot`` holds buffers to read into, kept across calls: fresh allocations of this
        size come from new pages, and their page faults cost more than the reads.
        """
        count, size = len(self.inputs.finetuned), stop - start
        dtype = compute_dtype(info.dtype)
        if slot is None:
            base = self.base(info, start, stop)
            values = torch.empty((count, size), dtype=dtype)
        else:
            if dtype not in slot:
                slot[dtype] = torch.empty((count + 1) * self.chunk, dtype=dtype)
            flat = slot[dtype]
            base = self.inputs.base.read_into(info.name, start, flat[:size])
            self.bytes_read += size * SAFETENSORS_DTYPES[info.dtype].itemsize
            values = flat[size : size * (count + 1)].view(count, size)
        for i, reader in enumerate(self.inputs.finetuned):
            reader.read_into(info.name, start, values[i])
        self.bytes_read += count * size * SAFETENSORS_DTYPES[info.dtype].itemsize
        return base, values

    def form(
        self, info: TensorInfo, base: torch.Tensor, values: torch.Tensor, total: bool = False
    ) -> Chunk:
        """Turn loaded values into task vectors (in place) with their consensus mask and,
        with ``total``, their ordered sum.

        On the CPU each row is subtracted and folded into the running minimum, maximum and
        sum in one sweep while it is in cache; the minimum and maximum give the
        sign-consensus mask and, since NaN and Inf propagate through them, the finiteness
        check, without another pass over the N task vectors.
        """
        if self.device.type == "cpu":
            # numpy's elementwise calls cost less than torch's at these sizes and its
            # comparisons are vectorised; the results are the same IEEE operations.
            taus = values
            rows, origin = values.numpy(), base.numpy()
            lows, highs = np.subtract(rows[0], origin, out=rows[0]).copy(), rows[0].copy()
            sums = rows[0].copy() if total else None
            for row in rows[1:]:
                np.subtract(row, origin, out=row)
                np.minimum(lows, row, out=lows)
                np.maximum(highs, row, out=highs)
                if sums is not None:
                    sums += row  # in input order, as ordered_sum
            consensus = torch.from_numpy(np.greater(lows, 0) | np.less(highs, 0))
            low, high = torch.from_numpy(lows), torch.from_numpy(highs)
            summed = None if sums is None else torch.from_numpy(sums)
        else:
            base = base.to(self.device, non_blocking=True)
            taus = values.to(self.device, non_blocking=True)
            taus -= base
            low, high = torch.aminmax(taus, dim=0)
            consensus = (low > 0) | (high < 0)
            summed = ordered_sum(taus) if total else None
        if not _finite(base) or not (_finite(low) and _finite(high)):
            self._name_culprit(info, base, taus)
        return Chunk(base, taus, consensus, summed)

    def read(self, info: TensorInfo, start: int, stop: int) -> Chunk:
        """One element range of every input as task vectors in the compute dtype."""
        return self.form(info, *self.load(info, start, stop))

    def stream(
        self, items: Sequence[tuple[TensorInfo, int, int]], total: bool = False
    ) -> Iterator[Chunk]:
        """``read`` for each item in order, the next range read and formed in a background
        thread while the caller merges this one (preads and numpy/torch ops release the GIL,
        so the two use two cores). Nothing else may read these inputs while the stream is open."""
        loaded: queue.Queue[tuple[dict, Chunk] | BaseException] = queue.Queue()
        free: queue.Queue[dict] = queue.Queue()
        for _ in range(3):  # one being filled, one waiting, one in use by the caller
            free.put({})
        stop = threading.Event()
        threads = torch.get_num_threads()

        def produce() -> None:
            # OpenMP's thread count is per OS thread: without this the new thread would use
            # the default (every core) and crowd out the caller's thread.
            torch.set_num_threads(threads)
            for info, start, end in items:
                slot = free.get()
                if stop.is_set():
                    return
                try:
                    values = self.load(info, start, end, slot)
                    loaded.put((slot, self.form(info, *values, total=total)))
                except BaseException as exc:  # handed to the consumer, which raises it
                    loaded.put(exc)
                    return

        thread = threading.Thread(target=produce, daemon=True, name="negmerge-prefetch")
        thread.start()
        try:
            for _ in items:
                item = loaded.get()
                if isinstance(item, BaseException):
                    raise item
                slot, chunk = item
                yield chunk
                free.put(slot)  # the caller is done with this chunk once it asks for more
        finally:
            stop.set()
            free.put({})  # unblock a producer waiting for a free slot
            thread.join()

    def _name_culprit(self, info: TensorInfo, base: torch.Tensor, taus: torch.Tensor) -> None:
        rows = [(self.inputs.base, base), *zip(self.inputs.finetuned, taus, strict=True)]
        for reader, row in rows:
            if not bool(torch.isfinite(row).all()):
                raise NonFiniteError(f"{reader.path}: tensor {info.name!r} contains NaN or Inf")
        raise NonFiniteError(
            f"{self.inputs.base.path}: tensor {info.name!r}: a task vector overflows float32"
        )


def _finite(values: torch.Tensor) -> bool:
    """All finite? One reduction; a sum that overflows on finite values is checked again."""
    if math.isfinite(float(values.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(values).all())


@dataclass
class Chunk:
    """One element range of a tensor, read from every input."""

    base: torch.Tensor
    """``[n]`` the base's values in the compute dtype."""
    taus: torch.Tensor
    """``[N, n]`` the task vectors ``ft_i - base``."""
    consensus: torch.Tensor
    """``[n]`` True where every task vector has the same strict sign."""
    total: torch.Tensor | None = None
    """``[n]`` ``ordered_sum(taus)``, when the reader was asked for it."""


def apply_vector(base: torch.Tensor, vector: torch.Tensor, lam: float) -> torch.Tensor:
    """``base - lam * vector`` in the compute dtype; lambda 0 returns the base exactly."""
    if lam == 0:
        return base
    return base - lam * vector


def copy_tensor(
    reader: CheckpointReader, info: TensorInfo, writer: OutputWriter, chunk: int
) -> None:
    """Copy a tensor from ``reader`` to ``writer`` bit for bit, a chunk at a time."""
    for start, stop in chunk_ranges(info.numel, chunk):
        writer.write(info.name, reader.read(info.name, start, stop))


def commit_all(writers: Sequence[OutputWriter | None]) -> None:
    """Flush every output to disk first, then rename them all into place."""
    present = [w for w in writers if w is not None]
    for writer in present:
        writer.finish()
    for writer in present:
        writer.commit()


def discard_all(writers: Sequence[OutputWriter | None]) -> None:
    for writer in writers:
        if writer is not None:
            writer.discard()


def _check_result(path: Path, name: str, values: torch.Tensor) -> None:
    """The result in its stored dtype: 70000 fits float32 but is inf in float16."""
    if not math.isfinite(float(values.sum(dtype=torch.float32))) and not bool(
        torch.isfinite(values).all()
    ):
        raise NonFiniteError(f"{path}: result for tensor {name!r} is not finite (overflow?)")


# ---------------------------------------------------------------------------- TIES statistics


@dataclass
class TrimStatistics:
    thresholds: torch.Tensor
    majority_sign: float


def feed_selector(
    reader: TaskVectorReader, infos: Sequence[TensorInfo], selector: MagnitudeSelector, stage: str
) -> MagnitudeSelector:
    """One streamed pass of the radix select (``stage`` is ``coarse`` or ``fine``) over
    ``infos``; workers run it on their share and the driver adds the counts up."""
    feed = selector.coarse if stage == "coarse" else selector.fine
    for info in infos:
        for start, stop in reader.ranges(info):
            feed(reader.read(info, start, stop).taus)
    return selector


def count_votes(
    reader: TaskVectorReader, infos: Sequence[TensorInfo], thresholds: torch.Tensor
) -> int:
    """Sum of TIES elected signs over ``infos``; its sign is the majority sign."""
    return sum(
        majority_contribution(reader.read(info, start, stop).taus, thresholds)
        for info in infos
        for start, stop in reader.ranges(info)
    )


def _sign(value: int) -> float:
    return float((value > 0) - (value < 0))


def trim_statistics(
    reader: TaskVectorReader, infos: Sequence[TensorInfo], density: float
) -> TrimStatistics:
    """TIES thresholds and majority sign over ``infos`` taken together (one scope).

    Reads the inputs three times: coarse and fine counts of the radix select, then votes.
    """
    count = len(reader.inputs.finetuned)
    selector = MagnitudeSelector([trim_rank(sum(i.numel for i in infos), density)] * count)
    if selector.needed:
        feed_selector(reader, infos, selector, "coarse").end_coarse()
        feed_selector(reader, infos, selector, "fine")
    thresholds = selector.thresholds()
    return TrimStatistics(thresholds, _sign(count_votes(reader, infos, thresholds)))


def _tensor_trim(
    reader: TaskVectorReader,
    info: TensorInfo,
    cached: Chunk | None,
    density: float,
) -> TrimStatistics:
    """TIES statistics of one tensor (``--density-scope tensor``)."""
    if cached is not None:  # one chunk, already in memory: kthvalue directly
        taus = cached.taus
        thresholds = torch.tensor([kth_magnitude(t, density) for t in taus])
        return TrimStatistics(thresholds, _sign(majority_contribution(taus, thresholds)))
    return trim_statistics(reader, [info], density)


# ---------------------------------------------------------------------------- merge


@dataclass
class TensorStats:
    numel: int = 0
    kept: int = 0
    consensus: int = 0
    norm_sq: float = 0.0

    def add(self, merged: torch.Tensor, consensus: torch.Tensor) -> None:
        self.numel += merged.numel()
        if merged.device.type == "cpu":  # numpy's comparison is vectorised, torch's not
            self.kept += int(np.count_nonzero(merged.numpy() != 0))
            self.consensus += int(np.count_nonzero(consensus.numpy()))
        else:
            self.kept += int(torch.count_nonzero(merged))
            self.consensus += int(consensus.sum())
        # A float32 dot per chunk, summed in float64 across chunks, is plenty for a report
        # figure and several times cheaper than a float64 norm; float64 when the dtype is
        # float64 or the float32 squares overflow.
        flat = merged.reshape(-1)
        square = float(torch.dot(flat, flat)) if flat.dtype == torch.float32 else None
        if square is None or not math.isfinite(square):
            square = float(torch.linalg.vector_norm(flat, dtype=torch.float64)) ** 2
        self.norm_sq += square

    def as_dict(self, info: TensorInfo) -> dict[str, Any]:
        return {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "numel": self.numel,
            "kept": self.kept,
            "consensus": self.consensus,
            "consensus_fraction": self.consensus / self.numel if self.numel else 0.0,
            "merged_norm": math.sqrt(self.norm_sq),
        }


def provenance(
    inputs: Inputs, method: str, options: dict[str, Any], lam: float | None
) -> dict[str, str]:
    described = [
        {"name": r.path.name, "bytes": sum(f.stat().st_size for f in r.files)}
        for r in inputs.readers
    ]
    metadata = {
        "format": "pt",
        "negmerge_version": __version__,
        "negmerge_method": method,
        "negmerge_options": json.dumps(options, sort_keys=True),
        "negmerge_base": json.dumps(described[0]),
        "negmerge_finetuned": json.dumps(described[1:]),
    }
    if lam is not None:
        metadata["negmerge_lambda"] = repr(lam)
    return metadata


def check_merge_arguments(
    method: str, lam: float, density: float, density_scope: str, shard_size: int | None
) -> tuple[MergeMethod, float, dict[str, Any]]:
    """Usage errors before any file is opened; returns the method, lambda and the options
    recorded in the output's metadata."""
    chosen = get_method(method)
    lam = check_lambda(lam)
    if not 0 < density <= 1:
        raise UsageError(f"density must be in (0, 1], got {density}")
    if density_scope not in DENSITY_SCOPES:
        raise UsageError(f"density scope must be global or tensor, got {density_scope!r}")
    if shard_size is not None and shard_size <= 0:
        raise UsageError("shard size must be positive")
    options = {"density": density, "density_scope": density_scope} if chosen.trims else {}
    return chosen, lam, options


def merge(
    base: PathLike,
    finetuned: Sequence[PathLike],
    output: PathLike | None,
    *,
    method: str = "negmerge",
    lam: float = 1.0,
    density: float = 0.2,
    density_scope: str = "global",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    merge_batchnorm_stats: bool = False,
    save_vector: PathLike | None = None,
    device: str = "auto",
    shard_size: int | None = None,
    force: bool = False,
    quiet: bool = True,
    progress: Progress | None = None,
    memory_budget: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Merge the task vectors of ``finetuned`` against ``base`` and write ``base - lam * merged``.

    ``output`` may be ``None`` when only ``save_vector`` (the merged task vector, float32)
    is wanted. ``shard_size`` (bytes) makes ``output`` a sharded folder. Returns a JSON-able
    report: per merged tensor the element count, elements kept, consensus fraction and
    norm of the merged vector, plus totals and timings.

    Example:
        >>> report = merge("base.safetensors", ["ft1.safetensors", "ft2.safetensors"],
        ...                "out.safetensors", method="negmerge", lam=1.0)  # doctest: +SKIP
        >>> report["totals"]["consensus_fraction"]  # doctest: +SKIP
        0.11
    """
    started = time.perf_counter()
    chosen, lam, options = check_merge_arguments(method, lam, density, density_scope, shard_size)
    if output is None and save_vector is None:
        raise UsageError("nothing to write: give an output path or a vector path")
    target = resolve_device(device)

    with signals_as_errors(), compute_threads(target, threads):
        inputs = open_inputs(base, finetuned)
        try:
            infos = list(inputs.base.tensors.values())
            merged_names = select_merged(infos, include, exclude, merge_batchnorm_stats)
            destinations = []
            if output is not None:
                check_output(
                    Path(output), inputs.files, sharded=shard_size is not None, force=force
                )
                destinations.append(Path(output))
            if save_vector is not None:
                vector_path = Path(save_vector)
                if destinations and (vector_path.resolve() == destinations[0].resolve()):
                    raise UsageError("the vector path and the output path are the same")
                check_output(vector_path, inputs.files, sharded=False, force=force, what="vector")
            plan_s = time.perf_counter() - started
            report = _run_merge(
                inputs,
                infos,
                merged_names,
                chosen,
                lam=lam,
                density=density,
                density_scope=density_scope,
                output=Path(output) if output is not None else None,
                vector=Path(save_vector) if save_vector is not None else None,
                shard_size=shard_size,
                device=target,
                progress=progress or (_NoProgress() if quiet else default_progress()),
                memory_budget=memory_budget,
                options=options,
            )
        finally:
            inputs.close()
    report["timings"]["plan_s"] = plan_s
    report["timings"]["total_s"] = time.perf_counter() - started
    return report


def merge_tensors(
    reader: TaskVectorReader,
    infos: Sequence[TensorInfo],
    merged_names: set[str] | frozenset[str],
    method: MergeMethod,
    *,
    lam: float,
    density: float,
    global_trim: TrimStatistics | None,
    out_writer: OutputWriter | SafetensorsWriter | None,
    vec_writer: OutputWriter | None,
    progress: Progress,
) -> dict[str, dict[str, Any]]:
    """The streaming loop over ``infos``, in order: merged tensors are read from every
    input a chunk at a time, the rest copied from the base. Returns per-tensor reports."""
    inputs = reader.inputs
    count = len(inputs.finetuned)
    reports: dict[str, dict[str, Any]] = {}
    # TIES reads some tensors more than once (per-tensor thresholds), so it reads in step;
    # every other method gets its chunks from a stream that loads the next one meanwhile.
    stream = None
    if not method.trims:
        items = [(i, s, e) for i in infos if i.name in merged_names for s, e in reader.ranges(i)]
        stream = reader.stream(items, total="total" in method.precomputed)
    with contextlib.closing(stream) if stream is not None else contextlib.nullcontext():
        for info in infos:
            if info.name not in merged_names:
                if out_writer is not None:
                    copy_tensor(inputs.base, info, out_writer, reader.chunk)
                progress.advance(info.nbytes)
                continue
            params: dict[str, Any] = {}
            ranges = reader.ranges(info)
            cached: Chunk | None = None
            if method.trims:
                trim = global_trim
                if trim is None:
                    if len(ranges) == 1:
                        cached = reader.read(info, *ranges[0])
                    trim = _tensor_trim(reader, info, cached, density)
                params = {"thresholds": trim.thresholds, "majority_sign": trim.majority_sign}
            stats = TensorStats()
            storage = SAFETENSORS_DTYPES[info.dtype]
            for start, stop in ranges:
                if cached is not None:
                    chunk = cached
                elif stream is not None:
                    chunk = next(stream)
                else:
                    chunk = reader.read(info, start, stop)
                if "consensus" in method.precomputed:
                    params["consensus"] = chunk.consensus
                if "total" in method.precomputed and chunk.total is not None:
                    params["total"] = chunk.total
                merged = method.fn(chunk.taus, **params)
                stats.add(merged, chunk.consensus)
                if out_writer is not None:
                    result = apply_vector(chunk.base, merged, lam).to(storage)
                    _check_result(out_writer.destination, info.name, result)
                    # A fresh tensor unless lambda 0 returned the base, whose buffer the
                    # reader reuses: only then must the writer copy it.
                    out_writer.write(info.name, result.cpu(), owned=result is not chunk.base)
                if vec_writer is not None:
                    vec_writer.write(info.name, merged.cpu())
                progress.advance((stop - start) * storage.itemsize * (count + 1))
            reports[info.name] = stats.as_dict(info)
    return reports


def merge_report(
    base: Path,
    finetuned: Sequence[Path],
    infos: Sequence[TensorInfo],
    tensor_reports: dict[str, dict[str, Any]],
    method: MergeMethod,
    options: dict[str, Any],
    lam: float,
    *,
    bytes_read: int,
    bytes_written: int,
    device: torch.device,
) -> dict[str, Any]:
    """The JSON-able report: settings, per merged tensor statistics, totals."""
    merged_numel = sum(r["numel"] for r in tensor_reports.values())
    consensus = sum(r["consensus"] for r in tensor_reports.values())
    return {
        "tool": "negmerge",
        "version": __version__,
        "method": method.name,
        "options": options,
        "lambda": lam,
        "base": str(base),
        "finetuned": [str(p) for p in finetuned],
        "device": str(device),
        "tensors": tensor_reports,
        "copied": [i.name for i in infos if i.name not in tensor_reports],
        "totals": {
            "tensors": len(infos),
            "merged_tensors": len(tensor_reports),
            "copied_tensors": len(infos) - len(tensor_reports),
            "parameters": sum(i.numel for i in infos),
            "merged_parameters": merged_numel,
            "kept": sum(r["kept"] for r in tensor_reports.values()),
            "consensus": consensus,
            "consensus_fraction": consensus / merged_numel if merged_numel else 0.0,
            "merged_norm": math.sqrt(sum(r["merged_norm"] ** 2 for r in tensor_reports.values())),
            "bytes_read": bytes_read,
            "bytes_written": bytes_written,
        },
        "timings": {},
    }


def _run_merge(
    inputs: Inputs,
    infos: list[TensorInfo],
    merged_names: set[str],
    method: MergeMethod,
    *,
    lam: float,
    density: float,
    density_scope: str,
    output: Path | None,
    vector: Path | None,
    shard_size: int | None,
    device: torch.device,
    progress: Progress,
    memory_budget: int | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    reader = TaskVectorReader(inputs, device, memory_budget)
    count = len(inputs.finetuned)
    merged_infos = [i for i in infos if i.name in merged_names]
    out_writer = vec_writer = None
    stats_s = 0.0
    global_trim: TrimStatistics | None = None
    if method.trims and density_scope == "global":
        began = time.perf_counter()
        progress.start(sum(i.nbytes for i in merged_infos) * (count + 1) * 3, "TIES thresholds")
        global_trim = trim_statistics(reader, merged_infos, density)
        progress.stop()
        stats_s = time.perf_counter() - began

    began = time.perf_counter()
    try:
        if output is not None:
            out_writer = OutputWriter(
                output, infos, provenance(inputs, method.name, options, lam), shard_size
            )
        if vector is not None:
            vector_infos = [
                TensorInfo(i.name, "F64" if i.dtype == "F64" else "F32", i.shape)
                for i in merged_infos
            ]
            vec_writer = OutputWriter(
                vector, vector_infos, provenance(inputs, method.name, options, None)
            )
        progress.start(
            sum(i.nbytes for i in infos) + sum(i.nbytes for i in merged_infos) * count, "merging"
        )
        tensor_reports = merge_tensors(
            reader,
            infos,
            merged_names,
            method,
            lam=lam,
            density=density,
            global_trim=global_trim,
            out_writer=out_writer,
            vec_writer=vec_writer,
            progress=progress,
        )
        progress.stop()
        inputs.check_unchanged()
        commit_all([out_writer, vec_writer])
    except BaseException:
        progress.stop()
        discard_all([out_writer, vec_writer])
        raise
    report = merge_report(
        inputs.base.path,
        [r.path for r in inputs.finetuned],
        infos,
        tensor_reports,
        method,
        options,
        lam,
        bytes_read=reader.bytes_read + sum(i.nbytes for i in infos if i.name not in merged_names),
        bytes_written=sum(w.bytes_written for w in (out_writer, vec_writer) if w is not None),
        device=device,
    )
    report["output"] = str(output) if output is not None else None
    report["vector"] = str(vector) if vector is not None else None
    report["timings"] = {"stats_s": stats_s, "merge_s": time.perf_counter() - began}
    return report


# ---------------------------------------------------------------------------- apply


def apply(
    base: PathLike,
    vector: PathLike,
    output: PathLike,
    *,
    lam: float = 1.0,
    device: str = "auto",
    shard_size: int | None = None,
    force: bool = False,
    quiet: bool = True,
    progress: Progress | None = None,
    memory_budget: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Write ``base - lam * vector`` for the tensors in ``vector``; copy the rest of ``base``.

    ``vector`` is what ``merge(..., save_vector=...)`` wrote, so trying another lambda
    reads two checkpoints instead of N + 1; the result equals ``merge`` with that lambda.

    Example:
        >>> apply("base.safetensors", "vec.safetensors", "out.safetensors", lam=0.6)
    """
    started = time.perf_counter()
    lam = check_lambda(lam)
    target = resolve_device(device)
    if shard_size is not None and shard_size <= 0:
        raise UsageError("shard size must be positive")
    progress = progress or (_NoProgress() if quiet else default_progress())
    with signals_as_errors(), compute_threads(target, threads):
        base_reader = open_checkpoint(base)
        try:
            vector_reader = open_checkpoint(vector)
        except BaseException:
            base_reader.close()
            raise
        inputs = Inputs(base_reader, [vector_reader])
        try:
            _check_vector(base_reader, vector_reader)
            inputs.identities = {f: file_identity(f) for f in inputs.files}
            destination = Path(output)
            check_output(destination, inputs.files, sharded=shard_size is not None, force=force)
            infos = list(base_reader.tensors.values())
            chunk = max(1, (memory_budget or MEMORY_BUDGET) // (4 * 4))
            writer = None
            try:
                writer = OutputWriter(
                    destination,
                    infos,
                    {**vector_reader.metadata, "negmerge_lambda": repr(lam)},
                    shard_size,
                )
                progress.start(sum(i.nbytes for i in infos), "applying")
                for info in infos:
                    if info.name in vector_reader.tensors:
                        _apply_tensor(inputs, info, writer, chunk, lam, target)
                    else:
                        copy_tensor(base_reader, info, writer, chunk)
                    progress.advance(info.nbytes)
                progress.stop()
                inputs.check_unchanged()
                commit_all([writer])
            except BaseException:
                progress.stop()
                discard_all([writer])
                raise
        finally:
            inputs.close()
    return {
        "tool": "negmerge",
        "version": __version__,
        "base": str(base_reader.path),
        "vector": str(vector_reader.path),
        "output": str(destination),
        "lambda": lam,
        "totals": {
            "tensors": len(infos),
            "applied_tensors": len(vector_reader.tensors),
            "parameters": sum(i.numel for i in infos),
            "bytes_written": writer.bytes_written,
        },
        "timings": {"total_s": time.perf_counter() - started},
    }


def _check_vector(base: CheckpointReader, vector: CheckpointReader) -> None:
    extra = [k for k in vector.tensors if k not in base.tensors]
    if extra:
        raise CheckpointError(
            f"{vector.path}: has {len(extra)} tensors the base {base.path} lacks "
            f"({_describe_keys(extra)}); was it made from another model?"
        )
    for name, info in vector.tensors.items():
        ours = base.tensors[name]
        if info.shape != ours.shape:
            raise CheckpointError(
                f"{vector.path}: tensor {name!r} has shape {list(info.shape)}, "
                f"the base {base.path} has {list(ours.shape)}"
            )
        if info.dtype not in MERGEABLE or ours.dtype not in MERGEABLE:
            raise CheckpointError(
                f"{vector.path}: tensor {name!r} is {info.dtype} and the base's is {ours.dtype}; "
                "only floating-point tensors can be applied"
            )


def _apply_tensor(
    inputs: Inputs,
    info: TensorInfo,
    writer: OutputWriter,
    chunk: int,
    lam: float,
    device: torch.device,
) -> None:
    vector = inputs.finetuned[0]
    dtype = compute_dtype(info.dtype)
    storage = SAFETENSORS_DTYPES[info.dtype]
    for start, stop in chunk_ranges(info.numel, chunk):
        base_values = inputs.base.read_into(
            info.name, start, torch.empty(stop - start, dtype=dtype)
        )
        values = vector.read_into(info.name, start, torch.empty(stop - start, dtype=dtype))
        for reader, row in ((inputs.base, base_values), (vector, values)):
            if not math.isfinite(float(row.sum())) and not bool(torch.isfinite(row).all()):
                raise NonFiniteError(f"{reader.path}: tensor {info.name!r} contains NaN or Inf")
        result = apply_vector(base_values.to(device), values.to(device), lam).to(storage)
        _check_result(writer.destination, info.name, result)
        writer.write(info.name, result.cpu(), owned=True)  # buffers are fresh per chunk


def default_progress() -> Progress:
    from negmerge_cli.progress import StderrProgress

    return StderrProgress()
