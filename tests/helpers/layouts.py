"""One sequence ``[4, 3, 5, 6, 7]`` in every memory layout a neuron kernel must accept, for the layout tests."""

from __future__ import annotations

import torch


def sequence_layouts(base: torch.Tensor) -> dict[str, torch.Tensor]:
    """``base`` (contiguous ``[T, N, C, H, W]``) as NCHW, channels_last steps, broadcast over T (from its first
    step), broadcast channels_last, and a slice of a wider tensor (not dense)."""
    t, n = base.shape[:2]
    return {
        "contiguous": base,
        "channels_last": base.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (t, n)),
        "broadcast": base[:1].expand(*base.shape),
        "broadcast_cl": base[0].contiguous(memory_format=torch.channels_last).unsqueeze(0).expand(*base.shape),
        "slice": torch.cat([base, base], 2)[:, :, 2:2 + base.shape[2]],
    }
