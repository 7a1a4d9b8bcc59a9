"""Compile every Triton kernel of models/ for a GPU architecture, on a machine without a GPU.

Triton's interpreter (tools/lif_triton_check.py with ``TRITON_INTERPRET=1``) runs the kernels' Python on CPU
tensors: it checks their arithmetic, not that Triton's compiler accepts them. This tool runs that check's quick
cases (and PLIF's default) in the interpreter, records each distinct launch (argument types, constexpr values, ``num_warps``), then
compiles each for ``--arch`` (default 90: the H100 / H200) down to a cubin, with the ptxas Triton ships, and reads
its registers and spill stores (``cuobjdump --dump-resource-usage``). A kernel that fails here would fall back to
torch ops on the GPU: the lever it carries would go unmeasured.

    pip install --no-deps --target /tmp/tritonpkg triton==3.6.0   # the GPU machine's (torch 2.11); or the newest
    PYTHONPATH=/tmp/tritonpkg python tools/triton_compile_check.py [--arch 90]

Pin the Triton of the machine the kernels will run on: its compiler, not this one, decides there (3.6.0 and
3.9.0 both compile all 31 kernels, 2026-12-02).

Prints one line per compiled kernel and exits 1 when any fails to compile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64", "int8": "i8",
           "uint8": "u8", "int16": "i16", "int32": "i32", "int64": "i64", "bool": "i1"}  # fmt: skip


def _type_of(value) -> str:
    """Triton's signature type for one launch argument."""
    if hasattr(value, "data_ptr"):
        return "*" + _DTYPES[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported launch argument {value!r}")


def record(out: Path) -> None:
    """In the interpreter: run the quick kernel checks and write each distinct launch to ``out``."""
    import inspect

    import torch
    from triton.runtime.interpreter import InterpretedFunction

    sys.path.insert(0, str(REPO / "tools"))
    import lif_triton_check

    launches: dict[str, dict] = {}
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(self.arg_names, args, strict=False))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        const = {k: v for k, v in bound.items() if "constexpr" in str(params[k].annotation)}
        sig = {k: "constexpr" if k in const else _type_of(v) for k, v in bound.items()}
        entry = {"module": self.fn.__module__, "name": self.fn.__name__, "signature": sig, "constexprs": const,
                 "num_warps": kwargs.get("num_warps", 4)}  # fmt: skip
        launches.setdefault(json.dumps(entry, sort_keys=True), entry)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording
    cpu = torch.device("cpu")
    failures = lif_triton_check.run(cpu, lif_triton_check.CASES[:1] + lif_triton_check.PLIF_CASES[:1])
    failures += lif_triton_check.run_bn_neuron(cpu, lif_triton_check.CASES[:1] + lif_triton_check.PLIF_CASES[:1])
    failures += lif_triton_check.run_da(cpu, quick=True)
    out.write_text(json.dumps({"launches": list(launches.values()), "failures": failures}))


def _resources(cubin: bytes, cuobjdump: Path) -> str:
    """'REG:n STACK:n ...' for the cubin's kernel, or '' when cuobjdump is not at hand."""
    if not cuobjdump.exists():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", r.stdout)
    return f"registers {m.group(1)}, stack {m.group(2)} B, local {m.group(4)} B" if m else ""


def compile_all(launches: list[dict], arch: int) -> list[str]:
    """Compile each recorded launch for ``sm_<arch>``; one printed line each; the failures."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    failures = []
    for e in launches:
        fn = getattr(importlib.import_module(e["module"]), e["name"])
        const = dict(e["constexprs"])
        shown = ", ".join(f"{k}={v}" for k, v in const.items())
        ptrs = sorted({t for t in e["signature"].values() if t.startswith("*")})
        label = f"{e['module'].split('.')[-1]}.{e['name']}({shown}; {' '.join(ptrs)})"
        t = time.perf_counter()
        try:
            k = triton.compile(ASTSource(fn=fn, signature=e["signature"], constexprs=const), target=target,
                               options={"num_warps": e["num_warps"]})
        except Exception as exc:  # the first lines name the failing construct
            failures.append(f"{label}: {str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)}")
            print("FAIL", failures[-1])
            continue
        print(f"ok   {label}: {time.perf_counter() - t:.1f} s; {_resources(k.asm['cubin'], cuobjdump)}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)  # the interpreter half (internal)
    args = parser.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton is not importable: pip install --no-deps --target DIR triton; PYTHONPATH=DIR", file=sys.stderr)
        return 2
    if args.record:
        record(args.record)
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the compile half needs the real compiler", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        rec = Path(tmp) / "launches.json"
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        r = subprocess.run([sys.executable, __file__, "--record", str(rec)], env=env, capture_output=True, text=True)
        if r.returncode != 0 or not rec.exists():
            print(f"the interpreter run failed:\n{(r.stdout + r.stderr)[-3000:]}", file=sys.stderr)
            return 1
        got = json.loads(rec.read_text())
    failures = [f"interpreter: {f}" for f in got["failures"]]
    for f in failures:
        print("FAIL", f)
    failures += compile_all(got["launches"], args.arch)
    print(f"triton_compile_check for sm_{args.arch}: {len(got['launches'])} kernels compiled, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
