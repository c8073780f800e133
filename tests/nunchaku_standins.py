"""Stand-ins for nunchaku's FLUX transformers, built from a tiny model's own diffusers blocks.

nunchaku's kernels need a supported NVIDIA GPU, so CI checks the *calling contract* instead: classes with nunchaku's
names, nunchaku's rotary format (``[1, 1, T, D/2, 1, 2]`` from ``pos_embed``, padded to 256 tokens and packed to
``[1, T_pad, D]``), V2's single blocks on the concatenated ``[txt; img]`` tensor, and V1's C++ object ``m`` whose
``forward_layer`` returns ``(img, txt)`` and whose ``forward_single_layer`` is positional. Underneath, the real
diffusers blocks compute, so the numbers are real and must equal the diffusers backend's.

The packing here is a plain reshape (nunchaku's is a permutation for its MMA layout, a kernel detail); unpacking
checks that the padded length is a multiple of 256 and recovers the exact (cos, sin) diffusers uses.
"""

from __future__ import annotations

import copy
import sys
import types

import torch
from diffusers import FluxTransformer2DModel
from torch import nn


def pack_rotemb(rotemb: torch.Tensor) -> torch.Tensor:
    """``[B, M, D/2, 1, 2]`` float32 -> ``[B, M, D]``, with nunchaku's preconditions."""
    batch, tokens, half, _, _ = rotemb.shape
    assert rotemb.dtype == torch.float32 and tokens % 16 == 0 and (2 * half) % 8 == 0
    return rotemb.reshape(batch, tokens, 2 * half)


def unpack_rotary(packed: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    assert packed.shape[1] % 256 == 0 and packed.shape[1] >= num_tokens, packed.shape
    pairs = packed[0, :num_tokens].reshape(num_tokens, -1, 2)
    sin, cos = pairs[..., 0], pairs[..., 1]
    return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)


class NunchakuFluxPosEmbed(nn.Module):
    """diffusers' rotary embedding re-expressed in nunchaku's stacked ``(sin, cos)`` format."""

    def __init__(self, diffusers_pos_embed):
        super().__init__()
        self.inner = diffusers_pos_embed

    def forward(self, ids):
        cos, sin = self.inner(ids)
        stacked = torch.stack([sin[:, ::2], cos[:, ::2]], dim=-1).float()
        return stacked.reshape(1, 1, ids.shape[0], -1, 1, 2)


class NunchakuFluxTransformerBlock(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        if joint_attention_kwargs is not None:
            raise NotImplementedError("joint_attention_kwargs is not supported")
        rot_img, rot_txt = image_rotary_emb
        cos_txt, sin_txt = unpack_rotary(rot_txt, encoder_hidden_states.shape[1])
        cos_img, sin_img = unpack_rotary(rot_img, hidden_states.shape[1])
        rotary = (torch.cat([cos_txt, cos_img]), torch.cat([sin_txt, sin_img]))
        return self.block(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb, image_rotary_emb=rotary
        )


class NunchakuFluxSingleTransformerBlock(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        rotary = unpack_rotary(image_rotary_emb, hidden_states.shape[1])
        # An empty text stream makes the diffusers block compute on exactly the concatenated tensor it was given.
        _, joint = self.block(
            hidden_states=hidden_states, encoder_hidden_states=hidden_states[:, :0], temb=temb, image_rotary_emb=rotary
        )
        return joint


class NunchakuFluxTransformer2DModelV2(FluxTransformer2DModel):
    pass


class NunchakuFluxTransformer2dModel(FluxTransformer2DModel):
    pass


class _FusedLayers:
    """V1's pybind object ``m``: every layer behind index-based calls (not an nn.Module, as in nunchaku)."""

    def __init__(self, doubles, singles):
        self.doubles, self.singles = doubles, singles

    def isBF16(self):
        return self.doubles[0].norm1.linear.weight.dtype == torch.bfloat16

    def forward_layer(self, idx, img, txt, temb, rot_img, rot_txt, cn_block=None, cn_single=None):
        assert 0 <= idx < len(self.doubles), "forward_layer index out of range"
        txt, img = NunchakuFluxTransformerBlock(self.doubles[idx])(img, txt, temb, (rot_img, rot_txt))
        return img, txt

    def forward_single_layer(self, idx, x, temb, rot_single, /):
        return NunchakuFluxSingleTransformerBlock(self.singles[idx])(x, temb, rot_single)

    def norm_one_forward(self, idx, hidden, temb, /):
        return self.doubles[idx].norm1(hidden, emb=temb)


class NunchakuFluxTransformerBlocks(nn.Module):
    pack_rotemb = staticmethod(pack_rotemb)

    def __init__(self, doubles, singles):
        super().__init__()
        self.doubles, self.singles = doubles, singles  # registered, so .to() and hooks reach the real blocks
        self.m = _FusedLayers(doubles, singles)

    @property
    def device(self):
        return self.doubles[0].norm1.linear.weight.device


def _clone_as(transformer, cls):
    clone = copy.deepcopy(transformer)
    clone.__class__ = cls
    clone.pos_embed = NunchakuFluxPosEmbed(clone.pos_embed)
    return clone


def nunchaku_v2_standin(transformer):
    model = _clone_as(transformer, NunchakuFluxTransformer2DModelV2)
    model.transformer_blocks = nn.ModuleList(NunchakuFluxTransformerBlock(b) for b in model.transformer_blocks)
    model.single_transformer_blocks = nn.ModuleList(
        NunchakuFluxSingleTransformerBlock(b) for b in model.single_transformer_blocks
    )
    return model


def nunchaku_v1_standin(transformer):
    model = _clone_as(transformer, NunchakuFluxTransformer2dModel)
    fused = NunchakuFluxTransformerBlocks(model.transformer_blocks, model.single_transformer_blocks)
    model.transformer_blocks = nn.ModuleList([fused])
    model.single_transformer_blocks = nn.ModuleList([])
    return model


def real_blocks(model):
    """The diffusers blocks that actually compute, in (double, single) lists, for counting with hooks."""
    if isinstance(model, NunchakuFluxTransformer2dModel):
        fused = model.transformer_blocks[0]
        return list(fused.doubles), list(fused.singles)
    unwrap = lambda blocks: [getattr(b, "block", b) for b in blocks]  # noqa: E731
    return unwrap(model.transformer_blocks), unwrap(model.single_transformer_blocks)


def install_nunchaku_rotary_module(monkeypatch):
    """Provide ``nunchaku.models.embeddings.pack_rotemb`` (what the V2 backend imports) for one test."""
    root = types.ModuleType("nunchaku")
    models = types.ModuleType("nunchaku.models")
    embeddings = types.ModuleType("nunchaku.models.embeddings")
    embeddings.pack_rotemb = pack_rotemb
    root.models, models.embeddings = models, embeddings
    for name, module in (("nunchaku", root), ("nunchaku.models", models), ("nunchaku.models.embeddings", embeddings)):
        monkeypatch.setitem(sys.modules, name, module)
