"""Reference strategies, named as their config values, and the reference log-prob cache.

``make_reference(cfg, loaded)`` picks one for a run (``build``); ``strategies`` holds the
live ones (``NoReference``, ``AdaptersOff``, ``SeparateModel``), ``cache`` the on-disk
``Cached`` one, and ``refresh`` the rules that copy the student into the reference.
"""

from mlx_pref.reference.build import make_reference, reference_free, start_reference
from mlx_pref.reference.cache import (
    CACHE_FORMAT,
    Cached,
    dataset_fingerprint,
    model_fingerprint,
)
from mlx_pref.reference.refresh import mix_adapters, refresh
from mlx_pref.reference.strategies import (
    AdaptersOff,
    FrozenCopy,
    NoReference,
    Reference,
    SeparateModel,
    StartingWeights,
    reference_weights,
)

__all__ = [
    "CACHE_FORMAT",
    "AdaptersOff",
    "Cached",
    "FrozenCopy",
    "NoReference",
    "Reference",
    "SeparateModel",
    "StartingWeights",
    "dataset_fingerprint",
    "make_reference",
    "mix_adapters",
    "model_fingerprint",
    "reference_free",
    "reference_weights",
    "refresh",
    "start_reference",
]
