"""FFRecord files: HFAiLab's record format, read and written byte-compatibly with its ``ffrecord`` library.

Layout of one file (little-endian)::

    u32 meta_crc | i64 N | u32 crc[N] | i64 offset[N] | payload 0 | payload 1 | ...

Offsets are absolute; record ``i`` spans ``offset[i] .. offset[i+1]`` and the last one runs to the end of the
file. CRCs are zlib crc32; ``meta_crc = crc32(bytes 4 .. 12 + 12N)``. A stored ``meta_crc`` of 0 marks a legacy
file without checksums (accepted, records unchecked) unless the whole header is zero, which is what a writer that
never finished leaves behind: that is rejected, where the reference reader would silently see an empty file.

A file cut short still opens when its header and tables are whole (they come first, and their checksum holds):
every record before the cut reads, and each record the cut reaches fails with an FFRecordError naming the file
and the index (``truncated()`` lists such files from their sizes alone; ``validate()`` lists every bad record).
A cut inside the tables is refused at open.

A dataset may be one file, a folder (every ``*.ffr`` in it, sorted by name, read as one sequence) or a list of
files. Reads are positional (``os.pread``) on descriptors opened once; a batch is read with one syscall per
record (or per run of adjacent records), spread over a few threads when it is large enough to pay.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

__all__ = ["FFRecordError", "FileReader", "FileWriter", "list_files"]

_HEAD = struct.Struct("<Iq")  # meta_crc, N
_PARALLEL_MIN_BYTES = 16 << 20  # a batch larger than this is read with several threads ...
_PARALLEL_MIN_CPUS = 4  # ... where there are cores to spare (on 2 cores the threads only add overhead)
_PARALLEL_THREADS = 4


class FFRecordError(ValueError):
    """A corrupt or unreadable FFRecord file; the message names the file and, for a record, its index."""


def _header_size(n: int) -> int:
    return 12 + 12 * n


def list_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The files a reader opens for ``source``: a file, a folder (its ``*.ffr`` sorted by name) or a list."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.name.endswith(".ffr") and f.is_file())
            if not files:
                raise FFRecordError(f"{p}: folder holds no *.ffr files")
            return files
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such FFRecord file or folder")
        return [p]
    files: list[Path] = []
    for item in source:
        files.extend(list_files(item))
    if not files:
        raise FFRecordError("empty list of FFRecord files")
    return files


class _File:
    """One open FFRecord file: its descriptor, size, checksums and record spans."""

    __slots__ = ("path", "fd", "size", "n", "crcs", "starts", "ends", "legacy", "cut")

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            self._parse()
        except BaseException:
            os.close(self.fd)
            raise

    def _parse(self) -> None:
        path = self.path
        self.size = os.fstat(self.fd).st_size
        if self.size < 12:
            raise FFRecordError(f"{path}: too short for an FFRecord header ({self.size} bytes)")
        meta_crc, n = _HEAD.unpack(os.pread(self.fd, 12, 0))
        if meta_crc == 0 and n == 0:
            # A valid empty file stores crc32 of its 8-byte count (non-zero); an all-zero header is the
            # placeholder a writer puts down before the payloads and fills in only when it finishes.
            raise FFRecordError(
                f"{path}: header is all zeros: the writer never finished this file (rewrite it)"
            )
        if n < 0 or _header_size(n) > self.size:
            raise FFRecordError(
                f"{path}: header declares {n} records, whose {_header_size(max(n, 0))}-byte header and tables "
                f"do not fit in the file's {self.size} bytes (the file is cut inside its tables, or not FFRecord)"
            )
        table = os.pread(self.fd, 12 * n, 12)
        if len(table) != 12 * n:
            raise FFRecordError(f"{path}: short read of the header tables")
        self.legacy = meta_crc == 0
        if not self.legacy:
            actual = zlib.crc32(table, zlib.crc32(struct.pack("<q", n)))
            if actual != meta_crc:
                raise FFRecordError(
                    f"{path}: metadata checksum mismatch (stored {meta_crc:#010x}, computed {actual:#010x}): "
                    "header or offset table is corrupt"
                )
        self.n = n
        self.crcs = np.frombuffer(table, dtype="<u4", count=n).astype(np.uint32)
        starts = np.frombuffer(table, dtype="<i8", count=n, offset=4 * n).astype(np.int64)
        self.cut = n  # records cut..n-1 lie (partly) past the end of the file
        if n:
            if starts[0] < _header_size(n):
                raise FFRecordError(f"{path}: record 0 offset {starts[0]} points into the header")
            bad = np.nonzero(starts[1:] < starts[:-1])[0]
            if bad.size:
                i = int(bad[0]) + 1
                raise FFRecordError(
                    f"{path}: record {i} offsets out of order (offset {starts[i]} before record {i - 1}'s "
                    f"{starts[i - 1]}): the offset table is corrupt"
                )
            # Offsets only grow, so the records a cut reaches are a suffix: the first one that ends past the end
            # of the file, or the last one when even its start is past it (it runs to the end of the file, so
            # only its CRC tells a cut inside it).
            past = np.nonzero(np.append(starts[1:], starts[-1]) > self.size)[0]
            if past.size:
                self.cut = int(past[0])
        ends = np.empty_like(starts)
        if n:
            ends[:-1] = starts[1:]
            ends[-1] = max(self.size, int(starts[-1]))
        self.starts = starts
        self.ends = ends

    def read(self, i: int) -> bytes:
        start, end = int(self.starts[i]), int(self.ends[i])
        if i >= self.cut:
            where = f"spans bytes {start}..{end}" if i < self.n - 1 else f"starts at byte {start}"
            raise FFRecordError(
                f"{self.path}: record {i}: truncated: the file ends at byte {self.size} but the record {where}"
            )
        data = os.pread(self.fd, end - start, start) if end > start else b""
        if len(data) != end - start:
            raise FFRecordError(f"{self.path}: record {i}: short read ({len(data)} of {end - start} bytes)")
        return data

    def check(self, i: int, data: bytes | memoryview) -> None:
        if not self.legacy and zlib.crc32(data) != int(self.crcs[i]):
            raise FFRecordError(f"{self.path}: record {i}: CRC mismatch (corrupt or truncated data)")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FileReader:
    """Reads records from one FFRecord file, a folder of them, or a list, as one indexed sequence.

    ``check_data=True`` verifies each record's CRC on read. Pickles by file names: a copy in another process
    reopens the files.
    """

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike], check_data: bool = True):
        self._source = [str(p) for p in list_files(source)]
        self.check_data = check_data
        self._open()

    def _open(self) -> None:
        self._files: list[_File] = []
        try:
            for p in self._source:
                self._files.append(_File(Path(p)))
        except BaseException:
            self.close()
            raise
        counts = [f.n for f in self._files]
        self._bounds = np.cumsum([0] + counts).astype(np.int64)  # file k holds [bounds[k], bounds[k+1])
        self.n = int(self._bounds[-1])
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # -- pickling: by file names -------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        return {"source": self._source, "check_data": self.check_data}

    def __setstate__(self, state: dict) -> None:
        self._source = state["source"]
        self.check_data = state["check_data"]
        self._open()

    # -- info ----------------------------------------------------------------------------------------------
    @property
    def files(self) -> list[str]:
        return list(self._source)

    def __len__(self) -> int:
        return self.n

    def locate(self, index: int) -> tuple[str, int]:
        """(file, index inside that file) of a dataset index."""
        k, j = self._where(index)
        return self._source[k], j

    def sizes(self) -> np.ndarray:
        """Byte length of every record, in dataset order."""
        return (
            np.concatenate([f.ends - f.starts for f in self._files]) if self._files else np.zeros(0, np.int64)
        )

    def _where(self, index: int) -> tuple[int, int]:
        i = int(index)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"record index {index} out of range for {self.n} records")
        k = int(np.searchsorted(self._bounds, i, side="right")) - 1
        return k, i - int(self._bounds[k])

    # -- reads ---------------------------------------------------------------------------------------------
    def _read_local(self, k: int, j: int, check: bool) -> bytes:
        f = self._files[k]
        if f.fd < 0:
            raise ValueError("FileReader is closed")
        data = f.read(j)
        if check:
            f.check(j, data)
        return data

    def read_one(self, index: int) -> bytes:
        k, j = self._where(index)
        return self._read_local(k, j, self.check_data)

    def read(self, indices: Iterable[int]) -> list[bytes]:
        """Records at ``indices`` (any order, repeats allowed), as a list of bytes."""
        idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64)
        if idx.size == 0:
            return []
        idx = np.where(idx < 0, idx + self.n, idx)
        if idx.min() < 0 or idx.max() >= self.n:
            raise IndexError(f"record index out of range for {self.n} records")
        ks = np.searchsorted(self._bounds, idx, side="right") - 1
        js = idx - self._bounds[ks]
        locs = list(zip(ks.tolist(), js.tolist(), strict=True))
        check = self.check_data
        if len(locs) >= 16:
            total = sum(int(self._files[k].ends[j] - self._files[k].starts[j]) for k, j in locs)
            if total >= _PARALLEL_MIN_BYTES and (os.cpu_count() or 1) >= _PARALLEL_MIN_CPUS:
                pool = self._get_pool()
                chunks = np.array_split(np.arange(len(locs)), _PARALLEL_THREADS)
                parts = pool.map(lambda c: [self._read_local(*locs[t], check) for t in c.tolist()], chunks)
                return [d for part in parts for d in part]
        return [self._read_local(k, j, check) for k, j in locs]

    def _get_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_PARALLEL_THREADS, thread_name_prefix="ffrecord")
            return self._pool

    def truncated(self) -> list[str]:
        """One message per file cut short so that records lie past its end (known from the header and the file
        size alone, no reads); empty when none is. A cut inside a file's last record shows only in its CRC."""
        out = []
        for k, f in enumerate(self._files):
            if f.cut < f.n:
                first = int(self._bounds[k]) + f.cut
                out.append(
                    f"{f.path}: truncated at byte {f.size}: records {f.cut}..{f.n - 1} of {f.n} lie past its end "
                    f"[dataset index {first}..{first + f.n - 1 - f.cut}]"
                )
        return out

    def validate(self) -> list[str]:
        """Check every record's CRC; returns one message per bad record (empty: all good)."""
        bad: list[str] = []
        for k, f in enumerate(self._files):
            for j in range(f.n):
                try:
                    self._read_local(k, j, True)
                except FFRecordError as e:
                    bad.append(f"{e} [dataset index {int(self._bounds[k]) + j}]")
        return bad

    def close(self) -> None:
        for f in getattr(self, "_files", []):
            f.close()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)
            self._pool = None

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class FileWriter:
    """Writes exactly ``n`` records to ``path``; the file appears (atomically, by rename) only on ``close()``.

    The bytes are identical to those HFAiLab's writer produces for the same records.
    """

    def __init__(self, path: str | os.PathLike, n: int):
        if n < 0:
            raise ValueError(f"record count must be >= 0, got {n}")
        self.path = Path(path)
        self.n = int(n)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        self._f = open(self._tmp, "wb")
        self._crcs: list[int] = []
        self._offsets: list[int] = []
        self._pos = _header_size(self.n)
        self._f.write(b"\0" * self._pos)  # placeholder, filled in by close()
        self._closed = False

    def write_one(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise ValueError("FileWriter is closed")
        if len(self._crcs) >= self.n:
            raise ValueError(f"{self.path}: already wrote the {self.n} records declared")
        self._crcs.append(zlib.crc32(data))
        self._offsets.append(self._pos)
        self._f.write(data)
        self._pos += len(data)

    @property
    def count(self) -> int:
        return len(self._crcs)

    def close(self) -> None:
        if self._closed:
            return
        if len(self._crcs) != self.n:
            self.abort()
            raise ValueError(f"{self.path}: {len(self._crcs)} records written of the {self.n} declared")
        table = struct.pack(f"<q{self.n}I{self.n}q", self.n, *self._crcs, *self._offsets)
        meta_crc = zlib.crc32(table)
        self._f.seek(0)
        self._f.write(struct.pack("<I", meta_crc) + table)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        self._closed = True

    def abort(self) -> None:
        """Drop the unfinished file."""
        if not self._closed:
            self._f.close()
            self._closed = True
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass

    def __enter__(self) -> FileWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()
