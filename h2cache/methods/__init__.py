"""Registry of cache methods: the name ``h2cache.apply`` takes -> (config class, method class)."""

from __future__ import annotations

import json
from dataclasses import asdict

from ..config import (
    DBFCacheConfig,
    FBCacheConfig,
    H2CacheConfig,
    H2ForecastConfig,
    HiCacheConfig,
    NoCacheConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
)
from .base import CacheMethod
from .dbfcache import DBFCache
from .fbcache import FBCache
from .h2 import H2Cache
from .h2_forecast import H2Forecast
from .hicache import HiCache
from .none import NoCache
from .taylorseer import TaylorSeer
from .teacache import TeaCache

METHODS = {
    "none": (NoCacheConfig, NoCache),
    "h2": (H2CacheConfig, H2Cache),
    "h2-forecast": (H2ForecastConfig, H2Forecast),
    "dbfcache": (DBFCacheConfig, DBFCache),
    "fbcache": (FBCacheConfig, FBCache),
    "teacache": (TeaCacheConfig, TeaCache),
    "taylorseer": (TaylorSeerConfig, TaylorSeer),
    "hicache": (HiCacheConfig, HiCache),
}


def build_method(method, **params) -> CacheMethod:
    """A method instance from a name and keyword parameters, or from a config object."""
    if not isinstance(method, str):
        if params:
            raise TypeError("pass either a config object or a method name with parameters, not both")
        config = method
        method = getattr(config, "method", None)
        if method not in METHODS or not isinstance(config, METHODS[method][0]):
            raise TypeError(f"not a cache config: {type(config).__name__}")
        return METHODS[method][1](config)
    if method not in METHODS:
        raise ValueError(f"unknown cache method {method!r}; choose one of {', '.join(METHODS)}")
    config_class, method_class = METHODS[method]
    try:
        config = config_class(**params)
    except TypeError as error:
        raise ValueError(f"method {method!r}: {error}") from None
    return method_class(config)


def resolved_settings(method: str, **params) -> dict:
    """Every parameter the method runs with, its defaults filled in, as JSON stores them: what a resumable run compares
    to tell a result made under other defaults from one it can keep."""
    return json.loads(json.dumps(asdict(build_method(method, **params).config)))


__all__ = ["METHODS", "CacheMethod", "build_method", "resolved_settings"]
