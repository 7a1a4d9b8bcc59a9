"""The `orchestrator` command line: thin subcommands over the project's modules.

Bad input anywhere ends in exit code 2 with one line on stderr per problem and no traceback: every command raises
UserError (``orchestrator.errors``), and ``main`` is the one place that prints it (an OSError on a path becomes
one too). Commands that start work check everything first (``orchestrator.preflight``) and report every problem
at once, before any rank, process, file or folder is made.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from orchestrator.errors import (
    UserError,
    clear_bad_input,
    os_error_line,
    report_bad_input,
    reported_bad_input,
)

if TYPE_CHECKING:
    from launch.runlock import RunLock

# DeepSpeed picks its accelerator at import: named here from the device nodes, without importing torch (any
# /dev/nvidiaN: a container given one GPU of a host may see /dev/nvidia3 alone)
os.environ.setdefault("DS_ACCELERATOR", "cuda" if any(Path("/dev").glob("nvidia[0-9]*")) else "cpu")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message otherwise)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_config_args(p: argparse.ArgumentParser, run_dir: bool = True) -> None:
    p.add_argument("--config", default=None, help="preset name or YAML path (default: digits)")
    if run_dir:
        p.add_argument("--run-dir", default=None, help="where the run lives (default: runs/<preset>-<time>)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.epochs=3 model.T=2")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="orchestrator", description="Train densely additive spiking ResNets (DANet) at scale.")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("launch", help="run a training job: locally (default) or on Slurm (--nodes/--slurm)")
    _add_config_args(p)
    p.add_argument("--nodes", type=int, default=None, help="Slurm nodes (> 1 implies Slurm)")
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None, help="Slurm time limit, e.g. 2-00:00:00")
    p.add_argument("--slurm", action="store_true", help="submit to Slurm even with one node")
    p.add_argument("--dry-run", action="store_true", help="print the plan (and sbatch script) only")

    p = sub.add_parser("train", help="per-rank training entry (run by launch, srun or sbatch)")
    _add_config_args(p)

    p = sub.add_parser("config", help="configuration")
    csub = p.add_subparsers(dest="sub", metavar="SUB", parser_class=_Parser)
    s = csub.add_parser("show", help="print the resolved config as YAML")
    s.add_argument("name", nargs="?", default=None)
    s.add_argument("overrides", nargs="*")

    p = sub.add_parser("models", help="model registry")
    msub = p.add_subparsers(dest="sub", metavar="SUB", parser_class=_Parser)
    s = msub.add_parser("list", help="name, connection, depth, params, GFLOPs per time step at 224")
    s.add_argument("--json", action="store_true")

    p = sub.add_parser("data", help="FFRecord datasets")
    dsub = p.add_subparsers(dest="sub", metavar="SUB", parser_class=_Parser)
    s = dsub.add_parser("convert", help="ImageNet folder layout -> FFRecord dataset")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    s.add_argument("--parts", type=int, default=0, help="parts per split (0 = about 1 GiB each)")
    s.add_argument("--strict", action="store_true", help="fail on the first unreadable image")
    s.add_argument("--val-labels", default=None, help="labels file for a flat val/ folder")
    s = dsub.add_parser("verify", help="check every CRC and decode a sample per part")
    s.add_argument("dst")
    s = dsub.add_parser("inspect", help="counts and classes")
    s.add_argument("dst")

    p = sub.add_parser("bench", help="benchmarks (JSON results)")
    bsub = p.add_subparsers(dest="sub", metavar="SUB", parser_class=_Parser)
    s = bsub.add_parser("models", help="ours vs SpikingJelly: sew_resnet50 / danet50 throughput, LIF kernels")
    s.add_argument("--rounds", type=int, default=None, help="timed rounds, one step of each model per round "
                                                            "(median reported; default models.bench.ROUNDS)")
    s.add_argument("--json", default=None)
    s = bsub.add_parser("memory", help="peak memory and step time per checkpointing policy")
    s.add_argument("--model", default="danet152")
    s.add_argument("--T", type=int, default=4)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--res", type=int, default=112)
    s.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    s.add_argument("--configs", default=None, help="POLICY[/STORAGE],... (default: none, time, time/bit, "
                                                   "block, block_time/bit)")
    s.add_argument("--no-spikingjelly", action="store_true", help="skip the SpikingJelly memopt rows")
    s.add_argument("--json", default=None)
    s = bsub.add_parser("data", help="FFRecord + DALI vs folder + PIL DataLoader")
    s.add_argument("--json", default=None)

    p = sub.add_parser("plan", help="per-GPU memory per checkpointing policy and the largest micro-batch")
    _add_config_args(p, run_dir=False)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")

    p = sub.add_parser("runs", help="MLflow runs")
    rsub = p.add_subparsers(dest="sub", metavar="SUB", parser_class=_Parser)
    s = rsub.add_parser("list")
    s.add_argument("--experiment", default=None)
    s = rsub.add_parser("compare")
    s.add_argument("run_ids", nargs="+")
    s.add_argument("--out", default=None, metavar="DIR",
                   help="also write the comparison figures (PNG: val top-1 against depth per connection, or per "
                        "varying param; val top-1 curves) into DIR")
    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 against the same store")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--experiment", default=None,
                   help="experiment whose runs table the printed URL opens (default: the newest run's)")

    p = sub.add_parser("sweep", help="a grid of runs (key=a,b,c is an axis): locally one after another, or ONE "
                                     "Slurm job array (--nodes); `sweep status DIR` shows it")
    p.add_argument("--config", default=None, help="preset name or YAML path (default: digits)")
    p.add_argument("--run-dir", default=None, help="the sweep's folder: sweep.json and one run dir per run "
                                                   "(default: runs/sweep-<preset>-<time>); relaunch with the same")
    p.add_argument("overrides", nargs="*", help="key=value for every run, key=a,b,c for an axis (brackets keep a "
                                                "list: optim.betas=[0.9,0.99]); or: status DIR")
    p.add_argument("--nodes", type=int, default=None, help="Slurm nodes per run: submit one job array, a task per run")
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None, help="Slurm time limit of each run, e.g. 2-00:00:00")
    p.add_argument("--max-parallel", type=int, default=None, help="array tasks running at once (sbatch --array %%K)")
    p.add_argument("--dry-run", action="store_true", help="list the runs (names and overrides); write nothing")

    p = sub.add_parser("status", help="Slurm jobs of this project")
    p.add_argument("job", nargs="?")
    p = sub.add_parser("cancel", help="cancel a Slurm job")
    p.add_argument("job")
    p = sub.add_parser("logs", help="a Slurm job's log")
    p.add_argument("job")
    p.add_argument("-f", "--follow", action="store_true")
    return ap


def _split_overrides(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """Overrides may sit anywhere on the line; anything else unrecognised is an error."""
    bad = [e for e in extra if e.startswith("-") or "=" not in e]
    if bad:
        raise UserError(*[f"unrecognized argument '{b}' (overrides look like key=value; see --help)" for b in bad])
    return list(getattr(args, "overrides", []) or []) + extra


def _default_run_dir(preset: str) -> Path:
    return Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_launch(args, overrides: list[str]) -> int:
    from orchestrator import preflight as pf
    from orchestrator.config.load import resolve_config

    # One validation pass: the config, the flags, the run dir, the data, a resume; every problem at once.
    cfg, problems = resolve_config(args.config, overrides)
    if cfg is None:  # no config to check the rest against: the flags alone
        problems += pf.check_slurm_flags(args.nodes, args.gpus_per_node, args.partition, args.time)
        if args.run_dir and not args.dry_run:
            problems += pf.check_writable_dir(args.run_dir, "--run-dir")
        pf.raise_if(problems)
    slurm = args.slurm or (args.nodes or 1) > 1 or (cfg.launch.mode == "slurm" and args.nodes is not None)
    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(cfg.preset)
    config_arg = str(Path(args.config).resolve()) if args.config and Path(args.config).is_file() else (args.config or "digits")
    if slurm:
        nodes = args.nodes or cfg.launch.nodes
        gpn = args.gpus_per_node or cfg.launch.gpus_per_node
        problems += pf.check_slurm(cfg, run_dir, args.nodes, args.gpus_per_node, args.partition, args.time,
                                   submit=not args.dry_run)
        problems += pf.check_batch(cfg, max(nodes, 1) * max(gpn, 1))
        if not args.dry_run:  # what the job will meet; a dry run may describe a cluster from anywhere
            problems += pf.check_writable_dir(run_dir, "--run-dir")
            if not os.environ.get("DATA_ROOT"):  # set: the job script points data.root at it on the nodes
                problems += pf.check_dataset(cfg)
            problems += pf.check_resume(cfg, run_dir, max(nodes, 1) * max(gpn, 1))
            problems += pf.check_run_dir_free(run_dir)  # a job running there now: the batch script would refuse
        pf.raise_if(problems)
        from launch import slurm as sl

        if args.dry_run:
            from orchestrator.plan import describe

            # The recipe and its arithmetic go to stderr: stdout stays exactly the sbatch script.
            print(describe(cfg, nodes=nodes, gpus_per_node=gpn), file=sys.stderr)
            print(sl.render_sbatch(cfg, run_dir.resolve(), config_arg, overrides, nodes=nodes, gpus_per_node=gpn,
                                   partition=args.partition, time=args.time))
            return 0
        return sl.launch(cfg, run_dir.resolve(), config_arg, overrides, nodes=nodes, gpus_per_node=gpn,
                         partition=args.partition, time=args.time)
    from launch.local import local_rank_count

    nprocs = local_rank_count(cfg.launch.local_ranks, cfg.train.device)  # one per GPU, else the CPU ranks
    problems += pf.check_local_flags(args.nodes, args.gpus_per_node, args.partition, args.time)
    problems += pf.check_batch(cfg, nprocs)
    if not args.dry_run:
        problems += pf.check_writable_dir(run_dir, "--run-dir")
        problems += pf.check_device(cfg, nprocs)
        problems += pf.check_dataset(cfg, verify_files=True)  # data.verify: headers / CRCs before any rank
        problems += pf.check_resume(cfg, run_dir, nprocs, pf.local_device(cfg))
        problems += pf.check_run_dir_free(run_dir)
    pf.raise_if(problems)
    if args.dry_run:
        from orchestrator.plan import describe

        if cfg.launch.mode == "slurm":  # a cluster preset: describe the allocation it is made for
            print(describe(cfg, nodes=cfg.launch.nodes, gpus_per_node=cfg.launch.gpus_per_node))
        else:
            print(describe(cfg, nodes=1, gpus_per_node=nprocs))
        return 0
    from launch.local import run_local
    from orchestrator.train.worker import prepare_dataset

    # Held by the launcher and handed to its ranks (launch/runlock.py); None on a file system without flock.
    with _take_run_lock(run_dir) or contextlib.nullcontext() as lock:
        prepare_dataset(cfg)  # the digits set is built once here, not by every rank at once
        print(f"launch: {nprocs} local ranks, run dir {run_dir}", file=sys.stderr)
        clear_bad_input(run_dir)
        code = run_local(["--config", config_arg, "--run-dir", str(run_dir), *overrides], nprocs, run_dir,
                         cfg.launch.rank_timeout_s, lock_fd=lock.fd if lock else None)
    _print_summary(run_dir)
    if code == 2:  # a rank met bad input mid-run (e.g. a corrupt record): its line is the last word
        error = reported_bad_input(run_dir)
        if error:
            raise UserError(error)
    return code


def _take_run_lock(run_dir: str | os.PathLike) -> RunLock | None:
    """``run_dir``'s lock (None: a file system without flock); a job taking it since the preflight is bad input."""
    from launch import runlock

    try:
        return runlock.acquire(run_dir)
    except runlock.RunDirBusy as e:
        raise UserError(str(e)) from None


