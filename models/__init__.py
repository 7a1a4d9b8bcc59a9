"""Spiking models: neurons, connections, the ResNet family with DA, telemetry. Imports torch only."""

from .connections import Connection, DASpec
from .neurons import MultiStepNeuron, NeuronSpec, make_neuron
from .resnet import DEPTHS, FAMILIES, REGISTRY, SpikingResNet, create_model, model_names

__all__ = [
    "Connection",
    "DASpec",
    "DEPTHS",
    "FAMILIES",
    "MultiStepNeuron",
    "NeuronSpec",
    "REGISTRY",
    "SpikingResNet",
    "create_model",
    "list_models",
    "make_neuron",
    "model_names",
]


def list_models() -> list[dict]:
    """Every registered model: name, connection, depth, params_m, gflops_224 (see models.registry)."""
    from .registry import list_models as _list

    return _list()
