"""The prepared GPU script's pieces, on CPU: the photo dataset and its conversion, the pack of wheels in pieces
and its unpacking (only what the Python lacks), the steady-state rate, the MLflow peak read, the JSON writer.
(The whole ``tools/gpu_train_check.py --dry-run`` takes minutes on 2 cores: BENCHMARKS.md has a run.)"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import gpu_out  # noqa: E402
import gpu_pack  # noqa: E402
import gpu_train_check as gtc  # noqa: E402


def test_photo_folder_has_imagenet_sizes_and_converts(tmp_path):
    from PIL import Image

    src = tmp_path / "src"
    counts = gtc.build_image_folder(src, gtc.photo_paths(), classes=4, train_per_class=3, val_per_class=1)
    assert counts == {"train": 12, "val": 4}
    files = sorted(src.glob("*/n*/*.JPEG"))
    assert len(files) == 16 and {f.parent.name for f in files} == {f"n{c:08d}" for c in range(4)}
    sizes = [Image.open(f).size for f in files]
    assert all(300 <= max(s) <= 600 and 200 <= min(s) <= 480 for s in sizes), sizes  # about 500x375
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes) or len(set(sizes)) > 8
    assert len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) == 16  # no two alike
    env = gtc._env(None, dry=True)
    gtc.convert_folder(src, tmp_path / "ffr", env, workers=1)
    meta = json.loads((tmp_path / "ffr" / "meta.json").read_text())
    assert meta["num_classes"] == 4 and meta["counts"] == {"train": 12, "val": 4}


def _wheel(folder: Path, dist: str, module: str, body: str, version: str = "1.0") -> Path:
    """A minimal wheel (a zip of the installed files plus dist-info), as pip would install it."""
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", body)
        z.writestr(f"{dist}-{version}.data/purelib/{module}_extra.py", "EXTRA = 1\n")
        z.writestr(f"{dist}-{version}.data/scripts/{module}-cli", "#!/bin/sh\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_pack_in_pieces_and_unpack_only_what_is_missing(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    noise = random.Random(0).randbytes(30000).hex()  # incompressible: the pack must really split
    _wheel(wheels, "gpu_pack_probe", "gpu_pack_probe", f"VALUE = 42\nNOISE = {noise!r}\n")
    _wheel(wheels, "packaging", "packaging", "SHADOW = True\n")  # older than this Python's: must not shadow it
    _wheel(wheels, "six", "six", "NEWER = True\n", version="99.0")  # newer than this Python's: replaces it
    manifest = gpu_pack.pack(wheels, tmp_path / "pack", chunk_mb=0.01)
    assert len(manifest["pieces"]) >= 2  # really split
    for piece in manifest["pieces"]:
        assert (tmp_path / "pack" / piece).stat().st_size <= 0.01 * 2**20 + 1
    assert sorted(p.name for p in (tmp_path / "pack/c00/photos").iterdir()) == ["china.jpg", "flower.jpg"]

    last = tmp_path / "pack" / manifest["pieces"][-1]
    held = last.read_bytes()
    last.unlink()
    with pytest.raises(SystemExit, match="not carried yet: c0"):
        gpu_pack.unpack(tmp_path / "pack", tmp_path / "site")
    last.write_bytes(held[:-1] + bytes([held[-1] ^ 1]))
    with pytest.raises((SystemExit, EOFError, Exception)):
        gpu_pack.unpack(tmp_path / "pack", tmp_path / "site")  # a flipped bit: xz's own check or the sha256
    last.write_bytes(held)

    r = subprocess.run([sys.executable, str(REPO / "tools/gpu_pack.py"), "unpack", "--pack", str(tmp_path / "pack"),
                        "--site", str(tmp_path / "site")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lib = Path(r.stdout.strip())
    assert "added 2 distributions" in r.stderr and "gpu_pack_probe, six" in r.stderr
    assert (lib / "gpu_pack_probe_extra.py").is_file() and not (lib / "packaging").exists()
    assert not list(lib.rglob("*-cli"))  # scripts are not needed to import
    probe = ("import gpu_pack_probe, gpu_pack_probe_extra, packaging, six; "
             "print(gpu_pack_probe.VALUE, hasattr(packaging, 'SHADOW'), hasattr(six, 'NEWER'))")
    r = subprocess.run([sys.executable, "-c", probe], env={"PYTHONPATH": str(lib)}, capture_output=True, text=True)
    assert r.stdout.split() == ["42", "False", "True"], r.stderr


def test_trim_keeps_only_the_cp312_backends(tmp_path):
    root = tmp_path / "nvidia_dali_cuda120"
    for name in ("backend_impl.cpython-311-x86_64-linux-gnu.so", "backend_impl.cpython-312-x86_64-linux-gnu.so",
                 "backend_impl.cpython-314t-x86_64-linux-gnu.so", "libdali.so", "include/dali/x.h"):
        (root / "nvidia/dali" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "nvidia/dali" / name).write_bytes(b"x")
    gpu_pack.trim("nvidia_dali_cuda120", root)
    assert sorted(p.name for p in (root / "nvidia/dali").iterdir()) == [
        "backend_impl.cpython-312-x86_64-linux-gnu.so", "libdali.so"]


def test_trim_keeps_the_codecs_the_jobs_decode_with(tmp_path):
    """JPEG on the GPU and the CPU (the ImageNet-layout folder) and PNG (the embedded default's digits)."""
    ext = tmp_path / "nvidia_nvimgcodec_cu12" / "nvidia/nvimgcodec/extensions"
    ext.mkdir(parents=True)
    for name in ("libnvjpeg_ext", "libjpeg_turbo_ext", "libopencv_ext", "libnvjpeg2k_ext", "libnvtiff_ext",
                 "libtiff_ext", "libnvbmp_ext", "libnvpnm_ext"):
        (ext / f"{name}.so.0.9.0").write_bytes(b"x")
    gpu_pack.trim("nvidia_nvimgcodec_cu12", tmp_path / "nvidia_nvimgcodec_cu12")
    assert sorted(p.name.split(".")[0] for p in ext.iterdir()) == ["libjpeg_turbo_ext", "libnvjpeg_ext",
                                                                    "libopencv_ext"]


def test_steady_rate_and_result_fields(tmp_path):
    # progress lines every 5 steps of 32 images; the first third (warm-up, slow) is left out
    steps = [(5, 10.0), (10, 11.0), (15, 12.0), (20, 13.0), (25, 14.0), (30, 15.0)]
    assert gtc.steady_rate(steps, 32) == pytest.approx(20 * 32 / 4.0)  # steps 10 -> 30
    assert gtc.steady_rate(steps[:2], 32) is None
    assert gtc.gpu_slug("NVIDIA H200") == "h200" and gtc.gpu_slug("NVIDIA A100-SXM4-80GB") == "a100-sxm4-80gb"
    result = {k: None for k in gtc.REQUIRED} | {"gpu": "NVIDIA H200", "torch": "2.11", "model": "danet152", "T": 4,
                                                 "resolution": 224, "precision": "bf16", "micro_batch": 32,
                                                 "world_size": 1, "end_to_end_img_per_s": 210.5}
    gtc.write_result(tmp_path / "r.json", result)
    assert json.loads((tmp_path / "r.json").read_text())["end_to_end_img_per_s"] == 210.5
    assert "210.5" in gtc.table(result)
    with pytest.raises(ValueError, match="resumed"):
        gtc.write_result(tmp_path / "bad.json", {k: v for k, v in result.items() if k != "resumed"})


def test_peak_memory_from_the_jobs_sqlite_store(tmp_path):
    """The job logs peak_memory_mb to MLflow's sqlite store; the script reads it back with sqlite3 alone."""
    code = ("import mlflow, sys; mlflow.set_tracking_uri('sqlite:///' + sys.argv[1])\n"
            "for peaks in ([5.0, 9.5, 7.0], [12.0]):\n"
            "    with mlflow.start_run() as run:\n"
            "        [mlflow.log_metric('peak_memory_mb', v, step=i) for i, v in enumerate(peaks)]\n"
            "    print(run.info.run_id)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "mlflow.db")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    first, second = r.stdout.split()
    assert gtc.mlflow_peak_mb(tmp_path / "mlflow.db", first) == 9.5
    assert gtc.mlflow_peak_mb(tmp_path / "mlflow.db", second) == 12.0
    assert gtc.mlflow_peak_mb(tmp_path / "mlflow.db") == 12.0
    assert gtc.mlflow_peak_mb(tmp_path / "none.db") is None


def test_memory_piece_measures_every_policy_against_the_plan(tmp_path):
    """The memory piece on CPU (dry sizes): every concrete policy measured beside the plan's estimate at the same
    micro-batch; auto and the fastest fitting policy are named; the table shows it; an exhausted budget skips
    the piece with its reason instead of running it."""
    import argparse
    import dataclasses

    import torch

    from orchestrator.plan import POLICIES

    args = argparse.Namespace(out=tmp_path, work=tmp_path / "work", pieces="memory", site=None, budget_s=450.0,
                              variants="", pack_photos=None)
    check = gtc.TrainCheck(args, torch.device("cpu"), "cpu (dry run)")
    check.memory()
    mem = check.result["memory_by_policy"]
    assert list(mem["policies"]) == list(POLICIES) and mem["micro_batch"] == check.z.micro_batch
    for row in mem["policies"].values():
        assert row["plan_gb"] > 0 and row["img_per_s"] > 0 and row["peak_gb"] is None  # no device peak on CPU
    assert mem["auto_policy"] in POLICIES and mem["fastest_fitting_policy"] in POLICIES
    probe = check._plan_probe
    rows, _ = check.plan_rows(4 * check.z.micro_batch)  # another micro-batch: the same probe, a larger estimate
    assert check._plan_probe is probe and rows["none"]["est_gb"] > mem["policies"]["none"]["plan_gb"]
    assert "auto -> " in gtc.table({**{k: None for k in gtc.REQUIRED}, **check.result})
    late = gtc.TrainCheck(args, torch.device("cpu"), "cpu (dry run)")
    late.z = dataclasses.replace(late.z, budget=0.0)
    late.memory()
    assert "memory_by_policy" not in late.result and late.result["skipped"] == ["memory: skipped (time budget)"]
    shown = gtc.table({**{k: None for k in gtc.REQUIRED}, **late.result}).splitlines()
    assert late.result["errors"] == [] and any(ln.startswith("skipped (time budget") and ln.endswith("  memory")
                                               for ln in shown), shown  # fmt: skip


def test_a_failing_piece_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    """run(): a piece that raises (here the plan estimate inside plan_batch) lands in ``errors`` and the JSON;
    the pieces after it still run and the exit code says something failed."""
    import argparse

    import torch

    args = argparse.Namespace(out=tmp_path, work=tmp_path / "work", pieces="plan_batch,precision", site=None,
                              budget_s=450.0, variants="", pack_photos=None)
    check = gtc.TrainCheck(args, torch.device("cpu"), "cpu (dry run)")
    (check.ffr / "meta.json").parent.mkdir(parents=True)
    (check.ffr / "meta.json").write_text("{}")  # the dataset piece finds its folder made

    def no_plan(micro_batch: int):
        raise RuntimeError("no plan here")

    monkeypatch.setattr(check, "plan_rows", no_plan)
    ran = []
    monkeypatch.setattr(check, "precision", lambda: ran.append("precision"))
    assert check.run() == 1
    saved = json.loads(check.out_json.read_text())
    assert saved["errors"] == ["plan_batch: RuntimeError: no plan here"] and ran == ["precision"]


def test_a_table_that_cannot_be_laid_out_loses_the_table_only(tmp_path, monkeypatch, capsys):
    """The table is printed last; if it raises on a result of a shape it did not foresee, the run still ends with
    its own verdict and says where the figures are (the JSON, written before)."""
    check = _check(tmp_path, "precision")
    (check.ffr / "meta.json").parent.mkdir(parents=True)
    (check.ffr / "meta.json").write_text("{}")
    monkeypatch.setattr(check, "precision", lambda: None)

    def broken(result):
        raise KeyError("status")

    monkeypatch.setattr(gtc, "table", broken)
    assert check.run() == 0
    assert f"!! table: KeyError: 'status'; every figure is in {check.out_json}" in capsys.readouterr().out
    assert json.loads(check.out_json.read_text())["errors"] == []


@pytest.mark.parametrize("dtype, error", [("torch.float32", False), ("torch.bfloat16", True), (None, True)])
def test_throughput_job_names_a_forward_in_another_dtype(tmp_path, monkeypatch, dtype, error):
    """The job's summary says what its forward ran in; the throughput piece names a dtype other than the
    precision's (fp32 in the dry run, bf16 on a GPU) in errors: DeepSpeed once ran bf16-mixed's forward in fp32."""
    check = _check(tmp_path, "throughput")

    def steady(label, *extra):
        check.result["jobs"][label] = {"forward_dtype": dtype}
        return {"rate": 5.0, "peak_gb": None}

    monkeypatch.setattr(check, "steady_job", steady)
    check.throughput()
    said = [e for e in check.result["errors"] if e.startswith("throughput job: its forward ran in")]
    assert check.result["end_to_end_img_per_s"] == 5.0 and bool(said) == error, check.result["errors"]


def _check(tmp_path, pieces: str):
    import argparse

    import torch

    args = argparse.Namespace(out=tmp_path, work=tmp_path / "work", pieces=pieces, site=None, budget_s=450.0,
                              variants="", pack_photos=None)
    return gtc.TrainCheck(args, torch.device("cpu"), "cpu (dry run)")


def test_fused_model_step_variants_run_at_the_dry_sizes(tmp_path):
    """Each fusion's model-step variant runs on CPU at the dry sizes with its flag on (the models really fuse)."""
    check = _check(tmp_path, "variants")
    for name in gtc.FUSIONS:
        kw = check.fastest_kw(name)
        assert all(kw[k] == v for k, v in gtc.VARIANTS[name].items())
        got = gtc.model_step(check.device, **{**kw, "warmup": 0, "repeats": 1})
        assert got["img_per_s"] > 0 and gtc.fused_path(False, name) == "torch ops (CPU)"


@pytest.mark.parametrize("won", [("fused_bn_neuron",), ("fused_da",), ("fused_bn_neuron", "fused_da"), ()])
def test_fusion_job_runs_only_where_the_fused_model_step_won(tmp_path, monkeypatch, won):
    """The fusion piece: one job runs beside the preset's with the flags of those fusion variants that beat
    their unfused twin (none: no job), and the plan's micro-batch job takes them only when that job was faster
    end to end."""
    check = _check(tmp_path, "fusion")
    check.variants = {"benchmark": {"img_per_s": 10.0},
                      **{n: {"img_per_s": 12.0 if n in won else 9.0} for n in gtc.FUSIONS}}  # fmt: skip
    check.result["end_to_end_img_per_s"] = 5.0
    jobs = []
    monkeypatch.setattr(check, "steady_job", lambda label, *extra: jobs.append((label, extra)) or {"rate": 6.0})
    check.fusion()
    by = check.result["end_to_end_by_fusion"]
    flags = tuple(gtc.FUSIONS[n] for n in won)
    if won:
        assert jobs == [("throughput_fused", flags)] and by == {"off": 5.0, "on": 6.0}
        assert check.winning_overrides() == list(flags)  # carried into the plan's job
        assert all(f in gtc.table(check.result) for f in flags)
    else:
        assert jobs == [] and by == {"off": 5.0} and check.winning_overrides() == []
    lost = set(gtc.FUSIONS) - set(won)
    assert all(f"{n} model step" in check.result.get("fusion_note", "") for n in lost)
    assert "fusions off" in gtc.table(check.result)


def test_equivalence_piece_finds_the_fast_paths_equal_and_a_wrong_one_not(tmp_path, monkeypatch):
    """The equivalence piece at the dry sizes: the fusions and the job's layout give the baseline's loss and
    gradients (what only changes cudnn's choice or the micro-batch is not checked); a variant that computes
    something else (a gradient scaled by 1.01) is recorded as differing, named in errors, and counted neither
    as the fastest nor as a fusion to turn on."""
    check = _check(tmp_path, "variants,equivalence")
    names = ["benchmark", "job_layout", "batch64", *gtc.FUSIONS]
    check.variants = {n: {"img_per_s": 1.0 if n == "baseline" else 2.0, "peak_gb": None} for n in ["baseline", *names]}
    check.variants["fused_da"]["img_per_s"] = 3.0  # the fastest, until shown to differ
    real = gtc.gradients

    def gradients(device, **kw):
        loss, g = real(device, **kw)
        if kw.get("fuse_da"):  # a planted defect on one path: one parameter's gradient 1% off
            k = max(g, key=lambda n: g[n].norm())
            g[k] = g[k] * 1.01
        return loss, g

    monkeypatch.setattr(gtc, "gradients", gradients)
    check.measuring = gtc.StepProcess(inline=True)  # the planted defect is in this process only
    check.equivalence()
    check.summarise_variants()
    eq = check.result["equivalence"]
    assert set(eq) - {"grad_tol", "loss_tol", "batch", "res"} == {"job_layout", *gtc.FUSIONS}
    for n in ("job_layout", "fused_bn_neuron"):
        assert eq[n]["equal"] and eq[n]["grad_rel_l2"] <= gtc.GRAD_TOL and eq[n]["loss_off"] <= gtc.LOSS_TOL, eq[n]
    assert eq["fused_da"]["equal"] is False and eq["fused_da"]["grad_rel_l2"] > gtc.GRAD_TOL
    assert any(e.startswith("equivalence fused_da: gradients differ") for e in check.result["errors"])
    assert check.result["fastest_variant"] != "fused_da" and check.result["model_step_img_per_s"] == 2.0
    check.variants["benchmark"]["img_per_s"] = 1.5
    check.result["end_to_end_img_per_s"] = 5.0
    jobs = []
    monkeypatch.setattr(check, "steady_job", lambda label, *extra: jobs.append(extra) or {"rate": 6.0})
    check.fusion()
    assert jobs == [(gtc.FUSIONS["fused_bn_neuron"],)], "the differing fusion was turned on"
    assert "fused_da: gradients differ" in check.result["fusion_note"]
    assert "fused_da DIFFER" in gtc.table(check.result) and "fused_bn_neuron equal" in gtc.table(check.result)


def test_compare_gradients_sees_a_nan_and_a_missing_gradient():
    import torch

    ref = (1.0, {"a": torch.ones(3), "b": torch.ones(2)})
    assert gtc.compare_gradients(ref, ref)["equal"]
    nan = gtc.compare_gradients(ref, (1.0, {"a": torch.tensor([1.0, float("nan"), 1.0]), "b": torch.ones(2)}))
    assert nan["equal"] is False and nan["worst_parameter"] == "a"
    assert gtc.compare_gradients(ref, (1.0, {"a": torch.ones(3)}))["equal"] is False
    assert gtc.compare_gradients(ref, (1.001, ref[1]))["equal"] is False  # the loss alone


@pytest.mark.parametrize(
    "name, group",
    [  # kernel names of the forms torch.profiler reports on Hopper GPUs (public traces; none captured here yet), CPU ops
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
        ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true>", "layout"),
        ("void cudnn::bn_fw_tr_1C11_singleread<__nv_bfloat16, 512, true, 1, 2, 0>", "batch_norm"),
        ("void at::native::batch_norm_collect_statistics_channels_last_kernel<at::native::Var, c10::BFloat16>",
         "batch_norm"),
        ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
        ("Memcpy HtoD (Pageable -> Device)", "memcpy"),
        ("Memset (Device)", "memcpy"),
        ("_lif_fwd", "lif"), ("_lif_bwd", "lif"), ("_bn_lif_elemt", "bn_neuron"), ("_weighted_sum_dots", "da_sums"),
        ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)",
         "casts_copies"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
         "elementwise"),
        ("void multi_tensor_apply_kernel<TensorListMetadata<2>, SGDFunctor<float>>", "optimizer"),
        ("aten::mkldnn_convolution", "convolution"), ("c10d::allreduce_", "communication"),
        ("cunn_SoftMaxForward", "other"),
    ],
)
def test_profile_groups_name_real_kernels(name, group):
    """The profile summary's groups (convolutions, BatchNorm, LIF, DA sums, casts, layout conversions, ...)
    hold the kernels a reader expects there: NCCL's '..._Sum_...' is not element-wise work, nor cuDNN's layout
    transform a convolution."""
    assert gtc._group(name) == group


