"""The run configuration: ``Config`` (``schema.py``), its checks (``checks.py``) and how it
is read from YAML files and flags (``load.py``). ``load_config`` is the one way to get one."""

from mlx_pref.config.checks import (
    DATA_FORMATS,
    DTYPES,
    EXPORT_FORMATS,
    FINE_TUNE_TYPES,
    GGUF_QUANTS,
    LR_SCHEDULES,
    QUANTIZATION_BITS,
    REFERENCES,
    REPORT_TO,
    TRUNCATION_MODES,
)
from mlx_pref.config.load import (
    config_from_dict,
    load_config,
    merge,
    read_yaml,
    rewrite_config,
)
from mlx_pref.config.schema import RUN_CONFIG, Config, LoraConfig

__all__ = [
    "DATA_FORMATS",
    "DTYPES",
    "EXPORT_FORMATS",
    "FINE_TUNE_TYPES",
    "GGUF_QUANTS",
    "LR_SCHEDULES",
    "QUANTIZATION_BITS",
    "REFERENCES",
    "REPORT_TO",
    "RUN_CONFIG",
    "TRUNCATION_MODES",
    "Config",
    "LoraConfig",
    "config_from_dict",
    "load_config",
    "merge",
    "read_yaml",
    "rewrite_config",
]
