#!/usr/bin/env bash
# Prepared GPU check (H100/H200; every step has a timeout, worst case ~8 minutes): run from anywhere, unchanged.
#  1. python -m models.gpu_check                     (danet152 img/s + peak per policy, fused LIF vs SpikingJelly)
#  2. python -m orchestrator.data.gpu_bench --json   (needs NVIDIA DALI; skipped with a message if it won't import)
#  3. danet152 T=4 224x224 bf16 batch 32: peak memory (max_memory_allocated above the loaded model) and median step
#     time per checkpointing policy, each in its own process (orchestrator.bench_memory --child), against the
#     memory model behind `orchestrator plan` (saved activations + fp32 gradients at the same size)
#  4. train (only when named in STEPS; alone it fits in 8 minutes: STEPS=train): the real job, danet152 T=4 224 px
#     bf16-mixed through `orchestrator launch --config danet152_imagenet` (DeepSpeed over NCCL, DALI 'mixed', MLflow on
#     a local sqlite store, checkpoints): Ctrl-C mid-epoch and resume, an uninterrupted deterministic run to
#     compare weights with, the embedded default beside them (`orchestrator launch` with no arguments: one rank per
#     GPU, and it must learn), the model step (today's configuration and faster ones, each faster path's fp32
#     gradients against today's), the job's steady state, a profile, memory per checkpointing policy against the
#     plan on the fastest settings, the steady state on DeepSpeed's bf16 engine if time is left; writes
#     $OUT_DIR/gpu_train_<gpu>.json
#     (tools/gpu_train_check.py; copy it to docs/bench/). What that machine lacks comes from .cache/gpu_pack
#     (made here by tools/gpu_pack.sh, carried one piece per run call: see there), unpacked into .cache/gpu_site;
#     the Triton kernels (the LIF, BatchNorm + LIF) are checked first. Before any GPU time:
#     tools/gpu_stack_check.sh runs the model, kernel, preset and dry-run tests here on that machine's torch and
#     Triton versions (torch 2.11, Triton 3.6), Triton's compiler and interpreter included; tools/gpu_rehearse.sh
#     runs this very step (DRY_RUN=1) from the pack in a Python 3.12 holding that torch and little else, as there.
# Prints a short table last. Results: $OUT_DIR (default ./gpu_check_out). STEPS="models data memory" (the default)
# runs a subset, e.g. when device time is short; STEPS=train the job check.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUT_DIR=${OUT_DIR:-${OUT:-./gpu_check_out}}
# Only results go to OUT_DIR: the device tool brings back at most 8 files from $OUT (16 MiB each, 64 MiB in all),
# so the jobs' folders (datasets, checkpoints: gigabytes) and the logs stay in WORK_DIR, and the logs come back as
# one archive (tools/gpu_out.py, which also checks OUT_DIR against those limits before the script ends)
WORK_DIR=${WORK_DIR:-.cache/gpu_check_work}
LOGS="$WORK_DIR/logs"
POLICIES=${POLICIES:-"none:float time:bit block:float block_time:bit"}
STEPS=${STEPS:-"models data memory"}
want() { case " $STEPS " in *" $1 "*) return 0 ;; esac; echo "SKIP $1 (not in STEPS)"; return 1; }
START=$(date +%s)
note() { echo "== [$(( $(date +%s) - START ))s] $*"; }

# DRY_RUN=1 (the train step only; tools/gpu_rehearse.sh): the same path on CPU, at toy sizes, kernels interpreted
DRY_RUN=${DRY_RUN:-0}
if [ "$DRY_RUN" = 1 ]; then
  [ "$STEPS" = train ] || { echo "DRY_RUN=1 rehearses the train step only: set STEPS=train, not '$STEPS' (exit 2)"; exit 2; }
  "$PY" -c "import torch; print('dry run on CPU:', torch.__version__)" || exit 1
else
  "$PY" -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0), torch.__version__)" \
    || { echo "no CUDA device: this script measures a GPU (exit 1)"; exit 1; }
