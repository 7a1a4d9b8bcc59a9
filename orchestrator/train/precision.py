"""Training precision: the dtype the images are cast to, and whether the forward runs under autocast.

* ``fp32``: everything fp32.
* ``bf16-mixed`` (``auto`` on CUDA): ``torch.autocast`` to bf16 around each forward (and DeepSpeed's
  ``torch_autocast`` section saying so: without it DeepSpeed switches autocast off inside its forward on a GPU,
  engine.deepspeed_config). Weights, gradients, the
  optimizer and BatchNorm's running statistics stay fp32, so DeepSpeed runs as an fp32 engine: its gradient
  all-reduce is fp32, and its bf16 optimizer wrapper, which reads the gradient norm on the host every step under
  ZeRO 1, is not used. This is how the danet152 model step was measured on the H200 (BENCHMARKS.md).
* ``bf16``: DeepSpeed's bf16 engine: weights and BatchNorm buffers bf16, fp32 master weights in the optimizer.
* ``fp16``: DeepSpeed's fp16 engine with dynamic loss scaling.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

_INPUTS = {"bf16": torch.bfloat16, "fp16": torch.float16}
_AUTOCAST = {"bf16-mixed": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    name: str = "fp32"  # fp32 | bf16-mixed | bf16 | fp16 (resolved: never auto)

    def __post_init__(self) -> None:
        if self.name not in ("fp32", "bf16-mixed", "bf16", "fp16"):
            raise ValueError(f"precision {self.name!r}: expected fp32, bf16-mixed, bf16 or fp16")

    def __str__(self) -> str:
        return self.name

    @property
    def inputs(self) -> torch.dtype:
        """The dtype images are cast to before the forward: the engine's weight dtype."""
        return _INPUTS.get(self.name, torch.float32)

    @property
    def engine(self) -> str:
        """What DeepSpeed is told: ``bf16``, ``fp16`` or ``fp32`` (bf16-mixed: fp32, with torch_autocast)."""
        return self.name if self.name in _INPUTS else "fp32"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype forwards autocast to, or None (no autocast)."""
        return _AUTOCAST.get(self.name)

    def forward(self, device: str) -> contextlib.AbstractContextManager:
        """The context a forward (training or evaluation) runs in."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


FP32 = Precision()


def resolve(setting: str, device: str) -> str:
    """``train.precision`` for a device: ``auto`` is bf16-mixed on CUDA and fp32 elsewhere."""
    if setting == "auto":
        return "bf16-mixed" if device == "cuda" else "fp32"
    return setting