def _print_summary(run_dir: Path) -> None:
    p = run_dir / "summary.json"
    if not p.is_file():
        print(f"launch: no summary at {p} (the job failed before training; see the log above)", file=sys.stderr)
        return
    s = json.loads(p.read_text())
    keys = ["status", "val_top1", "val_top5", "epochs", "steps", "final_train_loss", "world_size",
            "images_per_sec", "restarts", "mlflow_run_id", "mlflow_tracking_uri", "checkpoint_dir"]
    print("\nsummary (" + str(p) + ")")
    for k in keys:
        v = s.get(k)
        print(f"  {k:<20} {v:.4f}" if isinstance(v, float) else f"  {k:<20} {v}")
    uri = s.get("mlflow_tracking_uri") or ""
    if uri.startswith("sqlite"):
        print(f"  open the run: mlflow ui --backend-store-uri {uri}   (or: orchestrator ui)")


def cmd_train(args, overrides: list[str]) -> int:
    from orchestrator.train.signals import StopRequests

    stops = StopRequests()  # before torch/DeepSpeed import: Slurm's USR2 may arrive during start-up
    from launch import runlock
    from launch.env import rank_info
    from launch.local import follow_launcher

    follow_launcher()  # a rank of `orchestrator launch` ends with it, even a SIGKILLed one
    from orchestrator import preflight as pf
    from orchestrator.config.load import resolve_config

    run_dir = args.run_dir or os.environ.get("RUN_DIR")
    cfg, problems = resolve_config(args.config, overrides)
    if not run_dir:
        problems.append("orchestrator train needs --run-dir DIR (or RUN_DIR in the environment)")
    info = rank_info()
    own_lock = bool(run_dir) and runlock.taken_by_rank(run_dir, info)
    if cfg is not None:  # this rank's share of the launcher's checks, before anything is written
        if run_dir:
            problems += pf.check_writable_dir(run_dir, "--run-dir")
        problems += pf.check_batch(cfg, info.world_size)
        problems += pf.check_device(cfg, info.local_world_size)
        problems += pf.check_dataset(cfg)
        if run_dir:
            problems += pf.check_resume(cfg, run_dir, info.world_size, pf.local_device(cfg))
            if own_lock:
                problems += pf.check_run_dir_free(run_dir)
    pf.raise_if(problems)
    # Held to the process's end: nothing closes its descriptor (a RunLock has no finalizer).
    lock = _take_run_lock(run_dir) if own_lock else None  # noqa: F841
    from orchestrator.train.worker import run

    try:
        code = run(args.config, run_dir, overrides, stops)
    except UserError as e:  # bad input met after the checks: the launcher reports the line(s)
        report_bad_input(run_dir, str(e))
        raise
    exit_rank(code)


