"""Every shipped preset runs as configured, and the plumbing the cluster presets rely on.

* Each orchestrator/presets/*.yaml is launched with `orchestrator launch` on 2 CPU ranks with only sizes shrunk
  (width, image sizes, a tiny dataset made by `orchestrator data convert`, steps and global batch); everything
  else (ZeRO stage, optimizer, channels_last, precision, checkpointing, spike storage, loss...) as shipped. A new
  preset file is covered without touching this file.
* The three defect classes that stopped the cluster presets before their first step, each checked through the
  project's own code on 2 real ranks (tests/helpers/job_probe.py, one run shared by the tests below):
  channels_last with DeepSpeed, ZeRO 1/2 with every optimizer the config allows, and collectives on the device
  their process group serves. The same run checks that a training step reads nothing on the host.
* `orchestrator launch` starts one rank per visible GPU, the CPU ranks otherwise.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_imagenet as tiny

from orchestrator.config import load_config, to_dict
from orchestrator.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "orchestrator" / "presets").glob("*.yaml"))
CLASSES = tiny.CLASSES  # the tiny dataset's class count (a dataset size: model.num_classes follows it)
# What a preset run may change: sizes only (and where the dataset lives).
SIZE_KEYS = {"model.width", "model.num_classes", "data.root", "data.image_size", "data.val_resize",
             "train.max_steps", "train.global_batch_size"}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    return env


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory) -> Path:
    """A few generated JPEGs in ImageNet folder layout, converted with `orchestrator data convert`."""
    return tiny.build(tmp_path_factory.mktemp("imagenet"))


def shrunk(preset: str, data_root: Path) -> list[str]:
    """Size overrides for a preset: narrow, 32 px images, 2 steps of a global batch of 8 (2 ranks x 4)."""
    cfg = load_config(preset)
    if cfg.data.name == "digits":
        data = [f"data.root={REPO}/.cache/data/digits"]  # the bundled set (built by conftest), 10 classes
    else:
        data = [f"data.root={data_root}", f"model.num_classes={CLASSES}"]
    return ["model.width=4", "data.image_size=32", "data.val_resize=36", "train.max_steps=2",
            "train.global_batch_size=8", *data]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_as_configured(preset, tiny_imagenet, tmp_path):
    overrides = shrunk(preset, tiny_imagenet)
    assert {o.split("=", 1)[0] for o in overrides} <= SIZE_KEYS  # the test itself changes sizes only
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "orchestrator", "launch", "--config", preset, "--run-dir",
                        str(tmp_path / "run"), *overrides], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=900)
    wall = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-5000:]
    assert "launch: 2 local ranks" in r.stderr  # a cluster preset (launch.mode=slurm) launched here runs locally
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["status"] == "completed" and s["steps"] == 2 and s["world_size"] == 2 and s["preset"] == preset, s
    assert s["latest_checkpoint"] == "step00000002" and s["mlflow_run_id"], s  # saved through its ZeRO stage
    assert all(v == v for v in s["loss_tail"]) and len(s["loss_tail"]) == 2
    assert s["forward_dtype"] == "torch.float32"  # auto on CPU
    # The run's resolved config is the preset's, except the sizes this test shrank.
    from orchestrator.config.load import from_yaml_file

    ran = _flat(to_dict(from_yaml_file(tmp_path / "run" / "config.yaml")))
    shipped = _flat(to_dict(load_config(preset)))
    changed = {k for k in shipped if ran.get(k) != shipped[k]}
    assert changed <= SIZE_KEYS, {k: (shipped[k], ran.get(k)) for k in changed - SIZE_KEYS}
    # The real checkpoint as preflight reads it before a resume: ZeRO splits the optimizer state per rank, so
    # another world size is refused in one line (tests/test_cli_contract.py holds the CLI side of that contract).
    from orchestrator.config.load import resolve_config
    from orchestrator.preflight import check_resume

    cfg, problems = resolve_config(preset, [*overrides, "train.max_steps=4"])
    assert not problems and check_resume(cfg, tmp_path / "run", 2, "cpu") == []
    refused = check_resume(cfg, tmp_path / "run", 1, "cpu")
    if cfg.deepspeed.zero_stage > 0:
        assert len(refused) == 1 and "written by 2 ranks with ZeRO stage" in refused[0], refused
    else:
        assert refused == [], refused  # ZeRO 0: another world size resumes (test_reliability does it)
    print(f"{preset}: {wall:.1f} s")


def test_gpu_precision_runs_the_whole_job(tiny_imagenet, tmp_path):
    """train.precision=bf16-mixed, what `auto` resolves to on a GPU, through the whole job on 2 CPU ranks (autocast
    on CPU): training, evaluation, EMA, telemetry, checkpoints, exported weights."""
    import torch

    r = subprocess.run([sys.executable, "-m", "orchestrator", "launch", "--config", "danet18_imagenet", "--run-dir",
                        str(tmp_path / "run"), *shrunk("danet18_imagenet", tiny_imagenet), "train.precision=bf16-mixed",
                        "train.ema_decay=0.9"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-5000:]
    assert "cpu bf16-mixed" in r.stderr
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["status"] == "completed" and s["steps"] == 2 and s["val_top1"] is not None, s
    assert all(v == v for v in s["loss_tail"]) and (tmp_path / "run" / "checkpoints" / "final_ema.pt").is_file()
    assert s["forward_dtype"] == "torch.bfloat16"  # what the forward really ran in, recorded by the worker
    # DeepSpeed's own checkpoint holds the module as trained: fp32 weights and BN statistics (bf16 would be bf16)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)["module"]
    assert {str(v.dtype) for v in saved.values() if v.is_floating_point()} == {"torch.float32"}


# --- the plumbing, on 2 real ranks -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def probe(tiny_imagenet, tmp_path_factory) -> dict:
    """tests/helpers/job_probe.py on 2 ranks: {check: [rank 0's result, rank 1's]}."""
    from launch.local import rank_envs

    port = 20000 + os.getpid() % 9000
    run_root = tmp_path_factory.mktemp("probe")
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests/helpers/job_probe.py"), str(port), str(tiny_imagenet),
                               str(run_root)], env={**_env(), **env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for env in rank_envs(2, port)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(err[-3000:] for _, err in outs)
    results: dict = {}
    for out, _ in outs:
        for line in out.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                results.setdefault(row.pop("check"), {})[row.pop("rank")] = row
    return {k: [v[0], v[1]] for k, v in results.items()}


def test_collectives_run_on_the_device_their_group_serves(probe):
    # A group that serves CUDA tensors only, like NCCL: a raw CPU all-reduce fails as it does under NCCL...
    cuda_only = probe["collectives/cuda:gloo"]
    for r in cuda_only:
        assert r["served"] == ["cuda"] and "No backend type associated with device type cpu" in r["raw_cpu_error"]
        # ...while host values (stop requests, checkpoint verdicts, barriers) go over the CPU group
        assert r["host_max"] == [1.0] and r["host_sum"] == [4.0] and r["host_min"] == [0.0]
        assert r["stop_agreed"] == 2 and r["barrier"] is None  # rank 1's requeue request reaches both ranks
        # and device values are put on CUDA (which this machine lacks), never all-reduced as CPU tensors
        assert r["device"] == "cuda" and r["device_for_cpu"] == "cuda"
        # (a CPU-only torch: "not compiled with CUDA"; a CUDA build without a GPU: "no NVIDIA driver")
        assert ("CUDA" in r["device_error"] or "NVIDIA" in r["device_error"]) and "No backend type" not in r["device_error"]
    cpu_only, both = probe["collectives/cpu:gloo"], probe["collectives/gloo"]
    for r in cpu_only + both:
        assert r["device"] == "cpu" and r["device_error"] is None and r["raw_cpu_error"] is None
        assert r["device_max"] == [2.0] and r["stop_agreed"] == 2 and r["host_sum"] == [4.0]
    assert [r["served"] for r in cpu_only] == [["cpu"]] * 2 and [r["served"] for r in both] == [["cpu", "cuda"]] * 2


def _collective_calls(tree: ast.AST) -> list[str]:
    """Imports of torch.distributed / deepspeed.comm and attribute uses of them, as 'line: text'."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names
                      if a.name.startswith(("torch.distributed", "deepspeed.comm"))]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(("torch.distributed", "deepspeed.comm")) or (
                    node.module in ("torch", "deepspeed") and any(a.name in ("distributed", "comm") for a in node.names)):
                found.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and node.attr in ("distributed", "comm"):
            if isinstance(node.value, ast.Name) and node.value.id in ("torch", "deepspeed"):
                found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            module = node.args[0].value
            if name in ("import_module", "__import__") and str(module).startswith(("torch.distributed",
                                                                                   "deepspeed.comm")):
                found.append(f"{node.lineno}: {name}({module!r})")
    return found


