"""elastic-moe: a mixture-of-experts inference runtime on JAX that keeps serving when devices die.

The user-facing Python API. Names load on first use, so that light users (the CLI's client
commands, `elastic_moe.reconfiguration`) do not pay for importing JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Engine": "elastic_moe.engine",
    "EngineOptions": "elastic_moe.engine",
    "TokenEvent": "elastic_moe.engine",
    "FinishReason": "elastic_moe.requests",
    "Request": "elastic_moe.requests",
    "RequestError": "elastic_moe.requests",
    "SamplingParams": "elastic_moe.requests",
    "ConfigError": "models.config",
    "ModelConfig": "models.config",
    "init_params": "models.params",
    "PRESETS": "models.presets",
    "get_preset": "models.presets",
}

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

if TYPE_CHECKING:
    from elastic_moe.engine import Engine, EngineOptions, TokenEvent
    from elastic_moe.requests import FinishReason, Request, RequestError, SamplingParams
    from models.config import ConfigError, ModelConfig
    from models.params import init_params
    from models.presets import PRESETS, get_preset


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'elastic_moe' has no attribute {name!r}")
    if _EXPORTS[name].startswith("models."):
        from elastic_moe.layout import check_layout

        check_layout()  # a foreign `models` would fail below with a confusing error
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
