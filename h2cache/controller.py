"""The cache controller: owns one FLUX transformer's forward and asks a method what to run at each step.

The owned forward runs the shared prologue, hands the streams to the method with a ``BlockRunner`` (which runs
blocks through the backend, adds ControlNet residuals and counts what ran), then runs the epilogue and records
the step. State lives here, one method state per CFG branch (the name diffusers passes to
``transformer.cache_context``), created at a generation's first step and dropped at its end.

Installed per instance: ``forward`` (or accelerate's ``_old_forward``) and ``cache_context`` become instance
attributes; the class is never touched. Calls the owned forward cannot serve exactly (IP-Adapter, PuLID's identity
embeddings on nunchaku V1, training with gradients) go to the original forward, with a warning the first time.
Calls the original forward cannot serve either (ControlNet or attention kwargs on nunchaku V2) raise
``UnsupportedCall`` before any block runs.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch

from .backends import UnsupportedCall, detect_backend, unwrap
from .streams import Streams
from .trace import StepRecord

DEFAULT_BRANCH = "cond"
# What the shared prologue consumes; the remaining forward arguments steer the controller itself.
MODEL_INPUTS = (
    "hidden_states",
    "encoder_hidden_states",
    "pooled_projections",
    "timestep",
    "img_ids",
    "txt_ids",
    "guidance",
)


class BlockRunner:
    """What a method may do in one forward: run blocks by index, move between stages, read the step."""

    def __init__(self, backend, context, controlnet, step_index: int, num_steps: int | None):
        self._backend = backend
        self._context = context
        self._controlnet_double, self._controlnet_single, self._controlnet_repeat = controlnet
        self.step_index = step_index
        self.num_steps = num_steps
        self.num_double = backend.num_double
        self.num_single = backend.num_single
        self.double_blocks_run = 0
        self.single_blocks_run = 0

    def double_blocks(self, streams: Streams, start: int, stop: int | None = None) -> Streams:
        for index in range(start, self.num_double if stop is None else stop):
            streams = self._backend.double(index, streams, self._context)
            sample = self._controlnet_sample(self._controlnet_double, index, self.num_double, self._controlnet_repeat)
            if sample is not None:
                streams = Streams(streams.img + sample, streams.txt)
            self.double_blocks_run += 1
        return streams

    def rest_of_model(self, streams: Streams, start: int) -> Streams:
        """Double blocks ``start``.. and every single block, back out of the single stage: in one fused call where
        the backend has one (nunchaku V1: one device synchronisation instead of one per layer) and no ControlNet
        residual is to be added, else block by block."""
        if self._controlnet_double is None and self._controlnet_single is None:
            fused = self._backend.fused_rest(streams, start, self._context)
            if fused is not None:
                self.double_blocks_run += self.num_double - start
                self.single_blocks_run += self.num_single
                return fused
        streams = self.double_blocks(streams, start)
        return self.leave_single(self.single_blocks(self.enter_single(streams), 0))

    def enter_single(self, streams: Streams):
        return self._backend.enter_single(streams)

    def single_blocks(self, state, start: int, stop: int | None = None):
        for index in range(start, self.num_single if stop is None else stop):
            state = self._backend.single(index, state, self._context)
            sample = self._controlnet_sample(self._controlnet_single, index, self.num_single, False)
            if sample is not None:
                state = self._backend.add_to_image(state, sample, self._context)
            self.single_blocks_run += 1
        return state

    def leave_single(self, state) -> Streams:
        return self._backend.leave_single(state, self._context)

    def single_tokens(self, state) -> torch.Tensor:
        return self._backend.single_tokens(state)

    def modulated_input(self, streams: Streams) -> torch.Tensor:
        return self._backend.modulated_input(streams, self._context)

    def _controlnet_sample(self, samples, index: int, num_blocks: int, repeat: bool):
        # The block-to-sample mapping of the backend's own forward (nunchaku V1 ignores ``repeat``).
        if samples is None:
            return None
        return samples[self._backend.controlnet_sample_index(index, num_blocks, len(samples), repeat)]


class CacheController:
    """Owns ``model``'s forward for one cache method; see the module docstring."""

    def __init__(self, model, method):
        self.model = unwrap(model)
        self.backend = detect_backend(self.model)
        self.method = method
        self.scheduler = None  # set when applied to a pipeline: tells methods how many steps a call has
        self.records: list[StepRecord] = []
        self._states: dict[str, object] = {}
        self._steps: dict[str, int] = {}
        self._last_timestep: dict[str, float] = {}
        self._branch = DEFAULT_BRANCH
        self._in_session = False
        self._warned: set[str] = set()
        self._installed: dict[str, object] = {}

    # --- installation -----------------------------------------------------------------------------------------
    def install(self) -> None:
        model = self.model
        # accelerate's offload hook calls _old_forward after moving tensors; replacing forward would skip the moves.
        forward_name = "_old_forward" if hasattr(model, "_hf_hook") and hasattr(model, "_old_forward") else "forward"
        self._original_forward = getattr(model, forward_name)
        self._original_cache_context = model.cache_context
        for name, replacement in ((forward_name, self.forward), ("cache_context", self.cache_context)):
            self._installed[name] = model.__dict__.get(name)
            setattr(model, name, replacement)
        model._h2cache_controller = self

    def uninstall(self) -> None:
        model = self.model
        for name, previous in self._installed.items():
            if previous is None:
                delattr(model, name)
            else:
                setattr(model, name, previous)
        self._installed.clear()
        del model._h2cache_controller

    # --- scoping ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self):
        """One generation: fresh state and trace at the start, state released at the end (the trace stays)."""
        self.reset()
        self._in_session = True
        try:
            yield
        finally:
            self._in_session = False
            self._states.clear()

    def reset(self) -> None:
        self.records = []
        self._states.clear()
        self._steps.clear()
        self._last_timestep.clear()

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        """Wraps the model's own ``cache_context``: the branch name keys every cache buffer."""
        previous, self._branch = self._branch, name
        try:
            with self._original_cache_context(name, **kwargs):
                yield
        finally:
            self._branch = previous

    def _num_steps(self) -> int | None:
        if self.scheduler is None or getattr(self.scheduler, "timesteps", None) is None:
            return None
        return len(self.scheduler.timesteps) - (getattr(self.scheduler, "begin_index", None) or 0)

    # --- the owned forward ------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        pooled_projections: torch.Tensor = None,
        timestep: torch.Tensor = None,
        img_ids: torch.Tensor = None,
        txt_ids: torch.Tensor = None,
        guidance: torch.Tensor = None,
        joint_attention_kwargs: dict | None = None,
        controlnet_block_samples=None,
        controlnet_single_block_samples=None,
        return_dict: bool = True,
        controlnet_blocks_repeat: bool = False,
        **extra,
    ):
        arguments = dict(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            joint_attention_kwargs=joint_attention_kwargs,
            controlnet_block_samples=controlnet_block_samples,
            controlnet_single_block_samples=controlnet_single_block_samples,
            return_dict=return_dict,
            controlnet_blocks_repeat=controlnet_blocks_repeat,
            **extra,
        )
        controlnet = controlnet_block_samples is not None or controlnet_single_block_samples is not None
        self.check_call(joint_attention_kwargs, controlnet)
        reason = self._fallback_reason(joint_attention_kwargs, controlnet, extra)
        if reason is not None:
            if reason not in self._warned:
                self._warned.add(reason)
                warnings.warn(f"h2cache: {reason}: running the original forward, without caching", stacklevel=3)
            return self._original_forward(**arguments)

        with _lora_scaled(self.model, joint_attention_kwargs) as joint_attention_kwargs:
            output = self._cached_forward(
                {name: arguments[name] for name in MODEL_INPUTS},
                joint_attention_kwargs,
                (controlnet_block_samples, controlnet_single_block_samples, controlnet_blocks_repeat),
            )
        if not return_dict:
            return (output,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=output)

    def check_call(self, joint_attention_kwargs: dict | None, controlnet: bool) -> None:
        """Raise ``UnsupportedCall`` for a call the backend cannot run at all (before anything is computed)."""
        message = self.backend.refusal(_without_lora_scale(joint_attention_kwargs), controlnet)
        if message is not None:
            raise UnsupportedCall(f"h2cache: {message}")

    def _fallback_reason(self, joint_attention_kwargs, controlnet: bool, extra) -> str | None:
        unknown = sorted(set(extra) - set(self.backend.extra_keywords))
        if unknown:
            return f"unsupported arguments {unknown}"
        if torch.is_grad_enabled() and self.model.training:
            return "training mode with gradients"
        return self.backend.unsupported_reason(_without_lora_scale(joint_attention_kwargs), controlnet, extra)

    def _cached_forward(self, inputs: dict, joint_attention_kwargs, controlnet):
        branch = self._branch
        timestep_value = float(inputs["timestep"].flatten()[0])
        if not self._in_session and timestep_value > self._last_timestep.get(branch, math.inf):
            # Outside a pipeline call nothing marks a new generation, but denoising timesteps only decrease.
            self.reset()
        self._last_timestep[branch] = timestep_value
        if branch not in self._states:
            self._states[branch] = self.method.new_state()
            self._steps[branch] = 0

        streams, context = self.backend.prologue(**inputs, joint_attention_kwargs=joint_attention_kwargs)
        runner = BlockRunner(self.backend, context, controlnet, self._steps[branch], self._num_steps())
        streams, stage1, stage2 = self.method.step(runner, self._states[branch], streams)
        output = self.backend.epilogue(streams.img, context)

        self.records.append(
            StepRecord(
                branch=branch,
                step=runner.step_index,
                timestep=timestep_value,
                stage1=stage1.decision,
                d1=stage1.distance,
                stage2=stage2.decision,
                d2=stage2.distance,
                double_blocks_run=runner.double_blocks_run,
                single_blocks_run=runner.single_blocks_run,
                double_blocks_total=runner.num_double,
                single_blocks_total=runner.num_single,
            )
        )
        self._steps[branch] += 1
        return output


def _without_lora_scale(joint_attention_kwargs: dict | None) -> dict:
    return {key: value for key, value in (joint_attention_kwargs or {}).items() if key != "scale"}


@contextlib.contextmanager
def _lora_scaled(model, joint_attention_kwargs):
    """PEFT LoRA scaling from ``joint_attention_kwargs["scale"]``, as diffusers' ``apply_lora_scale`` does it."""
    from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

    scale = 1.0
    if joint_attention_kwargs is not None:
        joint_attention_kwargs = dict(joint_attention_kwargs)
        scale = joint_attention_kwargs.pop("scale", 1.0)
    if USE_PEFT_BACKEND:
        scale_lora_layers(model, scale)
    try:
        yield joint_attention_kwargs
    finally:
        if USE_PEFT_BACKEND:
            unscale_lora_layers(model, scale)