def test_no_collectives_outside_the_dist_module():
    """orchestrator/train/dist.py is the one place that talks to torch.distributed or deepspeed.comm."""
    offenders = {}
    for root in ("orchestrator", "launch", "models"):
        for path in sorted((REPO / root).rglob("*.py")):
            if path == REPO / "orchestrator/train/dist.py":
                continue
            calls = _collective_calls(ast.parse(path.read_text(), str(path)))
            if calls:
                offenders[str(path.relative_to(REPO))] = calls
    assert not offenders, offenders
    # the check sees the forms it forbids
    assert len(_collective_calls(ast.parse("import torch.distributed as d\nfrom torch import distributed\n"
                                           "torch.distributed.barrier()\nimportlib.import_module('deepspeed.comm')"))) == 4


@pytest.mark.parametrize("stage,optim", [(1, "sgd"), (2, "sgd"), (1, "adamw"), (2, "adamw"), (0, "lamb")])
def test_zero_trains_skips_and_resumes_with_each_optimizer(probe, stage, optim):
    """Both ranks: the weights moved; a first step whose loss is NaN on one rank left them untouched on both (a
    skipped first step must not corrupt momentum either); and 3 steps after it equal 2 steps + checkpoint +
    resume in a fresh engine + 1 step, bit for bit."""
    r0, r1 = probe[f"zero/{stage}/{optim}"]
    for r in (r0, r1):
        assert r["after_skip"] == r["start"]
        assert r["skipped_then"] != r["start"] and r["resumed"] == r["skipped_then"] and r["loaded_step"] == 2
        assert all(v == v for v in r["losses"]) and r["clipping"] == 0.0  # train.grad_clip=0: off, not 1.0
        assert r["optimizer"] == {"sgd": "SGD", "adamw": "AdamW", "lamb": "Lamb"}[optim]
        assert optim == "lamb" or r["fused"] == [True, True]  # torch's fused step on CPU too
    assert r0["skipped_then"] == r1["skipped_then"]  # data parallel: one model


