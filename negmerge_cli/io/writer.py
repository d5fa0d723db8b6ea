"""Streaming, atomic safetensors output: single files and Hugging Face sharded folders.

The header is computed from the planned tensor list before any data exists, so tensors
are written as they are produced and never held whole. Data goes to a temporary file in
the destination folder (``.NAME.*.negmerge-partial``), which is fsynced and renamed over
the destination only when everything succeeded; on any error it is removed. A process
killed with SIGKILL can leave such a ``.negmerge-partial`` file behind: it is safe to
delete.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import struct
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from negmerge_cli.errors import OutputError
from negmerge_cli.io.base import TensorInfo

PARTIAL_SUFFIX = ".negmerge-partial"
INDEX_NAME = "model.safetensors.index.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def encode_header(tensors: Sequence[TensorInfo], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length and JSON header, padded with spaces to a multiple of 8."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for info in tensors:
        header[info.name] = {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class PendingFile:
    """A temporary file next to ``destination`` that becomes it on ``rename``."""

    def __init__(self, destination: Path) -> None:
        self.destination = destination
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=2)
        self._error: OSError | None = None
        # Signals wait until the temp file is registered, so that an interrupt can never
        # leave one behind that nobody knows about.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            fd, name = tempfile.mkstemp(
                prefix=f".{destination.name}.", suffix=PARTIAL_SUFFIX, dir=destination.parent
            )
            self.temp = Path(name)
            self._handle = os.fdopen(fd, "wb", buffering=0)
            _PENDING.add(self)
        except OSError as exc:
            raise OutputError(f"{destination}: cannot create: {exc.strerror}") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def write(self, data: bytes | memoryview, owned: bool = False) -> None:
        """Queue ``data`` for the writer thread, which overlaps the disk write with the
        caller's next chunk; at most two chunks wait, so memory stays bounded. A view is
        copied first unless ``owned``: the caller promises never to change that memory."""
        self._raise_if_failed()
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, daemon=True)
            self._thread.start()
        self._queue.put(data if owned or isinstance(data, bytes) else bytes(data))

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # keep taking items so that the producer never blocks
            try:
                view = memoryview(item)
                while view:
                    view = view[self._handle.write(view) :]
            except OSError as exc:
                self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise OutputError(f"{self.destination}: write failed: {self._error.strerror}")

    def flush(self) -> None:
        """Wait until every queued chunk is written; the writer thread ends."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._raise_if_failed()

    def finish(self) -> None:
        """Flush to disk and give the file the mode the umask asks for (mkstemp uses 0600)."""
        self.flush()
        try:
            os.fchmod(self._handle.fileno(), 0o666 & ~_umask())
            os.fsync(self._handle.fileno())
            self._handle.close()
        except OSError as exc:
            raise OutputError(f"{self.destination}: write failed: {exc.strerror}") from None

    def rename(self) -> None:
        try:
            os.replace(self.temp, self.destination)
        except OSError as exc:
            raise OutputError(
                f"{self.destination}: cannot rename into place: {exc.strerror}"
            ) from None
        _PENDING.discard(self)

    def discard(self) -> None:
        if self._thread is not None:
            self._error = self._error or OSError(0, "discarded")
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if not self._handle.closed:
            self._handle.close()
        self.temp.unlink(missing_ok=True)
        _PENDING.discard(self)


_PENDING: set[PendingFile] = set()


def discard_pending() -> None:
    """Remove every temporary file not yet renamed into place (after an interrupt)."""
    for pending in list(_PENDING):
        pending.discard()


class SafetensorsWriter:
    """Writes the planned tensors in order, each in one or more flat chunks."""

    def __init__(
        self,
        destination: Path,
        tensors: Sequence[TensorInfo],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.destination = destination
        self._plan = list(tensors)
        self._index = 0
        self._written = 0
        self._file = PendingFile(destination)
        try:
            self._file.write(encode_header(self._plan, metadata))
        except BaseException:
            self._file.discard()
            raise
        self.bytes_written = 0

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._plan]

    def write(self, name: str, chunk: torch.Tensor, owned: bool = False) -> None:
        """Append a chunk of tensor ``name``; tensors must come in the planned order.
        ``owned``: nobody changes ``chunk`` afterwards, so it is written without a copy."""
        info = self._plan[self._index] if self._index < len(self._plan) else None
        if info is None or info.name != name:
            raise RuntimeError(f"writer expected {info.name if info else 'nothing'}, got {name}")
        data = chunk.detach().contiguous().view(-1).view(torch.uint8)
        self._file.write(memoryview(data.cpu().numpy()), owned)
        self._written += data.numel()
        self.bytes_written += data.numel()
        if self._written > info.nbytes:
            raise RuntimeError(f"writer got too many bytes for {name}")
        if self._written == info.nbytes:
            self._index += 1
            self._written = 0
            if self._index == len(self._plan):
                self._file.flush()  # a shard done: its writer thread need not linger

    def finish(self) -> None:
        if self._index != len(self._plan):
            raise RuntimeError(f"output incomplete at tensor {self._plan[self._index].name}")
        self._file.finish()

    def rename(self) -> None:
        self._file.rename()

    def discard(self) -> None:
        self._file.discard()


