"""Typed configuration: schema, presets, loading and validation."""

from orchestrator.config.load import load_config, preset_names, to_dict, to_yaml
from orchestrator.config.schema import Config

__all__ = ["Config", "load_config", "preset_names", "to_dict", "to_yaml"]
