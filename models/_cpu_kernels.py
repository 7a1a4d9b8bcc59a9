"""The models' CPU kernels in C++ (``csrc/cpu_kernels.cpp``), built on first use; each has a torch fallback.

- The fused LIF / IF / PLIF, one pass over the data per direction over all T (the Triton kernel's scheme). The
  vectorised torch path in ``lif_fused`` makes three passes per step forward and six backward, each a separate
  op; rounding follows that path (see the source): spikes equal its spikes, and on this project's x86 box the
  membranes came out bit-identical too (the tests allow rounding, for CPUs where torch's kernels round
  differently).
- BatchNorm's training forward on contiguous NCHW batches (statistics, running-statistics update and the
  normalisation, per channel), where torch's own CPU kernel gathers the statistics several times slower than
  it normalises (its loop is one serial chain of dependent adds; this kernel keeps independent vector
  accumulators, flushed to double every few dozen terms); the backward is torch's
  (``native_batch_norm_backward`` with the saved mean and invstd: a kernel written like the forward was slower
  than it). Statistics differ from torch's by summation order only.
- BatchNorm followed by the neuron as one op (``models.bn_neuron``) on contiguous ``[T, N, C, H, W]``
  sequences: the batch statistics (as above, with the running update and the per-channel scale and shift in the
  same call), a forward that normalises, charges, fires and resets per block and writes only the spikes, and a
  backward by groups of channels that recomputes the membrane from x, walks the steps back, sums BatchNorm's two
  per-channel terms and finishes g_x while the group is still in cache.
BENCHMARKS.md has what each gives on a training step.

Built with the system C++ compiler (``$CXX``, else ``g++`` / ``c++`` / ``clang++``) against the running torch's
headers and libraries, into ``$TORCH_EXTENSIONS_DIR`` (or ``~/.cache/danet``) as ``cpu_kernels_<hash>.so``; the
hash covers the source, the compiler, its flags (AVX2/FMA only where this CPU has them) and torch's version, so
hosts sharing a cache directory each load a build they can run. Ranks that build at once each write their own
temporary file and rename it into place. Loaded with ctypes (no Python headers, no pybind: the build takes about
two seconds, and ctypes releases the GIL during a call). The kernels run on torch's own intra-op threads
(``at::parallel_for``; the build links the libgomp torch loaded), so ``torch.set_num_threads`` applies and no
second thread pool competes for the cores.

Not used (the torch path runs instead, computing the same thing): when ``DANET_CPU_KERNELS=0``; for dtypes other
than float32 / float64; when no compiler is found (silently: the torch path is exact too) or the build fails (one
warning with the compiler's last line).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from .layout import dense_seq, empty_seq_like, empty_step_like, seq_operand, step_operand
from .neuron_spec import NeuronSpec

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
_DTYPES = {torch.float32: 0, torch.float64: 1}
_CHARGE = {"lif_decay": 0, "lif": 1, "if": 2}
_SURROGATE = {"atan": 0, "sigmoid": 1, "rect": 2}
_STATE: dict[str, object] = {}
log = logging.getLogger(__name__)


class _Spec(ctypes.Structure):
    """``LifSpec`` in the source."""

    _fields_ = [
        ("charge", ctypes.c_int32),
        ("hard_reset", ctypes.c_int32),
        ("detach_reset", ctypes.c_int32),
        ("surrogate", ctypes.c_int32),
        ("tau", ctypes.c_double),
        ("v_threshold", ctypes.c_double),
        ("v_reset", ctypes.c_double),
        ("alpha", ctypes.c_double),
        ("learnable", ctypes.c_int32),
        ("rate", ctypes.c_double),
    ]


def _c_spec(spec: NeuronSpec, k: torch.Tensor | None = None) -> _Spec:
    """The spec as the kernels take it; PLIF's rate ``k`` (a CPU tensor) travels as the number it holds."""
    charge = "if" if spec.type == "if" else ("lif_decay" if spec.decay_input else "lif")
    hard = spec.v_reset is not None
    return _Spec(_CHARGE[charge], int(hard), int(spec.detach_reset), _SURROGATE[spec.surrogate], spec.tau,
                 spec.v_threshold, spec.v_reset if hard else 0.0, spec.surrogate_alpha, int(k is not None),
                 float(k) if k is not None else 0.0)


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build_flags() -> list[str]:
    """The compiler flags for this host and this torch: its headers and libraries (the kernel runs on torch's
    intra-op threads), its C++ ABI, and vector extensions only where this CPU has them."""
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    flags.append(f"-I{os.path.join(os.path.dirname(torch.__file__), 'include')}")
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= _cpu_flags():
        flags += ["-mavx2", "-mfma"]
    return flags


