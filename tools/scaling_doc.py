"""docs/SCALING.md, rendered from one per-GPU training rate r (issue 14, deliverable 6).

Every figure in that page (step time, data demand, epoch time, checkpoint cadence, time lost per requeue, the
all-reduce's share of a step) follows from r and a few fixed inputs, so the page is not edited by hand: it is
rendered here.

    python tools/scaling_doc.py                 # r from docs/bench/gpu_train_<gpu>.json (the real job on a GPU;
                                                # one file per GPU kind, the fastest if several), or the
                                                # assumed rate orchestrator/plan.py uses while none exists
    python tools/scaling_doc.py --bench F.json  # r from that job check's end_to_end_img_per_s
    python tools/scaling_doc.py --check         # exit 1 if docs/SCALING.md is not what this renders

A job check's JSON counts only if it ran on a GPU (not ``dry_run``), the job completed, and it has an end-to-end
rate. Bad input (a missing or unreadable file, one that does not count) is one line on stderr and exit 2; nothing
is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DOC = REPO / "docs" / "SCALING.md"
BENCH = REPO / "docs" / "bench"

# fixed inputs (the page says where each comes from)
IMAGES = 1_281_167  # ImageNet-1k train
JPEG_KB = 110  # mean encoded size
FFR_GB = 141  # the FFRecord folder
PARAMS_M = 62.04  # DANet-152 (`orchestrator models list --json`)
GRAD_MB = PARAMS_M * 4  # fp32 gradients (and fp32 weights, and SGD momentum)
MICRO = 32  # the preset's per-GPU batch
PER_NODE = 8  # GPUs
NODES = (1, 4, 16, 64)
CKPT_MB = 500  # one checkpoint: fp32 module weights + SGD momentum
CKPT_EVERY = 2000  # the preset's train.checkpoint_every_steps
CKPT_EVERY_ALT = 500
WRITE_S = (0.5, 3.0)  # one checkpoint at 1 GB/s, at a slow 200 MB/s (rounded up)
REQUEUE_MIN = (3, 5)  # signalled requeue: latency + restart, minutes
NVLINK_GBS, IB_GBS_PER_GPU, NIC_100G_GBS, ETH_25G_GBS = 200.0, 20.0, 12.5, 3.125


class BadInput(Exception):
    pass


@dataclass(frozen=True)
class Rate:
    """The per-GPU rate the page is rendered for, and what it is."""

    img_per_s: float
    measured: dict | None = None  # the job check's JSON, if measured
    source: str = ""


def rate_from_bench(path: Path) -> Rate:
    """r from a job check's JSON: the real job's steady state on one GPU."""
    try:
        r = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"--bench {path}: cannot read it as JSON ({e})") from None
    if not isinstance(r, dict):
        raise BadInput(f"--bench {path}: not a job check's JSON object")
    why = ("it is a CPU dry run" if r.get("dry_run") else
           f"its job status is {r.get('job_status')!r}, not 'completed'" if r.get("job_status") != "completed" else
           "it has no end_to_end_img_per_s" if not isinstance(r.get("end_to_end_img_per_s"), (int, float))
           or r["end_to_end_img_per_s"] <= 0 else None)  # fmt: skip
    if why:
        raise BadInput(f"--bench {path}: {why}; give the JSON of tools/gpu_train_check.py run on a GPU")
    rel = path.resolve().relative_to(REPO) if path.resolve().is_relative_to(REPO) else path
    return Rate(float(r["end_to_end_img_per_s"]), r, str(rel))


def default_rate() -> Rate:
    """The measured rate of the fastest GPU job check in docs/bench, else orchestrator/plan.py's assumption."""
    found = []
    for path in sorted(BENCH.glob("gpu_train_*.json")):
        try:
            found.append(rate_from_bench(path))
        except BadInput:
            continue  # (a dry run kept for reference does not count)
    if found:
        return max(found, key=lambda r: r.img_per_s)
    from orchestrator.plan import ASSUMED_IMG_S_PER_GPU_152

    return Rate(ASSUMED_IMG_S_PER_GPU_152)


