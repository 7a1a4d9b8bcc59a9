"""The `orchestrator` command line: thin subcommands over the project's modules.

Bad input anywhere ends in one line on stderr and exit code 2 (UserError); nothing is written before the
config and the environment have been checked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from orchestrator.errors import UserError, clear_bad_input, report_bad_input, reported_bad_input

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not Path("/dev/nvidia0").exists() else "cuda")


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
        raise UserError(f"unrecognized argument '{bad[0]}' (overrides look like key=value; see --help)")
    return list(getattr(args, "overrides", []) or []) + extra


def _default_run_dir(preset: str) -> Path:
    return Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_launch(args, overrides: list[str]) -> int:
    from orchestrator.config import load_config
    from orchestrator.train.engine import batch_plan

    cfg = load_config(args.config, overrides)
    slurm = args.slurm or (args.nodes or 1) > 1 or (cfg.launch.mode == "slurm" and args.nodes is not None)
    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(cfg.preset)
    config_arg = str(Path(args.config).resolve()) if args.config and Path(args.config).is_file() else (args.config or "digits")
    if slurm:
        nodes = args.nodes or cfg.launch.nodes
        gpn = args.gpus_per_node or cfg.launch.gpus_per_node
        batch_plan(cfg, nodes * gpn)
        if not args.dry_run and not shutil.which("sbatch"):
            raise UserError(f"--nodes {nodes} needs Slurm, but sbatch is not on PATH; run on a Slurm login node, "
                            "or locally without --nodes/--slurm (launch.local_ranks sets the local ranks)")
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
    nprocs = cfg.launch.local_ranks
    batch_plan(cfg, nprocs)
    if args.dry_run:
        from orchestrator.plan import describe

        if cfg.launch.mode == "slurm":  # a cluster preset: describe the allocation it is made for
            print(describe(cfg, nodes=cfg.launch.nodes, gpus_per_node=cfg.launch.gpus_per_node))
        else:
            print(describe(cfg, nodes=1, gpus_per_node=nprocs))
        return 0
    _check_run_dir(run_dir)
    from orchestrator.train.worker import prepare_dataset

    prepare_dataset(cfg, check_files=True)  # built once here, not by every rank at once; data.verify
    from launch.local import run_local

    print(f"launch: {nprocs} local ranks, run dir {run_dir}", file=sys.stderr)
    clear_bad_input(run_dir)
    code = run_local(["--config", config_arg, "--run-dir", str(run_dir), *overrides], nprocs, run_dir,
                     cfg.launch.rank_timeout_s)
    _print_summary(run_dir)
    if code == 2:  # a rank met bad input mid-run (e.g. a corrupt record): its one line is the last word
        error = reported_bad_input(run_dir)
        if error:
            raise UserError(error)
    return code


def _check_run_dir(run_dir: Path) -> None:
    """The run dir (or its nearest existing parent) must be writable; checked before anything is written."""
    p = run_dir.resolve()
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"run directory {run_dir} is not writable ({p} is not a writable folder); "
                        "pass --run-dir to a writable folder")


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
    from orchestrator.train.worker import run

    run_dir = args.run_dir or os.environ.get("RUN_DIR")
    if not run_dir:
        raise UserError("orchestrator train needs --run-dir DIR (or RUN_DIR in the environment)")
    try:
        return run(args.config, run_dir, overrides, stops)
    except UserError as e:  # bad input before training: the launcher reports the line
        report_bad_input(run_dir, str(e))
        raise


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

    if args.sub == "convert":
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
    if args.sub == "models":
        from models.bench import run_models_bench

        _write_json(run_models_bench(args.json), args.json)
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
    from orchestrator.config import load_config
    from orchestrator.plan import plan_memory

    cfg = load_config(args.config, overrides)
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
    from orchestrator.tracking import cli as tcli

    tcli.ui(None, args.port, experiment=args.experiment)
    return 0


def cmd_slurm(args, overrides) -> int:
    from launch import slurm as sl

    if args.cmd == "status":
        print(sl.status(args.job))
    elif args.cmd == "cancel":
        sl.cancel(args.job)
    else:
        sl.logs(args.job, args.follow)
    return 0


COMMANDS = {"launch": cmd_launch, "train": cmd_train, "config": cmd_config, "models": cmd_models,
            "data": cmd_data, "bench": cmd_bench, "plan": cmd_plan, "runs": cmd_runs, "ui": cmd_ui,
            "status": cmd_slurm, "cancel": cmd_slurm, "logs": cmd_slurm}


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
        print(f"orchestrator: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("orchestrator: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