def test_profile_summary_groups_a_step_and_names_what_other_holds():
    import torch

    x, w = torch.randn(2, 3, 16, 16), torch.randn(4, 3, 3, 3)
    prof = gtc.profile_steps(lambda: torch.softmax(torch.nn.functional.conv2d(x, w), 1), lambda: None, 2, cuda=False)
    assert prof["steps"] == 2 and prof["groups_ms_per_step"]["convolution"] > 0
    assert prof["other_top"] and all(gtc._group(o["name"]) == "other" for o in prof["other_top"])
    assert any("softmax" in o["name"] for o in prof["other_top"])


@pytest.mark.parametrize(
    "script, env, says",
    [
        # DRY_RUN rehearses the train step only: any other STEPS is refused before anything runs
        ("gpu_check.sh", {"DRY_RUN": "1", "STEPS": "models data memory"}, "set STEPS=train"),
        ("gpu_check.sh", {"DRY_RUN": "1", "STEPS": "train memory"}, "set STEPS=train"),
        # the rehearsal needs the pack it rehearses (in a copy of the tree that has none)
        ("gpu_rehearse.sh", {}, "no .cache/gpu_pack/c00/MANIFEST.json"),
    ],
)
def test_gpu_scripts_refuse_bad_settings_in_one_line(tmp_path, script, env, says):
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / script).write_bytes((REPO / "tools" / script).read_bytes())
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(tools / script)], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "OUT_DIR": str(out), **env})  # fmt: skip
    said = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2, said
    assert len(said) == 1 and says in said[0], said
    assert sorted(tmp_path.iterdir()) == [tools] and [p.name for p in tools.iterdir()] == [script], "it wrote something"