def _dur(s: float) -> str:
    """Seconds as the page writes a duration: '67 s', '4.4 min', '71 min', '2.3 h'."""
    if s < 120:
        return f"{s:.0f} s"
    if s < 600:
        return f"{s / 60:.1f} min"
    if s < 3 * 3600:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _bps(b: float) -> str:
    return f"{b / 1e9:.1f} GB/s" if b >= 1e9 else f"{b / 1e6:.0f} MB/s"


def _pct(x: float) -> str:
    return f"{x * 100:.2g}%" if x < 0.01 else f"{x * 100:.0f}%"


def render(rate: Rate) -> str:
    """The page for per-GPU rate ``rate``."""
    r = rate.img_per_s
    step = MICRO / r  # seconds per step at the preset's per-GPU batch, at every scale
    sections = (_intro(rate, step), _data(r), _checkpoints(step), _requeue(step), _allreduce(step))
    return "\n".join(line for section in sections for line in section) + "\n"


def _intro(rate: Rate, step: float) -> list[str]:
    """Where r comes from, and the fixed inputs."""
    r = rate.img_per_s
    if rate.measured:
        m = rate.measured
        base = m.get("baseline_img_per_s")
        intro = (
            f"The per-GPU rate is **measured**: the real job (`orchestrator launch --config danet152_imagenet`: "
            f"DeepSpeed step, DALI 'mixed' loader, loop, callbacks, MLflow tracking) ran at **r = {r:.1f} img/s** "
            f"in steady state on one {m.get('gpu')} ({m.get('precision')}, micro-batch {m.get('micro_batch')}, "
            f"torch {m.get('torch')}; `{rate.source}`"
            + (f", beside {base:.1f} img/s for the model step alone as configured before issue 14" if base else "")
            + "). One GPU, so no all-reduce is in r: the section on it below says what it adds per step. Rendered "
            "by `python tools/scaling_doc.py` from that file; every number below scales with r."
        )
    else:
        intro = (
            "On paper. No whole GPU run has been measured in this project, so the per-GPU rate is an "
            "**assumption**: SEW-ResNet-152 (same depth, same T=4, ~same FLOPs: DANet-152 11.64 vs SEW-152 11.51 "
            "GFLOPs/step at 224 px from `orchestrator models list`) trained at ~300 img/s on 8 A100 (4,285 s/epoch, "
            f"its authors' logs; see ../shared/reference/DANET.md), i.e. **r = {r:.1f} img/s per GPU** (the same "
            "constant `orchestrator/plan.py` uses for `launch --dry-run`). Measured on one NVIDIA H200 "
            "(BENCHMARKS.md, 2026-11-27): danet152's bf16 training step alone (no loader, no all-reduce, batch 32) "
            "ran at 55.9 img/s and the FFRecord + DALI 'mixed' training pipeline delivered ~9,600 img/s from 4 CPU "
            "threads, so neither is below r. Rendered by `python tools/scaling_doc.py`: once "
            "`tools/gpu_train_check.py` has run on a GPU and its JSON is in docs/bench/, the same command renders "
            "this page from the measured end-to-end rate."
        )
    return [
        "# Scaling DANet-152 on ImageNet: the arithmetic for 1, 4, 16 and 64 nodes of 8 GPUs",
        "",
        *_wrap(intro),
        "",
        *_wrap(
            f"Fixed inputs: ImageNet-1k train {IMAGES:,} images, mean JPEG ~{JPEG_KB} KB; DANet-152 **{PARAMS_M} M "
            f"parameters** (`orchestrator models list --json`); the preset's per-GPU batch of {MICRO} (global 1,024 "
            "on 4 nodes) is kept per GPU (weak scaling: global 256 / 1,024 / 4,096 / 16,384; above ~8k the "
            f"linear-lr rule needs LAMB, `optim.name=lamb`). Step time = {MICRO} / r = **{step:.2f} s** at every "
            "scale (ideal scaling; the all-reduce share below says how ideal)."
        ),
        "",
    ]


