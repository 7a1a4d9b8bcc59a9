"""Firing rates, synaptic operations (SOPs) and an energy estimate from one forward pass.

Conventions of the SNN literature (Horowitz 2014, 45 nm): an accumulate (AC) costs 0.9 pJ and a
multiply-accumulate (MAC) 4.6 pJ. A convolution or FC layer whose input is non-negative and integer-valued (binary
spikes, or SEW-ADD's spike counts) performs ``MACs * mean(input)`` accumulates (a synaptic operation per spike and
fan-out); any other input (the image at the stem, a real-valued membrane stream on a projection shortcut) costs
its full MACs. Counts are per sample for the whole forward over all T steps.

``measure(model, x)`` returns flat float keys, ready for ``log_metrics``:
``firing_rate/<stage>`` (stem, stage1..stage4; spikes per neuron per time step), ``firing_rate/mean``,
``firing_rate/layer/<neuron module name>``, ``sops`` (ACs), ``macs``, ``energy_mj``, ``ann_energy_mj`` (the same
network's MACs as an ANN at one time step, for the usual ratio). It runs under ``torch.no_grad`` and leaves the
model's training mode unchanged (call it on a small batch: a few images suffice).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .bn_neuron import unfused
from .neurons import MultiStepNeuron

E_AC_PJ = 0.9
E_MAC_PJ = 4.6


def _group(name: str) -> str:
    if name.startswith("stages."):
        return f"stage{int(name.split('.')[1]) + 1}"
    return "head" if name.startswith(("head", "fc")) else "stem"


def _macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        return out.numel() * k
    assert isinstance(module, nn.Linear)
    return out.numel() * module.in_features


def _seq_len(x_in: torch.Tensor, x: torch.Tensor, time_steps: int) -> int:
    """T * N for the model input ``x`` (images [N, ...] or a sequence [T, N, ...])."""
    return x.shape[0] * x.shape[1] if x.dim() == 5 else x.shape[0] * time_steps


def measure(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Telemetry of one forward pass of ``model`` on ``x`` (see the module docstring for the keys)."""
    spikes: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # name -> [spike count, neuron-steps]
    ops = {"sops": 0.0, "macs": 0.0, "dense_macs": 0.0}
    time_steps = int(getattr(model, "T", 1))

    def on_neuron(name: str):
        def hook(_m, _inp, out):
            spikes[name][0] += float(out.sum())
            spikes[name][1] += out.numel()

        return hook

    def on_synapse(module: nn.Module):
        def hook(_m, inp, out):
            x_in = inp[0]
            macs = _macs(module, out)
            # Inside the network convolutions see [T * N, ...] and the FC [T, N, C]; only the stem convolves the
            # static image once ([N, ...]), which hardware would repeat at every step: count it T times.
            once = x_in.dim() == 4 and x_in.shape[0] != _seq_len(x_in, x, time_steps)
            per_step = macs if once else macs / time_steps
            ops["dense_macs"] += per_step
            if bool((x_in >= 0).all()) and bool((x_in == x_in.round()).all()):
                ops["sops"] += per_step * time_steps * float(x_in.float().mean())
            else:
                ops["macs"] += per_step * time_steps

        return hook

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, MultiStepNeuron):
            handles.append(m.register_forward_hook(on_neuron(name)))
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(on_synapse(m)))
    was_training = model.training
    try:
        model.eval()
        # BatchNorm + neuron as one op calls no neuron module, so the hooks above would not see its spikes: this
        # one pass runs the pair, which computes the same spikes
        with torch.no_grad(), unfused(model):
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    n = x.shape[1] if x.dim() == 5 else x.shape[0]
    out: dict[str, float] = {}
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, (count, total) in spikes.items():
        out[f"firing_rate/layer/{name}"] = count / max(total, 1)
        g = groups[_group(name)]
        g[0] += count
        g[1] += total
    for group, (count, total) in sorted(groups.items()):
        out[f"firing_rate/{group}"] = count / max(total, 1)
    all_count = sum(c for c, _ in spikes.values())
    all_total = sum(t for _, t in spikes.values())
    out["firing_rate/mean"] = all_count / max(all_total, 1)
    out["sops"] = ops["sops"] / n
    out["macs"] = ops["macs"] / n
    out["energy_mj"] = (ops["sops"] * E_AC_PJ + ops["macs"] * E_MAC_PJ) / n * 1e-9
    out["ann_energy_mj"] = ops["dense_macs"] / n * E_MAC_PJ * 1e-9
    return out
