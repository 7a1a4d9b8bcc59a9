"""Checks that run before anything starts: run directory, dataset, launcher flags, batch arithmetic, resume.

Every function returns a list of problems (one line each, naming the key or flag, the value and what would be
valid) and writes nothing: a command collects them all, with the config's own (``resolve_config``), and raises
one ``UserError(*problems)`` before it makes a rank, a process, a file or a folder. ``raise_if`` does that last
step. The checks mirror what the parts that meet these values later would refuse (the worker, the loader, the
Slurm renderer, DeepSpeed's checkpoint loader), so a refusal comes first and once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from orchestrator.config.schema import Config
from orchestrator.errors import UserError

DIGITS_CLASSES = 10  # the bundled set (orchestrator/data/digits.py), checked before it is built

# Settings a checkpoint's tensors depend on, each with what must match (a normalised value): resuming with
# another fails inside DeepSpeed's loader (shape or key mismatch, a missing optimizer-state file, a missing loss
# scaler). Measured by resuming a digits checkpoint with each changed: model.width, model.neuron.type=plif,
# optim.name, deepspeed.zero_stage and train.precision fail; model.T and the neuron's scalars load fine.
def _connection(cfg: Config) -> str:
    from models import FAMILIES, REGISTRY

    if cfg.model.connection != "default" or cfg.model.name not in REGISTRY:
        return cfg.model.connection
    return FAMILIES[REGISTRY[cfg.model.name][0]].value


CHECKPOINT_KEYS = {
    "model.name": lambda c: c.model.name,
    "model.num_classes": lambda c: c.model.num_classes,
    "model.in_channels": lambda c: c.model.in_channels,
    "model.width": lambda c: c.model.width,
    "model.input_size": lambda c: c.model.input_size <= 64,  # the stem: CIFAR-style up to 64, ImageNet above
    "model.connection": _connection,
    "model.da.domain": lambda c: _connection(c) != "da" or c.model.da.domain,
    "model.da.span": lambda c: _connection(c) != "da" or c.model.da.span,
    "model.da.weights": lambda c: _connection(c) != "da" or c.model.da.weights,
    "model.neuron.type": lambda c: c.model.neuron.type == "plif",  # PLIF's learnable tau is a parameter
    "optim.name": lambda c: c.optim.name,
    "deepspeed.zero_stage": lambda c: c.deepspeed.zero_stage,
}


def raise_if(problems: list[str]) -> None:
    """Raise one UserError carrying every problem, if there are any."""
    if problems:
        raise UserError(*problems)


def _get(cfg: object, key: str) -> object:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _probe_writable(folder: Path) -> str | None:
    """None if a folder can be made inside ``folder`` (an empty probe, removed at once), else why not.

    ``os.access`` alone is not enough: root passes it everywhere, and /proc or /sys accept no new entries."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "permission denied"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".orchestrator-probe-", dir=folder))
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def check_writable_dir(path: str | os.PathLike, what: str) -> list[str]:
    """``path`` is a writable folder, or one that can be created (its nearest existing parent is a writable
    folder). ``what`` names the flag or key, e.g. ``--run-dir``."""
    p = Path(path)
    try:
        p = Path(os.path.abspath(p))
        if p.exists():
            if not p.is_dir():
                return [f"{what} {path}: exists and is not a folder; give a folder (existing or new)"]
            why = _probe_writable(p)
            return [f"{what} {path}: not writable ({why}); give a writable folder"] if why else []
        parent = p.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            return [f"{what} {path}: not writable: cannot be created ({parent} is a file, not a folder); give a "
                    "writable folder"]
        why = _probe_writable(parent)
    except OSError as e:
        return [f"{what} {path}: {e.strerror or e}; give a writable folder"]
    return [f"{what} {path}: not writable: cannot be created in {parent} ({why}); give a writable folder"] if why else []


def check_output_file(path: str | os.PathLike | None, flag: str) -> list[str]:
    """An output file the command will write at the end (e.g. ``--json``): its folder exists and is writable,
    and it is not itself a folder; checked before the work, not after it."""
    if not path:
        return []
    p = Path(os.path.abspath(path))
    if p.is_dir():
        return [f"{flag} {path}: is a folder; give a file path"]
    if not p.parent.is_dir():
        return [f"{flag} {path}: folder {p.parent} does not exist"]
    if p.exists() and not os.access(p, os.W_OK):
        return [f"{flag} {path}: not writable"]
    why = _probe_writable(p.parent)
    return [f"{flag} {path}: cannot write in {p.parent} ({why})"] if why else []