def test_lamb_is_refused_under_zero(probe):
    for r in probe["zero/1/lamb"]:
        assert "optim.name=lamb with deepspeed.zero_stage=1" in r["refused"] and "zero_stage=0" in r["refused"]


def test_channels_last_convolutions_with_zero(probe):
    """danet18_imagenet as shipped (channels_last, ZeRO 1, SGD): DeepSpeed takes the contiguous parameters and
    every convolution of a training step still runs channels_last (forward outputs, backward input gradients)."""
    for r in probe["channels_last"]:
        assert r["zero_stage"] == 1 and r["optimizer"] == "sgd" and r["params_contiguous"] and r["conv_params"] > 10
        assert r["fwd"] and all(r["fwd"]), r["fwd"]
        assert r["bwd"] and all(r["bwd"]), r["bwd"]


def test_a_step_reads_nothing_on_the_host(probe):
    """The real loop (DALI loader, DeepSpeed ZeRO 1, log every 3 steps, 5 steps): values are read on the host
    only at sync points (step 3 and the last), once each; every other step reads none."""
    for r in probe["loop"]:
        assert r["steps"] == 5 and r["synced_at"] == [3, 5] and r["logged"] == [1, 2, 3, 4, 5]
        reads = r["reads_per_step"]
        assert reads[0] == reads[1] == reads[3] == 0 and reads[2] == reads[4] == 1, reads
        # nor does DeepSpeed wait for the device (its throughput timer synchronises at every forward and step)
        assert r["device_syncs_per_step"] == [0] * 5, r["device_syncs_per_step"]
        assert len(r["loss_tail"]) == 5


