"""diffusers ``FluxTransformer2DModel`` (0.42 block signatures).

Blocks return ``(txt, img)``; single blocks concatenate and split the streams themselves, so the single stage
keeps ``Streams``. Called as ``block(...)`` (not ``block.forward``) so that hooks and per-block compile still apply.
This loop reproduces ``FluxTransformer2DModel.forward`` bit for bit.
"""

from __future__ import annotations

import torch

from ..streams import Streams
from .base import Backend, BlockContext


class DiffusersBackend(Backend):
    name = "diffusers"

    def double(self, index: int, streams: Streams, context: BlockContext) -> Streams:
        txt, img = self.model.transformer_blocks[index](
            hidden_states=streams.img,
            encoder_hidden_states=streams.txt,
            temb=context.block_temb,
            image_rotary_emb=context.rotary,
            joint_attention_kwargs=context.joint_attention_kwargs,
        )
        return Streams(img, txt)

    def enter_single(self, streams: Streams) -> Streams:
        return streams

    def single(self, index: int, state: Streams, context: BlockContext) -> Streams:
        txt, img = self.model.single_transformer_blocks[index](
            hidden_states=state.img,
            encoder_hidden_states=state.txt,
            temb=context.block_temb,
            image_rotary_emb=context.rotary,
            joint_attention_kwargs=context.joint_attention_kwargs,
        )
        return Streams(img, txt)

    def leave_single(self, state: Streams, context: BlockContext) -> Streams:
        return state

    def single_tokens(self, state: Streams) -> torch.Tensor:
        return torch.cat([state.txt, state.img], dim=1)

    def add_to_image(self, state: Streams, delta: torch.Tensor, context: BlockContext) -> Streams:
        return Streams(state.img + delta, state.txt)
