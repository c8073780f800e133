"""Pooled Feature Summarization (PFS) and the relative L1 distance H2-Cache decides with.

PFS (H2-Cache, arXiv 2510.27171, as its official code computes it): a residual ``[B, N, C]`` is seen as a one-channel
image ``[B, 1, N, C]`` and average-pooled with a *square* ``k x k`` window, ``k = max(1, N // divisor)``, stride k,
floor mode. The window spans tokens and channels alike; ``divisor`` is not a kernel size. The official code has no
``max(1, .)`` and crashes below ``divisor`` tokens (e.g. 512x512 at stage 1); we clamp.

The distance is ``mean|ref - cur| / mean|ref|`` with the stored reference as denominator and no epsilon, as in the
official code, but computed per sample and in float32 (the official code reduces over the whole batch in bf16).
A zero reference gives ``inf`` (or ``nan``), which no threshold accepts: the stage is recomputed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_kernel(num_tokens: int, divisor: int) -> int:
    return max(1, num_tokens // divisor)


def summarize(residual: torch.Tensor, divisor: int | None) -> torch.Tensor:
    """The PFS thumbnail of a ``[B, N, C]`` residual, in float32; ``divisor=None`` keeps the full tensor."""
    residual = residual.float()
    if divisor is None:
        return residual
    batch, tokens, channels = residual.shape
    kernel = pool_kernel(tokens, divisor)
    if kernel == 1:
        return residual
    return F.avg_pool2d(residual.reshape(batch, 1, tokens, channels), kernel_size=kernel, stride=kernel)


def relative_l1(reference: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Per-sample ``mean|reference - current| / mean|reference|`` over every non-batch dimension, shape ``[B]``."""
    reference = reference.flatten(1)
    current = current.flatten(1)
    return (reference - current).abs().mean(dim=1) / reference.abs().mean(dim=1)
