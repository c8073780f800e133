"""What every FLUX backend shares, and the handful of primitives in which they differ.

The prologue (embedders, timestep/guidance embedding, rotary embedding) and the epilogue (``norm_out``,
``proj_out``) are the same in diffusers 0.42, nunchaku V1 and nunchaku V2. A backend supplies only: the rotary
format its blocks take, how to run double block ``i`` and single block ``j``, how to enter and leave the single
stage, and the first block's modulated input (TeaCache's indicator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..streams import StageState, Streams


@dataclass
class BlockContext:
    """Everything a block call needs besides the streams, fixed for one transformer forward."""

    temb: torch.Tensor
    rotary: Any
    joint_attention_kwargs: dict | None
    num_txt: int
    output_dtype: torch.dtype
    # The embedding as the blocks take it; differs from ``temb`` only where blocks run in another dtype (V1).
    block_temb: torch.Tensor | None = None

    def __post_init__(self):
        if self.block_temb is None:
            self.block_temb = self.temb


class UnsupportedCall(ValueError):
    """A call this backend cannot run at all, cached or not; raised before anything is computed, with the fix."""


class Backend:
    """Base class: the shared prologue/epilogue; subclasses implement the block primitives."""

    name = "base"

    def __init__(self, model):
        self.model = model

    @property
    def num_double(self) -> int:
        return len(self.model.transformer_blocks)

    @property
    def num_single(self) -> int:
        return len(self.model.single_transformer_blocks)

    # Keyword arguments beyond diffusers' forward that this backend's own forward takes (e.g. PuLID's on V1).
    extra_keywords: tuple[str, ...] = ()

    def refusal(self, joint_attention_kwargs: dict | None, controlnet: bool) -> str | None:
        """Why neither the owned nor the original forward can run this call (then ``UnsupportedCall``), or None."""
        return None

    def unsupported_reason(self, joint_attention_kwargs: dict | None, controlnet: bool, extra: dict) -> str | None:
        """Why this call cannot go through the owned forward (the original forward then runs), or None."""
        if joint_attention_kwargs and "ip_adapter_image_embeds" in joint_attention_kwargs:
            return "IP-Adapter image embeddings"
        return None

    def controlnet_sample_index(self, index: int, num_blocks: int, num_samples: int, repeat: bool) -> int:
        """Which ControlNet sample block ``index`` adds: diffusers' rule, ``index % n`` when samples repeat."""
        return index % num_samples if repeat else index // math.ceil(num_blocks / num_samples)

    def prologue(
        self,
        hidden_states,
        encoder_hidden_states,
        pooled_projections,
        timestep,
        img_ids,
        txt_ids,
        guidance,
        joint_attention_kwargs,
    ) -> tuple[Streams, BlockContext]:
        model = self.model
        img = model.x_embedder(hidden_states)
        timestep = timestep.to(img.dtype) * 1000
        if guidance is None:
            temb = model.time_text_embed(timestep, pooled_projections)
        else:
            temb = model.time_text_embed(timestep, guidance.to(img.dtype) * 1000, pooled_projections)
        txt = model.context_embedder(encoder_hidden_states)
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rotary = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        context = BlockContext(
            temb=temb,
            rotary=self.block_rotary(rotary, txt.shape[1]),
            joint_attention_kwargs=joint_attention_kwargs,
            num_txt=txt.shape[1],
            output_dtype=img.dtype,
        )
        return self.enter_blocks(Streams(img, txt), context), context

    def epilogue(self, img: torch.Tensor, context: BlockContext) -> torch.Tensor:
        img = img.to(context.output_dtype)
        return self.model.proj_out(self.model.norm_out(img, context.temb))

    # --- primitives -------------------------------------------------------------------------------------------
    def block_rotary(self, rotary, num_txt: int):
        """The rotary embedding in the form this backend's blocks take."""
        return rotary

    def enter_blocks(self, streams: Streams, context: BlockContext) -> Streams:
        """Move the streams to the blocks' device/dtype (a no-op where blocks run in the model's dtype)."""
        return streams

    def double(self, index: int, streams: Streams, context: BlockContext) -> Streams:
        raise NotImplementedError

    def enter_single(self, streams: Streams) -> StageState:
        raise NotImplementedError

    def single(self, index: int, state: StageState, context: BlockContext) -> StageState:
        raise NotImplementedError

    def leave_single(self, state: StageState, context: BlockContext) -> Streams:
        raise NotImplementedError

    def single_tokens(self, state: StageState) -> torch.Tensor:
        """The single stage as one ``[B, N_txt + N_img, C]`` tensor, text first (what stage-2 probes compare)."""
        raise NotImplementedError

    def add_to_image(self, state: StageState, delta: torch.Tensor, context: BlockContext) -> StageState:
        """Add ``delta`` to the image tokens of a single-stage state (ControlNet residuals)."""
        raise NotImplementedError

    def fused_rest(self, streams: Streams, start: int, context: BlockContext) -> Streams | None:
        """Double blocks ``start``.. and every single block in one call, or None where the backend has no such call
        (then the controller runs them block by block)."""
        return None

    def modulated_input(self, streams: Streams, context: BlockContext) -> torch.Tensor:
        """Double block 0's AdaLN-modulated image input, TeaCache's step-change indicator."""
        return self.model.transformer_blocks[0].norm1(streams.img, emb=context.block_temb)[0]
