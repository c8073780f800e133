"""Fidelity of a cached image to the uncached image of the same prompt and seed: PSNR, SSIM, LPIPS.

Conventions (metrics.md §3), each chosen to avoid a measured trap:
- PSNR in float64 per image, ``data_range=1``. Integer maths wraps for differences ≥ 16 grey levels (cache-dit's
  bug) and a batch-pooled MSE (torchmetrics' default ``dim=None``) is not the mean of per-image PSNRs.
- SSIM: torchmetrics' definition (gaussian window 11, σ 1.5, ``data_range=1``, reflect padding, the mean of the
  whole map), computed here in float64 with the window applied as two 1-D passes. torchmetrics itself in float32
  scores two identical pictures with a flat background 0.999, not 1: in flat regions its variances come out of
  ``E[x²] - μ²`` as rounding noise, and it clamps the two variances at 0 but not the covariance. In float64 it is
  right but slow on CPU (its 2-D convolution): at 1024² on one thread 18.7 s per pair, against 1.3 s in float32 and
  0.46 s for the two 1-D passes here, which agree with it to 1e-15. It differs from scikit-image by ~1e-3 at borders
  only.
- LPIPS: torchmetrics AlexNet LPIPS with ``normalize=True`` (inputs in [0,1]), as the H2 authors and nunchaku use.
Identical images give PSNR ``inf``, SSIM 1, LPIPS 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from eval.metrics.images import ImageLike, load_pair, to_unit_tensor
from eval.weights import ALEXNET_CHECKPOINT, WEIGHT_FILES, Missing, MissingWeightsError

SSIM_KERNEL_SIZE = 11
SSIM_SIGMA = 1.5
# SSIM's stabilising constants, as fractions of the data range (Wang et al. 2004; torchmetrics' defaults).
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr_per_image(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each ``N×C×H×W`` image in [0,1] against its reference; ``inf`` where they are identical."""
    squared_error = (images.to(torch.float64) - references.to(torch.float64)) ** 2
    mse = squared_error.mean(dim=(1, 2, 3))
    return 10 * torch.log10(1.0 / mse)


def _unit_pair(image: ImageLike, reference: ImageLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Both pictures' uint8 pixels as float64 in [0,1]: float32 pixels alone shift PSNR by up to ~1e-7 dB and
    round SSIM's 1/255 steps before its float64 arithmetic."""
    image_pixels, reference_pixels = load_pair(image, reference)
    return to_unit_tensor(image_pixels, torch.float64), to_unit_tensor(reference_pixels, torch.float64)


def psnr(image: ImageLike, reference: ImageLike) -> float:
    """PSNR in dB of one image against its reference (``float('inf')`` if identical)."""
    return psnr_per_image(*_unit_pair(image, reference)).item()


def _gaussian_window() -> torch.Tensor:
    offsets = torch.arange(SSIM_KERNEL_SIZE, dtype=torch.float64) - (SSIM_KERNEL_SIZE - 1) / 2
    weights = torch.exp(-((offsets / SSIM_SIGMA) ** 2) / 2)
    return weights / weights.sum()


def _filter_valid(maps: torch.Tensor, window: torch.Tensor, dim: int) -> torch.Tensor:
    """``maps`` filtered by the 1-D ``window`` along ``dim``, keeping only the positions the window fits in."""
    length = maps.shape[dim] - window.numel() + 1
    filtered = torch.zeros_like(maps.narrow(dim, 0, length))
    for offset, weight in enumerate(window.tolist()):
        filtered.add_(maps.narrow(dim, offset, length), alpha=weight)
    return filtered


def ssim_per_image(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """SSIM of each ``N×3×H×W`` image in [0,1] against its reference (gaussian 11/1.5, ``data_range=1``)."""
    pad = (SSIM_KERNEL_SIZE - 1) // 2
    x, y = (F.pad(t.to(torch.float64), (pad, pad, pad, pad), mode="reflect") for t in (images, references))
    window = _gaussian_window()
    mu_x, mu_y, mean_xx, mean_yy, mean_xy = (
        _filter_valid(_filter_valid(t, window, dim=2), window, dim=3) for t in (x, y, x * x, y * y, x * y)
    )
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data_range 1
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    contrast_structure = (2 * (mean_xy - mu_x * mu_y) + c2) / ((mean_xx - mu_x**2) + (mean_yy - mu_y**2) + c2)
    return (luminance * contrast_structure).flatten(1).mean(1)


def ssim(image: ImageLike, reference: ImageLike) -> float:
    """SSIM of one image against its reference, on its uint8 pixels."""
    return ssim_per_image(*_unit_pair(image, reference)).item()


class Lpips:
    """LPIPS-AlexNet distance of an image to its reference (0 for identical images; lower is closer).

    The AlexNet backbone is read by torchvision from ``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``
    (``eval.weights.configure_environment`` points TORCH_HOME into the weights dir). Its presence is checked here
    first, because torchvision would otherwise download it. The linear heads ship inside the torchmetrics wheel.
    """

    def __init__(self) -> None:
        checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_CHECKPOINT
        if not checkpoint.is_file():
            weight = WEIGHT_FILES["lpips"][0]
            problem = "absent (TORCH_HOME must be <weights dir>/torch)"
            raise MissingWeightsError(
                [Missing("lpips", weight.relative_path, str(checkpoint), weight.source_url, weight.sha256, problem)]
            )
        from torchmetrics.image import LearnedPerceptualImagePatchSimilarity

        self._metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True, reduction="none")
        self._metric.eval()

    def distance_per_image(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """LPIPS of each ``N×3×H×W`` image in [0,1] against its reference."""
        self._metric.reset()
        with torch.no_grad():
            self._metric.update(images.to(torch.float32), references.to(torch.float32))
            return self._metric.compute()

    def __call__(self, image: ImageLike, reference: ImageLike) -> float:
        """LPIPS of one image against its reference."""
        image_pixels, reference_pixels = load_pair(image, reference)
        return self.distance_per_image(to_unit_tensor(image_pixels), to_unit_tensor(reference_pixels)).item()
