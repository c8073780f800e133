"""One configuration dataclass per cache method; every field is documented and validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

H2_MODES = ("official", "independent")


def _check_threshold(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}.{name} must be a finite number >= 0, got {value!r}")


def _check_divisor(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name} must be an integer >= 1, got {value!r}")


class MethodConfig:
    """Base of the method configurations: ``method`` names the method in ``h2cache.apply``."""

    method: ClassVar[str] = ""
    # the values each text field accepts, for forms that offer them as a choice
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}

    def to_dict(self) -> dict:
        return {"method": self.method, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass
class NoCacheConfig(MethodConfig):
    """Every block runs at every step, through h2cache's own forward: the baseline, and its overhead measure."""

    method = "none"


@dataclass
class H2CacheConfig(MethodConfig):
    r"""H2-Cache: hierarchical dual-stage cache (Sung et al., arXiv 2510.27171), with the official code's semantics.

    Each step, double block 0 and single block 0 run as probes. A probe's residual is compared, by Pooled Feature
    Summarization and relative L1, with the residual stored at that stage's last full computation.

    Args:
        tau1 (`float`, defaults to 0.15):
            Structure threshold. Below it (strict ``<``), double blocks 1..18 are replaced by their cached residual.
        tau2 (`float`, defaults to 0.22):
            Detail threshold. Below it, single blocks 1..37 are replaced by their cached residual.
        pool1 (`int`, defaults to 2048):
            Stage-1 PFS divisor: the square pooling kernel is ``max(1, N_img // pool1)`` over [tokens x channels].
            It is not a kernel size; at 1024x1024 (4096 image tokens) the kernel is 2.
        pool2 (`int`, defaults to 384):
            Stage-2 PFS divisor over the ``N_txt + N_img`` joint tokens; at 1024x1024 the kernel is 12.
        pfs (`bool`, defaults to True):
            False compares full residuals instead of thumbnails (the paper's PFS ablation).
        mode (`str`, defaults to "official"):
            "official": a stage-1 hit also reuses stage 2 without measuring it, as the authors' code does.
            "independent": stage 2 is always judged on its own threshold, as the paper's text describes.
    """

    method = "h2"
    choices = {"mode": H2_MODES}
    tau1: float = 0.15
    tau2: float = 0.22
    pool1: int = 2048
    pool2: int = 384
    pfs: bool = True
    mode: str = "official"

    def __post_init__(self):
        _check_threshold("H2CacheConfig", "tau1", self.tau1)
        _check_threshold("H2CacheConfig", "tau2", self.tau2)
        _check_divisor("H2CacheConfig", "pool1", self.pool1)
        _check_divisor("H2CacheConfig", "pool2", self.pool2)
        if not isinstance(self.pfs, bool):
            raise ValueError(f"H2CacheConfig.pfs must be True or False, got {self.pfs!r}")
        if self.mode not in H2_MODES:
            raise ValueError(f"H2CacheConfig.mode must be one of {H2_MODES}, got {self.mode!r}")


@dataclass
class DBFCacheConfig(MethodConfig):
    r"""nunchaku's double first-block cache (``use_double_fb_cache=True``), H2-Cache's direct ancestor.

    Two first-block caches in series, compared on full residuals (no PFS), stage 2 always judged on its own. Run
    at H2-Cache's thresholds (the defaults here) it isolates what PFS and the forced stage-2 hit add; nunchaku's own
    examples use 0.09 / 0.12 (V1) and 0.12 / 0.20 (V2).

    Args:
        tau1 (`float`, defaults to 0.15): double-stage threshold (``residual_diff_threshold_multi``).
        tau2 (`float`, defaults to 0.22): single-stage threshold (``residual_diff_threshold_single``).
    """

    method = "dbfcache"
    tau1: float = 0.15
    tau2: float = 0.22

    def __post_init__(self):
        _check_threshold("DBFCacheConfig", "tau1", self.tau1)
        _check_threshold("DBFCacheConfig", "tau2", self.tau2)


@dataclass
class FBCacheConfig(MethodConfig):
    r"""Block Cache: nunchaku's first-block cache (from ParaAttention), the paper's "Block Cache" row.

    Double block 0 is the probe; when its image residual is within ``threshold`` (relative L1, strict ``<``) of the
    one stored at the last miss, the cached residual of all other blocks (double 1.. and every single block)
    replaces them.

    Args:
        threshold (`float`, defaults to 0.12): nunchaku's recommended value ("2x at 50 steps").
        pool (`int`, *optional*): a PFS divisor for the comparison. None compares full residuals, as upstream
            nunchaku does; 2048 is the variant the H2-Cache fork runs (which one the paper used is unknown).
    """

    method = "fbcache"
    threshold: float = 0.12
    pool: int | None = None

    def __post_init__(self):
        _check_threshold("FBCacheConfig", "threshold", self.threshold)
        if self.pool is not None:
            _check_divisor("FBCacheConfig", "pool", self.pool)


