#!/usr/bin/env bash
# The GPU machine's train step rehearsed here, on CPU, before any GPU time is spent on it.
#
#   bash tools/gpu_pack.sh && bash tools/gpu_rehearse.sh    # ~15 min + ~6 min on the 2-core box (+5 min, PyPI, once)
#
# tools/gpu_stack_check.sh checks the code against that machine's torch and Triton, borrowing every other package
# from the project's venv. This checks what that leaves out: the pack itself. It builds what the GPU machine is
# (../shared/reference/STACK-NOTES.md, the device tool's KINDS.md): a Python 3.12 holding torch 2.11, Triton 3.6
# and a few of that image's packages (MACHINE_PKGS below). It copies the working tree the way the device tool does
# (tracked and untracked-but-not-ignored files, plus the carried .cache/gpu_pack; no .venv, no other cache), checks
# that a run call carrying the tree and the largest piece stays under 64 MiB, then runs there, in a clean
# environment, what the GPU session will run: `STEPS=train bash tools/gpu_check.sh`, with DRY_RUN=1 (CPU, toy
# sizes, Triton's interpreter for the kernel check). So the cp312 wheels' imports, the unpack (checksum, only what
# the machine lacks), DeepSpeed + OmegaConf + MLflow + DALI from the pack, the photo dataset, the interrupted and
# resumed job and the JSON are all exercised once. Exits as gpu_check.sh does (0: every piece ran, the job
# completed and resumed); the JSON is in $REHEARSE_DIR/out.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.11.0}
TRITON=${TRITON:-3.6.0}
VENV=${REHEARSE_VENV:-/tmp/danet-gpu-rehearse}
WORK=${REHEARSE_DIR:-/tmp/danet-gpu-rehearse-tree}
die() { echo "gpu_rehearse: error: $*" >&2; exit 2; }

[ -f .cache/gpu_pack/c00/MANIFEST.json ] || die "no .cache/gpu_pack/c00/MANIFEST.json (make the pack first: bash tools/gpu_pack.sh)"
# the first Python 3.12 that runs (a pyenv shim is on PATH even where pyenv's selected version is another)
PY312=${PYTHON312:-}
if [ -z "$PY312" ]; then
  for cand in $(command -v python3.12) "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { PY312=$cand; break; }
  done
fi
[ -n "$PY312" ] && "$PY312" -V >/dev/null 2>&1 || die "no Python 3.12 that runs (the GPU machine's; set PYTHON312=/path/to/python3.12)"

# Beside torch, the packages that machine's image has and the pack also carries (device tool's KINDS.md), at
# PyPI's newest as that image roughly is: so the unpack's "keep what the machine has at the same or a newer
# version" path runs, not only "install what it lacks". MACHINE_PKGS="" rehearses a bare torch.
MACHINE_PKGS=${MACHINE_PKGS-"numpy pillow pyyaml psutil packaging protobuf tqdm msgpack py-cpuinfo nvidia-ml-py einops ninja scikit-learn requests click six"}
PY="$VENV/bin/python"
STAMP="$VENV/.rehearse-$TORCH-$TRITON-$(echo "$MACHINE_PKGS" | cksum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || ! "$PY" -c "import torch, triton" 2>/dev/null; then
  echo "gpu_rehearse: building $VENV (Python 3.12, torch $TORCH, triton $TRITON${MACHINE_PKGS:+, $MACHINE_PKGS}; a few GB from PyPI)"
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  # shellcheck disable=SC2086
  "$PY" -m pip install --quiet "torch==$TORCH" "triton==$TRITON" $MACHINE_PKGS
  touch "$STAMP"
fi

# the tree as the device tool copies it: git's view of the working tree (deleted files left out) + the carry
rm -rf "$WORK" && mkdir -p "$WORK/.cache"
git ls-files -z --cached --others --exclude-standard \
  | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$WORK"
# each run call carries the tree and one piece, and the device tool refuses a call over 64 MiB in all
tree_b=$(du -sb --exclude=.cache "$WORK" | cut -f1)
piece_b=$(du -sb .cache/gpu_pack/c* | sort -n | tail -1 | cut -f1)
[ $(( tree_b + piece_b )) -le $(( 64 * 1024 * 1024 )) ] || die "the tree ($(( tree_b >> 20 )) MiB) and the \
largest pack piece ($(( piece_b >> 20 )) MiB) exceed the 64 MiB one run call carries: shrink the tree or rerun \
tools/gpu_pack.sh with a smaller CHUNK_MB"
echo "gpu_rehearse: one run call carries $(( (tree_b + piece_b) >> 20 )) MiB of 64 (tree $(( tree_b >> 10 )) KiB + largest piece)"
cp -r .cache/gpu_pack "$WORK/.cache/gpu_pack"
echo "gpu_rehearse: $WORK, $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)')"

cd "$WORK"
# a clean environment: nothing from this shell's venv, DS_ACCELERATOR or TORCH_EXTENSIONS_DIR leaks in
exec env -i PATH="$VENV/bin:/usr/local/bin:/usr/bin:/bin" HOME="$HOME" LANG=C.UTF-8 OUT="$WORK/out" \
  UNPACK_TIMEOUT_S="${UNPACK_TIMEOUT_S:-600}" DRY_RUN=1 STEPS=train bash tools/gpu_check.sh
