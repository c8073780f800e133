"""Build a small FLUX-architecture ``FluxPipeline`` offline, from configs only.

Every component is a real diffusers/transformers class (``FluxTransformer2DModel``, ``CLIPTextModel``,
``T5EncoderModel``, ``AutoencoderKL``, ``FlowMatchEulerDiscreteScheduler``); only the sizes are small. Nothing is
downloaded: the tokenizers are word-level vocabularies built in memory.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field, replace
from functools import cache

import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[EOS]")

# Words a random-weight model's tokenizer knows; the trained model brings the vocabulary of its own grammar.
BASIC_VOCABULARY = tuple(
    (
        "a an the of on in with and at to small large big tiny red green blue yellow white black orange purple gray "
        "circle square triangle cat dog photo picture image sign text left right top bottom center background "
        "beach city night day street sky tree house man woman player jersey number name"
    ).split()
)


@dataclass
class TinyFluxSpec:
    """Sizes of an embedded FLUX-architecture pipeline.

    Attributes:
        num_double: double-stream (``transformer_blocks``) count; FLUX.1 has 19.
        num_single: single-stream (``single_transformer_blocks``) count; FLUX.1 has 38.
        num_heads: attention heads per block.
        head_dim: channels per head; ``sum(axes_dims_rope)`` must equal it.
        axes_dims_rope: rotary dimensions for the (text, row, column) axes.
        text_dim: width of the T5 encoder output (``joint_attention_dim``).
        pooled_dim: width of the CLIP pooled projection.
        vae_channels: channels of every VAE stage; four stages give a 8x spatial factor as in FLUX.
        timestep_damping: factor applied to the first timestep-embedding layer of a *random* transformer. Random
            weights make the first-block residual jump by 0.37-0.57 per step, which no realistic threshold
            tolerates; 0.1 brings it to ~0.05, FLUX-like magnitudes (testbed notes). A trained model uses 1.0.
        native_size: image side in pixels that a call without ``height``/``width`` draws.
        max_sequence_length: T5 tokens per prompt; FLUX.1-dev uses 512, a tiny model needs far fewer.
        guidance_embeds: whether the transformer embeds the distilled guidance scale (FLUX.1-dev does).
    """

    num_double: int = 2
    num_single: int = 4
    num_heads: int = 2
    head_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    text_dim: int = 32
    pooled_dim: int = 32
    vae_channels: tuple[int, ...] = (8, 8, 8, 8)
    timestep_damping: float = 0.1
    native_size: int = 128
    max_sequence_length: int = 32
    guidance_embeds: bool = True
    vocabulary: tuple[str, ...] = field(default=BASIC_VOCABULARY, repr=False)

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to head_dim={self.head_dim}")
        if self.native_size % 16:
            raise ValueError(f"native_size={self.native_size} must be a multiple of 16")

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("vocabulary")
        return out


# The shipped trained model: FLUX.1's 19 double-stream + 38 single-stream blocks, narrow enough for a CPU.
EMBEDDED_SPEC = TinyFluxSpec(
    num_double=19,
    num_single=38,
    # 96 channels. No fewer than the 64 of a packed 2x2 latent patch: a narrower stream (48 was tried) cannot carry
    # the noisy input it must predict the velocity of. 96 rather than 64: trained alike for 1,000 steps (4 + 8
    # blocks, full captions), 96 channels drew the named colour / shape in 90 / 75% of the images, 64 in 70 / 50%;
    # 4 heads of 16 at 64 channels did no better than 2 of 32 (500 steps). Stored in float16 the 19 + 38 blocks
    # fit 25 MB, and they cost a sample 1.2 times the time of 64 channels, a training step twice.
    num_heads=3,
    head_dim=32,
    axes_dims_rope=(8, 12, 12),
    text_dim=32,
    pooled_dim=32,
    vae_channels=(16, 32, 32, 32),
    timestep_damping=1.0,
    native_size=64,
    max_sequence_length=16,
)
# The same architecture with random weights (damped, see ``timestep_damping``): the overhead benchmark and the
# proportion tests measure what the trained model would, without loading it.
FLUX_PROPORTIONED = replace(EMBEDDED_SPEC, timestep_damping=0.1)


def build_word_tokenizer(words, model_max_length: int):
    """A whitespace word-level tokenizer over ``words``, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        eos_token="[EOS]",
        model_max_length=model_max_length,
    )


