"""TaylorSeer (Liu et al., "From Reusing to Forecasting", ICCV 2025; Shenyi-Z/TaylorSeer @ 288776d), stage level.

Defaults as the official FLUX code: interval N = 6, order 1 (the paper reports order 2), first_enhance = 3.
Forecast of a stage's residual at distance k from the last computed step: ``sum_i D^i F * k^i / i!``.
See ``forecast.py`` for the schedule and the differences, and ``TaylorSeerConfig`` for what "stage level" changes.
"""

from __future__ import annotations

from .forecast import ForecastCache, taylor_coefficient


class TaylorSeer(ForecastCache):
    def coefficient(self, order: int, distance: int) -> float:
        return taylor_coefficient(order, distance)