def test_rehearsal_passes_over_a_python312_that_does_not_run(tmp_path):
    """A pyenv shim named python3.12 is on PATH even where pyenv selects another version, and fails when run:
    the rehearsal looks on (pyenv's versions) and, finding no Python 3.12 that runs, says so in one line."""
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "gpu_rehearse.sh").write_bytes((REPO / "tools" / "gpu_rehearse.sh").read_bytes())
    (tmp_path / ".cache" / "gpu_pack" / "c00").mkdir(parents=True)
    (tmp_path / ".cache" / "gpu_pack" / "c00" / "MANIFEST.json").write_text("{}")
    shim = tmp_path / "bin" / "python3.12"
    shim.parent.mkdir()
    shim.write_text("#!/bin/sh\necho 'pyenv: python3.12: command not found' >&2\nexit 127\n")
    shim.chmod(0o755)
    proc = subprocess.run(["bash", str(tmp_path / "tools" / "gpu_rehearse.sh")], capture_output=True, text=True,
                          timeout=60, env={"PATH": f"{shim.parent}:/usr/bin:/bin", "HOME": str(tmp_path / "home")})
    said = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2 and len(said) == 1 and "no Python 3.12 that runs" in said[0], said


def test_default_piece_launches_the_embedded_default_on_the_expected_ranks(tmp_path):
    """``orchestrator launch`` with no arguments, as the GPU run starts it beside the resume check (here with the
    dry run's ``train.epochs=1``): it completes on the CPU default's 2 ranks and the verdict has no error."""
    check = _check(tmp_path, "default")
    check.join_default(check.start_default())
    d = check.result["default_launch"]
    assert check.result["errors"] == [], (check.result["errors"], d)
    assert d["status"] == "completed" and d["world_size"] == d["expected_world_size"] == 2 and d["epochs"] == 1
    assert 0.0 <= d["val_top1"] <= 1.0 and d["wall_s"] > 0
    assert check.result["direct_train"]["status"] == "completed"  # `orchestrator train`, one rank, no launcher
    assert check.result["direct_train"]["world_size"] == 1
    table = gtc.table({**check.result, "fastest_variant": None})
    assert "orchestrator launch, no arguments" in table and "orchestrator train, one rank" in table


