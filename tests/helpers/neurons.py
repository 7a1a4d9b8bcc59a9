"""The neuron variants the tests run every neuron path on: each charge (LIF with and without decay_input, IF,
PLIF), reset (hard to 0, hard to another value, soft), detached or not, and surrogate."""

from __future__ import annotations

# the variants the fused paths cover (LIF and IF): the torch loop, the C++ and Triton kernels, BatchNorm + neuron
FUSED_NEURON_CASES = [
    dict(type="lif"),
    dict(type="lif", v_reset=None),
    dict(type="lif", v_reset=-0.2, detach_reset=False),
    dict(type="lif", decay_input=False, surrogate="sigmoid", surrogate_alpha=4.0),
    dict(type="lif", decay_input=False, v_reset=0.3),
    dict(type="lif", v_reset=None, detach_reset=False, surrogate="rect", surrogate_alpha=1.0),
    dict(type="lif", tau=3.0, v_threshold=0.5),
    dict(type="if"),
    dict(type="if", v_reset=None, surrogate="sigmoid"),
]

# PLIF: the same fused ops with a learnable rate k = sigmoid(w), and its gradient g_k
PLIF_CASES = [
    dict(type="plif"),
    dict(type="plif", v_reset=None, detach_reset=False, surrogate="sigmoid", surrogate_alpha=4.0),
    dict(type="plif", decay_input=False, v_reset=0.3),
    dict(type="plif", decay_input=False, v_reset=None, surrogate="rect", surrogate_alpha=1.0),
]


def case_id(case: dict) -> str:
    """A readable pytest id for one variant."""
    return "-".join(f"{k}={v}" for k, v in case.items())