fi
mkdir -p "$OUT_DIR" "$LOGS"
# the script's end, whichever step ran last: the logs bundled into OUT_DIR, OUT_DIR checked (a result the device
# tool would leave behind fails the script: it is as lost as a failed step)
finish() {
  note "done"
  timeout 60 "$PY" tools/gpu_out.py --out "$OUT_DIR" --work "$WORK_DIR" || TRAIN_RC=1
  exit "${TRAIN_RC:-0}"
}

note "1/3 models.gpu_check"
if ! want models; then :
elif "$PY" -c "import models.gpu_check" 2>/dev/null; then
  timeout 120 "$PY" -m models.gpu_check 2>&1 | tail -25 | tee "$OUT_DIR/models_gpu_check.txt" || echo "models.gpu_check failed or timed out"
else
  echo "SKIP models.gpu_check: import failed"
fi

note "2/3 orchestrator.data.gpu_bench"
if ! want data; then :
elif "$PY" -c "import nvidia.dali, orchestrator.data.gpu_bench" 2>/dev/null; then
  # builds 1024 photos, converts them, checks GPU vs CPU batches, then 20 s GPU + 20 s CPU timing
  timeout 180 "$PY" -m orchestrator.data.gpu_bench --json "$OUT_DIR/data_gpu_bench.json" --images 1024 --seconds 20 \
    2>&1 | tail -25 || echo "data gpu_bench failed or timed out"
else
  echo "SKIP data gpu_bench: nvidia.dali (or orchestrator.data.gpu_bench) does not import here"
fi

if want train; then
  note "4/4 train: unpack .cache/gpu_pack, Triton LIF check, tools/gpu_train_check.py"
  SITE=""
  if [ -f .cache/gpu_pack/c00/MANIFEST.json ]; then
    SITE=$(timeout "${UNPACK_TIMEOUT_S:-150}" "$PY" tools/gpu_pack.py unpack --pack .cache/gpu_pack --site .cache/gpu_site) \
      || { echo "unpacking .cache/gpu_pack failed (see above)"; SITE=""; }
  else
    echo "no .cache/gpu_pack/c00/MANIFEST.json: using what this Python has (tools/gpu_pack.sh makes the pack)"
  fi
  export PYTHONPATH="${SITE:+$SITE:}$PWD${PYTHONPATH:+:$PYTHONPATH}"
  # nvimgcodec's nvJPEG extension loads libnvjpeg from the pack (not on the loader's default path)
  [ -n "$SITE" ] && export LD_LIBRARY_PATH="$SITE/nvidia/nvjpeg/lib:$SITE/nvidia/nvimgcodec${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  "$PY" -c "import deepspeed, omegaconf, mlflow, nvidia.dali, PIL; print('job stack: deepspeed', deepspeed.__version__, \
'dali', nvidia.dali.__version__, 'mlflow', mlflow.__version__)" 2>&1 | tail -2
  if [ "$DRY_RUN" = 1 ]; then kcheck=(env TRITON_INTERPRET=1 timeout 900); targs=(--dry-run)
  else kcheck=(timeout 120); targs=(); fi
  "${kcheck[@]}" "$PY" tools/lif_triton_check.py --quick 2>&1 | tail -4 | tee "$LOGS/lif_triton_check.txt"
  left=$(( ${TRAIN_BUDGET_S:-470} - ($(date +%s) - START) ))
  [ "$DRY_RUN" = 1 ] && left=100000  # the dry run checks the path, not the time
  set -o pipefail  # the job check's exit status, not tail's, is the step's
  # TRAIN_PIECES: a comma-separated subset of its pieces, e.g. to rerun what the first run's budget skipped (its
  # JSON is written anew: keep the first one)
  [ -n "${TRAIN_PIECES:-}" ] && targs+=(--pieces "$TRAIN_PIECES")
  # TRAIN_VARIANTS: the model-step variants instead of the default list, e.g. "compile" (torch.compile of danet152
  # takes minutes: left out of the first run, for a rerun of TRAIN_PIECES=baseline,variants,equivalence)
  [ -n "${TRAIN_VARIANTS:-}" ] && targs+=(--variants "$TRAIN_VARIANTS")
  timeout $(( left > 60 ? left : 60 )) "$PY" tools/gpu_train_check.py "${targs[@]}" --out "$OUT_DIR" --work "$WORK_DIR/train_check" --site "$SITE" \
    --budget-s $(( left > 90 ? left - 45 : 45 )) 2>&1 | tee "$OUT_DIR/gpu_train_check.txt" | grep -v "^\s*$" | tail -40 \
    || { TRAIN_RC=1; echo "gpu_train_check failed or timed out"; }
  set +o pipefail
