#!/usr/bin/env bash
# What the GPU machine lacks for the real job (tools/gpu_check.sh's `train` step), made here and carried over in
# pieces: that machine has Python 3.12 and torch (+ Triton) but no DeepSpeed, OmegaConf, MLflow or DALI, and no
# network, and each `run` call carries at most 64 MiB of ignored paths.
#
#   bash tools/gpu_pack.sh              # here (needs the registries, 5-14 min): .cache/gpu_pack/c00 ... cNN
#   bash tools/gpu_rehearse.sh          # here: the train step from this pack, as that machine will run it
#
# Then, from the session that has the GPU, one `run` call per piece (each piece is one ignored folder <= 64 MiB;
# what an earlier call brought stays on the warm machine, for 30 s: make the calls back to back), the last one
# running the check; the first one also reads what the machine is (seconds, and the machine is started anyway):
#   run(command="nvidia-smi -L; python3 -V; python3 -c 'import torch; print(torch.__version__)'; ls /dev/nvidia*;
#       df -h /dev/shm .; ls .cache/gpu_pack", carry=[".cache/gpu_pack/c00"])
#   run(command="ls .cache/gpu_pack", carry=[".cache/gpu_pack/c01"])      ... one per piece but the last
#   run(command="STEPS=train bash tools/gpu_check.sh", carry=[".cache/gpu_pack/cNN"], timeout_s=540)
#       (if `status` says less than ~560 s of device time is left by then, prefix TRAIN_BUDGET_S=<left - 90>: the
#       check then skips its later pieces in time and still prints its table, instead of being cut off mid-piece)
# then give the machine back, copy $OUT's gpu_train_<gpu>.json (and gpu_train_check.txt) to docs/bench/, render
# docs/SCALING.md from its measured rate (python tools/scaling_doc.py; make test checks it) and BENCHMARKS.md's
# section from the JSON (python tools/gpu_train_report.py docs/bench/gpu_train_<gpu>.json, then the prose). A
# rerun of what the budget skipped: TRAIN_PIECES=... (and TRAIN_VARIANTS=compile) STEPS=train bash tools/gpu_check.sh
# gpu_check.sh unpacks the pieces (tools/gpu_pack.py unpack: checksum, then only the distributions that
# machine's Python does not already have, so nothing it has is shadowed) into .cache/gpu_site.
#
# Contents: cp312 manylinux wheels from `pip download --python-version 3.12 --only-binary=:all: --platform ...`:
# OmegaConf (2.4 needs only PyYAML: no antlr4), the MLflow client (mlflow-skinny, with SQLAlchemy + Alembic for a local sqlite
# store), DeepSpeed's dependencies, Pillow, NumPy, psutil, tqdm, DALI (nvidia-dali-cuda120 with nvimgcodec, its
# JPEG and PNG decoders only, and nvJPEG: no nvcomp / nvJPEG2000 / nvTIFF), plus the DeepSpeed wheel itself (pure Python; PyPI ships an
# sdist, built here by pip) and two photographs (scikit-learn's china.jpg, flower.jpg) for the dataset. Unpacked,
# trimmed (DALI's backends for other Pythons, headers), then one tar.xz split into <= CHUNK_MB pieces.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PACK=${PACK:-.cache/gpu_pack}
CHUNK_MB=${CHUNK_MB:-56}  # the tree (~2 MiB) travels with each piece; 268 MiB is 5 pieces at 56
WHEELS=${WHEELS:-.cache/gpu_wheels}   # pip's own cache makes a second pack quick
rm -rf "$WHEELS" && mkdir -p "$WHEELS"
PLATFORM=(--python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
# resolved with their dependencies (none of these depends on torch)
"$PY" -m pip download --quiet --dest "$WHEELS" "${PLATFORM[@]}" \
  omegaconf==2.4.0 mlflow-skinny==3.17.2 sqlalchemy alembic \
  einops hjson msgpack ninja numpy "packaging>=20.0" psutil py-cpuinfo "pydantic>=2.0.0" tqdm nvidia-ml-py \
  pillow astunparse gast six optree nvtx makefun
# without dependencies: DeepSpeed would pull a CUDA torch (the machine has one); DALI's [all] codecs are not needed
"$PY" -m pip download --quiet --dest "$WHEELS" "${PLATFORM[@]}" --no-deps \
  nvidia-dali-cuda120==2.4.0 nvidia-nvimgcodec-cu12==0.9.0.20 nvidia-nvjpeg-cu12==12.4.0.76
# (built against this venv's torch if pip has no wheel cached: an isolated build would fetch a CUDA torch)
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$WHEELS" deepspeed==0.19.8
"$PY" tools/gpu_pack.py pack --wheels "$WHEELS" --out "$PACK" --chunk-mb "$CHUNK_MB"
