"""Turn the inputs the metrics accept (PIL image, uint8 array, file path) into uint8 RGB pixels and [0,1] tensors.

Metrics are defined on the saved uint8 PNG pixels, so float arrays are refused rather than guessed at: a float
image has not yet been through the quantisation that the saved file went through.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

ImageLike = Image.Image | np.ndarray | str | os.PathLike


def load_rgb_uint8(image: ImageLike) -> np.ndarray:
    """Pixels of ``image`` as an ``H×W×3`` uint8 array (PIL images and files are converted to RGB)."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return np.asarray(opened.convert("RGB")).copy()
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB")).copy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"expected an H×W×3 uint8 array, got dtype {image.dtype} shape {image.shape}; "
                "quantise to uint8 RGB as the saved PNG is (e.g. np.asarray(pil_image.convert('RGB')))"
            )
        return image
    raise TypeError(f"expected a PIL image, an H×W×3 uint8 array or an image path, got {type(image).__name__}")


def to_unit_tensor(pixels: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``H×W×3`` uint8 pixels as a ``1×3×H×W`` tensor in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0).to(dtype) / 255


def load_pair(image: ImageLike, reference: ImageLike) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of an image and its reference, refusing pairs of different sizes (they cannot be the same render)."""
    image_pixels, reference_pixels = load_rgb_uint8(image), load_rgb_uint8(reference)
    if image_pixels.shape != reference_pixels.shape:
        raise ValueError(
            f"image is {image_pixels.shape[1]}×{image_pixels.shape[0]} but its reference is "
            f"{reference_pixels.shape[1]}×{reference_pixels.shape[0]}; the reference must be the uncached image "
            "of the same prompt, seed and size"
        )
    return image_pixels, reference_pixels