def plan_shards(tensors: Sequence[TensorInfo], shard_bytes: int) -> list[list[TensorInfo]]:
    """Contiguous groups of at most ``shard_bytes`` (a larger tensor gets a shard alone)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in tensors:
        if shards[-1] and size + info.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


def shard_name(number: int, count: int) -> str:
    return f"model-{number:05d}-of-{count:05d}.safetensors"


class OutputWriter:
    """One output, a single file or a sharded folder, committed all at once.

    ``write(name, chunk)`` routes chunks to the right shard; ``commit()`` renames every
    shard into place and writes the index last; ``discard()`` removes every temporary
    file (and the folder, if this writer created it).
    """

    def __init__(
        self,
        destination: Path,
        tensors: Sequence[TensorInfo],
        metadata: dict[str, str] | None = None,
        shard_bytes: int | None = None,
    ) -> None:
        self.destination = destination
        self.sharded = shard_bytes is not None
        self._created_folder = False
        self._writers: list[SafetensorsWriter] = []
        self._route: dict[str, SafetensorsWriter] = {}
        self._metadata = metadata
        try:
            if self.sharded:
                if not destination.exists():
                    destination.mkdir()
                    self._created_folder = True
                groups = plan_shards(tensors, shard_bytes or 1)
                for number, group in enumerate(groups, 1):
                    path = destination / shard_name(number, len(groups))
                    writer = SafetensorsWriter(path, group, metadata)
                    self._writers.append(writer)
                    self._route.update(dict.fromkeys(writer.names, writer))
            else:
                writer = SafetensorsWriter(destination, tensors, metadata)
                self._writers.append(writer)
                self._route = dict.fromkeys(writer.names, writer)
        except BaseException:
            self.discard()
            raise
        self._infos = {t.name: t for t in tensors}

    def write(self, name: str, chunk: torch.Tensor, owned: bool = False) -> None:
        self._route[name].write(name, chunk, owned)

    @property
    def bytes_written(self) -> int:
        return sum(w.bytes_written for w in self._writers)

    def finish(self) -> None:
        """Flush everything to disk; the destination is untouched until ``commit``."""
        for writer in self._writers:
            writer.finish()

    def commit(self) -> None:
        """Rename into place; for a folder, the index last and stale shards removed."""
        if not self.sharded:
            self._writers[0].rename()
            _fsync_folder(self.destination.parent)
            return
        groups = [[self._infos[n] for n in w.names] for w in self._writers]
        commit_index(self.destination, groups, self._metadata, rename=self._writers)

    def discard(self) -> None:
        for writer in self._writers:
            writer.discard()
        if self._created_folder:
            with contextlib.suppress(OSError):
                self.destination.rmdir()


def commit_index(
    folder: Path,
    groups: Sequence[Sequence[TensorInfo]],
    metadata: dict[str, str] | None,
    rename: Sequence[SafetensorsWriter] = (),
) -> None:
    """Finish a sharded output: rename the shards' writers (if given) into place, write
    ``model.safetensors.index.json`` last, and remove shards of an earlier output that the
    new index no longer lists. Until the index exists the folder is not a valid model."""
    index_path = folder / INDEX_NAME
    stale = _listed_shards(index_path)
    names = [shard_name(number, len(groups)) for number in range(1, len(groups) + 1)]
    weight_map = {t.name: name for name, group in zip(names, groups, strict=True) for t in group}
    index = {
        "metadata": {"total_size": sum(t.nbytes for g in groups for t in g), **(metadata or {})},
        "weight_map": weight_map,
    }
    pending = PendingFile(index_path)
    try:
        pending.write(json.dumps(index, indent=2).encode("utf-8") + b"\n")
        pending.finish()
        for writer in rename:
            writer.rename()
    except BaseException:
        pending.discard()
        raise
    pending.rename()
    for name in stale - set(names):
        (folder / name).unlink(missing_ok=True)
    _fsync_folder(folder)


def remove_partials(folder: Path, names: Sequence[str]) -> None:
    """Delete the temporary files of outputs ``names`` in ``folder``: what a worker killed
    in the middle of a write (SIGKILL, a lost node) leaves behind."""
    for name in names:
        for path in folder.glob(f".{name}.*{PARTIAL_SUFFIX}"):
            path.unlink(missing_ok=True)


def _listed_shards(index_path: Path) -> set[str]:
    """Shard names of an earlier output's index, to remove those the new one no longer has."""
    try:
        index = json.loads(index_path.read_text("utf-8"))
        names = set(index["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {n for n in names if isinstance(n, str) and "/" not in n and n.startswith("model-")}


def write_text_atomic(path: Path, text: str) -> None:
    """Small text outputs (reports, indexes) get the same temp-fsync-rename treatment."""
    pending = PendingFile(path)
    try:
        pending.write(text.encode("utf-8"))
        pending.finish()
        pending.rename()
    except BaseException:
        pending.discard()
        raise
