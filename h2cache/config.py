"""One configuration dataclass per cache method; every field is documented and validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

H2_MODES = ("official", "independent")


def _check_threshold(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}.{name} must be a finite number >= 0, got {value!r}")


def _check_divisor(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name} must be an integer >= 1, got {value!r}")


class MethodConfig:
    """Base of the method configurations: ``method`` names the method in ``h2cache.apply``."""

    method: str = ""

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
