"""Stand-ins for nunchaku's FLUX transformers, built from a tiny model's own diffusers blocks.

nunchaku's kernels need a supported NVIDIA GPU, so CI checks the *calling contract* instead, as nunchaku 1.x
defines it (nunchaku-integration spec, sections 2.3-2.4):

- classes with nunchaku's names; the rotary format ``[1, 1, T, D/2, 1, 2]`` (stacked sin, cos) from ``pos_embed``,
  each range padded to 256 tokens and packed to ``[1, T_pad, D]`` in the MMA accumulator tile order (below);
- V2: per-block modules, single blocks on the concatenated ``[txt; img]`` tensor, fp16 outputs clipped to the fp16
  range, and a model forward that raises ``NotImplementedError`` for ControlNet and attention kwargs;
- V1: the C++ object ``m``. ``forward_layer`` returns ``(img, txt)`` and, for ``idx >= num_layers``, silently runs
  double block ``idx - num_layers``; ``forward_single_layer`` and ``norm_one_forward`` are positional; the layers
  take only their own dtype (bf16 or fp16) on their own device; ``norm_one_forward`` reads its input's memory as
  is (no ``.contiguous()`` in the binding); ``m.forward`` runs all 57 layers fused, adding ControlNet residuals
  ``samples[i // ceil(n / len(samples))]`` whatever ``controlnet_blocks_repeat`` says.

Underneath, the real diffusers blocks compute, so the numbers are real and must equal the diffusers backend's.
"""

from __future__ import annotations

import copy
import math
import sys
import types

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

FP16_MAX = 65504.0


def _accumulator_tile_order() -> torch.Tensor:
    """Flat index into a row-major 16x8 tile for each of its 128 values in storage order.

    PTX ISA, ``mma.m16n8k16`` with an f32 accumulator: lane ``l`` of the warp holds four values ``c0..c3``;
    with ``group = l // 4`` and ``thread = l % 4``, ``c_i`` sits at row ``group + 8 * (i // 2)`` and column
    ``2 * thread + i % 2``. A packed tile stores lane after lane, each lane's four values in order.
    """
    lane = torch.arange(32).repeat_interleave(4)
    value = torch.arange(4).repeat(32)
    row = lane // 4 + 8 * (value // 2)
    column = 2 * (lane % 4) + value % 2
    return row * 8 + column


TILE_ORDER = _accumulator_tile_order()