def _data(r: float) -> list[str]:
    """What storage must deliver at each scale."""
    out = [
        "## Data: what storage must deliver",
        "",
        f"FFRecord stores each encoded JPEG once plus a few bytes (offset, CRC, label): read volume = images x "
        f"{JPEG_KB} KB.",
        "",
        "| nodes (GPUs) | images/s needed | bytes/s from the shared FS | per node | one epoch |",
        "|---|---|---|---|---|",
    ]
    for n in NODES:
        ips = r * PER_NODE * n
        out.append(f"| {n} ({PER_NODE * n}) | {ips:,.0f} | {_bps(ips * JPEG_KB * 1e3)} | "
                   f"{_bps(r * PER_NODE * JPEG_KB * 1e3)} | {_dur(IMAGES / ips)} |")  # fmt: skip
    top = r * PER_NODE * NODES[-1]
    # the largest scale whose aggregate read rate any parallel file system serves (below ~1 GB/s)
    served = max((n for n in NODES[:-1] if r * PER_NODE * n * JPEG_KB * 1e3 < 1e9), default=None)
    out += [
        "",
        *_wrap(
            f"Per node the demand is flat ({_bps(r * PER_NODE * JPEG_KB * 1e3)}, {r * PER_NODE:,.0f} JPEG decodes/s: "
            "DALI on 8 x 8 CPU cores or nvJPEG is far from its limit: its 'mixed' pipeline delivered ~9,600 img/s "
            "from 4 CPU threads on one H200, BENCHMARKS.md). The aggregate is what matters: "
            + (f"up to {served} nodes ({_bps(r * PER_NODE * served * JPEG_KB * 1e3)}) any parallel FS "
               "(Lustre/GPFS/Weka, or a good NFS server) serves it; " if served else "")
            + f"at {NODES[-1]} nodes {_bps(top * JPEG_KB * 1e3)} of ~{JPEG_KB} KB positional reads is a real load on a "
            f"shared FS. The FFRecord folder is ~{FFR_GB} GB, so at scale copying it once to each node's local NVMe "
            f"(`data.root=` a local path) takes the load off the shared FS entirely ({FFR_GB} GB at 2 GB/s per node "
            f"~ {FFR_GB / 2:.0f} s per node, from the FS: {NODES[-1]} x {FFR_GB} GB once, vs the same volume every "
            f"{_dur(IMAGES / top)} epoch otherwise)."
        ),
        "",
    ]
    return out


def _checkpoints(step: float) -> list[str]:
    """A checkpoint's size, its write time and its share of the time."""
    return [
        "## Checkpoints: size and write time",
        "",
        *_wrap(
            "`train.precision: auto` is bf16-mixed on GPUs (autocast around an fp32 DeepSpeed engine) with "
            "`deepspeed.zero_stage: 1` (the preset): fp32 module weights (4 B/param) written by rank 0; SGD momentum "
            "(4 B/param) sharded over the data-parallel ranks, each rank writing its shard; plus our exported fp32 "
            "`best.pt` (4 B/param) when val top-1 improves. (`train.precision=bf16`, DeepSpeed's bf16 engine, writes "
            f"bf16 module weights, {GRAD_MB / 2:.0f} MB, and fp32 master weights + momentum, {GRAD_MB * 2:.0f} MB in "
            f"shards: ~{GRAD_MB * 2.5:.0f} MB.)"
        ),
        "",
        "| item | bytes |",
        "|---|---|",
        f"| module weights (fp32) | {GRAD_MB:.0f} MB |",
        f"| SGD momentum (all shards) | {GRAD_MB:.0f} MB ({GRAD_MB / 32:.1f} MB per rank at 32 GPUs, "
        f"{GRAD_MB / 512:.1f} MB at 512) |",
        f"| one checkpoint | **~{CKPT_MB} MB** (plus loop state, a few KB) |",
        f"| exported best.pt / final.pt (fp32) | {GRAD_MB:.0f} MB |",
        "",
        *_wrap(
            f"Write time: assumed 1 GB/s sustained for one job's writes to the shared FS -> **~{WRITE_S[0]} s** per "
            "checkpoint (the sharded part is written by all ranks in parallel, so it goes as the FS's aggregate, not "
            f"one client's, bandwidth); at a slow 200 MB/s, ~{WRITE_S[1]:.0f} s. With `keep_top_k: 3` plus the last, "
            "~2 GB on disk. The step is stalled for the write (DeepSpeed saves synchronously), so at "
            f"`checkpoint_every_steps: {CKPT_EVERY}` ({_dur(CKPT_EVERY * step)} at {step:.2f} s/step) checkpointing "
            f"costs {_pct(WRITE_S[0] / (CKPT_EVERY * step))}-{_pct(WRITE_S[1] / (CKPT_EVERY * step))} of the time."
        ),
        "",
    ]