fi

want memory || finish  # the train step's status is the script's
note "3/3 danet152 T=4 224 bf16 batch 32 per policy"
: > "$OUT_DIR/memory.jsonl"
for ps in $POLICIES; do
  p=${ps%%:*}; s=${ps##*:}
  BENCH_BF16=1 timeout 55 "$PY" -m orchestrator.bench_memory --child --model danet152 --policy "$p" --storage "$s" \
    --T 4 --batch 32 --res 224 --steps 5 2>"$LOGS/mem_$p.err" | grep '^{' >> "$OUT_DIR/memory.jsonl" \
    || { echo "{\"policy\": \"$p\", \"spike_storage\": \"$s\", \"error\": \"failed or timed out (see mem_$p.err in gpu_check_logs.tar.gz)\"}" >> "$OUT_DIR/memory.jsonl"; tail -3 "$LOGS/mem_$p.err"; }
done

note "plan estimate (orchestrator plan --config danet152_imagenet --gpu-mem 80)"
timeout 60 "$PY" -m orchestrator plan --config danet152_imagenet --gpu-mem 80 2>&1 | tee "$LOGS/plan.txt" | tail -8

note "table"
OUT_DIR="$OUT_DIR" POLICIES="$POLICIES" timeout 45 "$PY" - <<'PYEOF'
import json, os
import torch
from models import create_model
from models.checkpointing import activation_bytes
out = os.environ["OUT_DIR"]
rows = [json.loads(l) for l in open(os.path.join(out, "memory.jsonl")) if l.strip()]
m = create_model("danet152", T=4, input_size=224).cuda()
grads = sum(p.numel() for p in m.parameters()) * 4
probe = 64
est = {}
for ps in os.environ["POLICIES"].split():
    p, s = ps.split(":")
    for mod in m.modules():
        if hasattr(mod, "spike_input"):
            mod.spike_storage = s
    act = activation_bytes(m, [p], 1, probe)[p]  # saved + backward transient, as `orchestrator plan` counts
    # plan's scaling: batch x (res/probe)^2, bf16 halves fp32 activations; plus fp32 gradients
    est[(p, s)] = (act * 32 * (224 / probe) ** 2 * 0.5 + grads) / 2**20
base = next((r for r in rows if r.get("policy") == "none" and "peak_mb" in r), None)
print(f"\n{torch.cuda.get_device_name(0)}: danet152 T=4 224px bf16 autocast, batch 32, one fwd+bwd")
print(f"{'policy':<11} {'storage':<7} {'peak GiB':>9} {'plan GiB':>9} {'meas/plan':>9} {'step s':>7} {'x none mem':>10} {'x none time':>11}")
for r in rows:
    key = (r.get("policy"), r.get("spike_storage"))
    if "peak_mb" not in r:
        print(f"{key[0]:<11} {key[1]:<7} {r.get('error', '?')}")
        continue
    e = est.get(key)
    mr = f"{r['peak_mb'] / base['peak_mb']:.2f}" if base else "-"
    tr = f"{r['step_s'] / base['step_s']:.2f}" if base else "-"
    print(f"{key[0]:<11} {key[1]:<7} {r['peak_mb'] / 1024:>9.2f} {e / 1024 if e else float('nan'):>9.2f} "
          f"{r['peak_mb'] / e if e else float('nan'):>9.2f} {r['step_s']:>7.3f} {mr:>10} {tr:>11}")
json.dump({"measured": rows, "plan_est_mb": {f"{p}/{s}": v for (p, s), v in est.items()}},
          open(os.path.join(out, "gpu_check_memory.json"), "w"), indent=1)
PYEOF
finish
