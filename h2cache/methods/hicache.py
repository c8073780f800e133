"""HiCache (arXiv 2508.16984, ICLR 2026; github.com/fenglang918/HiCache), stage level.

TaylorSeer's schedule and finite differences with a scaled Hermite basis: the order-i term is
``D^i F * sigma^i * H_i(sigma * k) / i!``, a shrunk extrapolation. Defaults for FLUX.1-dev: N = 7, order 2,
sigma = 0.5, first_enhance = 3.
"""

from __future__ import annotations

from .forecast import ForecastCache, hermite_coefficient


class HiCache(ForecastCache):
    def coefficient(self, order: int, distance: int) -> float:
        return hermite_coefficient(order, distance, self.config.scale)