def _requeue(step: float) -> list[str]:
    """Time lost per requeue, signalled or not."""
    return [
        "## Time lost per requeue",
        "",
        "lost = requeue latency + restart + lost work since the last checkpoint.",
        "",
        *_wrap(
            "- **Requeue latency**: Slurm's requeue puts the job back after `cred_expire` (default 120 s) plus "
            "scheduling; on a busy cluster it waits for 32-512 GPUs again, which can be anything. Assumed: 2-3 min "
            "on an idle partition.", indent="  "
        ),
        *_wrap(
            "- **Restart**: process start, imports, DeepSpeed/NCCL init, loader pipelines, checkpoint load (500 MB at "
            "1 GB/s ~0.5 s). Assumed 1-2 min at scale (NCCL init grows with ranks).", indent="  "
        ),
        *_wrap(
            "- **Lost work**: a time limit or preemption sends the signal first (`--signal=B:USR2@300`, TERM on "
            "preemption), every rank checkpoints at the next step boundary, so **~0 steps are lost**. A node crash "
            f"(no signal) loses on average half the interval: {CKPT_EVERY // 2:,} steps x {step:.2f} s = "
            f"**~{_dur(CKPT_EVERY / 2 * step)}** at `checkpoint_every_steps: {CKPT_EVERY}` (at every scale here, "
            "since the per-GPU batch and step time are constant; the images lost grow with the global batch).",
            indent="  ",
        ),
        "",
        "| case | lost per requeue |",
        "|---|---|",
        f"| time limit / preemption (signalled) | ~{REQUEUE_MIN[0]}-{REQUEUE_MIN[1]} min (latency + restart) |",
        f"| node failure | ~{_mins(REQUEUE_MIN[0] * 60 + CKPT_EVERY / 2 * step)}-"
        f"{_mins(REQUEUE_MIN[1] * 60 + CKPT_EVERY / 2 * step)} min (+ ~{_dur(CKPT_EVERY / 2 * step)} of "
        f"recomputation on average, up to {_dur(CKPT_EVERY * step)}) |",
        "",
        *_wrap(
            f"Checkpointing every {CKPT_EVERY_ALT} steps instead would cut a crash's loss to "
            f"~{_dur(CKPT_EVERY_ALT / 2 * step)} for {_pct(WRITE_S[0] / (CKPT_EVERY_ALT * step))}-"
            f"{_pct(WRITE_S[1] / (CKPT_EVERY_ALT * step))} of the time in writes ({WRITE_S[0]}-{WRITE_S[1]:.0f} s per "
            f"{_dur(CKPT_EVERY_ALT * step)})."
        ),
        "",
        *_wrap(LOCAL_SLURM),
        "",
    ]