def test_bf16_mixed_autocasts_and_reads_nothing_on_the_host(probe):
    """train.precision=bf16-mixed (auto on CUDA): the forward runs in bf16 under autocast while the weights and
    BatchNorm statistics stay fp32, and under ZeRO 1 a step reads nothing on the host, as in fp32. DeepSpeed's own
    bf16 engine (train.precision=bf16) reads the gradient norm on the host in every step (its bf16 optimizer's
    overflow check): the reason auto is bf16-mixed. If that count drops to 0, DeepSpeed changed: revisit auto."""
    for mixed, fp32, ds_bf16 in zip(probe["loop/bf16-mixed"], probe["loop"], probe["loop/bf16"], strict=True):
        # (DeepSpeed asked as on a GPU: it switches a forward's autocast off unless its config has torch_autocast)
        assert mixed["output_dtype"] == "torch.bfloat16" and mixed["weight_dtype"] == "torch.float32"
        assert mixed["device_syncs_per_step"] == [0] * 5, mixed["device_syncs_per_step"]
        assert mixed["bn_stats_dtype"] == "torch.float32" and fp32["output_dtype"] == "torch.float32"
        assert mixed["reads_per_step"] == fp32["reads_per_step"] and mixed["steps"] == 5, mixed
        assert all(v == v for v in mixed["loss_tail"]) and mixed["loss_tail"] != fp32["loss_tail"]
        assert ds_bf16["weight_dtype"] == ds_bf16["bn_stats_dtype"] == "torch.bfloat16"
        assert all(a > b for a, b in zip(ds_bf16["reads_per_step"], fp32["reads_per_step"], strict=True)), ds_bf16


# --- how many local ranks ------------------------------------------------------------------------------------------
def test_local_ranks_one_per_gpu_else_cpu_ranks():
    from launch.local import local_rank_count
    from orchestrator.train.engine import batch_plan

    assert local_rank_count(2, "auto", gpus=1) == 1  # the embedded default on a one-GPU machine: not 2 on one GPU
    assert local_rank_count(2, "auto", gpus=8) == 8 and local_rank_count(2, "cuda", gpus=4) == 4
    assert local_rank_count(2, "auto", gpus=0) == 2 and local_rank_count(3, "cpu", gpus=8) == 3
    cfg = load_config("digits")  # global batch 64
    assert batch_plan(cfg, local_rank_count(cfg.launch.local_ranks, "auto", gpus=8)).micro_batch == 8
    with pytest.raises(UserError, match=r"train.global_batch_size=64 is not divisible by the world size 3"):
        batch_plan(cfg, local_rank_count(cfg.launch.local_ranks, "auto", gpus=3))


@pytest.mark.parametrize("preset", PRESETS)
def test_cudnn_autotuner_follows_determinism(preset):
    """The ImageNet presets (fixed-size crops, not deterministic) let cuDNN pick the fastest convolution; a
    deterministic run never does, whatever train.cudnn_benchmark says."""
    import torch

    from orchestrator.train.worker import seed_everything

    before = torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()
    try:
        for deterministic in (False, True):
            t = load_config(preset, [f"train.deterministic={str(deterministic).lower()}"]).train
            seed_everything(t.seed, t.deterministic, t.cudnn_benchmark)
            assert torch.backends.cudnn.benchmark is (t.cudnn_benchmark and not deterministic)
        shipped = load_config(preset).train
        assert shipped.cudnn_benchmark
    finally:
        torch.backends.cudnn.benchmark = before[0]
        torch.use_deterministic_algorithms(before[1])
