"""Train the embedded FLUX-architecture model on the procedural grammar and write it as a diffusers folder.

    python -m h2cache.embedded.train --out /work/train_ckpt

Three phases, all seeded and resumable (kill and rerun the same command: it continues from ``OUT/checkpoint.pt``;
every step's data and noise derive from ``(seed, phase, step)``, so a resumed run sees what an unbroken one would):

1. **Autoencoder.** The ``AutoencoderKL`` (4 stages, 8x spatial factor, 16 latent channels as in FLUX) learns to
   reconstruct grammar pictures (L1 + MSE, and a small KL term so that nearby latents decode to nearby pictures,
   which the sampler's small errors need). Its ``shift_factor``/``scaling_factor`` are then set from the latent
   mean and standard deviation, so the flow model works on unit-variance latents exactly as FluxPipeline undoes.
2. **Rectified flow** on the ``FluxTransformer2DModel`` (4 double + 8 single blocks, FLUX's 1:2 proportion), with
   FLUX's objective: ``x_t = (1 - t) x0 + t noise`` and the target velocity ``noise - x0``, on latents packed into 2x2
   patches with ``img_ids``/``txt_ids`` from FluxPipeline's own helpers, prompt embeddings from FluxPipeline's own
   ``encode_prompt`` (CLIP pooled + T5 sequence; both text encoders stay frozen at their seeded random weights: the
   grammar's words are distinct enough for the transformer to learn from), and ``timestep = t`` which the
   transformer scales by 1000, as the pipeline's ``timestep / 1000`` does.
   * Timesteps: ``t = sigmoid(n), n ~ N(0, 1)`` (SD3/FLUX logit-normal). The scheduler keeps its default config
     (``use_dynamic_shifting=False``, ``shift=1``), so FluxPipeline's ``mu`` is ignored and it samples the unshifted
     sigmas ``linspace(1, 1/N, N)``; the logit-normal weighting covers that whole range, densest mid-way.
   * Guidance: the model embeds a guidance value as FLUX.1-dev does, but there is no teacher to distil
     classifier-free guidance from, so training draws it uniformly from [1, 5]; the model learns to ignore it, and
     any ``guidance_scale`` a caller passes in that range draws the same kind of picture.
   The exported transformer is an exponential moving average of the trained weights (smoother samples).
3. **Sharper decoder.** With the encoder (and so the flow model's latent space) frozen, the decoder alone trains
   further on exact latents plus a little noise: phase 1's short run rounds off corners and triangle tips.

Phase 1 and 3 each take a few minutes and phase 2 about half an hour on 2 otherwise idle CPU cores (torch with 2
threads slows down many times over if anything else computes on the same cores).

The pipeline folder (``OUT/tiny-flux``, with ``h2cache_embedded.json`` giving native size, sequence length, step
count and guidance) is rewritten at every checkpoint, so a run stopped early still leaves a loadable model. Copy it to
``h2cache/embedded/tiny-flux`` to ship it. Training is never part of CI.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..io import atomic_path
from . import CALL_DEFAULTS_FILE
from .builder import TinyFluxSpec, build_components, finish_pipeline
from .grammar import VOCABULARY, all_scenes, sample

EMBEDDED_SPEC = TinyFluxSpec(
    num_double=4,
    num_single=8,
    num_heads=4,
    head_dim=32,
    axes_dims_rope=(8, 12, 12),
    text_dim=32,
    pooled_dim=32,
    vae_channels=(16, 32, 32, 32),
    timestep_damping=1.0,
    native_size=64,
    max_sequence_length=16,
    vocabulary=VOCABULARY,
)
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 3.5
GUIDANCE_RANGE = (1.0, 5.0)

VAE_STEPS = 1200
VAE_BATCH = 32
VAE_LR = 2e-3
# Per latent element; small enough to leave reconstructions sharp, large enough to keep the latent space smooth.
VAE_KL_WEIGHT = 1e-4
LATENT_STATS_IMAGES = 512

DECODER_STEPS = 5000
DECODER_LR = 2e-3
# Latent noise (relative to the latent spread) the refined decoder must tolerate: a sampled latent is never exact.
DECODER_LATENT_NOISE = 0.05

FLOW_STEPS = 4500
FLOW_BATCH = 64
FLOW_LR = 5e-4
WARMUP_STEPS = 200
EMA_DECAY = 0.999
CHECKPOINT_EVERY = 250


def _image_batch(seed: int, phase: int, step: int, count: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """``count`` grammar pictures in [-1, 1] (NCHW) and their captions, fixed by (seed, phase, step)."""
    rng = np.random.default_rng([seed, phase, step])
    pictures, captions = [], []
    for _ in range(count):
        picture, caption = sample(rng, size)
        pictures.append(np.asarray(picture))
        captions.append(caption)
    pixels = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float()
    return pixels / 127.5 - 1.0, captions


def _torch_generator(seed: int, phase: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + phase * 100_003 + step)


def _cosine_with_warmup(step: int, total: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to a tenth."""
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, out: Path, seed: int):
        from diffusers import FluxPipeline

        self.out = out
        self.seed = seed
        self.checkpoint_path = out / "checkpoint.pt"
        components = build_components(EMBEDDED_SPEC, seed=seed)
        self.pipe = finish_pipeline(FluxPipeline(**components), EMBEDDED_SPEC.native_size)
        self.vae = self.pipe.vae
        self.transformer = self.pipe.transformer
        self.ema = copy.deepcopy(self.transformer).requires_grad_(False)
        self.vae_optimizer = torch.optim.AdamW(self.vae.parameters(), lr=VAE_LR, weight_decay=0.0)
        self.flow_optimizer = torch.optim.AdamW(self.transformer.parameters(), lr=FLOW_LR, weight_decay=0.0)
        self.decoder_optimizer = None
        self.decoder_optimizer_state = None
        self.phase, self.step = 1, 0
        if self.checkpoint_path.is_file():
            self._load_checkpoint()

    # --- checkpoints -------------------------------------------------------------------------------------------
    def _save_checkpoint(self):
        state = {
            "phase": self.phase,
            "step": self.step,
            "vae": self.vae.state_dict(),
            "vae_config": {
                "shift_factor": self.vae.config.shift_factor,
                "scaling_factor": self.vae.config.scaling_factor,
            },
            "vae_optimizer": self.vae_optimizer.state_dict(),
            "transformer": self.transformer.state_dict(),
            "ema": self.ema.state_dict(),
            "flow_optimizer": self.flow_optimizer.state_dict(),
            "decoder_optimizer": self.decoder_optimizer.state_dict() if self.decoder_optimizer else None,
        }
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(state, tmp)

    def _load_checkpoint(self):
        state = torch.load(self.checkpoint_path, weights_only=True)
        self.phase, self.step = state["phase"], state["step"]
        self.vae.load_state_dict(state["vae"])
        self.vae.register_to_config(**state["vae_config"])
        self.vae_optimizer.load_state_dict(state["vae_optimizer"])
        self.transformer.load_state_dict(state["transformer"])
        self.ema.load_state_dict(state["ema"])
        self.flow_optimizer.load_state_dict(state["flow_optimizer"])
        self.decoder_optimizer_state = state.get("decoder_optimizer")
        print(f"resumed from {self.checkpoint_path}: phase {self.phase}, step {self.step}")

    # --- phase 1: autoencoder ----------------------------------------------------------------------------------
    def train_autoencoder(self):
        self.vae.train()
        size = EMBEDDED_SPEC.native_size
        for step in tqdm(range(self.step, VAE_STEPS), initial=self.step, total=VAE_STEPS, desc="autoencoder"):
            for group in self.vae_optimizer.param_groups:
                group["lr"] = VAE_LR * _cosine_with_warmup(step, VAE_STEPS)
            pixels, _ = _image_batch(self.seed, 1, step, VAE_BATCH, size)
            posterior = self.vae.encode(pixels).latent_dist
            latents = posterior.sample(generator=_torch_generator(self.seed, 1, step))
            reconstruction = self.vae.decode(latents).sample
            error = reconstruction - pixels
            kl_per_element = posterior.kl().mean() / latents[0].numel()
            loss = error.abs().mean() + error.pow(2).mean() + VAE_KL_WEIGHT * kl_per_element
            self.vae_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
            self.vae_optimizer.step()
            self.step = step + 1
            if self.step % CHECKPOINT_EVERY == 0 or self.step == VAE_STEPS:
                self._save_checkpoint()
        self.vae.eval().requires_grad_(False)
        pixels, _ = _image_batch(self.seed, 0, 0, LATENT_STATS_IMAGES, size)
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.mode()
        self.vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1.0 / latents.std().item())
        self.phase, self.step = 2, 0
        self._save_checkpoint()

    # --- phase 3: sharper decoder ------------------------------------------------------------------------------
    def refine_decoder(self):
        """Train the decoder alone on the frozen encoder's latents.

        Phase 1's short run leaves pictures blurry (corners and triangle tips rounded off), mainly because it had to
        decode noisy posterior samples. The encoder, and so the latent space the flow model learned, stays fixed.
        """
        self.vae.eval().requires_grad_(False)
        decoder_parameters = [*self.vae.decoder.parameters()]
        for parameter in decoder_parameters:
            parameter.requires_grad_(True)
        self.vae.decoder.train()
        optimizer = self.decoder_optimizer = torch.optim.AdamW(decoder_parameters, lr=DECODER_LR, weight_decay=0.0)
        if self.decoder_optimizer_state is not None:
            optimizer.load_state_dict(self.decoder_optimizer_state)
        noise_scale = DECODER_LATENT_NOISE / self.vae.config.scaling_factor
        progress = tqdm(range(self.step, DECODER_STEPS), initial=self.step, total=DECODER_STEPS, desc="decoder")
        for step in progress:
            for group in optimizer.param_groups:
                group["lr"] = DECODER_LR * _cosine_with_warmup(step, DECODER_STEPS)
            pixels, _ = _image_batch(self.seed, 3, step, VAE_BATCH, EMBEDDED_SPEC.native_size)
            with torch.no_grad():
                latents = self.vae.encode(pixels).latent_dist.mode()
            latents = latents + noise_scale * torch.randn(latents.shape, generator=_torch_generator(self.seed, 3, step))
            error = self.vae.decode(latents).sample - pixels
            loss = error.abs().mean() + error.pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(decoder_parameters, 1.0)
            optimizer.step()
            progress.set_postfix(loss=f"{loss.item():.4f}")
            self.step = step + 1
            if self.step % CHECKPOINT_EVERY == 0 or self.step == DECODER_STEPS:
                self._save_checkpoint()
        self.vae.eval().requires_grad_(False)

    # --- phase 2: rectified flow -------------------------------------------------------------------------------
    def _prompt_table(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(T5 sequence, CLIP pooled) embedding of every caption, computed once by FluxPipeline itself."""
        captions = [scene.caption() for scene in all_scenes()]
        with torch.no_grad():
            sequence, pooled, _ = self.pipe.encode_prompt(
                prompt=captions, prompt_2=None, max_sequence_length=EMBEDDED_SPEC.max_sequence_length
            )
        return {caption: (sequence[i], pooled[i]) for i, caption in enumerate(captions)}

    def train_flow(self):
        self.vae.eval().requires_grad_(False)
        self.pipe.text_encoder.requires_grad_(False)
        self.pipe.text_encoder_2.requires_grad_(False)
        self.transformer.train()
        prompts = self._prompt_table()
        size = EMBEDDED_SPEC.native_size
        latent_side = size // self.pipe.vae_scale_factor
        packed_side = latent_side // 2
        image_ids = self.pipe._prepare_latent_image_ids(FLOW_BATCH, packed_side, packed_side, "cpu", torch.float32)
        text_ids = torch.zeros(EMBEDDED_SPEC.max_sequence_length, 3)
        shift, scale = self.vae.config.shift_factor, self.vae.config.scaling_factor
        progress = tqdm(range(self.step, FLOW_STEPS), initial=self.step, total=FLOW_STEPS, desc="rectified flow")
        for step in progress:
            for group in self.flow_optimizer.param_groups:
                group["lr"] = FLOW_LR * _cosine_with_warmup(step, FLOW_STEPS)
            pixels, captions = _image_batch(self.seed, 2, step, FLOW_BATCH, size)
            generator = _torch_generator(self.seed, 2, step)
            with torch.no_grad():
                clean = (self.vae.encode(pixels).latent_dist.mode() - shift) * scale
            clean = self.pipe._pack_latents(clean, FLOW_BATCH, 16, latent_side, latent_side)
            noise = torch.randn(clean.shape, generator=generator)
            t = torch.sigmoid(torch.randn(FLOW_BATCH, generator=generator))
            guidance = torch.empty(FLOW_BATCH).uniform_(*GUIDANCE_RANGE, generator=generator)
            noisy = (1 - t[:, None, None]) * clean + t[:, None, None] * noise
            prediction = self.transformer(
                hidden_states=noisy,
                timestep=t,
                guidance=guidance,
                pooled_projections=torch.stack([prompts[c][1] for c in captions]),
                encoder_hidden_states=torch.stack([prompts[c][0] for c in captions]),
                txt_ids=text_ids,
                img_ids=image_ids,
                return_dict=False,
            )[0]
            loss = (prediction - (noise - clean)).pow(2).mean()
            self.flow_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.transformer.parameters(), 1.0)
            self.flow_optimizer.step()
            with torch.no_grad():
                # Short memory while the weights move fast early on, EMA_DECAY once they settle.
                decay = min(EMA_DECAY, (1 + step) / (10 + step))
                for averaged, current in zip(self.ema.parameters(), self.transformer.parameters(), strict=True):
                    averaged.lerp_(current, 1 - decay)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            self.step = step + 1
            if self.step % CHECKPOINT_EVERY == 0 or self.step == FLOW_STEPS:
                self._save_checkpoint()
                self.export(self.out / "tiny-flux")

    # --- export ------------------------------------------------------------------------------------------------
    def export(self, folder: Path):
        """Write the pipeline (EMA transformer) as a diffusers folder plus its call defaults."""
        from diffusers import FluxPipeline

        components = {name: getattr(self.pipe, name) for name in self.pipe.components}
        components["transformer"] = self.ema
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        FluxPipeline(**components).save_pretrained(staging)
        defaults = {
            "native_size": EMBEDDED_SPEC.native_size,
            "max_sequence_length": EMBEDDED_SPEC.max_sequence_length,
            "num_inference_steps": DEFAULT_STEPS,
            "guidance_scale": DEFAULT_GUIDANCE,
            "trained_steps": {
                "autoencoder": VAE_STEPS,
                "rectified_flow": FLOW_STEPS if self.phase == 3 else self.step,
                "decoder_refinement": self.step if self.phase == 3 else 0,
            },
        }
        (staging / CALL_DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)

    def run(self):
        if self.phase == 1:
            self.train_autoencoder()
        if self.phase == 2:
            if self.step < FLOW_STEPS:
                self.train_flow()
            self.phase, self.step = 3, 0
            self._save_checkpoint()
        self.refine_decoder()
        self.export(self.out / "tiny-flux")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint and output folder (outside the repo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the budget is one hour on 2 cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    Trainer(args.out, args.seed).run()
    print(f"pipeline written to {args.out / 'tiny-flux'}")


if __name__ == "__main__":
    main()
