"""The neuron's configuration (``model.neuron``): shared by the neuron modules and their fused kernels.

A module of its own so that ``neurons`` (the modules), ``lif_fused`` (the fused op) and ``_lif_triton`` (its CUDA
kernels) all import it without importing each other in a circle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

NEURON_TYPES = ("lif", "plif", "if")
SURROGATES = ("atan", "sigmoid", "rect")
BACKENDS = ("auto", "fused", "reference")


def spec_from_any(cls: type, value: Any, label: str) -> Any:
    """A spec dataclass from itself, a dataclass with the same fields (the config's), a dict or None; unknown
    fields are an error naming the valid ones."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if hasattr(value, "__dataclass_fields__"):
        value = asdict(value)
    valid = [f.name for f in fields(cls)]
    if not isinstance(value, dict):
        raise TypeError(f"{label}: expected a dict of {valid}, got {type(value).__name__}")
    unknown = sorted(set(value) - set(valid))
    if unknown:
        raise ValueError(f"{label}: unknown field(s) {unknown}; valid fields: {', '.join(sorted(valid))}")
    return cls(**value)


@dataclass
class NeuronSpec:
    """The neuron fields of the model config (``model.neuron``); every default explicit."""

    type: str = "lif"  # lif | plif (learnable tau) | if
    tau: float = 2.0  # membrane time constant (LIF; PLIF initial value)
    v_threshold: float = 1.0
    v_reset: float | None = 0.0  # None = soft reset (subtract the threshold)
    decay_input: bool = True
    detach_reset: bool = True
    surrogate: str = "atan"  # atan | sigmoid | rect
    surrogate_alpha: float = 2.0
    backend: str = "auto"  # auto (= fused) | fused | reference (the autograd loop, for checking)

    def __post_init__(self) -> None:
        problems = []
        if self.type not in NEURON_TYPES:
            problems.append(f"neuron.type={self.type!r}: expected one of {', '.join(NEURON_TYPES)}")
        if self.surrogate not in SURROGATES:
            problems.append(f"neuron.surrogate={self.surrogate!r}: expected one of {', '.join(SURROGATES)}")
        if self.backend not in BACKENDS:
            problems.append(f"neuron.backend={self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.type in ("lif", "plif") and not float(self.tau) > 1.0:
            problems.append(f"neuron.tau={self.tau}: must be > 1")
        if not float(self.surrogate_alpha) > 0:
            problems.append(f"neuron.surrogate_alpha={self.surrogate_alpha}: must be > 0")
        if problems:
            raise ValueError("; ".join(problems))
        self.tau = float(self.tau)
        self.v_threshold = float(self.v_threshold)
        self.v_reset = None if self.v_reset is None else float(self.v_reset)
        self.surrogate_alpha = float(self.surrogate_alpha)

    def rate(self, k: Any = None) -> Any:
        """The charge's rate: PLIF's learned ``k`` when given, else ``1 / tau`` (unused by IF)."""
        return k if k is not None else 1.0 / self.tau

    def coefficients(self, k: Any = None) -> tuple:
        """(a, b) with h = a * v + b * x (+ a constant): the backward pass's coefficients (tensors for PLIF's k).
        Here, not beside the fused op, so that its CUDA kernels' wrappers take them without an import circle."""
        if self.type == "if":
            return 1.0, 1.0
        k = self.rate(k)
        return 1.0 - k, (k if self.decay_input else 1.0)

    @classmethod
    def from_any(cls, value: Any) -> NeuronSpec:
        """Build from a NeuronSpec, a dataclass with the same fields (the config's), a dict or None."""
        return spec_from_any(cls, value, "neuron")