def check_dataset(cfg: Config, verify_files: bool = False) -> list[str]:
    """data.root is a dataset folder whose classes match model.num_classes (or the bundled digits set, which is
    built on first use); with ``verify_files``, the FFRecord headers (and CRCs per data.verify) as well."""
    from orchestrator.data.dali import load_meta

    root = Path(cfg.data.root)
    key = f"data.root={cfg.data.root}"
    if cfg.data.name == "digits" and not (root / "meta.json").is_file():
        problems = []
        if root.is_dir() and any(root.iterdir()):
            problems.append(f"{key}: exists but is not a digits dataset folder (no meta.json); remove it or "
                            "point data.root at an empty or missing folder")
        elif root.exists() and not root.is_dir():
            problems.append(f"{key}: is a file; point data.root at a folder (the digits set is built there)")
        else:
            problems += check_writable_dir(root, "data.root")  # built there on first use
        if cfg.model.num_classes != DIGITS_CLASSES:
            problems.append(f"the digits dataset has {DIGITS_CLASSES} classes but model.num_classes="
                            f"{cfg.model.num_classes}; set model.num_classes={DIGITS_CLASSES}")
        return problems
    if not root.exists():
        return [f"{key}: no such folder; point it at a dataset folder (meta.json, train.ffr/, val.ffr/ from "
                "`orchestrator data convert`), or use data.name=digits"]
    if not root.is_dir():
        return [f"{key}: not a folder; point it at a dataset folder (meta.json, train.ffr/, val.ffr/)"]
    if not os.access(root, os.R_OK | os.X_OK):
        return [f"{key}: not readable (permission denied)"]
    try:
        meta = load_meta(root)
    except UserError as e:
        return e.problems
    except OSError as e:
        return [f"{key}: cannot read {root / 'meta.json'} ({e.strerror})"]
    problems = []
    if cfg.data.name == "digits" and meta.get("name") != "digits":
        problems.append(f"{key}: holds dataset '{meta.get('name')}', not the digits set; set data.name to "
                        "something else than digits, or point data.root at another folder")
    try:
        classes = int(meta["num_classes"])
    except (TypeError, ValueError):
        problems.append(f"{root / 'meta.json'}: num_classes is {meta['num_classes']!r}, not a number")
        classes = cfg.model.num_classes
    if classes != cfg.model.num_classes:
        problems.append(f"dataset {root} has {classes} classes but model.num_classes={cfg.model.num_classes}; "
                        f"set model.num_classes={classes}")
    for split in ("train", "val"):
        if not (root / f"{split}.ffr").exists():
            problems.append(f"{key}: {root / f'{split}.ffr'} is missing (a dataset folder has train.ffr/ and "
                            "val.ffr/)")
    payload = cfg.data.payload if cfg.data.payload != "auto" else meta.get("payload")
    if payload == "pickle" and not cfg.data.trust_pickle:
        problems.append(f"{key}: stores pickled records (HFAiLab layout); unpickling runs code from the file, so it "
                        "needs data.trust_pickle=true (a restricted unpickler reads it), or convert it to jpeg_label")
    if verify_files and not problems:
        from orchestrator.train.worker import verify_dataset

        try:
            verify_dataset(root, cfg.data.verify)
        except UserError as e:
            problems += e.problems
    return problems


def check_batch(cfg: Config, world_size: int) -> list[str]:
    """How the engine will be built for ``world_size`` ranks: the batch arithmetic (engine.batch_plan), an explicit
    accumulation count, and the optimizers ZeRO can partition (engine.zero_problems)."""
    from orchestrator.train.engine import batch_plan, zero_problems

    problems = zero_problems(cfg)
    if world_size < 1 or cfg.train.global_batch_size < 1 or cfg.train.micro_batch_size < 0:
        return problems  # the counts themselves are refused by the config check
    try:
        plan = batch_plan(cfg, world_size)
    except UserError as e:
        return problems + e.problems
    acc = cfg.deepspeed.gradient_accumulation_steps
    if acc and acc != plan.accumulation:
        problems.append(f"deepspeed.gradient_accumulation_steps={acc} disagrees with the batch sizes (global "
                        f"{plan.global_batch} = {world_size} ranks x micro-batch {plan.micro_batch} x "
                        f"{plan.accumulation}); set it to 0 (derived) or {plan.accumulation}")
    return problems


def check_device(cfg: Config, local_ranks: int | None = None) -> list[str]:
    """train.device=cuda needs a visible GPU (and, for ranks on this machine, one per rank)."""
    if cfg.train.device == "cpu":
        return []
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.train.device == "cuda" and gpus == 0:
        return ["train.device=cuda but no CUDA device is visible here; valid here: auto, cpu"]
    if gpus and local_ranks and local_ranks > gpus:
        return [f"{local_ranks} local ranks on CUDA but {gpus} GPUs are visible; use at most {gpus} ranks "
                "(launch.local_ranks) or train.device=cpu"]
    return []


