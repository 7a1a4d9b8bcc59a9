"""Mixup and CutMix on a batch: mixed images and soft targets, deterministic from (seed, step, micro-batch).

Mixup (Zhang et al. 2018): ``x = lam * x + (1 - lam) * x[rev]``, lam ~ Beta(a, a). CutMix (Yun et al. 2019): a box
of area ``(1 - lam)`` from ``x[rev]`` is pasted in, and lam is corrected to the pasted area. The partner of each
sample is the batch reversed (no extra randomness to resume). With both alphas set, each batch picks one of the two
with probability 1/2 (as timm does). The random draws come from a generator seeded by (seed, step, micro), so a
resumed run mixes exactly as the uninterrupted one. Targets are class probabilities ``[N, num_classes]``;
``loop.loss_fn`` takes them like integer labels (label smoothing applies on top).
"""

from __future__ import annotations

import numpy as np
import torch


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
              seed: int, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [N, C, H, W], y: int64 [N] -> (mixed x, soft targets float32 [N, num_classes])."""
    onehot = torch.nn.functional.one_hot(y, num_classes).to(torch.float32)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return x, onehot
    rng = np.random.default_rng([int(seed), int(step), int(micro)])
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    partner = x.flip(0)
    if use_cutmix:
        H, W = x.shape[-2:]
        cut = np.sqrt(1.0 - lam)
        ch, cw = int(H * cut), int(W * cut)
        cy, cx = int(rng.integers(H)), int(rng.integers(W))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
        x = x.clone()
        x[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)
    else:
        x = x * lam + partner * (1.0 - lam)
    target = onehot * lam + onehot.flip(0) * (1.0 - lam)
    return x, target