@pytest.mark.parametrize("job,says", [
    ({"rc": 0, "summary": {"status": "completed", "world_size": 2, "val_top1": 0.9}, "wall_s": 9.0},
     "2 rank(s), expected 1"),  # two ranks on one GPU: NCCL would refuse them
    ({"rc": 0, "summary": {"status": "completed", "world_size": 1, "val_top1": 0.12}, "wall_s": 9.0},
     "val top-1 0.12, expected > 0.6"),
    ({"rc": 1, "summary": {"status": "failed", "world_size": 1}, "wall_s": 9.0}, "status 'failed', rc 1"),
    (None, "did not finish"),
], ids=["ranks", "not-learning", "failed", "hung"])  # fmt: skip
def test_default_piece_verdict_on_a_gpu(tmp_path, monkeypatch, job, says):
    """On one GPU the embedded default must complete on 1 rank and learn; anything else is an error."""
    import threading

    import torch

    check = _check(tmp_path, "default")
    check.cuda = True
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check._default_job = job
    check._direct_job = {"rc": 0, "summary": {"status": "completed", "world_size": 1}, "wall_s": 5.0}
    done = threading.Thread(target=lambda: None)
    done.start()
    check.join_default(done)
    assert len(check.result["errors"]) == 1 and says in check.result["errors"][0], check.result["errors"]


