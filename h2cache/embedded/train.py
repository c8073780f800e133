"""Train the embedded FLUX-architecture model on the procedural grammar and write it as a diffusers folder.

    python -m h2cache.embedded.train --out /work/train_ckpt

One command reproduces the shipped weights (``h2cache/embedded/tiny-flux``) on 2 CPU cores; it is seeded and
resumable (kill and rerun the same command: every phase continues from its checkpoint in ``OUT``, and every step's
data and noise derive from ``(seed, phase, step)``, so a resumed run computes what an unbroken one would).

1. **Autoencoder** (``OUT/autoencoder.pt``). The ``AutoencoderKL`` (4 stages, 8x spatial factor, 16 latent channels
   as in FLUX) learns to reconstruct grammar pictures (L1 + MSE, and a small KL term so that nearby latents decode to
   nearby pictures, which the sampler's small errors need). Its ``shift_factor``/``scaling_factor`` are then set from
   the latent mean and standard deviation, so the flow model works on unit-variance latents as FluxPipeline undoes.
2. **Rectified flow** (``OUT/flow.pt``) on the ``FluxTransformer2DModel`` with FLUX.1's 19 double-stream + 38
   single-stream blocks (narrow: 2 heads of 32 channels), with FLUX's objective: ``x_t = (1 - t) x0 + t noise``
   and the target velocity ``noise - x0``, on latents packed into 2x2 patches with ``img_ids``/``txt_ids`` from
   FluxPipeline's own helpers, prompt embeddings from FluxPipeline's own ``encode_prompt`` (CLIP pooled + T5
   sequence; both text encoders stay frozen at their seeded random weights: the grammar's words are distinct enough
   for the transformer to learn from), and ``timestep = t`` which the transformer scales by 1000, as the pipeline's
   ``timestep / 1000`` does.
   * adaLN-Zero start (as DiT): every block's modulation layer and the output layer start at zero, so each of the 57
     blocks begins as the identity and learns its gates first. From the default initialisation the deep, narrow
     stack learned the captions far more slowly (at 1,200 steps its raw weights drew the named position in 20% of
     the images and the named colour in 41%).
   * Captions: full ones first, partial ones late (a curriculum). For the first ``FULL_CAPTION_STEPS`` every
     caption names all five attributes; afterwards half of each batch names each attribute with probability 0.7
     (``grammar.ATTRIBUTE_DROPOUT``), a left-out attribute still drawn in the picture at random, so "a red circle"
     and "a shape" draw too. Partial captions from the start kept colour, shape and position at chance: a caption
     that leaves attributes out has a blurred average as its target, which teaches the words far more slowly than
     the sharp target of a full caption (at 500 steps of a 4 + 8-block scratch model, full captions drew the named
     colour in 41% of the images and the position in 85%; captions with dropout 16-19% and 12-33%). Words first,
     then what an unnamed attribute means.
   * Timesteps: ``t = sigmoid(n), n ~ N(0, 1)`` (SD3/FLUX logit-normal). The scheduler keeps its default config
     (``use_dynamic_shifting=False``, ``shift=1``), so FluxPipeline's ``mu`` is ignored and it samples the unshifted
     sigmas ``linspace(1, 1/N, N)``; the logit-normal weighting covers that whole range, densest mid-way.
   * Guidance: the model embeds a guidance value as FLUX.1-dev does, but there is no teacher to distil
     classifier-free guidance from, so training draws it uniformly from [1, 5]; the model learns to ignore it, and
     any ``guidance_scale`` a caller passes in that range draws the same kind of picture.
   The exported transformer is an exponential moving average of the trained weights (smoother samples).
3. **Sharper decoder** (``OUT/decoder.pt``), in a second process at the same time as phase 2: it needs only phase
   1's frozen encoder (and so the latent space the flow model learns). The decoder alone trains further on exact
   latents plus a little noise: phase 1's short run rounds off corners and triangle tips.

Every phase runs single-threaded, each process pinned to a core of its own (a float32 reduction depends on the
thread count, so that is part of reproducing the weights; and torch's multi-threaded kernels slow down many times
over when anything else computes on the same cores). Measured wall times are recorded in ``h2cache_embedded.json``.

The pipeline folder (``OUT/tiny-flux``, with ``h2cache_embedded.json`` giving native size, sequence length, step
count, guidance and the training record) is rewritten at every flow checkpoint, so a run stopped early still leaves a
loadable model. Copy it to ``h2cache/embedded/tiny-flux`` to ship it. Training is never part of CI.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..io import atomic_path
from . import CALL_DEFAULTS_FILE
from .builder import EMBEDDED_SPEC as BUILT_SPEC
from .builder import build_components, finish_pipeline
from .grammar import ATTRIBUTE_DROPOUT, VOCABULARY, all_descriptions, sample

EMBEDDED_SPEC = replace(BUILT_SPEC, vocabulary=VOCABULARY)
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 3.5
GUIDANCE_RANGE = (1.0, 5.0)

VAE_STEPS = 800
VAE_BATCH = 16
VAE_LR = 2e-3
# Per latent element; small enough to leave reconstructions sharp, large enough to keep the latent space smooth.
VAE_KL_WEIGHT = 1e-4
LATENT_STATS_IMAGES = 512

DECODER_STEPS = 1500
DECODER_LR = 2e-3
# Latent noise (relative to the latent spread) the refined decoder must tolerate: a sampled latent is never exact.
DECODER_LATENT_NOISE = 0.05

FLOW_STEPS = 2400
FLOW_BATCH = 32
FLOW_LR = 1e-3
# Flow steps trained on full captions only, before half of each batch turns partial (the curriculum above).
FULL_CAPTION_STEPS = 1400
WARMUP_STEPS = 200
EMA_DECAY = 0.999
CHECKPOINT_EVERY = 200


def _image_batch(
    seed: int, phase: int, step: int, count: int, size: int, partial: int = 0
) -> tuple[torch.Tensor, list[str]]:
    """``count`` grammar pictures in [-1, 1] (NCHW) and their captions, fixed by (seed, phase, step); the last
    ``partial`` captions leave attributes out (the pictures do not depend on it)."""
    rng = np.random.default_rng([seed, phase, step])
    pictures, captions = [], []
    for index in range(count):
        dropout = ATTRIBUTE_DROPOUT if index >= count - partial else 0.0
        picture, caption = sample(rng, size, dropout=dropout)
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


def _save(path: Path, state: dict):
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load(path: Path) -> dict | None:
    return torch.load(path, weights_only=True) if path.is_file() else None


def _set_learning_rate(optimizer, base: float, step: int, total: int):
    for group in optimizer.param_groups:
        group["lr"] = base * _cosine_with_warmup(step, total)


def _train_step(optimizer, parameters, loss: torch.Tensor):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()


def _start_as_identity(transformer):
    """adaLN-Zero: zero every block's modulation (so its gates, so its output) and the final layer."""
    zeroed = [block.norm1.linear for block in transformer.transformer_blocks]
    zeroed += [block.norm1_context.linear for block in transformer.transformer_blocks]
    zeroed += [block.norm.linear for block in transformer.single_transformer_blocks]
    zeroed += [transformer.norm_out.linear, transformer.proj_out]
    with torch.no_grad():
        for layer in zeroed:
            layer.weight.zero_()
            layer.bias.zero_()
    return transformer


