"""Fidelity of a cached image to the uncached image of the same prompt and seed: PSNR, SSIM, LPIPS.

Conventions (metrics.md §3), each chosen to avoid a measured trap:
- PSNR in float64 per image, ``data_range=1``. Integer maths wraps for differences ≥ 16 grey levels (cache-dit's
  bug) and a batch-pooled MSE (torchmetrics' default ``dim=None``) is not the mean of per-image PSNRs.
- SSIM: torchmetrics, gaussian kernel 11, σ 1.5, ``data_range=1``, float32 (float64 is ~30× slower on CPU for a
  ~1e-4 difference). It differs from scikit-image by ~1e-3 at borders only.
- LPIPS: torchmetrics AlexNet LPIPS with ``normalize=True`` (inputs in [0,1]), as the H2 authors and nunchaku use.
Identical images give PSNR ``inf``, SSIM 1, LPIPS 0.
"""

from __future__ import annotations

from pathlib import Path

import torch

from eval.metrics.images import ImageLike, load_pair, to_unit_tensor
from eval.weights import ALEXNET_CHECKPOINT, WEIGHT_FILES, Missing, MissingWeightsError

SSIM_KERNEL_SIZE = 11
SSIM_SIGMA = 1.5


def psnr_per_image(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each ``N×C×H×W`` image in [0,1] against its reference; ``inf`` where they are identical."""
    squared_error = (images.to(torch.float64) - references.to(torch.float64)) ** 2
    mse = squared_error.mean(dim=(1, 2, 3))
    return 10 * torch.log10(1.0 / mse)


def psnr(image: ImageLike, reference: ImageLike) -> float:
    """PSNR in dB of one image against its reference (``float('inf')`` if identical)."""
    image_pixels, reference_pixels = load_pair(image, reference)
    as_float64 = torch.float64  # float32 pixels alone shift PSNR by up to ~1e-7 dB
    return psnr_per_image(to_unit_tensor(image_pixels, as_float64), to_unit_tensor(reference_pixels, as_float64)).item()


def ssim_per_image(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """SSIM of each ``N×3×H×W`` image in [0,1] against its reference (gaussian 11/1.5, ``data_range=1``)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        images.to(torch.float32),
        references.to(torch.float32),
        gaussian_kernel=True,
        sigma=SSIM_SIGMA,
        kernel_size=SSIM_KERNEL_SIZE,
        data_range=1.0,
        reduction="none",
    )


def ssim(image: ImageLike, reference: ImageLike) -> float:
    """SSIM of one image against its reference, on its uint8 pixels."""
    image_pixels, reference_pixels = load_pair(image, reference)
    return ssim_per_image(to_unit_tensor(image_pixels), to_unit_tensor(reference_pixels)).item()


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