def pack_rotemb(rotemb: torch.Tensor) -> torch.Tensor:
    """``[B, M, D/2, 1, 2]`` float32 -> ``[B, M, D]``: 16-token x 8-channel tiles in the accumulator layout."""
    assert rotemb.dtype == torch.float32, rotemb.dtype
    batch, tokens, half = rotemb.shape[:3]
    dim = 2 * half
    assert rotemb.shape == (batch, tokens, half, 1, 2) and tokens % 16 == 0 and dim % 8 == 0, rotemb.shape
    tiles = rotemb.reshape(batch, tokens // 16, 16, dim // 8, 8).permute(0, 1, 3, 2, 4)
    tiles = tiles.reshape(batch, tokens // 16, dim // 8, 128)
    return tiles[..., TILE_ORDER].contiguous().reshape(batch, tokens, dim)


def unpack_rotemb(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_rotemb``: ``[B, M, D]`` -> ``[B, M, D/2, 2]`` (sin, cos)."""
    batch, tokens, dim = packed.shape
    tiles = packed.reshape(batch, tokens // 16, dim // 8, 128)
    rows = torch.empty_like(tiles)
    rows[..., TILE_ORDER] = tiles
    rows = rows.reshape(batch, tokens // 16, dim // 8, 16, 8).permute(0, 1, 3, 2, 4)
    return rows.reshape(batch, tokens, dim // 2, 2)


def pad_to_256(tensor: torch.Tensor) -> torch.Tensor:
    missing = -tensor.shape[1] % 256
    return torch.cat([tensor, tensor.new_zeros(tensor.shape[0], missing, *tensor.shape[2:])], dim=1)


def pack_ranges(rotary: torch.Tensor, num_txt: int):
    """(image, text, joint) rotary embeddings packed as nunchaku's own forwards pack them."""
    joint = rotary.reshape(1, -1, *rotary.shape[3:])
    return tuple(pack_rotemb(pad_to_256(part)) for part in (joint[:, num_txt:], joint[:, :num_txt], joint))


def check_tensor(name: str, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    """What nunchaku's kernels take without converting: the wrong dtype or device is a crash, not a cast."""
    if tensor.dtype != dtype:
        raise TypeError(f"{name}: expected {dtype}, got {tensor.dtype}")
    if tensor.device != device:
        raise RuntimeError(f"{name}: expected a tensor on {device}, got {tensor.device}")


def rotary_for_diffusers(packed: torch.Tensor, num_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed nunchaku rotary -> diffusers' ``(cos, sin)``, each ``[T, head_dim]``; checks nunchaku's preconditions."""
    check_tensor("packed rotary embedding", packed, torch.float32, device)
    assert packed.shape[1] % 256 == 0 and packed.shape[1] >= num_tokens, packed.shape
    pairs = unpack_rotemb(packed)[0, :num_tokens]
    sin, cos = pairs[..., 0], pairs[..., 1]
    return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)


def _weights_of(block: nn.Module) -> torch.Tensor:
    return block.norm1.linear.weight if hasattr(block, "norm1") else block.norm.linear.weight


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
    """V2's double block: ``image_rotary_emb=(rot_img, rot_txt)`` packed; returns ``(txt, img)``."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        if joint_attention_kwargs:
            raise NotImplementedError("joint_attention_kwargs is not supported")
        weight = _weights_of(self.block)
        for name, tensor in (("hidden_states", hidden_states), ("encoder_hidden_states", encoder_hidden_states)):
            check_tensor(name, tensor, weight.dtype, weight.device)
        rot_img, rot_txt = image_rotary_emb
        cos_txt, sin_txt = rotary_for_diffusers(rot_txt, encoder_hidden_states.shape[1], weight.device)
        cos_img, sin_img = rotary_for_diffusers(rot_img, hidden_states.shape[1], weight.device)
        rotary = (torch.cat([cos_txt, cos_img]), torch.cat([sin_txt, sin_img]))
        txt, img = self.block(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb, image_rotary_emb=rotary
        )
        if txt.dtype == torch.float16:  # nunchaku V2 clips the text stream only, as its double block does
            txt = txt.clip(-FP16_MAX, FP16_MAX)
        return txt, img


class NunchakuFluxSingleTransformerBlock(nn.Module):
    """V2's single block: one concatenated ``[txt; img]`` tensor in, one out; no encoder argument."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        weight = _weights_of(self.block)
        check_tensor("hidden_states", hidden_states, weight.dtype, weight.device)
        rotary = rotary_for_diffusers(image_rotary_emb, hidden_states.shape[1], weight.device)
        # An empty text stream makes the diffusers block compute on exactly the concatenated tensor it was given.
        _, joint = self.block(
            hidden_states=hidden_states, encoder_hidden_states=hidden_states[:, :0], temb=temb, image_rotary_emb=rotary
        )
        if joint.dtype == torch.float16:
            joint = joint.clip(-FP16_MAX, FP16_MAX)
        return joint


def _prologue(model, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance):
    img = model.x_embedder(hidden_states)
    timestep = timestep.to(img.dtype) * 1000
    if guidance is None:
        temb = model.time_text_embed(timestep, pooled_projections)
    else:
        temb = model.time_text_embed(timestep, guidance.to(img.dtype) * 1000, pooled_projections)
    txt = model.context_embedder(encoder_hidden_states)
    txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
    img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    return img, txt, temb, model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))


def _output(model, img, temb, return_dict):
    output = model.proj_out(model.norm_out(img, temb))
    return Transformer2DModelOutput(sample=output) if return_dict else (output,)


class NunchakuFluxTransformer2DModelV2(FluxTransformer2DModel):
    def forward(
        self,
        hidden_states,
        encoder_hidden_states=None,
        pooled_projections=None,
        timestep=None,
        img_ids=None,
        txt_ids=None,
        guidance=None,
        joint_attention_kwargs=None,
        controlnet_block_samples=None,
        controlnet_single_block_samples=None,
        return_dict=True,
        controlnet_blocks_repeat=False,
    ):
        img, txt, temb, rotary = _prologue(
            self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance
        )
        rot_img, rot_txt, rot_single = pack_ranges(rotary, txt.shape[1])
        for block in self.transformer_blocks:
            txt, img = block(img, txt, temb, (rot_img, rot_txt), joint_attention_kwargs)
            if controlnet_block_samples is not None:
                raise NotImplementedError("Controlnet is not supported for FluxTransformer2DModelV2 for now")
        joint = torch.cat([txt, img], dim=1)
        for block in self.single_transformer_blocks:
            joint = block(joint, temb, rot_single, joint_attention_kwargs)
            if controlnet_single_block_samples is not None:
                raise NotImplementedError("Controlnet is not supported for FluxTransformer2DModelV2 for now")
        return _output(self, joint[:, txt.shape[1] :], temb, return_dict)


class _FusedLayers:
    """V1's pybind object ``m``: every layer behind index-based calls (not an nn.Module, as in nunchaku)."""

    def __init__(self, doubles, singles):
        self.doubles, self.singles = doubles, singles
        self.layer_calls = 0  # per-layer entry points called (each one synchronises the GPU in nunchaku)
        self.fused_calls = 0

    @property
    def _weight(self):
        return self.doubles[0].norm1.linear.weight

    def isBF16(self):
        return self._weight.dtype == torch.bfloat16

    def _check(self, **tensors):
        for name, tensor in tensors.items():
            check_tensor(name, tensor, self._weight.dtype, self._weight.device)

    def _double(self, block, img, txt, temb, rot_img, rot_txt):
        return NunchakuFluxTransformerBlock(block)(img, txt, temb, (rot_img, rot_txt))

    def _single(self, block, x, temb, rot_single):
        return NunchakuFluxSingleTransformerBlock(block)(x, temb, rot_single)

    def forward_layer(self, idx, img, txt, temb, rot_img, rot_txt, cn_block=None, cn_single=None, /):
        self._check(hidden_states=img, encoder_hidden_states=txt, temb=temb)
        self.layer_calls += 1
        # FluxModel::forward_layer runs transformer_blocks.at(idx - num_layers) for idx >= num_layers.
        block = self.doubles[idx] if idx < len(self.doubles) else self.doubles[idx - len(self.doubles)]
        txt, img = self._double(block, img.contiguous(), txt.contiguous(), temb.contiguous(), rot_img, rot_txt)
        return img, txt

    def forward_single_layer(self, idx, x, temb, rot_single, /):
        self._check(hidden_states=x, temb=temb)
        self.layer_calls += 1
        return self._single(self.singles[idx], x.contiguous(), temb.contiguous(), rot_single)

    def norm_one_forward(self, idx, hidden, temb, /):
        self._check(hidden_states=hidden, temb=temb)
        if not hidden.is_contiguous():  # the binding hands the raw strides to a kernel that assumes none
            raise RuntimeError("norm_one_forward: hidden_states must be contiguous")
        return self.doubles[idx].norm1(hidden, emb=temb)

    def forward(self, img, txt, temb, rot_img, rot_txt, rot_single, cn_block=None, cn_single=None, skip_first=False):
        self._check(hidden_states=img, encoder_hidden_states=txt, temb=temb)
        self.fused_calls += 1
        num_double, num_single, num_txt = len(self.doubles), len(self.singles), txt.shape[1]
        for index in range(1 if skip_first else 0, num_double):
            txt, img = self._double(self.doubles[index], img, txt, temb, rot_img, rot_txt)
            if cn_block is not None:
                img = img + cn_block[index // math.ceil(num_double / cn_block.shape[0])]
        joint = torch.cat([txt, img], dim=1)
        for index in range(num_single):
            joint = self._single(self.singles[index], joint, temb, rot_single)
            if cn_single is not None:
                sample = cn_single[index // math.ceil(num_single / cn_single.shape[0])]
                joint = torch.cat([joint[:, :num_txt], joint[:, num_txt:] + sample], dim=1)
        return joint


class NunchakuFluxTransformerBlocks(nn.Module):
    """V1's single pseudo-block: converts to the layers' dtype, packs the rotary embedding, calls ``m.forward``."""

    pack_rotemb = staticmethod(pack_rotemb)

    def __init__(self, doubles, singles):
        super().__init__()
        self.doubles, self.singles = doubles, singles  # registered, so .to() and hooks reach the real blocks
        self.m = _FusedLayers(doubles, singles)

    @property
    def device(self):
        return self.doubles[0].norm1.linear.weight.device

    @property
    def dtype(self):
        return torch.bfloat16 if self.m.isBF16() else torch.float16

    def forward(
        self,
        hidden_states,
        temb,
        encoder_hidden_states,
        image_rotary_emb,
        id_embeddings=None,
        id_weight=None,
        joint_attention_kwargs=None,
        controlnet_block_samples=None,
        controlnet_single_block_samples=None,
        skip_first_layer=False,
    ):
        if id_embeddings is not None:
            raise NotImplementedError("stand-in: PuLID's residual callback is not modelled")
        dtype, device, num_txt = hidden_states.dtype, hidden_states.device, encoder_hidden_states.shape[1]
        to_blocks = lambda tensor: tensor.to(self.device, self.dtype)  # noqa: E731
        samples = (controlnet_block_samples, controlnet_single_block_samples)
        stacked = [torch.stack(s).to(self.device) if s else None for s in samples]
        rot_img, rot_txt, rot_single = pack_ranges(image_rotary_emb.to(self.device), num_txt)
        joint = self.m.forward(
            to_blocks(hidden_states),
            to_blocks(encoder_hidden_states),
            to_blocks(temb),
            rot_img,
            rot_txt,
            rot_single,
            *stacked,
            skip_first_layer,
        ).to(device, dtype)
        return joint[:, :num_txt], joint[:, num_txt:]


class NunchakuFluxTransformer2dModel(FluxTransformer2DModel):
    def forward(
        self,
        hidden_states,
        encoder_hidden_states=None,
        pooled_projections=None,
        timestep=None,
        img_ids=None,
        txt_ids=None,
        guidance=None,
        joint_attention_kwargs=None,
        controlnet_block_samples=None,
        controlnet_single_block_samples=None,
        return_dict=True,
        controlnet_blocks_repeat=False,
    ):
        img, txt, temb, rotary = _prologue(
            self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance
        )
        _, img = self.transformer_blocks[0](
            hidden_states=img,
            encoder_hidden_states=txt,
            temb=temb,
            image_rotary_emb=rotary,
            joint_attention_kwargs=joint_attention_kwargs,
            controlnet_block_samples=controlnet_block_samples,
            controlnet_single_block_samples=controlnet_single_block_samples,
        )
        return _output(self, img, temb, return_dict)


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


def leave_nunchaku_v1_cache(model, after_first_call: bool):
    """The attributes nunchaku's V1 ``apply_cache_on_transformer`` leaves on a model (caching/diffusers_adapters/
    flux.py): ``_original_forward`` and ``_original_blocks`` at once, ``_is_cached`` and ``cached_transformer_blocks``
    only when the first call inside a cache context has run."""
    model._original_forward = model.forward
    model._original_blocks = model.transformer_blocks
    model.forward = model._original_forward  # nunchaku wraps it; outside a cache context the wrapper delegates
    if after_first_call:
        model._is_cached = True
        model.cached_transformer_blocks = nn.ModuleList([nn.Identity()])
    return model


def leave_nunchaku_v2_cache(model):
    """What nunchaku's V2 ``apply_cache_on_transformer`` (flux_v2.py) leaves: ``_original_forward``, thresholds,
    ``_is_cached`` -- all at once, and no block lists of its own."""
    model._original_forward = model.forward
    model.residual_diff_threshold_multi, model.residual_diff_threshold_single = 0.12, -1.0
    model.use_double_fb_cache = False
    model._is_cached = True
    return model


def install_nunchaku_rotary_module(monkeypatch):
    """Provide ``nunchaku.models.embeddings.pack_rotemb`` (what the V2 backend imports) for one test."""
    root = types.ModuleType("nunchaku")
    models = types.ModuleType("nunchaku.models")
    embeddings = types.ModuleType("nunchaku.models.embeddings")
    embeddings.pack_rotemb = pack_rotemb
    root.models, models.embeddings = models, embeddings
    for name, module in (("nunchaku", root), ("nunchaku.models", models), ("nunchaku.models.embeddings", embeddings)):
        monkeypatch.setitem(sys.modules, name, module)
