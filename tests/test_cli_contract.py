"""The bad-input contract of every command, through the real CLI (the installed ``orchestrator`` script):
exit code 2, one stderr line per problem, each naming its key or flag, the value and what would be valid, no
traceback, nothing on stdout, and nothing written (the working directory, which holds the run directory, is the
same file tree before and after).

Several problems go into one invocation where a command can meet them together, which also holds "every problem
at once"; the issue's two reported symptoms are single-problem cases (a single line). The cases run three at a
time in one fixture (each CLI start imports torch), and each test asserts on its own case.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("orchestrator"))  # the console script of this venv
DIGITS = REPO / ".cache" / "data" / "digits"  # the real bundled dataset, shared with the other tests


@dataclass
class Case:
    args: list[str]
    # one tuple per expected stderr line: every substring of a tuple must be in that same line
    expect: list[tuple[str, ...]]
    env: dict[str, str] = field(default_factory=dict)
    no_slurm: bool = False  # PATH without any Slurm client
    setup: Callable[[Path], None] | None = None


def _bad_yaml(cwd: Path) -> None:
    (cwd / "bad.yaml").write_text("model:\n  T: 2\n  width: [8,\ntrain:\n  epochs: 1\n")


def _bad_keys(cwd: Path) -> None:
    (cwd / "keys.yaml").write_text("model:\n  T: abc\ntrain:\n  epochz: 3\noptim:\n  lr: -0.1\n")


def _blocker(cwd: Path) -> None:
    (cwd / "blocker").write_text("a file where the run dir's parent would be\n")


def _not_a_dataset(cwd: Path) -> None:
    (cwd / "notds").mkdir()
    (cwd / "notds" / "readme.txt").write_text("no meta.json here\n")


def _dangling_part(cwd: Path) -> None:
    ds = cwd / "ds"
    (ds / "train.ffr").mkdir(parents=True)
    (ds / "val.ffr").mkdir()
    (ds / "meta.json").write_text('{"num_classes": 10, "counts": {"train": 1, "val": 0}}\n')
    (ds / "train.ffr" / "PART_00000.ffr").symlink_to(cwd / "gone.ffr")


def _checkpointed_run(cwd: Path) -> None:
    """A run dir as CheckpointManager leaves it after a 2-rank ZeRO-1 run of digits at width 16: LATEST naming a
    complete tag, index.json with the world size, and the run's config.yaml. (A real 2-rank run costs ~50 s here;
    test_reliability resumes real checkpoints, this case checks the pre-start refusal.)"""
    from orchestrator.config import load_config, to_yaml

    run, tag = cwd / "run", "step00000004"
    (run / "checkpoints" / tag).mkdir(parents=True)
    (run / "checkpoints" / tag / "COMPLETE").write_text("ok\n")
    (run / "checkpoints" / "LATEST").write_text(f"{tag}\n")
    (run / "checkpoints" / "index.json").write_text(f'{{"{tag}": {{"step": 4, "val_top1": null, "world_size": 2}}}}')
    (run / "config.yaml").write_text(to_yaml(load_config("digits", ["deepspeed.zero_stage=1",
                                                                    f"data.root={DIGITS}"])))


def _mid_epoch_run(cwd: Path) -> None:
    """A run dir whose latest checkpoint stopped one micro-batch of 16 into an epoch on 2 ranks (rank 0's state
    file as CheckpointManager writes it): 32 samples in, which is no batch boundary for 2 ranks x 32."""
    import torch

    from orchestrator.config import load_config, to_yaml

    run, tag = cwd / "run", "step00000001"
    (run / "checkpoints" / tag).mkdir(parents=True)
    (run / "checkpoints" / tag / "COMPLETE").write_text("ok\n")
    (run / "checkpoints" / "LATEST").write_text(f"{tag}\n")
    (run / "checkpoints" / "index.json").write_text(f'{{"{tag}": {{"step": 1, "val_top1": null, "world_size": 2}}}}')
    torch.save({"loop": {"epoch": 0, "batch_in_epoch": 1, "step": 1, "layout": [2, 16]}},
               run / "checkpoints" / tag / "rank0.pt")
    (run / "config.yaml").write_text(to_yaml(load_config("digits", [f"data.root={DIGITS}"])))


CASES: dict[str, Case] = {
    # the two symptoms, as reported: one line each, before any rank starts, no run dir left behind
    "launch_unknown_model": Case(["launch", "--config", "digits", "model.name=danet999"],
                                 [("'model.name'", "danet999", "danet18", "sew_resnet50")]),
    "launch_run_dir_not_creatable": Case(["launch", "--run-dir", "/proc/x/run"],
                                         [("--run-dir /proc/x/run", "not writable")]),
    # every problem at once, config and environment together: the registry, enums (with a close match), ranges,
    # unknown keys, types, then the run dir, the launcher's flags, the dataset path and the batch arithmetic
    "launch_local_every_problem": Case(
        ["launch", "--run-dir", "blocker/run", "--nodes", "0", "--time", "1:00:00", "--partition", "gpu",
         "model.name=danet999", "model.neuron.surrogate=atann", "train.epochs=-1", "optim.lrr=1", "model.T=abc",
         "data.image_size=0", "deepspeed.zero_stage=4", "train.label_smoothing=1.5", "data.name=imagenet",
         "data.root=nodata", "train.global_batch_size=63", "model.neuron.type=plif", "model.neuron.tau=1"],
        [("'model.name'", "danet999", "danet18"), ("'model.neuron.surrogate'", "atann", "Did you mean 'atan'"),
         ("'train.epochs' must be >= 0", "-1"), ("'optim.lrr'", "Did you mean 'optim.lr'"),
         ("wrong type for 'model.T'", "'abc'", "int"), ("'data.image_size' must be > 0", "0"),
         ("'deepspeed.zero_stage'", "4", "[0, 1, 2, 3]"), ("'train.label_smoothing'", "1.5", "[0, 1)"),
         ("--run-dir blocker/run", "not writable", "is a file"), ("--nodes 0", ">= 1"),
         ("--time 1:00:00", "Slurm jobs only"), ("--partition gpu", "Slurm jobs only"),
         ("data.root=nodata", "no such folder"), ("train.global_batch_size=63", "world size 2", "multiple of 2"),
         ("'model.neuron.tau' must be > 1 for a LIF/PLIF neuron", "1.0")],
        setup=_blocker),
    # a Slurm launch with no Slurm client on PATH: its flags, a real dataset with other classes, and a run dir
    # whose checkpoint this config and world size cannot resume
    "launch_slurm_dataset_resume": Case(
        ["launch", "--nodes", "4", "--gpus-per-node", "0", "--time", "00:00:10", "--partition", "bad name",
         "--run-dir", "run", f"data.root={DIGITS}", "data.name=mine", "model.num_classes=7", "model.width=32",
         "deepspeed.zero_stage=1"],
        [("--gpus-per-node 0", ">= 1"), ("--partition 'bad name'", "partition name"),
         ("--time 00:00:10", "too short", "00:02:00"), ("sbatch is not on PATH",),
         ("has 10 classes", "model.num_classes=7", "set model.num_classes=10"),
         ("--run-dir run", "cannot be resumed", "model.width=16 there, 32 here", "model.num_classes=10 there, 7"),
         ("written by 2 ranks with ZeRO stage 1", "resume it with 2 ranks")],
        no_slurm=True, setup=_checkpointed_run),
    # the engine's arrangement, checked before any rank: an optimizer ZeRO cannot partition, beside the batch
    "launch_engine_arrangement": Case(["launch", "--run-dir", "run", "optim.name=lamb", "deepspeed.zero_stage=1",
                                       "train.global_batch_size=63"],
                                      [("optim.name=lamb with deepspeed.zero_stage=1", "zero_stage=0"),
                                       ("train.global_batch_size=63", "world size 2")]),
    # a mid-epoch position the new layout cannot continue from exactly: refused before any rank starts
    "launch_resume_position": Case(["launch", "--run-dir", "run", f"data.root={DIGITS}"],
                                   [("--run-dir run", "cannot resume mid-epoch with 2 ranks x micro-batch 32",
                                     "not a batch boundary")], setup=_mid_epoch_run),
    "launch_flag_type": Case(["launch", "--nodes", "two"], [("--nodes", "invalid int value", "'two'")]),
    # the per-rank entry: its own run dir requirement, dataset, enums and the world size from the environment
    "train_rank_checks": Case(
        ["train", "data.name=imagenet", "data.root=notds", "model.connection=foo", "train.global_batch_size=7"],
        [("needs --run-dir",), ("notds", "meta.json is missing"), ("'model.connection'", "foo", "sew_add"),
         ("train.global_batch_size=7", "world size 2")],
        env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, setup=_not_a_dataset),
    # config files: a syntax error by file and line; bad keys and values by file and line, with the flags'
    "config_show_yaml_syntax": Case(["config", "show", "bad.yaml"], [("bad.yaml:5", "not valid YAML", "flow sequence at line 3")],
                                    setup=_bad_yaml),
    "config_show_unknown_preset": Case(["config", "show", "digitz", "model.T=x"],
                                       [("unknown preset 'digitz'", "digits"), ("wrong type for 'model.T'", "'x'")]),
    "plan_config_file": Case(
        ["plan", "--config", "keys.yaml", "--gpu-mem", "0", "optim.name=adam", "launch.local_ranks=0"],
        [("keys.yaml:2", "wrong type for 'model.T'", "'abc'"), ("keys.yaml:4", "'train.epochz'", "'train.epochs'"),
         ("keys.yaml:6", "'optim.lr' must be > 0"), ("'optim.name'", "adam", "[sgd, adamw, lamb]"),
         ("'launch.local_ranks' must be > 0", "0"), ("--gpu-mem 0", "> 0")], setup=_bad_keys),
    "data_convert": Case(["data", "convert", "nosrc", "/proc/x/out", "--workers", "0", "--parts", "-1"],
                         [("--workers 0", ">= 1"), ("--parts -1", ">= 0"), ("SRC nosrc", "no such folder"),
                          ("DST /proc/x/out", "not writable")]),
    "data_verify": Case(["data", "verify", "nods"], [("DST nods", "no such dataset folder", "meta.json")]),
    # an OSError on a path inside the folder the user gave: one line, not a traceback
    "data_inspect_os_error": Case(["data", "inspect", "ds"], [("ds/train.ffr/PART_00000.ffr", "no such")],
                                  setup=_dangling_part),
    "runs_list_no_store": Case(["runs", "list"], [("no MLflow store", "mlflow.db")]),
    "runs_compare_bad_uri": Case(["runs", "compare", "abc"], [("MLFLOW_TRACKING_URI=foo://bar", "not an MLflow store URI", "sqlite:///")],
                                 env={"MLFLOW_TRACKING_URI": "foo://bar"}),
    "ui_port_and_store": Case(["ui", "--port", "70000"], [("--port 70000", "1..65535"),
                                                          ("/proc/x/mlflow.db", "does not exist")],
                              env={"MLFLOW_TRACKING_URI": "sqlite:////proc/x/mlflow.db"}),
    "status_bad_job": Case(["status", "abc"], [("'abc' is not a Slurm job id",), ("scontrol is not on PATH",)],
                           no_slurm=True),
    "cancel_bad_job": Case(["cancel", "1x"], [("'1x' is not a Slurm job id",), ("scancel is not on PATH",)],
                           no_slurm=True),
    "logs_no_slurm": Case(["logs", "12"], [("scontrol is not on PATH",)], no_slurm=True),
    "bench_memory": Case(["bench", "memory", "--model", "danet999", "--T", "0", "--configs", "foo", "--json",
                          "/proc/x/a.json"],
                         [("--model danet999", "danet152"), ("--T 0", "> 0"), ("--configs", "'foo'", "POLICY"),
                          ("--json /proc/x/a.json", "does not exist")]),
    # a sweep: its launcher flags (a zero count used to divide by zero), then each axis value's own problem,
    # labelled with the value, and a run dir that cannot be created
    "sweep_flags": Case(["sweep", "--nodes", "0", "--gpus-per-node", "0", "model.T=1,2"],
                        [("--nodes 0", ">= 1"), ("--gpus-per-node 0", ">= 1")]),
    "sweep_axis_values": Case(["sweep", "model.T=1,abc", "model.name=danet18,danet999"],
                              [("sweep runs with model.name=danet999", "danet18"),
                               ("sweep runs with model.T=abc", "int")]),
    "sweep_run_dir_not_creatable": Case(["sweep", "--run-dir", "/proc/x/sw", "model.T=1,2"],
                                        [("--run-dir /proc/x/sw", "not writable")]),
    "bench_models": Case(["bench", "models", "--rounds", "0", "--json", "/proc/x/a.json"],
                         [("--rounds 0", "> 0"), ("--json /proc/x/a.json", "does not exist")]),
    "bench_data_json_is_a_folder": Case(["bench", "data", "--json", "."], [("--json .", "is a folder")]),
}


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: folders, links (target) and files (content hash)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = f"link {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run(name: str, case: Case, base: Path) -> dict:
    cwd = base / name
    cwd.mkdir()
    if case.setup:
        case.setup(cwd)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RUN_DIR", "RANK", "WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", **case.env)
    if case.no_slurm:
        empty = base / f"{name}-bin"
        empty.mkdir()
        env["PATH"] = str(empty)  # the script's shebang names the venv's python: nothing else is needed
    before = _tree(cwd)
    t0 = time.perf_counter()
    r = subprocess.run([CLI, *case.args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr, "before": before, "after": _tree(cwd),
            "wall_s": time.perf_counter() - t0}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    from orchestrator.data.digits import ensure_digits_dataset

    ensure_digits_dataset(DIGITS)  # the real dataset one case points at (built once, shared)
    base = tmp_path_factory.mktemp("contract")
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_run, name, case, base) for name, case in CASES.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_before_anything_is_written(results, name):
    r, case = results[name], CASES[name]
    err = r["stderr"]
    assert r["rc"] == 2, err
    assert "Traceback" not in err, err
    assert r["stdout"] == "", r["stdout"]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert all("error: " in ln for ln in lines), err
    assert len(lines) == len(case.expect), err  # one line per problem: none missing, none repeated
    for want in case.expect:
        hits = [ln for ln in lines if all(w in ln for w in want)]
        assert hits, f"no line has all of {want}:\n{err}"
    assert r["after"] == r["before"], "the command wrote into its working directory"
    print(f"{name}: {r['wall_s']:.1f} s")


def test_refused_launch_leaves_no_run_dir_and_no_error_file(results):
    """The run dir of a refused launch is not created, and no RUN_DIR/ERROR appears in an existing one."""
    assert not any(k.startswith("runs") for k in results["launch_unknown_model"]["after"])  # the default run dir
    resume = results["launch_slurm_dataset_resume"]["after"]
    assert "run/ERROR" not in resume and "run/checkpoints/LATEST" in resume


# --- the config reader's own cases, in process (no CLI start: milliseconds) ---------------------------------------
def _problems(tmp_path: Path, text: str | bytes, *overrides: str) -> list[str]:
    from orchestrator.config.load import resolve_config

    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return resolve_config(str(path), overrides)[1]


def test_config_files_that_cannot_be_read_are_named(tmp_path, monkeypatch):
    from orchestrator.config.load import load_config, resolve_config

    assert any("expected a mapping of config groups" in p and "c.yaml:1" in p
               for p in _problems(tmp_path, "- model\n- data\n"))
    assert any("not a text (UTF-8) YAML file" in p for p in _problems(tmp_path, b"model:\n  name: \xff\xfe\n"))
    (tmp_path / "d.yaml").mkdir()
    cfg, problems = resolve_config(str(tmp_path / "d.yaml"), ["model.T=0"])
    assert cfg is None and any("is a directory" in p for p in problems)
    assert len(problems) == 1  # no base to check values against: model.T=0 waits for a readable config
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(str(tmp_path / "empty.yaml")).preset == "empty"  # an empty file: the schema's defaults
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()  # a folder named like a preset (a copied dataset) does not shadow it
    assert load_config("digits").preset == "digits"


def test_overrides_each_apply_or_name_their_problem(tmp_path):
    from orchestrator.config.load import resolve_config

    cfg, problems = resolve_config("digits", ["model=3", "deepspeed.extra.wall_clock_breakdown=true", "model.T=2",
                                              "train.epochs=${model.T}"])
    assert problems == ["override model=3: 'model' is a group of keys, not a value: set its keys (e.g. model.name=...)"]
    assert cfg.deepspeed.extra == {"wall_clock_breakdown": True} and cfg.model.T == 2 and cfg.train.epochs == 2
    cfg, problems = resolve_config("digits", ["train.epochs=${nope.x}"])
    assert cfg is None and len(problems) == 1 and "train.epochs" in problems[0], problems
