"""A DANet whose DA alphas differ per edge, and one training step of it: the tests of the dense aggregation
(the stage-wide backward, the fused sums) compare its outputs and gradients between two ways of summing."""

from __future__ import annotations

import torch

from models import create_model


def dense_danet(policy: str, width: int, name: str = "danet50") -> torch.nn.Module:
    """``name`` at T=2, 32 px, 10 classes, in training mode, alphas drawn from [0.5, 1.5] (so that a misplaced
    weight shows; at 1 every edge looks alike)."""
    torch.manual_seed(0)
    net = create_model(name, T=2, input_size=32, num_classes=10, width=width, checkpointing=policy).train()
    for stage in net.stages:
        with torch.no_grad():
            stage.weights.alpha.uniform_(0.5, 1.5)
    return net


def step_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))


def outputs_and_grads(model, x, y) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward: (the output, every parameter's gradient)."""
    out = model(x)
    torch.nn.functional.cross_entropy(out.mean(0), y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
