"""Config: every preset loads, overrides apply, and every kind of bad input is one clear line with exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator.config import load_config, preset_names, to_yaml
from orchestrator.config.load import from_yaml_file
from orchestrator.errors import UserError

PRESETS = ["digits", "danet18_imagenet", "danet34_imagenet", "danet50_imagenet", "danet101_imagenet",
           "danet152_imagenet"]


def test_presets_shipped():
    assert set(PRESETS) <= set(preset_names())


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_round_trips(name, tmp_path):
    cfg = load_config(name)
    assert cfg.preset == name
    assert cfg.model.T == 4
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    assert from_yaml_file(path) == cfg
    # a YAML path works as --config too
    assert load_config(str(path)) == cfg


def test_imagenet_presets_state_the_paper_setting():
    for d in (18, 34, 50, 101, 152):
        cfg = load_config(f"danet{d}_imagenet")
        assert cfg.model.name == f"danet{d}" and cfg.model.num_classes == 1000
        assert cfg.data.image_size == 224 and cfg.data.loader == "dali" and cfg.data.format == "ffrecord"


def test_default_is_digits_and_overrides_apply():
    cfg = load_config(None, ["train.epochs=3", "model.T=2", "model.neuron.tau=1.5", "data.root=/x"])
    assert cfg.preset == "digits"
    assert (cfg.train.epochs, cfg.model.T, cfg.model.neuron.tau, cfg.data.root) == (3, 2, 1.5, "/x")


@pytest.mark.parametrize("override, expect", [
    ("train.epochz=3", "unknown config key 'train.epochz'. Did you mean 'train.epochs'?"),
    ("optim.lrr=0.1", "Did you mean 'optim.lr'?"),
    ("nosuchgroup.x=1", "unknown config key"),
    ("train.epochs=abc", "wrong type for 'train.epochs'"),
    ("model.T=1.5", "wrong type for 'model.T'"),
    ("model.connection=foo", "invalid value 'foo' for 'model.connection'; expected one of [default, spiking"),
    ("data.loader=ffcv", "expected one of [dali, torch]"),
    ("model.neuron.surrogate=atann", "Did you mean 'atan'?"),
    ("model.T=0", "'model.T' must be > 0"),
    ("model.fuse_bn_neuron=maybe", "'model.fuse_bn_neuron' must be true, false or auto, got 'maybe'"),
    ("train.epochs", "is not of the form key=value"),
])
def test_bad_input_names_key_and_valid_values(override, expect):
    with pytest.raises(UserError) as e:
        load_config("digits", [override])
    msg = str(e.value)
    assert expect in msg
    assert "\n" not in msg


def test_unknown_preset_lists_valid_names():
    with pytest.raises(UserError, match="valid presets: .*digits.*Did you mean 'digits'"):
        load_config("digit")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("args, expect", [
    (["launch", "train.epochz=1"], "Did you mean 'train.epochs'?"),
    (["launch", "model.T=abc"], "wrong type for 'model.T'"),
    (["launch", "optim.name=adam"], "expected one of [sgd, adamw, lamb]"),
    (["launch", "model.T=-1"], "'model.T' must be > 0"),
    (["launch", "--config", "nope"], "unknown preset 'nope'"),
    (["launch", "train.global_batch_size=63"], "not divisible by the world size 2"),
    (["config", "show", "digits", "model.da.span=global"], "expected one of [stage, network]"),
    (["launch", "--frobnicate"], "unrecognized argument '--frobnicate'"),
])
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, args, expect):
    r = _cli(*args, "--run-dir", str(tmp_path / "run"), cwd=tmp_path) if args[0] == "launch" else _cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written: no run dir, no mlflow.db, no dataset cache


def test_cli_unwritable_run_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "file").write_text("")
    r = _cli("launch", "--run-dir", str(ro / "file" / "run"), cwd=tmp_path)
    assert r.returncode == 2 and "not writable" in r.stderr


def test_cli_nodes_without_slurm(tmp_path):
    env_path = "/usr/bin/false-dir-without-sbatch"
    r = subprocess.run([sys.executable, "-m", "orchestrator", "launch", "--nodes", "4", "--config", "digits"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={"PATH": env_path, "HOME": str(tmp_path)})
    assert r.returncode == 2, r.stderr
    assert "slurm" in r.stderr.lower() and len(r.stderr.strip().splitlines()) == 1


def test_help_lists_subcommands():
    r = _cli("--help")
    assert r.returncode == 0
    for sub in ("launch", "train", "config", "models", "data", "bench", "plan", "runs", "ui", "status", "cancel",
                "logs"):
        assert sub in r.stdout


def test_config_show_prints_resolved_yaml():
    r = _cli("config", "show", "danet152_imagenet", "train.epochs=7")
    assert r.returncode == 0, r.stderr
    assert "epochs: 7" in r.stdout and "name: danet152" in r.stdout and "surrogate: atan" in r.stdout
