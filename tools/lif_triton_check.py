"""The Triton LIF kernels (models/_lif_triton.py) against the vectorised path, for every operand layout they can
be given: NCHW, channels_last, broadcast over T (stride 0), a slice (copied), channels_last initial membrane,
gradients contiguous / channels_last / all-broadcast; each neuron variant, PLIF's rate gradient included; fp32
(exact spikes, 1e-6) and bf16.
Then the BatchNorm + neuron kernels (``run_bn_neuron``) and the DA aggregation kernels (``run_da``).

On a GPU: ``python tools/lif_triton_check.py [--quick]`` (the real kernels; --quick: the default neuron only). Without one: ``TRITON_INTERPRET=1 python
tools/lif_triton_check.py`` with triton installed runs the same kernels in Triton's interpreter on CPU tensors.
Prints one line per failure and a summary; exit 1 on any failure.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models import _lif_triton as K  # noqa: E402
from models.layout import empty_seq_like, empty_step_like  # noqa: E402
from models.lif_fused import backward_vectorised, forward_vectorised, plif_rate  # noqa: E402
from models.neuron_spec import NeuronSpec  # noqa: E402

CASES = [
    {},
    {"v_reset": None},
    {"v_reset": -0.2, "detach_reset": False},
    {"decay_input": False, "surrogate": "sigmoid", "surrogate_alpha": 4.0},
    {"v_reset": None, "detach_reset": False, "surrogate": "rect", "surrogate_alpha": 1.0},
    {"type": "if"},
]
# PLIF (a learnable rate read from device memory, and its gradient): the kernels' other path
PLIF_CASES = [
    {"type": "plif"},
    {"type": "plif", "decay_input": False, "v_reset": 0.3},
    {"type": "plif", "v_reset": None, "detach_reset": False},
]
T, N, C, H, W = 3, 2, 5, 4, 3


def _layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "contiguous": x,
        "channels_last": x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (T, N)),
        "broadcast": x[:1].expand(T, N, C, H, W),
        "broadcast_cl": x[0].contiguous(memory_format=torch.channels_last).unsqueeze(0).expand(T, N, C, H, W),
        "slice": torch.cat([x, x], 2)[:, :, 1 : 1 + C],
    }


def run(device: torch.device, cases: list[dict] | None = None) -> list[str]:
    """Every failure, as one line each (empty: all passed)."""
    failures = []
    gen = torch.Generator().manual_seed(0)
    cases = CASES + PLIF_CASES if cases is None else cases

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    for case, dtype in itertools.product(cases, (torch.float32, torch.bfloat16)):
        spec = NeuronSpec(**case)
        k = plif_rate(torch.tensor(0.4, device=device), dtype) if spec.type == "plif" else None
        exact = dtype == torch.float32
        base = (rnd(T, N, C, H, W) * 1.5 + 0.6).to(dtype)
        v0_cl = (rnd(N, C, H, W).abs() * 0.5).to(dtype).contiguous(memory_format=torch.channels_last)
        for (name, x), v0 in itertools.product(_layouts(base).items(), (None, v0_cl)):
            tag = f"{case or 'default'} {str(dtype)[6:]} x={name} v0={'cl' if v0 is not None else 'none'}"
            s1, v1, h1 = K.forward(x, v0, spec, k)
            s2, v2, h2 = forward_vectorised(x, v0, spec, k)
            if s1.stride() != empty_seq_like(x).stride() or v1.stride() != empty_step_like(x).stride():
                failures.append(f"{tag}: output strides {s1.stride()} / {v1.stride()}")
            if exact and not (torch.equal(s1, s2) and torch.allclose(h1, h2, atol=1e-6)
                              and torch.allclose(v1, v2, atol=1e-6)):  # fmt: skip
                failures.append(f"{tag}: forward differs (max |h| diff {(h1 - h2).abs().max():.2e})")
            if not exact and (s1 != s2).float().mean() > 0.02:  # bf16: the CPU path rounds every op, not only h
                failures.append(f"{tag}: {(s1 != s2).float().mean():.1%} spikes differ")
            grads = {
                "contiguous": rnd(T, N, C, H, W).to(dtype),
                "channels_last": rnd(T * N, C, H, W).to(dtype).contiguous(memory_format=torch.channels_last)
                .unflatten(0, (T, N)),
                "broadcast": torch.ones((), dtype=dtype, device=device).expand(T, N, C, H, W),
            }
            for (gname, g), gv in itertools.product(grads.items(), (None, rnd(N, C, H, W).to(dtype))):
                gx1, gv1, gk1 = K.backward(g, gv, h2, spec, k, v0)
                gx2, gv2, gk2 = backward_vectorised(g, gv, h2, spec, k, v0)
                tol = 1e-5 if exact else 5e-2
                if not (torch.allclose(gx1.float(), gx2.float(), atol=tol, rtol=tol)
                        and torch.allclose(gv1.float(), gv2.float(), atol=tol, rtol=tol)):  # fmt: skip
                    failures.append(f"{tag} g={gname} gv={gv is not None}: backward differs "
                                    f"({(gx1.float() - gx2.float()).abs().max():.2e})")
                if k is not None:  # bf16: the kernel works in fp32 on the stored values, so the fp32 path on them
                    if not exact:
                        gk2 = backward_vectorised(g.float(), None if gv is None else gv.float(), h2.float(), spec,
                                                  k, None if v0 is None else v0.float())[2]
                    if not torch.allclose(gk1, gk2, rtol=1e-4, atol=1e-4):
                        failures.append(f"{tag} g={gname} gv={gv is not None}: g_k {gk1.item():.6g} against "
                                        f"{gk2.item():.6g}")
                if gx1.stride() != empty_seq_like(h2).stride():
                    failures.append(f"{tag} g={gname}: g_x strides {gx1.stride()}")
    return failures


NAMES = ("g_x", "sum g_y", "sum g_y xhat")


def run_bn_neuron(device: torch.device, cases: list[dict] | None = None) -> list[str]:
    """The BatchNorm + neuron kernels (models/_bn_neuron_triton.py) against models.bn_neuron's torch path: every
    failure, one line each. fp32: equal spikes, gradients and per-channel sums to 1e-5 of their scale. bf16: against
    the torch path on the same values in fp32 (the torch path rounds every op in bf16, the kernels once), at most
    2% of spikes and of gradient elements apart (a spike flipped near the threshold changes its neighbours'), the
    per-channel sums no further from fp32 than twice the bf16 torch path's (or 5% of their scale; not checked
    for the discontinuous rect surrogate, nor PLIF). PLIF's rate gradient: to 1e-4 in fp32."""
    from models import _bn_neuron_triton as B
    from models.bn_neuron import _affine, backward_torch, forward_torch

    failures = []
    gen = torch.Generator().manual_seed(1)
    cases = CASES + PLIF_CASES if cases is None else cases

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    def far(a: torch.Tensor, b: torch.Tensor, tol: float) -> float:
        """The fraction of elements further apart than ``tol`` of the reference's largest magnitude."""
        a, b = a.float(), b.float()
        return ((a - b).abs() > tol * b.abs().max().clamp_min(1e-12)).float().mean().item()

    for case, dtype, batch in itertools.product(cases, (torch.float32, torch.bfloat16), (True, False)):
        spec = NeuronSpec(**case)
        k = plif_rate(torch.tensor(0.4, device=device), dtype) if spec.type == "plif" else None
        exact = dtype == torch.float32
        base = (rnd(T, N, C, H, W) * 1.5 + 0.8).to(dtype)
        mean, invstd = rnd(C) * 0.2, torch.rand(C, generator=gen).to(device) + 0.5
        scale, shift = _affine(torch.rand(C, generator=gen).to(device) + 0.5, rnd(C) * 0.3, mean, invstd)
        layouts = {k: v for k, v in _layouts(base).items() if k in ("contiguous", "channels_last", "slice")}
        for name, x in layouts.items():
            tag = f"bn+neuron {case or 'default'} {str(dtype)[6:]} {'batch' if batch else 'running'} x={name}"
            ref_x = x if exact else x.float()
            s1 = B.forward(x, scale, shift, spec, k)
            s2 = forward_torch(ref_x, scale, shift, spec, k)
            if s1.stride() != empty_seq_like(x).stride():
                failures.append(f"{tag}: spike strides {s1.stride()}")
            if (s1.float() != s2).float().mean() > (0.0 if exact else 0.02):
                failures.append(f"{tag}: {(s1.float() != s2).float().mean():.1%} spikes differ")
            g = rnd(T * N, C, H, W).to(dtype).contiguous(memory_format=torch.channels_last).unflatten(0, (T, N))
            *got, gk1 = B.backward(g, x, scale, shift, mean, invstd, batch, spec, k)
            *want, gk2 = backward_torch(g if exact else g.float(), ref_x, scale, shift, mean, invstd, batch, spec, k)
            if exact:
                checks = [(what, a, b, 1e-5, 0.0) for what, a, b in zip(NAMES, got, want, strict=True)]
                if k is not None and not torch.allclose(gk1, gk2, rtol=1e-4, atol=1e-4):
                    failures.append(f"{tag}: g_k {gk1.item():.6g} against {gk2.item():.6g}")
            else:  # g_x per element; the sums no further from fp32 than the torch path's own bf16 sums are
                checks = [("g_x", got[0], want[0], 5e-2, 0.02)]
                *today, _ = backward_torch(g, x, scale, shift, mean, invstd, batch, spec, k)
                # Not for the rect surrogate (a spike flipped by rounding moves its gradient by alpha), nor PLIF: its
                # other rate flips other spikes than the cases these bounds were set on, by as much (LIF at
                # tau = 1 / sigmoid(0.4) misses them too); its rate's arithmetic, the same in every dtype, is
                # checked in fp32 above, and its bf16 g_x per element below.
                named = zip(NAMES[1:], got[1:], want[1:], today[1:], strict=True)
                sums = named if spec.surrogate != "rect" and k is None else ()
                for what, a, b, c in sums:
                    bound = max(2 * (c.float() - b).abs().max().item(), 0.05 * b.abs().max().item())
                    if (a.float() - b).abs().max() > bound:
                        failures.append(f"{tag}: {what} off by {(a.float() - b).abs().max():.3g} of {b.abs().max():.3g} "
                                        f"(the bf16 torch path: {(c.float() - b).abs().max():.3g})")
            for what, a, b, tol, share in checks:
                if far(a, b, tol) > share:
                    failures.append(f"{tag}: {what} differs in {far(a, b, tol):.1%} of elements "
                                    f"(max {(a.float() - b.float()).abs().max():.3g} of {b.abs().max():.3g})")
            if got[0].stride() != empty_seq_like(x).stride():
                failures.append(f"{tag}: g_x strides {got[0].stride()}")
    return failures