# TeaCache4FLUX's rescale polynomial (np.polyfit of input change -> output change over FLUX.1-dev runs).
TEACACHE_FLUX_COEFFICIENTS = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)


@dataclass
class TeaCacheConfig(MethodConfig):
    r"""TeaCache4FLUX (Liu et al., "Timestep Embedding Tells", CVPR 2025), as ali-vilab/TeaCache @ 7c10efc runs it.

    The indicator is double block 0's modulated image input. Its step-to-step relative L1, passed through a
    rescale polynomial, accumulates; while the sum stays below ``threshold`` the whole step reuses the last
    computed residual of all blocks; when it reaches the threshold the step is computed and the sum restarts.
    The first and the last step are always computed.

    Args:
        threshold (`float`, defaults to 0.6): ``rel_l1_thresh``; the published speed-ups at 28 steps are 1.5x
            (0.25), 1.8x (0.4), 2.0x (0.6), 2.25x (0.8). Since the polynomial is >= 0.18 on [0, 0.6], a
            threshold caps consecutive reuses (0.8: four), so the H2 paper's 4.99x at 100 steps fits 0.8.
        num_steps (`int`, *optional*): steps per generation, to force the last one. Taken from the pipeline's
            scheduler when applied to a pipeline; needed only for a bare transformer.
        coefficients (`tuple[float, ...]`): the rescale polynomial, highest power first (FLUX.1's by default).
    """

    method = "teacache"
    threshold: float = 0.6
    num_steps: int | None = None
    coefficients: tuple[float, ...] = TEACACHE_FLUX_COEFFICIENTS

    def __post_init__(self):
        _check_threshold("TeaCacheConfig", "threshold", self.threshold)
        if self.num_steps is not None and (
            isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1
        ):
            raise ValueError(f"TeaCacheConfig.num_steps must be an integer >= 1, got {self.num_steps!r}")
        if not self.coefficients or not all(
            isinstance(c, (int, float)) and math.isfinite(c) for c in self.coefficients
        ):
            raise ValueError(f"TeaCacheConfig.coefficients must be finite numbers, got {self.coefficients!r}")
        self.coefficients = tuple(float(c) for c in self.coefficients)