def exit_rank(code: int) -> NoReturn:
    """End a rank whose work is done: run() has flushed and ended the tracker run, written its files and left the
    process group, so what is left is the interpreter's teardown of native objects (DALI pipelines, torch, gloo),
    measured at 2-3 s per rank on CPU, on every launch, requeue and sweep task. Flush and leave without it."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)


def cmd_config(args, overrides: list[str]) -> int:
    from orchestrator.config import load_config, to_yaml

    if args.sub != "show":
        raise UserError("usage: orchestrator config show [NAME] [key=value ...]")
    name = args.name
    if name and "=" in name:  # `config show train.epochs=3`: no name, only overrides
        overrides, name = [name, *overrides], None
    print(to_yaml(load_config(name, overrides)), end="")
    return 0


def cmd_models(args, overrides) -> int:
    from models.registry import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'name':<20} {'connection':<16} {'depth':>5} {'params (M)':>11} {'GFLOPs/step@224':>16}")
    for r in rows:
        print(f"{r['name']:<20} {r['connection']:<16} {r['depth']:>5} {r['params_m']:>11.2f} {r['gflops_224']:>16.2f}")
    return 0


def cmd_data(args, overrides) -> int:
    from orchestrator.data import convert as conv

    if args.sub in ("verify", "inspect") and not Path(args.dst).is_dir():
        raise UserError(f"DST {args.dst}: no such dataset folder (expected meta.json, train.ffr/, val.ffr/ made by "
                        "`orchestrator data convert`)")
    if args.sub == "convert":
        from orchestrator import preflight as pf

        problems = [f"--workers {args.workers}: must be >= 1"] if args.workers < 1 else []
        if args.parts < 0:
            problems.append(f"--parts {args.parts}: must be >= 0 (0 = about 1 GiB per part)")
        if not Path(args.src).is_dir():
            problems.append(f"SRC {args.src}: no such folder (expected SRC/train/<class>/<images>, ImageNet layout)")
        if args.val_labels is not None and not Path(args.val_labels).is_file():
            problems.append(f"--val-labels {args.val_labels}: no such file (expected '<file name> <class>' lines)")
        pf.raise_if(problems + pf.check_writable_dir(args.dst, "DST"))
        result = conv.convert(args.src, args.dst, workers=args.workers, parts=args.parts, strict=args.strict,
                              val_labels=args.val_labels)
        print(json.dumps(result, indent=1))
        return 0
    if args.sub == "verify":
        bad = conv.verify(args.dst)
        for b in bad:
            print(b)
        print(f"verify: {'OK' if not bad else f'{len(bad)} bad records'} ({args.dst})", file=sys.stderr)
        return 1 if bad else 0
    if args.sub == "inspect":
        print(json.dumps(conv.inspect(args.dst), indent=1))
        return 0
    raise UserError("usage: orchestrator data {convert,verify,inspect} ...")


def _write_json(result: dict, path: str | None) -> None:
    text = json.dumps(result, indent=1)
    if path:
        Path(path).write_text(text)
    print(text)


def cmd_bench(args, overrides) -> int:
    from orchestrator import preflight as pf

    problems = pf.check_output_file(getattr(args, "json", None), "--json")  # checked before the work, not after
    if args.sub == "models" and args.rounds is not None and args.rounds <= 0:
        problems.append(f"--rounds {args.rounds}: must be > 0")
    if args.sub == "memory":
        from models import REGISTRY
        from orchestrator.bench_memory import parse_configs

        if args.model not in REGISTRY:
            problems.append(f"--model {args.model}: unknown model; valid names: {', '.join(REGISTRY)}")
        problems += [f"--{k} {v}: must be > 0" for k, v in (("T", args.T), ("batch", args.batch), ("res", args.res),
                                                              ("steps", args.steps)) if v <= 0]
        try:
            parse_configs(args.configs)
        except UserError as e:
            problems += e.problems
    pf.raise_if(problems)
    if args.sub == "models":
        from models.bench import ROUNDS, run_models_bench

        _write_json(run_models_bench(args.json, repeats=args.rounds or ROUNDS), args.json)
    elif args.sub == "memory":
        from orchestrator.bench_memory import parse_configs, run_memory_bench

        configs = parse_configs(args.configs)
        _write_json(run_memory_bench(args.model, args.T, args.batch, args.res, args.steps, configs,
                                     spikingjelly=not args.no_spikingjelly), args.json)
    elif args.sub == "data":
        from orchestrator.data.bench import run_data_bench

        _write_json(run_data_bench(args.json), args.json)
    else:
        raise UserError("usage: orchestrator bench {models,memory,data} [--json PATH]")
    return 0


def cmd_plan(args, overrides) -> int:
    from orchestrator import preflight as pf
    from orchestrator.config.load import resolve_config

    cfg, problems = resolve_config(args.config, overrides)
    if not args.gpu_mem > 0:
        problems.append(f"--gpu-mem {args.gpu_mem}: must be > 0 (GiB per GPU)")
    if cfg is not None:
        problems += pf.check_batch(cfg, cfg.launch.nodes * cfg.launch.gpus_per_node)
    pf.raise_if(problems)
    from orchestrator.plan import plan_memory

    print(plan_memory(cfg, args.gpu_mem))
    return 0


def cmd_runs(args, overrides) -> int:
    from orchestrator.tracking import cli as tcli

    if args.sub == "list":
        print(tcli.runs_list(args.experiment, None))
    elif args.sub == "compare":
        print(tcli.runs_compare(args.run_ids, None, out=args.out))
    else:
        raise UserError("usage: orchestrator runs {list,compare} ...")
    return 0


def cmd_ui(args, overrides) -> int:
    from orchestrator import preflight as pf
    from orchestrator.tracking import cli as tcli
    from orchestrator.tracking.util import resolve_store

    problems = [] if 1 <= args.port <= 65535 else [f"--port {args.port}: must be a TCP port, 1..65535"]
    uri = resolve_store(None)[0]
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme == "sqlite":  # the server creates the store if it is missing: its folder must take it
        problems += pf.check_output_file(uri[len("sqlite:///"):], "MLflow store")
    elif scheme not in ("http", "https", "postgresql", "mysql", "mssql"):
        problems.append(f"MLFLOW_TRACKING_URI={uri}: not a store `orchestrator ui` can serve; valid: "
                        "sqlite:///PATH/mlflow.db, a database URI, or http(s)://HOST:PORT (a server shows its own UI)")
    pf.raise_if(problems)
    tcli.ui(None, args.port, experiment=args.experiment)
    return 0


def cmd_sweep(args, overrides: list[str]) -> int:
    from orchestrator import sweep

    if overrides[:1] == ["status"]:
        if len(overrides) != 2:
            raise UserError("usage: orchestrator sweep status DIR")
        print(sweep.show(overrides[1]))
        return 0

    def launch_one(run_dir: Path, run_overrides: list[str]) -> int:  # each local run: `orchestrator launch`'s path
        one = argparse.Namespace(config=args.config, run_dir=str(run_dir), nodes=None, gpus_per_node=None,
                                 partition=None, time=None, slurm=False, dry_run=False)
        return cmd_launch(one, run_overrides)

    return sweep.launch_sweep(args.config, args.run_dir, overrides, launch_one, nodes=args.nodes,
                              gpus_per_node=args.gpus_per_node, partition=args.partition, time_limit=args.time,
                              max_parallel=args.max_parallel, dry_run=args.dry_run)


def cmd_slurm(args, overrides) -> int:
    import re

    from launch import slurm as sl

    problems = []
    if args.job is not None and not re.fullmatch(r"\d+(_\d+)?", args.job):
        problems.append(f"'{args.job}' is not a Slurm job id (digits, or ARRAYJOB_TASK)")
    tool = {"status": "squeue" if args.job is None else "scontrol", "cancel": "scancel"}.get(args.cmd, "scontrol")
    if not shutil.which(tool):
        problems.append(f"{tool} is not on PATH: this machine has no Slurm client (run on a login node)")
    if problems:
        raise UserError(*problems)
    if args.cmd == "status":
        print(sl.status(args.job))
    elif args.cmd == "cancel":
        sl.cancel(args.job)
    else:
        sl.logs(args.job, args.follow)
    return 0


COMMANDS = {"launch": cmd_launch, "train": cmd_train, "config": cmd_config, "models": cmd_models,
            "data": cmd_data, "bench": cmd_bench, "plan": cmd_plan, "runs": cmd_runs, "ui": cmd_ui,
            "status": cmd_slurm, "cancel": cmd_slurm, "logs": cmd_slurm, "sweep": cmd_sweep}


def _bad_input(err: UserError) -> int:
    """The one place a UserError becomes output: one line per problem on stderr, exit code 2."""
    for line in err.problems:
        print(f"orchestrator: error: {line}", file=sys.stderr)
    sys.stderr.flush()
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["launch"]  # the main job: `orchestrator` alone runs the default preset locally
    args, extra = parser.parse_known_args(argv)
    if args.cmd is None:
        parser.print_help()
        return 2
    try:
        overrides = _split_overrides(args, extra)
        return COMMANDS[args.cmd](args, overrides)
    except UserError as e:
        return _bad_input(e)
    except OSError as e:  # on a path the user gave (or one inside it): bad input, one line
        line = os_error_line(e)
        if line is None:  # not about a path (a socket, a pipe): a failure, with its traceback
            raise
        return _bad_input(UserError(line))
    except KeyboardInterrupt:
        print("orchestrator: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
