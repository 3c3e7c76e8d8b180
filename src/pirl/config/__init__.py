"""Configuration: dataclass schema, YAML presets shipped in the package, ``key=value`` overrides, validation."""

from pirl.config.load import PRESETS, config_to_dict, load_config, validate
from pirl.config.schema import Config, DataConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig

__all__ = [
    "PRESETS", "Config", "DataConfig", "LossConfig", "ModelConfig", "OptimConfig", "TrainConfig",
    "config_to_dict", "load_config", "validate",
]