@pytest.mark.parametrize("flag,value", [("--pieces", "resume,bogus"), ("--variants", "compile,fused_bn")])
def test_job_check_refuses_unknown_names_before_anything_runs(tmp_path, capsys, flag, value):
    """A rerun's TRAIN_PIECES / TRAIN_VARIANTS with a typo: one line naming it and the valid names, exit 2, no
    output folder (not minutes of GPU time spent before an error in the JSON)."""
    out = tmp_path / "out"
    assert gtc.main(["--dry-run", "--out", str(out), flag, value]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and said[0].startswith(f"{flag}: unknown") and "valid: " in said[0], said
    assert not out.exists()


def test_out_keeps_what_the_device_tool_brings_back(tmp_path):
    """gpu_check.sh's end: the logs of the jobs' folder in one archive (each cut to its last part), and OUT checked
    against the device tool's limits (8 files, 16 MiB each, 64 in all, 2 folders down, plain names)."""
    import tarfile

    out, work = tmp_path / "out", tmp_path / "work"
    (work / "train_check" / "runs" / "resumed" / "checkpoints").mkdir(parents=True)
    out.mkdir()
    (out / "gpu_train_h200.json").write_text("{}")
    (work / "train_check" / "resumed.log").write_text("step 1/4\n" * 10)
    (work / "train_check" / "big.log").write_bytes(b"x" * (3 * 2**20) + b"THE END\n")
    (work / "train_check" / "runs" / "resumed" / "checkpoints" / "rank0.pt").write_bytes(b"\0" * 1000)
    assert gpu_out.main(["--out", str(out), "--work", str(work), "--log-mb", "1"]) == 0
    with tarfile.open(out / gpu_out.ARCHIVE) as tar:
        names = sorted(tar.getnames())
        big = tar.extractfile("train_check/big.log").read()
    assert names == ["train_check/big.log", "train_check/resumed.log"]  # logs only, no checkpoint
    assert big.endswith(b"THE END\n") and len(big) < 1.1 * 2**20 and big.startswith(b"[... cut")
    # what would be left behind is named, one line each, and fails the check
    for i in range(8):
        (out / f"extra{i}.txt").write_text("x")
    (out / "a" / "b" / "c").mkdir(parents=True)
    (out / "a" / "b" / "c" / "deep.txt").write_text("x")
    (out / "bad name.txt").write_text("x")
    said = gpu_out.problems(out)
    assert any(s.startswith("12 files, over 8") for s in said), said
    assert any("deep.txt: more than 2 folders down" in s for s in said)
    assert any(s.startswith("bad name.txt: a name") for s in said)
    assert gpu_out.main(["--out", str(out)]) == 1


def test_job_check_refuses_a_work_folder_inside_out(tmp_path, capsys):
    assert gtc.main(["--dry-run", "--out", str(tmp_path), "--work", str(tmp_path / "w")]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "inside --out" in said[0] and not (tmp_path / "w").exists()


def test_a_relative_work_folder_is_made_absolute(tmp_path, monkeypatch):
    """The jobs run with the work folder as their cwd: a relative data.root from it would name nothing (seen in the
    rehearsal, where gpu_check.sh passes .cache/gpu_check_work/train_check)."""
    import argparse

    import torch

    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(out=tmp_path / "out", work=Path("rel/work"), pieces="default", site=None,
                              budget_s=450.0, variants="", pack_photos=None)  # fmt: skip
    check = gtc.TrainCheck(args, torch.device("cpu"), "cpu (dry run)")
    assert check.work == tmp_path / "rel" / "work" and check.ffr.is_absolute()
    assert f"data.root={tmp_path / 'rel' / 'work' / 'imagenet_ffr'}" in check.job_args(2, 4, 1, False)


def test_a_resume_check_that_failed_says_why_in_errors(tmp_path, monkeypatch):
    """Jobs that never started (the rehearsal once gave them a data.root that named nothing): the errors name each
    job's exit code and its last log line, not only ``resumed: false`` in the table."""
    check = _check(tmp_path, "resume")
    refused = {"rc": 2, "summary": {}, "steps": [], "wall_s": 3.0, "sigint": False, "log": "x.log",
               "log_tail": "orchestrator: error: data.root=/x: no such folder\n"}  # fmt: skip
    monkeypatch.setattr(gtc, "run_job", lambda *a, **k: dict(refused))
    check.resume()
    assert check.result["resumed"] is False and check.result["job_status"] is None
    (said,) = check.result["errors"]
    # the reference and the interrupted job; the resumed one is not started after a job that was not interrupted
    assert said.startswith("resume check: not interrupted") and said.count("rc 2 status None") == 2
    assert "data.root=/x: no such folder" in said and "reference rc 2" in said and "interrupted rc 2" in said


def test_graphs_variant_is_a_diagnostic_never_the_fastest(tmp_path):
    """CUDA graphs replay the same kernels: their rate beside the eager one says what launches cost; the job
    captures nothing, so the variant is not the fastest configuration, and on CPU it is skipped, not an error."""
    check = _check(tmp_path, "variants")
    check.args.variants = "graphs"
    check.levers()
    assert check.result["graphs"] == {"skipped": "CUDA graphs need a GPU (dry run)"} and check.result["errors"] == []
    check.variants = {"baseline": {"img_per_s": 10.0, "peak_gb": 1.0}, "benchmark": {"img_per_s": 12.0},
                      "graphs": {"img_per_s": 18.0}}  # fmt: skip
    check.summarise_variants()
    r = check.result
    assert r["fastest_variant"] == "benchmark" and r["model_step_img_per_s"] == 12.0
    assert r["graphs"] == {"img_per_s": 18.0, "eager_img_per_s": 12.0, "speedup": 1.5}
    assert "18.0 / 12.0 (x1.50: what launches cost)" in gtc.table(r)
    with pytest.raises(RuntimeError, match="CUDA graphs need a GPU"):
        gtc._captured(lambda: None, None)


def test_direct_train_that_failed_is_an_error(tmp_path):
    import threading

    check = _check(tmp_path, "default")
    check._default_job = {"rc": 0, "summary": {"status": "completed", "world_size": 2, "val_top1": 0.9}}
    check._direct_job = {"rc": 1, "summary": {"status": "failed", "world_size": 1}, "wall_s": 5.0}
    done = threading.Thread(target=lambda: None)
    done.start()
    check.join_default(done)
    assert check.result["errors"] == ["orchestrator train (one rank, no launcher): status 'failed', rc 1, 1 rank(s)"]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # dead, only not yet reaped (by whoever adopted it)


def test_a_default_launch_still_running_after_the_grace_is_stopped_with_its_ranks(tmp_path, monkeypatch):
    """On the GPU the embedded default must not share the card with the timed pieces: still running once the
    resume check and the grace are over, it is killed, the ranks it started with it (its own session)."""
    import threading
    import time

    import torch

    check = _check(tmp_path, "default")
    check.cuda = True
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(gtc, "DEFAULT_GRACE_S", 0.5)
    pid_file = tmp_path / "rank.pid"

    def hung_launcher() -> None:  # a "launcher" whose "rank" never ends
        p = subprocess.Popen(["bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], start_new_session=True)
        check._default_procs.append(p)
        check._default_job = {"rc": p.wait(), "summary": {}}

    thread = threading.Thread(target=hung_launcher)
    thread.start()
    for _ in range(100):
        if pid_file.is_file() and pid_file.read_text().strip():
            break
        time.sleep(0.05)
    rank = int(pid_file.read_text())
    t0 = time.monotonic()
    check.join_default(thread)
    assert time.monotonic() - t0 < 20 and not thread.is_alive()
    assert check._default_job["rc"] == -9
    for _ in range(100):
        if _gone(rank):
            break
        time.sleep(0.05)
    assert _gone(rank), "the rank outlived its launcher"
    assert any(e.startswith("default launch: still running") and "after the resume check, stopped" in e
               for e in check.result["errors"]), check.result["errors"]


def _start_grandchild_and_hang(pid_file: str) -> None:
    """(In the measuring process) start a process of its own, note its pid, then never return."""
    import time

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    Path(pid_file).write_text(str(p.pid))
    time.sleep(120)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_model_step_work_runs_in_a_process_that_a_fault_costs_alone(tmp_path):
    """The measuring process: results come back from a child; a child that raised, died or hung is gone and
    said so (a hang stopped at its timeout, with what it started), and the next call gets a fresh child, so a
    fault that poisons a CUDA context costs one measurement, not the pieces after it."""
    import functools
    import os
    import time

    steps = gtc.StepProcess()
    try:
        first = steps(os.getpid)
        assert first != os.getpid() and steps(os.getpid) == first  # one child serves call after call
        with pytest.raises(RuntimeError, match="ValueError: invalid literal"):
            steps(functools.partial(int, "x"))
        second = steps(os.getpid)
        assert second != first and not _alive(first)
        with pytest.raises(RuntimeError, match=r"_exit: the measuring process died \(exit code 7\)"):
            steps(functools.partial(os._exit, 7))
        pid_file = tmp_path / "grandchild.pid"
        t = time.monotonic()
        with pytest.raises(TimeoutError, match="no result after 5 s"):
            steps(_start_grandchild_and_hang, timeout=5, pid_file=str(pid_file))
        assert time.monotonic() - t < 30
        grandchild = int(pid_file.read_text())
        deadline = time.monotonic() + 10
        while _alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(grandchild), "the hung child's own process was left running"
        assert steps(os.getpid) not in (first, second)
    finally:
        steps.close()
    assert steps.pid is None


GPU_RESULT = {  # the shape tools/gpu_train_check.py writes on a GPU (figures invented for the report's test)
    "gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "model": "danet152", "T": 4, "resolution": 224,
    "precision": "bf16-mixed", "micro_batch": 32, "world_size": 1, "baseline_img_per_s": 50.0,
    "model_step_img_per_s": 300.0, "end_to_end_img_per_s": 250.0, "peak_memory_gb": 40.0, "job_status": "completed",
    "resumed": True, "dry_run": False, "errors": [], "skipped": ["precision job: skipped (time budget)"],
    "weights_equal_uninterrupted": True, "losses_equal_uninterrupted": True, "wall_s": 420.0,
    "default_launch": {"status": "completed", "world_size": 1, "expected_world_size": 1, "val_top1": 0.97,
                       "wall_s": 80.0},
    "direct_train": {"status": "completed", "world_size": 1, "wall_s": 40.0},
    "model_step_variants": {"baseline": {"img_per_s": 50.0}, "benchmark": {"img_per_s": 100.0},
                            "fused_bn_neuron": {"img_per_s": 300.0}, "batch64": {"img_per_s": 120.0},
                            "graphs": {"img_per_s": 110.0}},
    "graphs": {"img_per_s": 110.0, "eager_img_per_s": 100.0, "speedup": 1.1},
    "fused_bn_neuron_path": "triton", "fastest_variant": "fused_bn_neuron",
    "equivalence": {"grad_tol": 1e-3, "loss_tol": 1e-4, "fused_bn_neuron": {"equal": True, "grad_rel_l2": 3e-6}},
    "end_to_end_by_fusion": {"off": 250.0, "on": 275.0}, "fusion_overrides": ["model.fuse_bn_neuron=true"],
    "end_to_end_by_micro_batch": {"32": 250.0, "64": 300.0},
    "profile": {"steps": 3, "timing": "device (CUDA) self time", "wall_ms_per_step": 110.0,
                "device_ms_per_step": 100.0, "host_gap_ms_per_step": 10.0,
                "groups_ms_per_step": {"convolution": 75.0, "bn_neuron": 25.0},
                "top_ops": [{"op": "aten::cudnn_convolution", "ms_per_step": 40.0, "calls_per_step": 155}],
                "other_top": [{"name": "cunn_SoftMaxForward", "ms_per_step": 0.25}]},
    "memory_by_policy": {"micro_batch": 32, "card_gb": 139.8, "auto_policy": "none", "fastest_fitting_policy": "none",
                         "policies": {"none": {"plan_gb": 40.0, "peak_gb": 44.0, "measured_over_plan": 1.1,
                                               "img_per_s": 300.0}}},
}  # fmt: skip


def test_report_gives_each_lever_as_a_ratio_and_each_verdict(tmp_path):
    """tools/gpu_train_report.py: BENCHMARKS.md's section from a job check's JSON: every lever as a ratio to the
    baseline of the same run, the end-to-end runs to the preset's job, the profile's shares, memory against the
    plan, the 200 img/s floor's verdict; bad input is one line and exit 2."""
    import gpu_train_report as rep

    md = rep.report(GPU_RESULT, "docs/bench/gpu_train_h200.json")
    assert "| model step: fused_bn_neuron | 32 | 300.0 | 6.00x | equal (\\|dg\\|/\\|g\\| 3e-06) |" in md
    assert "| model step: batch64 | 64 | 120.0 | 2.40x | not checked: the same computation |" in md
    assert "| model step: graphs | 32 | 110.0 | 2.20x | diagnostic (not a step the job runs) |" in md
    assert "| **the real job, end to end** (steady state) | 32 | **250.0** | 5.00x | - |" in md
    assert "| the job, fusions on (model.fuse_bn_neuron=true) | 32 | 275.0 | 5.50x (1.10x the job) | - |" in md
    assert "| the job, micro-batch 64 | 64 | 300.0 | 6.00x (1.20x the job) | - |" in md
    assert "| 250.0 |" not in md  # the preset's job once, in bold (not again as "fusions off" or "micro-batch 32")
    assert "250.0 img/s: meets the floor (5.00x the model step alone" in md
    assert "| convolution | 75.00 | 75% |" in md and "host gaps 10.0 ms" in md
    assert "In `other` (no group names them yet): `cunn_SoftMaxForward` 0.25 ms." in md
    assert "| none | 40.00 | 44.00 | 1.10 | 300.0 |" in md and "`fused_bn_neuron` ran on triton" in md
    assert "- precision job: skipped" in md
    slow = rep.report({**GPU_RESULT, "end_to_end_img_per_s": 150.0}, "x.json")
    assert "150.0 img/s: BELOW the floor" in slow
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"gpu": "x"}))
    r = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_train_report.py"), str(path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "not a job check's JSON (lacks torch" in r.stderr


SIGTERM_SCRIPT = """
import argparse, os, signal, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
import gpu_train_check as gtc
out = Path(sys.argv[2])
args = argparse.Namespace(out=out, work=out.parent / "work", pieces="baseline", site=None, budget_s=450.0,
                          variants="", pack_photos=None)
check = gtc.TrainCheck(args, torch.device("cpu"), "cpu (dry run)")
job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
check._procs.append(job)
child = check.measuring(os.getpid)
print("pids", job.pid, child, flush=True)
check.dataset = lambda: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(60)  # the timeout, mid-piece
check.run()
print("not reached", flush=True)
"""


def test_the_scripts_timeout_keeps_the_json_and_stops_every_job(tmp_path):
    """gpu_check.sh's timeout sends SIGTERM to the job check alone (its jobs and the measuring process run in
    sessions of their own): it stops them, writes the JSON with the reason, prints the table and exits 1."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, str(REPO / "tools"), str(out)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "not reached" not in r.stdout, r.stdout + r.stderr[-2000:]
    job, child = (int(x) for x in r.stdout.split("pids ")[1].split()[:2])
    assert not _alive(job) and not _alive(child)
    saved = json.loads((out / "gpu_train_cpu-dry-run.json").read_text())
    assert any(e.startswith("stopped by signal 15 at") for e in saved["errors"]), saved["errors"]
    assert "job status / resumed" in r.stdout  # the table, last


def test_a_job_that_was_not_interrupted_is_not_resumed(tmp_path, monkeypatch):
    """The resume check relaunches only a job that the interruption stopped (exit 130): one that failed or ran
    through has nothing to resume, and a second start would cost a job's time limit for nothing."""
    check = _check(tmp_path, "resume")
    calls = []

    def job(cwd, run_dir, overrides, env, timeout, stop_after_step=None, **kw):
        calls.append((run_dir, stop_after_step))
        return {"rc": 1, "summary": {"status": "failed"}, "steps": [], "wall_s": 1.0, "log": "x", "log_tail": "boom\n"}

    monkeypatch.setattr(gtc, "run_job", job)
    check.resume()
    assert sorted(calls, key=str) == sorted([("runs/uninterrupted", None), ("runs/resumed", check.z.stop_after)],
                                            key=str)  # fmt: skip
    assert check.result["resumed"] is False and "resumed" not in check.result["jobs"]
    assert any("interrupted rc 1 status failed (boom)" in e for e in check.result["errors"]), check.result["errors"]
