"""Pack wheels into <= 64 MiB pieces for the GPU machine, and unpack them there (standard library only).

    python tools/gpu_pack.py pack --wheels DIR --out .cache/gpu_pack [--chunk-mb 56]   (tools/gpu_pack.sh runs it)
    python tools/gpu_pack.py unpack --pack .cache/gpu_pack --site .cache/gpu_site       (tools/gpu_check.sh runs it)

pack: every wheel unzipped into ``site/<distribution>/`` (a wheel is a zip of its installed files; ``.data``
purelib/platlib merged, scripts and headers dropped), trimmed (DALI and nvimgcodec ship backends for every
CPython: only cp312's are kept; headers, tools and unused codec extensions dropped), one tar.xz of it all split
into pieces ``c00/pack.part00``, ``c01/pack.part01`` ... each in its own folder (one ``run`` call carries one).
``c00`` also holds ``MANIFEST.json`` (pieces, sha256 of the whole, distributions) and ``photos/``.

unpack: checks that every piece is there and the checksum, extracts, then installs into ``SITE/lib`` only the
distributions this Python lacks or has in an older version (``importlib.metadata``): what the machine has at the
same or a newer version is used as it is. Prints the folder to put first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

PY_TAG = "cpython-312"
# inside the trimmed distributions: what the job never loads
DROP = {
    "nvidia_dali_cuda120": ("nvidia/dali/include", "nvidia/dali/test"),
    "nvidia_nvimgcodec_cu12": ("nvidia/nvimgcodec/include", "nvidia/nvimgcodec/tools"),
    "nvidia_nvjpeg_cu12": ("nvidia/nvjpeg/include",),
}
# GPU (nvJPEG) and CPU JPEG decoding, and OpenCV's, nvimgcodec's only PNG decoder: the embedded default's digits
# are PNG records (without it DALI refuses them: "no decoder for this image")
KEEP_CODEC_EXT = ("libnvjpeg_ext", "libjpeg_turbo_ext", "libopencv_ext")


def dist_name(wheel: Path) -> str:
    """The normalised distribution name of a wheel file (``Foo.Bar-1.0-...`` -> ``foo_bar``)."""
    return re.sub(r"[-_.]+", "_", wheel.name.split("-")[0]).lower()


def unzip_wheel(wheel: Path, dest: Path) -> None:
    """Install a wheel's files under ``dest`` the way pip lays them out (purelib/platlib at the top)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts, headers, data: not needed to import
                parts = parts[2:]
            target = dest.joinpath(*parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                target.chmod(mode)


def trim(name: str, root: Path) -> None:
    """Drop what the job never loads from a DALI-family distribution (other CPythons' modules, headers)."""
    for rel in DROP.get(name, ()):
        shutil.rmtree(root / rel, ignore_errors=True)
    if name in ("nvidia_dali_cuda120", "nvidia_nvimgcodec_cu12"):
        for so in root.rglob("*.cpython-*.so"):
            if PY_TAG not in so.name or so.name.split(PY_TAG)[1].startswith("t"):  # free-threaded builds too
                so.unlink()
    if name == "nvidia_nvimgcodec_cu12":
        for ext in (root / "nvidia/nvimgcodec/extensions").glob("*.so*"):
            if not ext.name.startswith(KEEP_CODEC_EXT):
                ext.unlink()


def photos() -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-learn is needed here for its sample photographs (china.jpg, flower.jpg)")
    return sorted((Path(next(iter(spec.submodule_search_locations))) / "datasets" / "images").glob("*.jpg"))


def pack(wheels: Path, out: Path, chunk_mb: float) -> dict:
    """Build the pieces; returns the manifest."""
    if chunk_mb > 63:  # (and the tree travels beside it: tools/gpu_rehearse.sh checks the sum)
        raise SystemExit(f"--chunk-mb {chunk_mb}: a run call carries at most 64 MiB (c00 also holds photos)")
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise SystemExit(f"no wheels in {wheels}")
    shutil.rmtree(out, ignore_errors=True)
    site = out / "site"
    dists = {}
    for w in found:
        name = dist_name(w)
        if name in dists:
            raise SystemExit(f"two wheels of {name} in {wheels}: {dists[name]} and {w.name}")
        unzip_wheel(w, site / name)
        trim(name, site / name)
        dists[name] = w.name
    archive = out / "pack.tar.xz"
    if shutil.which("xz"):  # multi-threaded; the same format as tarfile's "w:xz"
        with tarfile.open(out / "pack.tar", "w") as tar:
            tar.add(site, arcname="site")
        subprocess.run(["xz", "-T0", "-6", str(out / "pack.tar")], check=True)
    else:
        with tarfile.open(archive, "w:xz", preset=6) as tar:
            tar.add(site, arcname="site")
    shutil.rmtree(site)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    size, chunk = archive.stat().st_size, int(chunk_mb * 2**20)
    pieces = []
    with open(archive, "rb") as f:
        for i in range((size + chunk - 1) // chunk):
            folder = out / f"c{i:02d}"
            folder.mkdir(parents=True)
            (folder / f"pack.part{i:02d}").write_bytes(f.read(chunk))
            pieces.append(f"c{i:02d}/pack.part{i:02d}")
    archive.unlink()
    (out / "c00" / "photos").mkdir()
    for p in photos():
        shutil.copy2(p, out / "c00" / "photos" / p.name)
    manifest = {"pieces": pieces, "sha256": digest, "bytes": size, "distributions": dists}
    (out / "c00" / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(pieces)} pieces of <= {chunk_mb} MiB ({size / 2**20:.0f} MiB xz, {len(dists)} distributions) "
          f"in {out}/c00 .. c{len(pieces) - 1:02d}; one run call per piece (see tools/gpu_pack.sh)")
    return manifest


class _Pieces:
    """The pieces read back to back as one stream (no joined copy on disk)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths, self.f, self.sha = list(paths), None, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        while True:
            if self.f is None:
                if not self.paths:
                    return b""
                self.f = open(self.paths.pop(0), "rb")
            data = self.f.read(n if n is not None and n >= 0 else -1)
            if data:
                self.sha.update(data)
                return data
            self.f.close()
            self.f = None


def _version_key(version: str) -> tuple[int, ...]:
    """'2.14.4' -> (2, 14, 4); a part's leading digits only ('0rc1' -> 0): enough to order release versions."""
    return tuple(int(re.match(r"\d*", part).group() or 0) for part in version.split("."))


def installed_version(dist: str) -> str | None:
    """The version of the distribution this Python has, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def dist_version(folder: Path) -> str:
    """The version in an unpacked distribution's dist-info folder name (``name-1.2.3.dist-info``)."""
    info = next(folder.glob("*.dist-info"), None)
    return info.name[: -len(".dist-info")].rsplit("-", 1)[1] if info else "0"


def unpack(pack_dir: Path, site: Path) -> list[str]:
    """Extract the pieces into ``site/lib`` (only distributions missing here or older); returns those added."""
    manifest_path = pack_dir / "c00" / "MANIFEST.json"
    if not manifest_path.is_file():
        raise SystemExit(f"{manifest_path} is missing: carry .cache/gpu_pack/c00 (made by tools/gpu_pack.sh)")
    manifest = json.loads(manifest_path.read_text())
    missing = [p for p in manifest["pieces"] if not (pack_dir / p).is_file()]
    if missing:
        raise SystemExit(f"pieces not carried yet: {', '.join(m.split('/')[0] for m in missing)} "
                         f"(one run call with carry=['.cache/gpu_pack/cNN'] each)")
    stage, lib = site / "stage", site / "lib"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    stream = _Pieces([pack_dir / p for p in manifest["pieces"]])
    with tarfile.open(fileobj=stream, mode="r|xz") as tar:
        tar.extractall(stage, filter="data")
    if stream.sha.hexdigest() != manifest["sha256"]:
        raise SystemExit("the pieces do not match MANIFEST.json's sha256: carry them again")
    lib.mkdir(parents=True, exist_ok=True)
    added = []
    for folder in sorted((stage / "site").iterdir()):
        have = installed_version(folder.name)
        # this Python's own copy wins unless it is older (a newer dependency may need the newer one; the pack's
        # versions are what its distributions were resolved against)
        if have is not None and _version_key(have) >= _version_key(dist_version(folder)):
            continue
        for item in folder.iterdir():
            dest = lib / item.name
            if dest.exists():  # namespace packages (nvidia/) shared by several distributions
                shutil.copytree(item, dest, dirs_exist_ok=True) if item.is_dir() else shutil.copy2(item, dest)
            else:
                shutil.move(str(item), dest)
        added.append(folder.name)
    shutil.rmtree(stage)
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--wheels", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--chunk-mb", type=float, default=56)
    u = sub.add_parser("unpack")
    u.add_argument("--pack", type=Path, required=True)
    u.add_argument("--site", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "pack":
        pack(args.wheels, args.out, args.chunk_mb)
        return 0
    added = unpack(args.pack, args.site)
    print(f"added {len(added)} distributions to {args.site / 'lib'}: {', '.join(added) or 'none'}", file=sys.stderr)
    print(args.site.resolve() / "lib")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