class Trainer:
    """One phase's state: the pipeline (weights from ``seed``), the phase-1 autoencoder once it exists."""

    def __init__(self, out: Path, seed: int):
        from diffusers import FluxPipeline

        self.out = out
        self.seed = seed
        components = build_components(EMBEDDED_SPEC, seed=seed)
        self.pipe = finish_pipeline(FluxPipeline(**components), EMBEDDED_SPEC.native_size, {})
        self.vae = self.pipe.vae
        self.transformer = _start_as_identity(self.pipe.transformer)

    # --- phase 1: autoencoder ----------------------------------------------------------------------------------
    def train_autoencoder(self) -> float:
        """Train (or resume) phase 1; afterwards ``self.vae`` holds its result. Returns the seconds it took."""
        path = self.out / "autoencoder.pt"
        optimizer = torch.optim.AdamW(self.vae.parameters(), lr=VAE_LR, weight_decay=0.0)
        state = _load(path) or {"step": 0, "seconds": 0.0}
        if "vae" in state:
            self.vae.load_state_dict(state["vae"])
            optimizer.load_state_dict(state["optimizer"])
        if state["step"] < VAE_STEPS:
            self.vae.train()
            started = time.perf_counter() - state["seconds"]
            size = EMBEDDED_SPEC.native_size
            for step in tqdm(
                range(state["step"], VAE_STEPS), initial=state["step"], total=VAE_STEPS, desc="autoencoder"
            ):
                _set_learning_rate(optimizer, VAE_LR, step, VAE_STEPS)
                pixels, _ = _image_batch(self.seed, 1, step, VAE_BATCH, size)
                posterior = self.vae.encode(pixels).latent_dist
                latents = posterior.sample(generator=_torch_generator(self.seed, 1, step))
                error = self.vae.decode(latents).sample - pixels
                kl_per_element = posterior.kl().mean() / latents[0].numel()
                _train_step(
                    optimizer,
                    self.vae.parameters(),
                    error.abs().mean() + error.pow(2).mean() + VAE_KL_WEIGHT * kl_per_element,
                )
                if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == VAE_STEPS:
                    state = {
                        "step": step + 1,
                        "seconds": time.perf_counter() - started,
                        "vae": self.vae.state_dict(),
                        "optimizer": optimizer.state_dict(),
                    }
                    _save(path, state)
        if "latent_stats" not in state:
            self.vae.eval().requires_grad_(False)
            pixels, _ = _image_batch(self.seed, 0, 0, LATENT_STATS_IMAGES, EMBEDDED_SPEC.native_size)
            with torch.no_grad():
                latents = self.vae.encode(pixels).latent_dist.mode()
            state["latent_stats"] = {"shift_factor": latents.mean().item(), "scaling_factor": 1 / latents.std().item()}
            _save(path, state)
        self.vae.register_to_config(**state["latent_stats"])
        self.vae.eval().requires_grad_(False)
        return state["seconds"]

    # --- phase 3: sharper decoder ------------------------------------------------------------------------------
    def refine_decoder(self):
        """Train the decoder alone on the frozen encoder's latents (``OUT/decoder.pt``).

        Phase 1's short run leaves pictures blurry (corners and triangle tips rounded off), mainly because it had to
        decode noisy posterior samples. The encoder, and so the latent space the flow model learns, stays fixed.
        """
        path = self.out / "decoder.pt"
        decoder_parameters = [*self.vae.decoder.parameters()]
        for parameter in decoder_parameters:
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(decoder_parameters, lr=DECODER_LR, weight_decay=0.0)
        state = _load(path) or {"step": 0, "seconds": 0.0}
        if "decoder" in state:
            self.vae.decoder.load_state_dict(state["decoder"])
            optimizer.load_state_dict(state["optimizer"])
        self.vae.decoder.train()
        noise_scale = DECODER_LATENT_NOISE / self.vae.config.scaling_factor
        started = time.perf_counter() - state["seconds"]
        progress = tqdm(range(state["step"], DECODER_STEPS), initial=state["step"], total=DECODER_STEPS, desc="decoder")
        for step in progress:
            _set_learning_rate(optimizer, DECODER_LR, step, DECODER_STEPS)
            pixels, _ = _image_batch(self.seed, 3, step, VAE_BATCH, EMBEDDED_SPEC.native_size)
            with torch.no_grad():
                latents = self.vae.encode(pixels).latent_dist.mode()
            latents = latents + noise_scale * torch.randn(latents.shape, generator=_torch_generator(self.seed, 3, step))
            error = self.vae.decode(latents).sample - pixels
            loss = error.abs().mean() + error.pow(2).mean()
            _train_step(optimizer, decoder_parameters, loss)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == DECODER_STEPS:
                state = {
                    "step": step + 1,
                    "seconds": time.perf_counter() - started,
                    "decoder": self.vae.decoder.state_dict(),
                    "optimizer": optimizer.state_dict(),
                }
                _save(path, state)

    # --- phase 2: rectified flow -------------------------------------------------------------------------------
    def _prompt_table(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(T5 sequence, CLIP pooled) embedding of every caption, computed once by FluxPipeline itself."""
        captions = [scene.caption() for scene in all_descriptions()]
        with torch.no_grad():
            sequence, pooled, _ = self.pipe.encode_prompt(
                prompt=captions, prompt_2=None, max_sequence_length=EMBEDDED_SPEC.max_sequence_length
            )
        return {caption: (sequence[i], pooled[i]) for i, caption in enumerate(captions)}

    def train_flow(self, record: dict):
        """Train (or resume) phase 2 (``OUT/flow.pt``), exporting the pipeline at every checkpoint."""
        path = self.out / "flow.pt"
        ema = copy.deepcopy(self.transformer).requires_grad_(False)
        optimizer = torch.optim.AdamW(self.transformer.parameters(), lr=FLOW_LR, weight_decay=0.0)
        state = _load(path) or {"step": 0, "seconds": 0.0}
        if "transformer" in state:
            self.transformer.load_state_dict(state["transformer"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
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
        started = time.perf_counter() - state["seconds"]
        progress = tqdm(
            range(state["step"], FLOW_STEPS), initial=state["step"], total=FLOW_STEPS, desc="rectified flow"
        )
        for step in progress:
            _set_learning_rate(optimizer, FLOW_LR, step, FLOW_STEPS)
            partial = 0 if step < FULL_CAPTION_STEPS else FLOW_BATCH // 2
            pixels, captions = _image_batch(self.seed, 2, step, FLOW_BATCH, size, partial)
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
            _train_step(optimizer, self.transformer.parameters(), loss)
            with torch.no_grad():
                # Short memory while the weights move fast early on, EMA_DECAY once they settle.
                decay = min(EMA_DECAY, (1 + step) / (10 + step))
                for averaged, current in zip(ema.parameters(), self.transformer.parameters(), strict=True):
                    averaged.lerp_(current, 1 - decay)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == FLOW_STEPS:
                state = {
                    "step": step + 1,
                    "seconds": time.perf_counter() - started,
                    "transformer": self.transformer.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                }
                _save(path, state)
                self.export(ema, {**record, "rectified_flow": {"steps": step + 1, "seconds": state["seconds"]}})
        return ema, state["seconds"]

    # --- export ------------------------------------------------------------------------------------------------
    def export(self, transformer, record: dict):
        """Write the pipeline (the given transformer, the latest refined decoder) as a diffusers folder."""
        from diffusers import FluxPipeline

        decoder_state = _load(self.out / "decoder.pt")
        if decoder_state is not None:
            self.vae.decoder.load_state_dict(decoder_state["decoder"])
            record = {
                **record,
                "decoder_refinement": {"steps": decoder_state["step"], "seconds": decoder_state["seconds"]},
            }
        folder = self.out / "tiny-flux"
        components = {name: getattr(self.pipe, name) for name in self.pipe.components}
        components["transformer"] = transformer
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        FluxPipeline(**components).save_pretrained(staging)
        defaults = {
            "native_size": EMBEDDED_SPEC.native_size,
            "max_sequence_length": EMBEDDED_SPEC.max_sequence_length,
            "num_inference_steps": DEFAULT_STEPS,
            "guidance_scale": DEFAULT_GUIDANCE,
            "training": {"seed": self.seed, **record},
        }
        (staging / CALL_DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)


def _pin_to_core(index: int):
    """Keep this process on one core of those it may use, so the two phase processes never share one."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > 1:
        os.sched_setaffinity(0, {cores[index % len(cores)]})


def run(out: Path, seed: int):
    """All three phases: the autoencoder, then the flow model here while the decoder refines in a child process."""
    trainer = Trainer(out, seed)
    record = {"autoencoder": {"steps": VAE_STEPS, "seconds": trainer.train_autoencoder()}}
    # Started before this process pins itself, so that the child can still choose the other core.
    decoder = subprocess.Popen(
        [sys.executable, "-m", "h2cache.embedded.train", "--out", str(out), "--seed", str(seed), "--only-decoder"]
    )
    _pin_to_core(0)
    ema, _ = trainer.train_flow(record)
    if decoder.wait() != 0:
        raise SystemExit(f"decoder refinement failed (exit {decoder.returncode}); rerun the same command to resume")
    flow = _load(out / "flow.pt")
    trainer.export(ema, {**record, "rectified_flow": {"steps": flow["step"], "seconds": flow["seconds"]}})


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint and output folder (outside the repo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only-decoder", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # One thread in every phase: a float32 reduction's result depends on the thread count, so a fixed count is part
    # of what makes the run reproducible; and two single-threaded processes use both cores for phases 2 and 3.
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only_decoder:
        _pin_to_core(1)
        trainer = Trainer(args.out, args.seed)
        trainer.train_autoencoder()
        trainer.refine_decoder()
        return
    run(args.out, args.seed)
    print(f"pipeline written to {args.out / 'tiny-flux'}")


if __name__ == "__main__":
    main()
