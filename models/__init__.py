"""The math of the MoE transformer: configs, layers, routing, experts over slots, KV cache.

Part of the elastic-moe distribution (elastic_moe.layout checks this line).
"""

from models.config import ConfigError, ModelConfig
from models.presets import PRESETS, get_preset

__all__ = ["PRESETS", "ConfigError", "ModelConfig", "get_preset"]