def _allreduce(step: float) -> list[str]:
    """The gradients' all-reduce per step and its share of a step, per interconnect."""
    out = [
        "## All-reduce per step",
        "",
        *_wrap(
            "Data-parallel gradients are all-reduced once per step (ZeRO-1: a reduce-scatter of gradients plus an "
            "all-gather of updated weights, the same volume as a ring all-reduce). Per GPU sent (and received) per "
            f"step, ring: 2(n-1)/n x grad bytes, grads = {PARAMS_M} M x 4 B = {GRAD_MB:.0f} MB in fp32 "
            f"({GRAD_MB / 2:.0f} MB if reduced in bf16)."
        ),
        "",
        "| nodes (n GPUs) | bytes per GPU per step, fp32 (bf16) | time, intra-node NVLink (~200 GB/s bus) | time, "
        "8x200 Gb/s IB per node (~20 GB/s per GPU) | time, 1x100 Gb/s per node | share of a "
        f"{step:.2f} s step |",
        "|---|---|---|---|---|---|",
    ]
    node_mb = 2 * GRAD_MB  # what each node sends per step across nodes (ring), fp32
    for n in NODES:
        g = PER_NODE * n
        per_gpu = 2 * (g - 1) / g * GRAD_MB
        if n == 1:
            t = per_gpu / NVLINK_GBS
            out.append(f"| {n} ({g}) | {per_gpu:.0f} MB ({per_gpu / 2:.0f}) | {t:.0f} ms | - | - | {_pct(t / 1e3 / step)} |")
        else:
            ib, nic = per_gpu / IB_GBS_PER_GPU, node_mb / NIC_100G_GBS
            out.append(f"| {n} ({g}) | {per_gpu:.0f} MB ({per_gpu / 2:.0f}) | - | {ib:.0f} ms ({ib / 2:.0f}) | "
                       f"{nic:.0f} ms ({nic / 2:.0f}) | {_pct(ib / 1e3 / step)} / {_pct(nic / 1e3 / step)} |")  # fmt: skip
    eth = node_mb / ETH_25G_GBS
    out += [
        "",
        *_wrap(
            "(Across nodes the ring's bottleneck is the node's network: per step each node sends ~2 x "
            f"{GRAD_MB:.0f} MB; with one NIC per GPU that is ~{node_mb / IB_GBS_PER_GPU:.0f} ms, with one "
            f"100 Gb/s NIC per node ~{node_mb / NIC_100G_GBS:.0f} ms. Latency terms, ~2(n-1) x a few us, add ~5 ms "
            "at 512 GPUs.) The volume per GPU is almost independent of n, so its share of a step is too: "
            f"{_pct(2 * 511 / 512 * GRAD_MB / IB_GBS_PER_GPU / 1e3 / step)} to "
            f"{_pct(node_mb / NIC_100G_GBS / 1e3 / step)} of the {step:.2f} s step across nodes, and DeepSpeed "
            "overlaps most of it with the backward pass. A slower network, 25 Gb/s Ethernet per node, takes "
            f"~{eth:.0f} ms, {_pct(eth / 1e3 / step)} of a step; gradient accumulation (`train.micro_batch_size`) "
            "divides that share by the accumulation factor."
        ),
    ]
    return out


def _mins(s: float) -> str:
    return f"{s / 60:.0f}"


# measured on this project's local Slurm (a CPU check of the mechanism; it does not scale with r)
LOCAL_SLURM = (
    "**Checked on the local 4-node Slurm** (`scripts/slurm-up.sh`; digits, DANet-18 width 4, 4 CPU ranks on 2 "
    "shared cores, fp32, from the log of the requeue test's job 39, `tests/test_slurm.py`): pre-timeout signal "
    "08:14:03 -> checkpoint written at the next step 08:14:10 (7 s, most of it finishing the step in flight; the "
    "checkpoint itself is 0.7 MB) -> the shell requeued 08:14:22 -> the job started again 08:14:34 (12 s requeue "
    "latency, with `cred_expire=10`; Slurm's default 120 s would make it ~2 min) -> resumed at step 14 at 08:15:04 "
    "(30 s restart: imports, DeepSpeed init, loaders, checkpoint load on a loaded 2-core machine) -> 0 steps lost. "
    "Signal to resumed: 61 s. The GPU-scale numbers (checkpoint write at 500 MB, NCCL init, cluster requeue "
    "latency) remain unchecked."
)


def _wrap(text: str, width: int = 115, indent: str = "") -> list[str]:
    """``text`` as lines of at most ``width`` characters (continuation lines indented by ``indent``)."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = indent + word
        else:
            line = f"{line} {word}" if line else word
    return lines + ([line] if line else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, help="a job check's JSON (default: docs/bench/gpu_train_*.json)")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/SCALING.md differs from the rendering")
    parser.add_argument("--out", type=Path, default=DOC)
    args = parser.parse_args(argv)
    try:
        if args.bench is not None and not args.bench.is_file():
            raise BadInput(f"--bench {args.bench}: no such file")
        rate = rate_from_bench(args.bench) if args.bench else default_rate()
    except BadInput as e:
        print(f"scaling_doc: error: {e}", file=sys.stderr)
        return 2
    text = render(rate)
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"scaling_doc: {args.out} is not what r = {rate.img_per_s:.1f} img/s renders: run "
                  "`python tools/scaling_doc.py`", file=sys.stderr)  # fmt: skip
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out} for r = {rate.img_per_s:.1f} img/s per GPU"
          + (f" (measured: {rate.source})" if rate.measured else " (assumed: no GPU job check in docs/bench)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
