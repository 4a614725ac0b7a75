"""elastic-moe: a mixture-of-experts inference runtime on JAX that keeps serving when devices die.

The user-facing Python API.
"""

from elastic_moe.engine import Engine, EngineOptions, TokenEvent
from elastic_moe.requests import FinishReason, Request, RequestError, SamplingParams
from models.config import ConfigError, ModelConfig
from models.params import init_params
from models.presets import PRESETS, get_preset

__all__ = [
    "PRESETS",
    "ConfigError",
    "Engine",
    "EngineOptions",
    "FinishReason",
    "ModelConfig",
    "Request",
    "RequestError",
    "SamplingParams",
    "TokenEvent",
    "get_preset",
    "init_params",
]