def build_components(spec: TinyFluxSpec, seed: int = 0) -> dict:
    """All pipeline components with weights drawn from ``seed`` (the same seed gives the same weights)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    vocab_size = len(SPECIAL_TOKENS) + len(spec.vocabulary)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=spec.num_double,
        num_single_layers=spec.num_single,
        attention_head_dim=spec.head_dim,
        num_attention_heads=spec.num_heads,
        joint_attention_dim=spec.text_dim,
        pooled_projection_dim=spec.pooled_dim,
        guidance_embeds=spec.guidance_embeds,
        axes_dims_rope=list(spec.axes_dims_rope),
    )
    if spec.timestep_damping != 1.0:
        with torch.no_grad():
            transformer.time_text_embed.timestep_embedder.linear_1.weight.mul_(spec.timestep_damping)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=spec.pooled_dim,
            intermediate_size=2 * spec.pooled_dim,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=vocab_size,
            max_position_embeddings=77,
            projection_dim=spec.pooled_dim,
            pad_token_id=0,
            eos_token_id=2,
            bos_token_id=2,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            d_model=spec.text_dim,
            d_ff=2 * spec.text_dim,
            num_heads=4,
            num_layers=2,
            vocab_size=vocab_size,
            d_kv=spec.text_dim // 4,
            pad_token_id=0,
            eos_token_id=2,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(spec.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(spec.vae_channels),
        block_out_channels=list(spec.vae_channels),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return {
        "transformer": transformer,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": build_word_tokenizer(spec.vocabulary, 77),
        "tokenizer_2": build_word_tokenizer(spec.vocabulary, spec.max_sequence_length),
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
    }


@cache
def _calling_with_defaults(base: type) -> type:
    """A same-named subclass of ``base`` whose call fills in ``self.h2cache_call_defaults`` for every argument the
    caller did not pass (FluxPipeline's own defaults, such as 512 T5 tokens, are FLUX.1-dev's, not a tiny model's).

    The subclass is made once per pipeline class and only ever given to embedded pipelines' instances. Its outputs are
    inference tensors: they can be read and copied freely, but not updated in place or used in autograd."""
    signature = inspect.signature(base.__call__)

    def __call__(self, *args, **kwargs):
        passed = signature.bind_partial(self, *args, **kwargs).arguments
        defaults = {key: value for key, value in self.h2cache_call_defaults.items() if key not in passed}
        # Inference mode rather than FluxPipeline's own no_grad: a small model's thousands of tiny ops per image cost
        # their bookkeeping more than their arithmetic, so skipping autograd's version counters saves time.
        with torch.inference_mode():
            return base.__call__(self, *args, **kwargs, **defaults)

    namespace = {"__call__": __call__, "__module__": base.__module__, "__qualname__": base.__qualname__}
    return type(base.__name__, (base,), namespace)


def finish_pipeline(pipe, native_size: int, call_defaults: dict):
    """Put a small pipeline in the state tests and CPU runs need: eval mode, quiet, native default size, and plain
    ``pipe(prompt)`` calls that use ``call_defaults`` (kept as ``pipe.h2cache_call_defaults``)."""
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            # Config-built modules start in train mode: T5/CLIP dropout would make two identical calls differ.
            module.eval()
    pipe.default_sample_size = native_size // pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=True)
    pipe.h2cache_call_defaults = dict(call_defaults)
    pipe.__class__ = _calling_with_defaults(type(pipe))
    return pipe


def build_pipeline(spec: TinyFluxSpec | None = None, seed: int = 0):
    """A random-weight embedded ``FluxPipeline`` (for tests and mechanics; it draws noise, not pictures)."""
    from diffusers import FluxPipeline

    spec = spec or TinyFluxSpec()
    pipe = FluxPipeline(**build_components(spec, seed))
    return finish_pipeline(pipe, spec.native_size, {"max_sequence_length": spec.max_sequence_length})