def link_flags() -> list[str]:
    """torch's libraries, after the source (a linker with --as-needed drops libraries named before it)."""
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    return [f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch_cpu", "-lc10"]


def _cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "danet"
    )
    return Path(root)


def library_path(cxx: str, flags: list[str]) -> Path:
    """Where the build for this source, compiler and flags lives."""
    key = hashlib.sha256(
        SOURCE.read_bytes() + cxx.encode() + " ".join(flags + link_flags()).encode() + torch.__version__.encode()
    ).hexdigest()[:16]
    return _cache_dir() / f"cpu_kernels_{key}.so"


def _build(cxx: str, flags: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    log.info("building the CPU kernels with %s into %s (once per host, compiler and torch)", Path(cxx).name, path)
    try:
        r = subprocess.run([cxx, *flags, str(SOURCE), *link_flags(), "-o", str(tmp)], capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise RuntimeError(f"{Path(cxx).name} exited {r.returncode}: {last}")
        os.replace(tmp, path)  # atomic: a rank building at the same time renames an identical file
    finally:
        tmp.unlink(missing_ok=True)


def _load() -> ctypes.CDLL | None:
    if os.environ.get("DANET_CPU_KERNELS", "1") == "0":
        return None
    cxx = _compiler()
    if cxx is None:
        _STATE["why"] = "no C++ compiler found ($CXX, g++, c++, clang++)"
        return None
    try:
        flags = build_flags()
        path = library_path(cxx, flags)
        try:
            if not path.exists():
                _build(cxx, flags, path)
            lib = ctypes.CDLL(str(path))
        except OSError:  # a cached build this process cannot load (damaged, or another libc): build it again
            _build(cxx, flags, path)
            lib = ctypes.CDLL(str(path))
    except Exception as exc:  # a failed build or load: the vectorised path computes the same thing
        _STATE["why"] = repr(exc)
        warnings.warn(f"the CPU kernels are unavailable ({exc}); using the torch paths", stacklevel=3)
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.danet_lif_forward.argtypes = [ctypes.c_int, ptr, i64, ptr, ptr, ptr, ptr, i64, i64, ctypes.POINTER(_Spec)]
    lib.danet_lif_backward.argtypes = [*lib.danet_lif_forward.argtypes, ptr, ptr]
    lib.danet_lif_block.argtypes, lib.danet_lif_block.restype = [], i64
    for fn in (lib.danet_lif_forward, lib.danet_lif_backward):
        fn.restype = ctypes.c_int
    lib.danet_bn_forward.argtypes = [ctypes.c_int, *[ptr] * 8, i64, i64, i64, ctypes.c_double, ctypes.c_double]
    lib.danet_bn_forward.restype = ctypes.c_int
    lib.danet_bn_stats.argtypes = [ctypes.c_int, *[ptr] * 10, i64, i64, i64, ctypes.c_double, ctypes.c_double]
    lib.danet_bn_lif_forward.argtypes = [ctypes.c_int, *[ptr] * 4, i64, i64, i64, i64, ctypes.POINTER(_Spec)]
    lib.danet_bn_lif_backward.argtypes = [ctypes.c_int, *[ptr] * 10, i64, i64, i64, i64, ctypes.c_int32,
                                          ctypes.POINTER(_Spec)]
    for fn in (lib.danet_bn_stats, lib.danet_bn_lif_forward, lib.danet_bn_lif_backward):
        fn.restype = ctypes.c_int
    _STATE["path"] = str(path)
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on the first call; None where they cannot be used (``why()`` says why)."""
    if "lib" not in _STATE:
        _STATE["lib"] = _load()
    return _STATE["lib"]  # type: ignore[return-value]


def why() -> str | None:
    """Why ``library()`` is None (None when it loaded or was switched off)."""
    library()
    return _STATE.get("why")  # type: ignore[return-value]


def applies(t: torch.Tensor) -> bool:
    """Whether the kernels take this tensor: on CPU, float32 / float64, non-empty, built, and not switched off."""
    return (t.device.type == "cpu" and t.dtype in _DTYPES and t.numel() > 0 and not _STATE.get("off")
            and library() is not None)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block the torch paths run instead (for side-by-side benchmarks and comparisons)."""
    previous = _STATE.get("off", False)
    _STATE["off"] = True
    try:
        yield
    finally:
        _STATE["off"] = previous


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _call(name: str, *args) -> None:
    """Call kernel ``name`` of the loaded library (the caller checked ``applies``); a non-zero return raises."""
    lib = library()
    assert lib is not None
    rc = getattr(lib, name)(*args)
    if rc != 0:
        raise RuntimeError(f"{name} returned {rc}")


def forward(x_seq: torch.Tensor, v0: torch.Tensor | None, spec: NeuronSpec, k: torch.Tensor | None = None):
    """(spikes, final membrane, h) in ``x_seq``'s step layout (``k``: PLIF's rate); the caller checked
    ``applies(x_seq)``."""
    s_seq, h_seq = empty_seq_like(x_seq), empty_seq_like(x_seq)
    v_last = empty_step_like(x_seq)
    ref = h_seq[0]
    x, x_st = seq_operand(x_seq, ref)
    v0c = step_operand(v0.to(x_seq.dtype), ref) if v0 is not None else None
    _call("danet_lif_forward", _DTYPES[x_seq.dtype], x.data_ptr(), x_st, _ptr(v0c), s_seq.data_ptr(),
          h_seq.data_ptr(), v_last.data_ptr(), x_seq.shape[0], ref.numel(), ctypes.byref(_c_spec(spec, k)))
    return s_seq, v_last, h_seq


def backward(
    g_s: torch.Tensor, g_v: torch.Tensor | None, h_seq: torch.Tensor, spec: NeuronSpec,
    k: torch.Tensor | None = None, v0: torch.Tensor | None = None,
):
    """(g_x, g_v0, PLIF's g_k or None) in ``h_seq``'s layout (``k``, ``v0``: PLIF's rate and forward's initial
    membrane); the caller checked ``applies(h_seq)``. g_k is the sum, in double, of one partial sum per block."""
    h_seq = dense_seq(h_seq)  # forward's own output always is
    ref = h_seq[0]
    g_x, g_v0 = empty_seq_like(h_seq), empty_step_like(h_seq)
    gs, gs_st = seq_operand(g_s.to(h_seq.dtype), ref)
    gv = step_operand(g_v.to(h_seq.dtype), ref) if g_v is not None else None
    v0c = step_operand(v0.to(h_seq.dtype), ref) if k is not None and v0 is not None else None
    partials = None
    if k is not None:
        lib = library()
        assert lib is not None
        partials = torch.empty(-(-ref.numel() // lib.danet_lif_block()), dtype=torch.float64)
    _call("danet_lif_backward", _DTYPES[h_seq.dtype], gs.data_ptr(), gs_st, _ptr(gv), h_seq.data_ptr(),
          g_x.data_ptr(), g_v0.data_ptr(), h_seq.shape[0], ref.numel(), ctypes.byref(_c_spec(spec, k)), _ptr(v0c),
          _ptr(partials))
    return g_x, g_v0, (partials.sum().to(k.dtype) if partials is not None else None)


# --------------------------------------------------------------------------------------------- BatchNorm


def batch_norm_applies(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether ``batch_norm_train`` takes this batch: 4-D contiguous NCHW (channels_last is fast in torch), more
    than one value per channel (torch's refusal of one stays torch's) and every parameter and buffer present of
    x's dtype, contiguous."""
    return (
        x.dim() == 4 and x.is_contiguous() and applies(x) and x.numel() > x.shape[1]
        and all(p is None or (p.dtype == x.dtype and p.is_contiguous() and p.device == x.device) for p in params)
    )


class _BatchNormTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):  # type: ignore[override]
        n, c = x.shape[:2]
        y = torch.empty_like(x)
        save_mean, save_invstd = x.new_empty(c), x.new_empty(c)
        _call("danet_bn_forward", _DTYPES[x.dtype], x.data_ptr(), _ptr(weight), _ptr(bias), _ptr(running_mean),
              _ptr(running_var), y.data_ptr(), save_mean.data_ptr(), save_invstd.data_ptr(), n, c, x[0, 0].numel(),
              eps, momentum)
        ctx.save_for_backward(x, weight, save_mean, save_invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight, save_mean, save_invstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g.contiguous(), x, weight, None, None, save_mean, save_invstd, True, ctx.eps, mask
        )
        return gx, gw, gb, None, None, None, None


def batch_norm_train(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float, eps: float,
) -> torch.Tensor:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)`` through the kernel (the
    running statistics updated in place); the caller checked ``batch_norm_applies``."""
    return _BatchNormTrain.apply(x, weight, bias, running_mean, running_var, momentum, eps)


# --------------------------------------------------------------------------------------------- BatchNorm + neuron


def bn_neuron_applies(x_seq: torch.Tensor) -> bool:
    """Whether the BatchNorm + neuron kernels take this ``[T, N, C, H, W]`` sequence: contiguous (NCHW steps, the
    CPU's layout; channels_last and broadcast sequences take the torch path) and taken by the kernels."""
    return x_seq.dim() == 5 and x_seq.is_contiguous() and applies(x_seq)


def _dims(x_seq: torch.Tensor) -> tuple[int, int, int, int]:
    steps, n, c, h, w = x_seq.shape
    return steps, n, c, h * w


def batch_stats_apply(x_seq: torch.Tensor, bn: torch.nn.BatchNorm2d) -> bool:
    """Whether ``batch_stats`` takes ``bn``'s parameters and running statistics with this sequence: each present
    one of x's dtype and contiguous (the kernel reads and updates them as x's type)."""
    params = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    return all(p is None or (p.dtype == x_seq.dtype and p.is_contiguous()) for p in params)


def batch_stats(
    x_seq: torch.Tensor, bn: torch.nn.BatchNorm2d, momentum: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased variance, 1 / sqrt(var + eps), scale, shift) per channel over all but dim 2, in x's dtype
    (summed in double), with ``bn``'s eps and affine (y = x * scale + shift); with ``momentum`` (a float) ``bn``'s
    running statistics are updated as nn.BatchNorm2d does, in the same call. The caller checked
    ``bn_neuron_applies`` and ``batch_stats_apply``."""
    steps, n, c, hw = _dims(x_seq)
    mean, var, invstd, scale, shift = x_seq.new_empty(5, c)
    update = momentum is not None
    _call("danet_bn_stats", _DTYPES[x_seq.dtype], x_seq.data_ptr(), _ptr(bn.weight), _ptr(bn.bias),
          _ptr(bn.running_mean) if update else None, _ptr(bn.running_var) if update else None, mean.data_ptr(),
          var.data_ptr(), invstd.data_ptr(), scale.data_ptr(), shift.data_ptr(), steps * n, c, hw, bn.eps,
          momentum or 0.0)
    return mean, var, invstd, scale, shift


def bn_neuron_forward(x_seq: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, spec: NeuronSpec,
                      k: torch.Tensor | None = None) -> torch.Tensor:
    """The spikes of the neuron on ``x * scale + shift`` (per channel, in x's dtype); the caller checked
    ``bn_neuron_applies``."""
    spikes = torch.empty_like(x_seq)
    scale, shift = (v.to(x_seq.dtype).contiguous() for v in (scale, shift))
    _call("danet_bn_lif_forward", _DTYPES[x_seq.dtype], x_seq.data_ptr(), scale.data_ptr(), shift.data_ptr(),
          spikes.data_ptr(), *_dims(x_seq), ctypes.byref(_c_spec(spec, k)))
    return spikes


def bn_neuron_backward(
    g_s: torch.Tensor, x_seq: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor,
    invstd: torch.Tensor, batch_stats: bool, spec: NeuronSpec, k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(g_x, sum g_y, sum g_y * xhat, PLIF's g_k or None) as ``bn_neuron.backward_torch`` returns them, the sums
    in scale's dtype (accumulated in double); the caller checked ``bn_neuron_applies(x_seq)``."""
    dtype, c = x_seq.dtype, x_seq.shape[2]
    per_channel = [v.to(dtype).contiguous() for v in (scale, shift, mean, invstd)]
    gs = g_s.to(dtype).contiguous()
    g_x = torch.empty_like(x_seq)
    sums = torch.zeros(3 if k is not None else 2, c, dtype=torch.float64)  # PLIF's: one per group, <= c
    _call("danet_bn_lif_backward", _DTYPES[dtype], gs.data_ptr(), x_seq.data_ptr(),
          *(v.data_ptr() for v in per_channel), g_x.data_ptr(), sums[0].data_ptr(), sums[1].data_ptr(),
          sums[2].data_ptr() if k is not None else None, *_dims(x_seq), int(batch_stats),
          ctypes.byref(_c_spec(spec, k)))
    g_k = sums[2].sum().to(k.dtype).reshape(k.shape) if k is not None else None
    return g_x, sums[0].to(scale.dtype), sums[1].to(scale.dtype), g_k