def _precision(cfg: Config, device: str | None) -> str:
    if device is None:  # a job that runs elsewhere: auto stays unresolved
        return cfg.train.precision
    from orchestrator.train.precision import resolve

    return resolve(cfg.train.precision, device)


def local_device(cfg: Config) -> str:
    """The device ranks on this machine will use (engine.resolve_device without its refusal)."""
    if cfg.train.device != "auto":
        return cfg.train.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_run_dir_free(run_dir: str | os.PathLike) -> list[str]:
    """No other job holds ``run_dir`` (launch/runlock.py): two jobs in one run directory overwrite each other's
    checkpoints. A lock this process inherited from its launcher is its own job's, not another's."""
    from launch import runlock

    if runlock.inherited(run_dir):
        return []
    who = runlock.holder(run_dir)
    return [] if who is None else [runlock.busy_line(run_dir, who)]


def check_resume(cfg: Config, run_dir: str | os.PathLike, world_size: int, device: str | None = None) -> list[str]:
    """A run dir's latest complete checkpoint must be one this config and world size can load. ``device``: the
    ranks' device when known (resolves train.precision=auto), None for a job that runs elsewhere."""
    from orchestrator.config.load import from_yaml_file

    ck = Path(run_dir) / "checkpoints"
    try:
        if not (ck / "LATEST").is_file():
            return []
        tag = (ck / "LATEST").read_text().strip()
        if not tag or not (ck / tag / "COMPLETE").is_file():
            return []  # the worker trusts no incomplete pointer either: it starts afresh
        index = json.loads((ck / "index.json").read_text()) if (ck / "index.json").is_file() else {}
    except (OSError, ValueError) as e:
        return [f"--run-dir {run_dir}: cannot read its checkpoint index in {ck} ({e}); start a new --run-dir"]
    problems = []
    saved = None
    saved_cfg = Path(run_dir) / "config.yaml"  # written at every start, once the checkpoint (if any) has loaded
    if saved_cfg.is_file():
        try:
            saved = from_yaml_file(saved_cfg)
        except Exception as e:  # noqa: BLE001 - any unreadable record of the run is the user's to sort out
            problems.append(f"--run-dir {run_dir}: {saved_cfg} does not load ({str(e).splitlines()[0]}); start a "
                            "new --run-dir")
    if saved is not None:
        diff = [f"{k}={_get(saved, k)} there, {_get(cfg, k)} here" for k, same in CHECKPOINT_KEYS.items()
                if same(saved) != same(cfg)]
        # precision=auto depends on the device: resolved where the ranks' device is known (here), else skipped
        precisions = [_precision(c, device) for c in (saved, cfg)]
        if "auto" not in precisions and precisions[0] != precisions[1]:
            diff.append(f"train.precision={saved.train.precision} there, {cfg.train.precision} here "
                        f"({precisions[0]} vs {precisions[1]})")
        if diff:
            problems.append(f"--run-dir {run_dir}: its checkpoint {tag} cannot be resumed with this config ("
                            f"{'; '.join(diff)}); use the run's settings, or start a new --run-dir")
    saved_world = index.get(tag, {}).get("world_size") if isinstance(index, dict) else None
    same_zero = saved is None or saved.deepspeed.zero_stage == cfg.deepspeed.zero_stage  # else reported above
    if saved_world not in (None, world_size) and cfg.deepspeed.zero_stage > 0 and same_zero:
        problems.append(f"{ck / tag} was written by {saved_world} ranks with ZeRO stage {cfg.deepspeed.zero_stage} "
                        f"(optimizer state split per rank); resume it with {saved_world} ranks, or start a new "
                        "--run-dir")
    return problems + _check_resume_position(cfg, run_dir, ck / tag, world_size)


