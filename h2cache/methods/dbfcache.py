"""nunchaku's double first-block cache (``apply_cache_on_pipe(..., use_double_fb_cache=True)``).

Source: nunchaku-tech/nunchaku @ 3a3cc3d, ``nunchaku/caching/utils.py`` (the author of H2-Cache wrote it, PR #76).
It is H2-Cache without its two additions, which is why it runs on H2-Cache's machinery: full residuals instead of
PFS thumbnails, and stage 2 judged on its own threshold even when stage 1 hit.
"""

from __future__ import annotations

from ..config import DBFCacheConfig, H2CacheConfig
from .h2 import H2Cache


class DBFCache(H2Cache):
    def __init__(self, config: DBFCacheConfig):
        super().__init__(config)
        self.rule = H2CacheConfig(tau1=config.tau1, tau2=config.tau2, pfs=False, mode="independent")