def run_da(device: torch.device, quick: bool = False) -> list[str]:
    """The DA aggregation kernels (models/_da_triton.py) against float64 sums of the same values, for 1 to 37 terms
    (launches of up to 16 chained), NCHW and channels_last, fp32 (1e-5 of the scale) and bf16 (one rounding: 1%);
    then a DANet-101 step (its 23-block stage chains launches) with ``fuse_da`` on against off: equal loss and
    gradients (fp32, 1e-4 of each gradient's scale). Every failure, one line each."""
    from models import _da_triton as D
    from models import connections, create_model

    failures = []
    gen = torch.Generator().manual_seed(2)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    def off(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

    shape = (T * N, C, H, W)
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    for dtype, (lname, fmt), n in itertools.product(
        (torch.float32, torch.bfloat16), layouts.items(), (19,) if quick else (1, 5, 16, 17, 37)
    ):
        tag, tol = f"da {str(dtype)[6:]} {lname} {n} terms", 1e-5 if dtype == torch.float32 else 1e-2

        def make() -> torch.Tensor:
            return rnd(*shape).to(dtype).contiguous(memory_format=fmt)  # noqa: B023

        base, ts = make(), [make() for _ in range(n)]
        alpha = rnd(n * (n + 1) // 2)
        row = n * (n - 1) // 2
        got = D.weighted_sum(base, ts, alpha, row, 1, 0)
        want = base.double() + sum(alpha[row + k].double() * t.double() for k, t in enumerate(ts))
        if got.stride() != base.stride() or got.dtype != dtype:
            failures.append(f"{tag}: sum strides {got.stride()} dtype {got.dtype}, base {base.stride()}")
        if off(got, want) > tol:
            failures.append(f"{tag}: sum off by {off(got, want):.3g} of its scale")
        j = 3  # column j, rows m = j .. j + n - 1
        rows = j + n - 1
        alpha = rnd(rows * (rows + 1) // 2)
        idx = [m * (m - 1) // 2 + j - 1 for m in range(j, j + n)]
        y, gs = make(), [make() for _ in range(n)]
        got, dots = D.weighted_sum_dots(y, gs, alpha, j * (j - 1) // 2 + j - 1, j, 1)
        want = sum(alpha[i].double() * g.double() for i, g in zip(idx, gs, strict=True))
        want_dots = torch.stack([(g.double() * y.double()).sum() for g in gs])
        if got.stride() != y.stride():
            failures.append(f"{tag}: gradient strides {got.stride()}, y {y.stride()}")
        if off(got, want) > tol:
            failures.append(f"{tag}: gradient off by {off(got, want):.3g} of its scale")
        if off(dots, want_dots) > 1e-5:  # fp32 sums of products of the stored values
            failures.append(f"{tag}: dots off by {off(dots, want_dots):.3g} of their scale")

    # The network: DANet-101's stages of 3, 4, 23 and 3 blocks, learnable DA (the default), fp32.
    on_device = connections._on_device
    connections._on_device = lambda t: True  # the interpreter runs the kernels on CPU tensors
    try:
        grads = {}
        for fused in (False, True):
            torch.manual_seed(0)
            model = create_model("danet101", T=2, input_size=32, width=4, num_classes=10, fuse_da=fused).to(device)
            model.train()
            for stage in model.stages:
                seed = torch.Generator().manual_seed(len(stage.branches))
                with torch.no_grad():
                    stage.weights.alpha.uniform_(0.5, 1.5, generator=seed)
            x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to(device)
            model(x).mean(0).logsumexp(1).sum().backward()
            grads[fused] = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
        for k, want in grads[False].items():
            if off(grads[True][k], want) > 1e-4:
                failures.append(f"da network: fused gradient of {k} off by {off(grads[True][k], want):.3g}")
    finally:
        connections._on_device = on_device
    return failures


def main() -> int:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    cuda = torch.cuda.is_available() and not interpret
    if not cuda and not interpret:
        print("no CUDA device: run with TRITON_INTERPRET=1 to check the kernels in Triton's interpreter", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    # --quick: the default neuron only (each variant is a kernel compile on a GPU, ~1 s each)
    cases = CASES[:1] if "--quick" in sys.argv[1:] else None
    failures = run(device, cases) + run_bn_neuron(device, cases) + run_da(device, quick=cases is not None)
    for f in failures:
        print("FAIL", f)
    mode = "CUDA" if cuda else "Triton interpreter (CPU)"
    print(f"lif_triton_check on {mode}: {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
