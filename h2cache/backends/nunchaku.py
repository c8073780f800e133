"""nunchaku 4-bit FLUX transformers: ``NunchakuFluxTransformer2DModelV2`` and ``NunchakuFluxTransformer2dModel`` (V1).

Both run the single stage on the concatenated ``[txt; img]`` tensor and take nunchaku's packed rotary embeddings:
the model's ``pos_embed`` yields ``[1, 1, T, D/2, 1, 2]``; each of the text, image and joint ranges is padded to a
multiple of 256 tokens and packed to ``[1, T_pad, D]`` (nunchaku-integration spec, sections 2.3-2.4).

V2 has real per-block modules. V1 keeps all 57 layers inside one C++ object ``m``: ``m.forward_layer`` returns
``(img, txt)``, image first, unlike every other call here, and ``m.forward_single_layer`` is positional only.
nunchaku is imported lazily, and only on these paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..streams import Streams
from .base import Backend, BlockContext

V1_HINT = "load the transformer as nunchaku V1 (run.py --nunchaku-class v1, NunchakuFluxTransformer2dModel)"

ROTARY_TOKEN_MULTIPLE = 256


def pad_tokens(tensor: torch.Tensor, multiple: int = ROTARY_TOKEN_MULTIPLE) -> torch.Tensor:
    """Zero-pad dimension 1 of a ``[1, T, ...]`` tensor up to a multiple of ``multiple``."""
    missing = -tensor.shape[1] % multiple
    if not missing:
        return tensor
    pad = [0, 0] * (tensor.ndim - 2) + [0, missing]
    return F.pad(tensor, pad)


def packed_rotary(rotary: torch.Tensor, num_txt: int, pack) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text, image, joint) rotary embeddings in nunchaku's packed, padded form."""
    joint = rotary.reshape(1, -1, *rotary.shape[3:])
    return tuple(pack(pad_tokens(part)) for part in (joint[:, :num_txt], joint[:, num_txt:], joint))


class _ConcatenatedSingleStage(Backend):
    """Shared by V1 and V2: the single stage is one ``[B, N_txt + N_img, C]`` tensor, text first."""

    def enter_single(self, streams: Streams) -> torch.Tensor:
        return torch.cat([streams.txt, streams.img], dim=1)

    def leave_single(self, state: torch.Tensor, context: BlockContext) -> Streams:
        return Streams(img=state[:, context.num_txt :], txt=state[:, : context.num_txt])

    def single_tokens(self, state: torch.Tensor) -> torch.Tensor:
        return state

    def add_to_image(self, state: torch.Tensor, delta: torch.Tensor, context: BlockContext) -> torch.Tensor:
        return torch.cat([state[:, : context.num_txt], state[:, context.num_txt :] + delta], dim=1)


class NunchakuV2Backend(_ConcatenatedSingleStage):
    name = "nunchaku_v2"

    def refusal(self, joint_attention_kwargs, controlnet):
        # nunchaku's own V2 forward raises NotImplementedError for both, so there is nothing to fall back to.
        if controlnet:
            return f"nunchaku V2 cannot run ControlNet (its forward raises NotImplementedError): {V1_HINT}"
        if joint_attention_kwargs:
            return (
                f"nunchaku V2 blocks accept no joint_attention_kwargs (got {sorted(joint_attention_kwargs)}; "
                f"IP-Adapter and attention-processor arguments): {V1_HINT}, or call without them"
            )
        return None

    def block_rotary(self, rotary, num_txt):
        from nunchaku.models.embeddings import pack_rotemb

        rot_txt, rot_img, rot_single = packed_rotary(rotary, num_txt, pack_rotemb)
        return {"double": (rot_img, rot_txt), "single": rot_single}

    def double(self, index, streams, context):
        txt, img = self.model.transformer_blocks[index](
            hidden_states=streams.img,
            encoder_hidden_states=streams.txt,
            temb=context.block_temb,
            image_rotary_emb=context.rotary["double"],
            joint_attention_kwargs=None,
        )
        return Streams(img, txt)

    def single(self, index, state, context):
        return self.model.single_transformer_blocks[index](
            hidden_states=state,
            temb=context.block_temb,
            image_rotary_emb=context.rotary["single"],
            joint_attention_kwargs=None,
        )


class NunchakuV1Backend(_ConcatenatedSingleStage):
    name = "nunchaku_v1"

    @property
    def _blocks(self):
        return self.model.transformer_blocks[0]

    # V1's layers live inside the C++ object, so the counts come from the model's config, not from module lists.
    @property
    def num_double(self) -> int:
        return self.model.config.num_layers

    @property
    def num_single(self) -> int:
        return self.model.config.num_single_layers

    # nunchaku's PuLID pipeline passes these to the transformer's forward; id_embeddings=None means no identity.
    extra_keywords = ("id_embeddings", "id_weight")

    def unsupported_reason(self, joint_attention_kwargs, controlnet, extra):
        if extra.get("id_embeddings") is not None:
            return "PuLID identity embeddings (nunchaku applies them only inside its fused forward)"
        return super().unsupported_reason(joint_attention_kwargs, controlnet, extra)

    def controlnet_sample_index(self, index, num_blocks, num_samples, repeat):
        # nunchaku's C++ FluxModel::forward ignores controlnet_blocks_repeat: always the interval rule.
        return super().controlnet_sample_index(index, num_blocks, num_samples, repeat=False)

    def block_rotary(self, rotary, num_txt):
        rot_txt, rot_img, rot_single = packed_rotary(rotary, num_txt, type(self._blocks).pack_rotemb)
        return {"txt": rot_txt, "img": rot_img, "single": rot_single}

    def enter_blocks(self, streams, context):
        # The C++ layers run in bf16 or fp16; norm_out keeps the model-dtype embedding in context.temb.
        block_dtype = torch.bfloat16 if self._blocks.m.isBF16() else torch.float16
        device = self._blocks.device
        context.block_temb = context.temb.to(device, block_dtype)
        return Streams(streams.img.to(device, block_dtype), streams.txt.to(device, block_dtype))

    def double(self, index, streams, context):
        img, txt = self._blocks.m.forward_layer(
            index,
            streams.img,
            streams.txt,
            context.block_temb,
            context.rotary["img"],
            context.rotary["txt"],
            None,
            None,
        )
        return Streams(img, txt)

    def single(self, index, state, context):
        return self._blocks.m.forward_single_layer(index, state, context.block_temb, context.rotary["single"])

    def fused_rest(self, streams, start, context):
        # m.forward runs layers 0..56, or 1..56 with skip_first_layer, synchronising once; per-layer calls
        # synchronise and copy their outputs once per layer.
        if start > 1:
            return None
        rotary = context.rotary
        joint = self._blocks.m.forward(
            streams.img,
            streams.txt,
            context.block_temb,
            rotary["img"],
            rotary["txt"],
            rotary["single"],
            None,
            None,
            start == 1,
        )
        return Streams(img=joint[:, context.num_txt :], txt=joint[:, : context.num_txt])

    def modulated_input(self, streams, context):
        return self._blocks.m.norm_one_forward(0, streams.img, context.block_temb)[0]
