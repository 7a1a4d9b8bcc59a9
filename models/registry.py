"""The model catalogue for ``orchestrator models list``: names, connection, depth, size and cost.

Sizes are for the reference configuration (1000 classes, width 64, 224x224, T=4): parameters in millions and
GFLOPs per time step, counted as multiply-accumulates of the convolutions and the FC (the convention under which
ResNet-50 is "4.1 GFLOPs"). Models are built on the meta device, so listing allocates no memory; the whole
registry (20 models) takes ~12 s on a 2-core box, one DANet-152 ~1 s.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .resnet import DEPTHS, FAMILIES, REGISTRY, create_model


def model_cost(name: str, input_size: int = 224, **overrides: Any) -> dict[str, float]:
    """``params_m`` and ``gflops`` per time step of a registered model, from a meta-device forward."""
    with torch.device("meta"):
        model = create_model(name, T=1, input_size=input_size, **overrides)
        macs = [0.0]

        def hook(m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            if isinstance(m, nn.Conv2d):
                macs[0] += out.numel() * m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            else:
                macs[0] += out.numel() * m.in_features

        handles = [
            m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
        ]
        with torch.no_grad():
            model(torch.empty(1, model.stem_conv.in_channels, input_size, input_size))
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    return {"params_m": params / 1e6, "gflops": macs[0] / 1e9}


def list_models() -> list[dict[str, Any]]:
    """One dict per registered model: name, family, connection, depth, block, params_m, params, gflops_224.

    ``connection`` is the model's own (config ``connection: default``); for DANets ``da(mem,net)`` is the default
    DA variant (``da.domain=membrane``, ``da.span=network``, ``da.weights=learnable``).
    """
    rows = []
    for name, (family, depth) in REGISTRY.items():
        cost = model_cost(name)
        connection = FAMILIES[family].value
        if connection == "da":
            connection = "da(mem,net)"  # the default DA: membrane domain, network span, learnable weights
        rows.append(
            {
                "name": name,
                "family": family,
                "connection": connection,
                "depth": depth,
                "block": DEPTHS[depth][0],
                "params_m": round(cost["params_m"], 3),
                "params": round(cost["params_m"] * 1e6),
                "gflops_224": round(cost["gflops"], 3),
            }
        )
    return rows
