"""Paper-faithful CLIP-IQA (Wang et al., AAAI 2023), as the official config ``CLIPIQAFixed(backbone_name='RN50',
pos_embedding=False)`` and piq 0.8.0's ``CLIPIQA`` compute it (metrics.md §2)::

    image = normalize(encode_image((x - CLIP_MEAN) / CLIP_STD, pos_embedding=False))   # native resolution
    text  = normalize(encode_text(["Good photo.", "Bad photo."]))
    score = softmax(logit_scale.exp() * image @ text.T)[:, 0]                          # in [0, 1]

Own module rather than torchmetrics/piq because those read the model from a hard-coded ``~/.cache/clip`` and
download when it is absent; this one loads an explicit file, needs no tokenizer (the two prompts' OpenAI BPE ids
are fixed below) and reuses piq's OpenAI-CLIP model code, so it matches ``piq.CLIPIQA`` operation for operation.
The file's sha256 is checked by the preflight (``eval.weights.check_weights``), not on every load.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from eval.metrics.images import ImageLike, load_rgb_uint8, to_unit_tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONTEXT_LENGTH = 77
# OpenAI BPE ids of "Good photo." and "Bad photo." (start and end tokens included); zero-padded to 77 below.
GOOD_PHOTO_TOKEN_IDS = (49406, 886, 1125, 269, 49407)
BAD_PHOTO_TOKEN_IDS = (49406, 2103, 1125, 269, 49407)


def prompt_tokens() -> torch.Tensor:
    """The ``2×77`` int64 token tensor for ("Good photo.", "Bad photo."), the layout piq's clipiqa_tokens.pt has."""
    tokens = torch.zeros(2, CONTEXT_LENGTH, dtype=torch.long)
    for row, ids in enumerate((GOOD_PHOTO_TOKEN_IDS, BAD_PHOTO_TOKEN_IDS)):
        tokens[row, : len(ids)] = torch.tensor(ids)
    return tokens


def load_clip_model(path: str | os.PathLike) -> torch.nn.Module:
    """Build piq's OpenAI-CLIP from an RN50 file: OpenAI's TorchScript archive or a plain state dict."""
    from piq.feature_extractors.clip import build_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights not found at {path}; run the preflight (python -m eval.weights)")
    try:
        with warnings.catch_warnings():
            # torch 2.14 deprecates torch.jit.load, but OpenAI ships RN50 only as TorchScript.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning)
            state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict) or "visual.attnpool.positional_embedding" not in state_dict:
        raise ValueError(
            f"{path} is not an OpenAI CLIP ResNet checkpoint (no visual.attnpool weights); "
            "expected OpenAI's RN50.pt or a state dict saved from it"
        )
    # build_model deletes metadata keys from its argument; keep the caller's dict intact.
    model = build_model(dict(state_dict)).float().eval()
    model.requires_grad_(False)
    return model


class ClipIqa:
    """CLIP-IQA scorer for images at their native resolution; higher means "Good photo." fits better."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        self.model = load_clip_model(model_path)
        with torch.no_grad():
            anchors = self.model.encode_text(prompt_tokens()).float()
        self.anchors = anchors / anchors.norm(dim=-1, keepdim=True)
        self.logit_scale = self.model.logit_scale.exp()
        self.mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)

    def score_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Scores in (0, 1) of ``N×3×H×W`` images with values in [0, 1] (one size per batch)."""
        normalized = (images.float() - self.mean) / self.std
        with torch.no_grad():
            features = self.model.encode_image(normalized, pos_embedding=False).float()
        features = features / features.norm(dim=-1, keepdim=True)
        logits = self.logit_scale * features @ self.anchors.t()
        return logits.softmax(dim=-1)[:, 0]

    def __call__(self, image: ImageLike) -> float:
        """Score of one image, read as its uint8 pixels."""
        return self.score_batch(to_unit_tensor(load_rgb_uint8(image))).item()
