#!/usr/bin/env bash
# The GPU machine's torch and Triton, checked here before any GPU time is spent on them.
#
#   bash tools/gpu_stack_check.sh            # ~10 min on the 2-core box, ~5 GB in $STACK_VENV; needs PyPI
#
# The H200 machine runs torch 2.11.0+cu130 with Triton 3.6.0 (docs: ../shared/reference/STACK-NOTES.md; the
# device tool's KINDS.md), this project's CPU stack torch 2.13 and Triton is absent. A call that torch 2.11 lacks,
# or a kernel that Triton 3.6's compiler or interpreter refuses, would otherwise first show on the GPU, inside the
# 15 minutes a session gets there. This builds a venv with exactly those two (PyPI's torch 2.11.0 is the CUDA
# build, which runs on CPU), borrows every other package from the project's .venv, then runs with them the tests
# of models/, the kernels, the optimizer, the presets as configured and the GPU script's dry run. Where triton is
# importable those tests include every Triton kernel compiled for sm_90 (tools/triton_compile_check.py) and run in
# Triton's interpreter against the torch paths (tools/lif_triton_check.py; QUICK=1 leaves that one out, ~5 min).
# Exits as pytest does.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.11.0}
TRITON=${TRITON:-3.6.0}
STACK_VENV=${STACK_VENV:-/tmp/danet-gpu-stack}
if [ ! -x .venv/bin/python ]; then
  echo "gpu_stack_check: error: no project venv at .venv (run \`make setup\` first: the other packages come from it)" >&2
  exit 2
fi
PROJECT_SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
PY="$STACK_VENV/bin/python"

if ! "$PY" -c "import torch, triton, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH' or triton.__version__ != '$TRITON')" 2>/dev/null; then
  echo "gpu_stack_check: building $STACK_VENV (torch $TORCH, triton $TRITON; a few GB from PyPI)"
  rm -rf "$STACK_VENV"
  python3 -m venv "$STACK_VENV"
  "$PY" -m pip install --quiet "torch==$TORCH" "triton==$TRITON"
fi
# everything else from the project's venv, after this venv's own packages (so its torch and triton win)
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n%s\n' "$PROJECT_SITE" "$PWD" > "$site/zz_danet_project.pth"
"$PY" -c "import torch, triton; print(f'gpu_stack_check: torch {torch.__version__}, triton {triton.__version__}')"

export DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$STACK_VENV/torch_extensions"  # builds for this torch apart
select=()
if [ "${QUICK:-0}" = 1 ]; then select=(-k "not in_the_interpreter"); fi
exec "$PY" -m pytest -q -p no:cacheprovider "${select[@]}" tests/test_models.py tests/test_da_fused.py \
  tests/test_bn_neuron.py tests/test_compile.py tests/test_cpu_kernels.py tests/test_optim.py tests/test_presets.py \
  tests/test_gpu_script.py
