"""Pooled Feature Summarization against a direct NumPy computation of the formula."""

import numpy as np
import pytest
import torch

from h2cache.pfs import pool_kernel, relative_l1, summarize


def numpy_pfs_distance(ref: np.ndarray, cur: np.ndarray, divisor: int) -> np.ndarray:
    """Square k x k average pooling over [tokens x channels] (floor mode), then per-sample relative L1."""
    batch, tokens, channels = ref.shape
    k = max(1, tokens // divisor)
    rows, cols = tokens // k, channels // k

    def pool(x):
        x = x[:, : rows * k, : cols * k].reshape(batch, rows, k, cols, k)
        return x.mean(axis=(2, 4))

    a, b = pool(ref.astype(np.float64)), pool(cur.astype(np.float64))
    return np.abs(a - b).reshape(batch, -1).mean(1) / np.abs(a).reshape(batch, -1).mean(1)


@pytest.mark.parametrize(
    "tokens, channels, divisor",
    [
        (1024, 64, 2048),
        (256, 32, 2048),
        (288, 32, 384),
        (4096, 96, 2048),
        (1536, 48, 384),
        (4608, 120, 384),
        (300, 50, 64),
    ],
)
def test_pfs_distance_equals_numpy_formula(tokens, channels, divisor):
    rng = np.random.default_rng(tokens + channels)
    ref = rng.standard_normal((2, tokens, channels)).astype(np.float32)
    cur = ref + 0.3 * rng.standard_normal(ref.shape).astype(np.float32)
    ours = relative_l1(summarize(torch.from_numpy(ref), divisor), summarize(torch.from_numpy(cur), divisor))
    np.testing.assert_allclose(ours.numpy(), numpy_pfs_distance(ref, cur, divisor), rtol=1e-5)


def test_small_token_counts_do_not_crash_and_use_no_pooling():
    # 512x512 has 1024 image tokens: the official code's kernel 1024 // 2048 = 0 raises "stride should not be zero".
    assert pool_kernel(1024, 2048) == 1
    x = torch.randn(1, 1024, 16)
    assert torch.equal(summarize(x, 2048), x)


def test_kernel_follows_the_spec_table_at_1024px():
    assert pool_kernel(4096, 2048) == 2
    assert pool_kernel(4096 + 512, 384) == 12
    assert summarize(torch.zeros(1, 4608, 3072), 384).shape == (1, 1, 384, 256)


def test_full_tensor_comparison_when_pfs_is_off():
    x = torch.randn(1, 4096, 8, dtype=torch.bfloat16)
    full = summarize(x, None)
    assert full.dtype == torch.float32 and full.shape == x.shape


def test_zero_reference_gives_a_distance_no_threshold_accepts():
    changed = relative_l1(torch.zeros(1, 4, 4), torch.ones(1, 4, 4))
    unchanged = relative_l1(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))
    assert torch.isinf(changed).all() and torch.isnan(unchanged).all()
    assert not bool((changed < 1e9).any()) and not bool((unchanged < 1e9).any())