def _check_resume_position(cfg: Config, run_dir: str | os.PathLike, tag_dir: Path, world_size: int) -> list[str]:
    """A mid-epoch checkpoint resumed with another world size or micro-batch continues at the same sample only
    where that position is a batch boundary of the new layout (the worker's translate_position): refused here,
    before any rank starts, rather than by every rank after start-up."""
    import pickle

    import torch

    from orchestrator.data.sampling import full_layout, translate_position
    from orchestrator.train.engine import batch_plan

    try:  # rank 0's small state file (loop state, RNG), not the weights
        loop = torch.load(tag_dir / "rank0.pt", weights_only=False, map_location="cpu").get("loop") or {}
        meta = json.loads((Path(cfg.data.root) / "meta.json").read_text())
        plan = batch_plan(cfg, world_size)
        n, new = int(meta["counts"]["train"]), (world_size, plan.micro_batch, plan.accumulation)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, UserError, pickle.UnpicklingError):
        return []  # unreadable here: the worker reports what it cannot load; a bad batch is reported elsewhere
    old, batches = tuple(loop.get("layout") or ()), int(loop.get("batch_in_epoch") or 0)
    if not old or not batches or full_layout(old) == new:
        return []
    try:
        translate_position(n, old, new, batches)
    except ValueError as e:
        return [f"--run-dir {run_dir}: cannot resume mid-epoch with {world_size} ranks x micro-batch {new[1]}: {e}"]
    return []


_PARTITION = re.compile(r"[A-Za-z0-9_.\-]+(,[A-Za-z0-9_.\-]+)*")


def _partitions() -> list[str] | None:
    """The cluster's partitions (sinfo), or None when Slurm cannot tell (then the check is skipped)."""
    if not shutil.which("sinfo"):
        return None
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=15)
    except (subprocess.TimeoutExpired, OSError):
        return None
    names = sorted({ln.strip() for ln in p.stdout.splitlines() if ln.strip()})
    return names if p.returncode == 0 and names else None


def check_slurm_flags(nodes: int | None, gpus_per_node: int | None, partition: str | None,
                      time: str | None) -> list[str]:
    """The launcher's Slurm flags on their own: counts, the partition's spelling, the time limit's format."""
    from launch.slurm import parse_time

    problems = []
    if nodes is not None and nodes < 1:
        problems.append(f"--nodes {nodes}: must be >= 1")
    if gpus_per_node is not None and gpus_per_node < 1:
        problems.append(f"--gpus-per-node {gpus_per_node}: must be >= 1 (ranks per node)")
    if partition is not None and not _PARTITION.fullmatch(partition):
        problems.append(f"--partition {partition!r}: not a Slurm partition name (letters, digits, _ . -; "
                        "several separated by commas)")
    if time is not None:
        try:
            parse_time(time)
        except UserError as e:
            problems.append(f"--time {time}: {e.problems[0]}")
    return problems


def check_local_flags(nodes: int | None, gpus_per_node: int | None, partition: str | None,
                      time: str | None) -> list[str]:
    """A local launch: the Slurm-only flags would be ignored, so they are refused rather than dropped."""
    problems = check_slurm_flags(nodes, gpus_per_node, None, None)
    for flag, value in (("--partition", partition), ("--time", time)):
        if value is not None:
            problems.append(f"{flag} {value}: applies to Slurm jobs only, and this launch runs locally; add "
                            "--slurm (or --nodes N > 1) to submit it, or drop the flag")
    return problems


def check_slurm(cfg: Config, run_dir: Path, nodes: int | None, gpus_per_node: int | None,
                partition: str | None, time: str | None, submit: bool) -> list[str]:
    """The Slurm flags (``--nodes``, ``--gpus-per-node``, ``--time``, ``--partition``) against the config
    (the time limit must leave room for the pre-timeout lead) and, when the job is to be submitted, the sbatch
    client and the partition's existence on the cluster."""
    from launch import slurm as sl

    problems = check_slurm_flags(nodes, gpus_per_node, partition, time)
    flag = f"--time {time}" if time is not None else f"launch.time={cfg.launch.time}"
    if not any(p.startswith(flag) for p in problems):
        try:  # the limit against its pre-timeout lead, as the renderer checks it (bad counts left to the config's)
            sl.describe(cfg, run_dir, nodes if nodes and nodes > 0 else None,
                        gpus_per_node if gpus_per_node and gpus_per_node > 0 else None, None, time)
        except UserError as e:
            problems += [f"{flag}: {p}" for p in e.problems]
    if submit and not problems and (partition or cfg.launch.partition):
        known = _partitions()
        wanted = (partition or cfg.launch.partition).split(",")
        missing = [w for w in wanted if known is not None and w not in known]
        if missing:
            flag = "--partition" if partition else "launch.partition"
            problems.append(f"{flag} {','.join(missing)}: no such partition on this cluster; valid: {', '.join(known)}")
    if submit and not shutil.which("sbatch"):
        n = nodes or cfg.launch.nodes
        problems.append(f"--nodes {n} needs Slurm, but sbatch is not on PATH; run on a Slurm login node, or "
                        "locally without --nodes/--slurm (launch.local_ranks sets the local ranks)")
    return problems
