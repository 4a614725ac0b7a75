"""The math of the MoE transformer: configs, layers, routing, experts over slots, KV cache."""

from models.config import ConfigError, ModelConfig
from models.presets import PRESETS, get_preset

__all__ = ["PRESETS", "ConfigError", "ModelConfig", "get_preset"]