def _check_schedule(owner: str, interval, order, first_enhance) -> None:
    for name, value, minimum in (("interval", interval, 1), ("order", order, 0), ("first_enhance", first_enhance, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class TaylorSeerConfig(MethodConfig):
    r"""TaylorSeer (Liu et al., ICCV 2025, arXiv 2503.06923) at stage level: forecast, don't reuse.

    A fixed schedule computes the first ``first_enhance`` steps and then every ``interval``-th; at the others each
    stage's residual is extrapolated from its finite differences over the computed steps (Taylor series in the
    step index). The official code forecasts every attention/MLP output inside every block with the current
    step's gates; here the forecast unit is the stage, which any backend supports (nunchaku V1 has no
    per-module outputs to hook).

    Args:
        interval (`int`, defaults to 6): ``fresh_threshold`` N; 50 steps at N = 6 compute 10 steps (5x).
        order (`int`, defaults to 1): the official code's ``max_order`` (the paper reports order 2).
        first_enhance (`int`, defaults to 3): leading steps always computed.
    """

    method = "taylorseer"
    interval: int = 6
    order: int = 1
    first_enhance: int = 3

    def __post_init__(self):
        _check_schedule("TaylorSeerConfig", self.interval, self.order, self.first_enhance)


@dataclass
class HiCacheConfig(MethodConfig):
    r"""HiCache (arXiv 2508.16984, ICLR 2026) at stage level: TaylorSeer's schedule and differences, forecast with
    scaled physicists' Hermite polynomials, ``sum_i Delta^i F * scale^i * H_i(scale * k) / i!``.

    Args:
        interval (`int`, defaults to 7): computed every 7th step (50 steps: 9 computed, 5.55x).
        order (`int`, defaults to 2).
        scale (`float`, defaults to 0.5): sigma, the Hermite scale; the paper sweeps 0.4-1.0.
        first_enhance (`int`, defaults to 3): leading steps always computed.
    """

    method = "hicache"
    interval: int = 7
    order: int = 2
    scale: float = 0.5
    first_enhance: int = 3

    def __post_init__(self):
        _check_schedule("HiCacheConfig", self.interval, self.order, self.first_enhance)
        _check_threshold("HiCacheConfig", "scale", self.scale)


FORECAST_BASES = ("taylor", "hermite")
FORECAST_DISTANCES = ("forecast", "accumulated", "anchor")
H2_FORECAST_MODES = (*H2_MODES, "chained")


@dataclass
class H2ForecastConfig(MethodConfig):
    r"""H2-Forecast: H2-Cache's two probes decide what each stage computes; a reused stage is forecast, not copied.

    Each step, double block 0 and single block 0 run as probes and are summarised by PFS, as in H2-Cache. A stage
    whose probe stays within its threshold skips its remaining blocks, and their residual is extrapolated from the
    stage's last full computations (Taylor finite differences as in TaylorSeer, or HiCache's scaled Hermite basis)
    instead of being reused as it was. By default a stage is judged by its probe's own forecast error: the probe's
    thumbnail is extrapolated exactly as the rest of the stage would be, so the threshold bounds the relative error
    the stage's forecast shares, a quantity that does not grow with the step count as the distance to a fixed
    anchor does.

    Args:
        tau1 (`float`, defaults to 0.3):
            Structure threshold (double blocks): the stage is forecast while its distance stays strictly below
            it. As in H2-Cache, larger means more reuse.
        tau2 (`float`, defaults to 0.3):
            Detail threshold (single blocks), the same way.
        pool1 (`int`, defaults to 2048): stage-1 PFS divisor, as ``H2CacheConfig.pool1``.
        pool2 (`int`, defaults to 384): stage-2 PFS divisor, as ``H2CacheConfig.pool2``.
        distance (`str`, defaults to "forecast"):
            What the probe's thumbnail is compared with. "forecast": its own forecast from the stage's computed
            steps (the same extrapolation the stage gets), so the threshold bounds the relative forecast error.
            "accumulated": the previous step's thumbnail, the relative L1 summed since the stage's last miss
            (TeaCache's accumulation). "anchor": the thumbnail of the last miss (H2-Cache's rule).
        order (`int`, defaults to 2):
            Highest finite difference of the forecast; 0 reuses the last computed residual as H2-Cache does.
        basis (`str`, defaults to "hermite"): "taylor" (``k^i / i!``) or "hermite" (HiCache's scaled Hermite).
        scale (`float`, defaults to 0.5): the Hermite scale sigma; unused by "taylor".
        max_run (`float`, *optional*, defaults to 0.2):
            Longest run of consecutive forecasts per stage, as a share of the call's steps (0.2: 10 of 50, 20 of
            100), so that it means the same stretch of the trajectory at any step count. None: no cap (also when
            the step count is unknown, on a bare transformer).
        min_run (`float`, defaults to 0.16):
            Shortest run: after a stage computes, it is forecast whole, probe not run, for this share of the call's
            steps (0.16: 8 of 50, 16 of 100), and its probe decides only between ``min_run`` and ``max_run``. A
            just-computed stage's forecast is at its most accurate, so its probe would cost a block to say so; and
            early in the trajectory the probe's relative error is large (on the embedded model at 50 steps, after ten
            forecasts: 1.5-2.5 in the first run, 0.4-1.0 in the second, 0.15-0.35 later) while the image barely shows
            it: left to the probes, the stages recompute in the first steps and leave long runs late. On the
            embedded model of commit cd41e16 (six grammar prompts, PSNR against the uncached image, ``warmup`` 2)
            these run windows computed 12.1% of the blocks at 47.4 dB mean (43.9 dB at worst) at 50 steps, and 7.0% at
            47.1 dB (43.6) at 100; no floor and ``max_run`` 0.24, 14.6% at 47.4 dB (42.7) and 6.9% at 45.9 dB (37.9).
            0 lets the probe decide from the first forecast; at or above ``max_run`` every run is ``max_run`` long (a
            fixed schedule); ignored for a stage whose threshold is 0 (nothing is forecast) and on a bare transformer
            (the step count is unknown).
        warmup (`int`, defaults to 1):
            Leading steps computed in full before any forecast. With one, the stages are forecast from the first
            step's residual alone (order 0 until a second computation) through the first ``min_run`` of the steps,
            where the trajectory's noise still hides what the residual's change would draw. A second warm-up step
            (a first difference from the start) costs a full step, which the same PSNR does not repay at 28 or 50 steps.
            On the embedded model of commit a18915f (six grammar prompts, each of the frontier's ten threshold and run
            window settings, warmup 1 against 2): at 28 steps the defaults compute 18.0% of the blocks at 45.5 dB mean
            (42.6 at worst) against 21.5% at 47.3 dB, and the cheapest setting 14.4% at 43.3 dB against 18.0% at 44.0;
            at 50 steps 10.1% at 45.4 dB against 12.0% at 46.7, and 8.2% at 43.1 dB against 10.2% at 43.8. At every
            level from 40 to 50 dB warmup 1 needs fewer blocks at 28 and 50 steps (40 dB: 14.4 against 18.0% at 28, 8.2
            against 10.2% at 50); at 100 steps the two fall on one curve (defaults 5.8% at 44.9 dB against 6.8% at 47.4;
            7.2% at 48.2 against 8.3% at 50.3).
        mode (`str`, defaults to "chained"):
            "chained": a stage-1 hit forecasts stage 2 whole, its probe included, so a step where both stages are
            forecast runs at most one block (1 of FLUX.1's 57 instead of 2); stage 2 is judged on its probe when
            stage 1 computes, and also once it has reached ``max_run``. On the embedded model it computes 19% of the
            blocks where "independent" computes 27%, at the same PSNR (50 steps, 0.3 / 0.3, every probe run).
            "independent": each stage is judged on its own probe at every step. "official": a stage-1 hit also
            forecasts stage 2 without judging it, as H2-Cache's code does (its probe still runs).
        lazy_probes (`float`, defaults to 0.5):
            Skip a stage's probe while its last measured distance, grown linearly with the steps since the stage's
            last computation, stays below this share of the stage's threshold; the stage is then forecast whole,
            probe included. A forecast's distance grows about linearly between computations, so such a probe
            mostly confirms the rate already measured, and the margin left below the threshold absorbs the rest.
            0 runs every probe; at most 1. Without the ``min_run`` floor, on the 19 + 38-block recipe model (six
            prompts, 100 steps) 0.5 computed 6.5% of the blocks at 46.7 dB where every probe computed 7.6% at 46.2
            dB; 0.75 computed 5.6% but fell to 44.5 dB. With the floor it skips nothing at the defaults: a probe
            runs only once the forecast has aged, when its distance is near the threshold.
    """

    method = "h2-forecast"
    choices = {"mode": H2_FORECAST_MODES, "distance": FORECAST_DISTANCES, "basis": FORECAST_BASES}
    tau1: float = 0.3
    tau2: float = 0.3
    pool1: int = 2048
    pool2: int = 384
    distance: str = "forecast"
    order: int = 2
    basis: str = "hermite"
    scale: float = 0.5
    max_run: float | None = 0.2
    warmup: int = 1
    mode: str = "chained"
    lazy_probes: float = 0.5
    min_run: float = 0.16

    def __post_init__(self):
        owner = "H2ForecastConfig"
        _check_threshold(owner, "tau1", self.tau1)
        _check_threshold(owner, "tau2", self.tau2)
        _check_divisor(owner, "pool1", self.pool1)
        _check_divisor(owner, "pool2", self.pool2)
        if self.distance not in FORECAST_DISTANCES:
            raise ValueError(f"{owner}.distance must be one of {FORECAST_DISTANCES}, got {self.distance!r}")
        _check_count(owner, "order", self.order, 0)
        if self.basis not in FORECAST_BASES:
            raise ValueError(f"{owner}.basis must be one of {FORECAST_BASES}, got {self.basis!r}")
        _check_threshold(owner, "scale", self.scale)
        if self.max_run is not None:
            _check_threshold(owner, "max_run", self.max_run)
        _check_threshold(owner, "min_run", self.min_run)
        if self.min_run >= 1:
            raise ValueError(f"{owner}.min_run must be below 1 (a share of the steps), got {self.min_run!r}")
        _check_count(owner, "warmup", self.warmup, 1)
        if self.mode not in H2_FORECAST_MODES:
            raise ValueError(f"{owner}.mode must be one of {H2_FORECAST_MODES}, got {self.mode!r}")
        _check_threshold(owner, "lazy_probes", self.lazy_probes)
        if self.lazy_probes > 1:
            raise ValueError(f"{owner}.lazy_probes must be at most 1 (0 runs every probe), got {self.lazy_probes!r}")


def _check_count(owner: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}")
