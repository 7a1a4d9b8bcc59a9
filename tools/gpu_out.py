"""What tools/gpu_check.sh leaves in ``$OUT`` for the device tool to bring back (standard library only).

    python tools/gpu_out.py --out OUT_DIR --work WORK_DIR

The device tool brings back at most 8 files from ``$OUT``, each at most 16 MiB and 64 MiB in all, none more than two
folders down, named in letters, digits, '.', '_' and '-'; past that, files are left out, and an ``$OUT`` it cannot
read back returns nothing at all. So the jobs' folders (datasets, checkpoints: gigabytes) live in WORK_DIR, and
this gathers the logs there (``*.log``, ``*.txt``, ``*.err``; each cut to its last ``--log-mb``) into one
``OUT_DIR/gpu_check_logs.tar.gz``, then checks OUT_DIR against those limits: one line per problem, exit 1 if any.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import tarfile
from pathlib import Path

MAX_FILES, MAX_FILE_MB, MAX_TOTAL_MB, MAX_DEPTH = 8, 16, 64, 2  # the device tool's limits on what comes back
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
LOG_SUFFIXES = (".log", ".txt", ".err")
ARCHIVE = "gpu_check_logs.tar.gz"


def bundle_logs(work: Path, archive: Path, log_mb: float = 2.0, total_mb: float = 12.0) -> int:
    """Every log under ``work`` (each cut to its last ``log_mb``, newest first until ``total_mb``) into
    ``archive``; returns how many went in."""
    logs = sorted((p for p in work.rglob("*") if p.is_file() and p.suffix in LOG_SUFFIXES),
                  key=lambda p: p.stat().st_mtime, reverse=True)  # fmt: skip
    budget, count = int(total_mb * 2**20), 0
    with tarfile.open(archive, "w:gz") as tar:
        for path in logs:
            data = path.read_bytes()
            keep = int(log_mb * 2**20)
            if len(data) > keep:
                data = b"[... cut: the last %d bytes of %d]\n" % (keep, len(data)) + data[-keep:]
            if len(data) > budget:
                break
            budget -= len(data)
            info = tarfile.TarInfo(str(path.relative_to(work)))
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
            count += 1
    return count


def problems(out: Path) -> list[str]:
    """What in ``out`` the device tool would not bring back."""
    found, said = [], []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if not all(NAME.match(part) for part in rel.parts):
            said.append(f"{rel}: a name the device tool does not bring back (letters, digits, '.', '_', '-' only)")
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            said.append(f"{rel}: not a plain file")
        elif p.is_file():
            found.append(p)
            if len(rel.parts) - 1 > MAX_DEPTH:
                said.append(f"{rel}: more than {MAX_DEPTH} folders down")
            if p.stat().st_size > MAX_FILE_MB * 2**20:
                said.append(f"{rel}: {p.stat().st_size / 2**20:.1f} MiB, over {MAX_FILE_MB} MiB")
    if len(found) > MAX_FILES:
        said.append(f"{len(found)} files, over {MAX_FILES}: " + ", ".join(str(p.relative_to(out)) for p in found[:12])
                    + (" ..." if len(found) > 12 else ""))  # fmt: skip
    total = sum(p.stat().st_size for p in found)
    if total > MAX_TOTAL_MB * 2**20:
        said.append(f"{total / 2**20:.1f} MiB in all, over {MAX_TOTAL_MB} MiB")
    return said


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="what comes back ($OUT)")
    parser.add_argument("--work", type=Path, default=None, help="where the jobs ran: its logs are bundled")
    parser.add_argument("--log-mb", type=float, default=2.0, help="each log's last MiB kept")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        print(f"--out {args.out}: no such folder", file=sys.stderr)
        return 2
    if args.work is not None and args.work.is_dir():
        n = bundle_logs(args.work, args.out / ARCHIVE, args.log_mb)
        print(f"{n} log(s) from {args.work} in {args.out / ARCHIVE}")
    said = problems(args.out)
    for line in said:
        print(f"OUT: {line}")
    if not said:
        files = [p for p in args.out.rglob("*") if p.is_file()]
        print(f"OUT: {len(files)} file(s), {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB: all come back")
    return 1 if said else 0


if __name__ == "__main__":
    raise SystemExit(main())
