"""Choosing and loading a FLUX pipeline: the embedded model, diffusers FLUX.1-dev, or nunchaku's 4-bit transformers.

Every check that can fail (the wrong ``nunchaku`` package, no CUDA, an unsupported GPU, weights neither cached nor
reachable) runs in ``plan_model`` before anything heavy is loaded, and fails with one ``SetupError`` that names the
fix. The choice itself is a pure function of ``Facts``, so it can be tested on any machine.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from . import embedded
from .nunchaku_wheels import ALL_TORCH_VERSIONS, major_minor

FLUX_DEV = "black-forest-labs/FLUX.1-dev"
NUNCHAKU_FLUX_DEV = "nunchaku-tech/nunchaku-flux.1-dev/svdq-{precision}_r32-flux.1-dev.safetensors"
EMBEDDED_NAMES = {
    "tiny": "the shipped trained embedded model",
    "random": "a random-weight embedded model (mechanics only; draws noise)",
    "flux-proportioned": "random weights, FLUX.1's 19 double + 38 single blocks at reduced width",
}
# nunchaku's 4-bit kernels exist for these compute capabilities only (no Hopper/B200/V100: no 4-bit tensor cores).
NUNCHAKU_PRECISION_BY_SM = {75: "int4", 80: "int4", 86: "int4", 89: "int4", 120: "fp4", 121: "fp4"}
NUNCHAKU_INSTALL_HINT = (
    "run python scripts/install_nunchaku.py (it picks nunchaku's CUDA wheel for your torch and Python from "
    "https://github.com/nunchaku-tech/nunchaku/releases)"
)
# The oldest nunchaku whose V1/V2 calls h2cache uses (unchanged since 1.0.0; 0.3.x exports no V2 class).
NUNCHAKU_MIN_VERSION = "1.0.0"


class SetupError(RuntimeError):
    """A problem found before any heavy work, with the fix in its message."""


@dataclass
class Facts:
    """What the machine offers, as far as model selection cares."""

    cuda: bool
    sm: int | None = None  # compute capability as major*10+minor, e.g. 89 for an RTX 4090
    gpu_name: str | None = None
    nunchaku: str = "absent"  # "real", "unrelated" (the PyPI project of the same name) or "absent"
    nunchaku_version: str | None = None  # e.g. "1.1.0+torch2.9"; None: unknown, not checked
    torch_version: str | None = None  # e.g. "2.9.1+cu130"; None: unknown, not checked
    # nunchaku's own requirements the environment does not meet, as (requirement, installed version or "none").
    unmet_requirements: tuple[tuple[str, str], ...] = ()


def nunchaku_mismatch(facts: Facts) -> str | None:
    """Why the installed real nunchaku cannot run here (too old, built for another torch, unmet requirements),
    with the fix; None when it can or when the versions are unknown."""
    from packaging.version import Version

    version = facts.nunchaku_version
    if facts.nunchaku != "real" or version is None:
        return None
    if Version(version).release < Version(NUNCHAKU_MIN_VERSION).release:
        return (
            f"nunchaku {version} is too old: h2cache needs nunchaku >= {NUNCHAKU_MIN_VERSION} (0.3.x has no V2 "
            f"class); {NUNCHAKU_INSTALL_HINT}"
        )
    built_for = version.partition("+")[2].rpartition("torch")[2] or None
    if facts.torch_version is not None and built_for is not None:
        installed = major_minor(facts.torch_version)
        if installed != built_for:
            message = f"nunchaku {version} is built for torch {built_for}, but torch {facts.torch_version} is installed"
            if installed not in ALL_TORCH_VERSIONS:
                return (
                    f"{message}, and nunchaku has no wheel for torch {installed} (only for torch "
                    f"{', '.join(ALL_TORCH_VERSIONS)}): pip install 'torch=={built_for}.*' 'torchvision' in a "
                    f"separate environment, then {NUNCHAKU_INSTALL_HINT}"
                )
            return f"{message} (the import fails on the ABI mismatch): {NUNCHAKU_INSTALL_HINT}"
    for requirement, installed in facts.unmet_requirements:
        return f"nunchaku {version} needs {requirement} (installed: {installed}): pip install '{requirement}'"
    return None


def unmet_nunchaku_requirements() -> list[tuple[str, str]]:
    """nunchaku's declared runtime requirements (its package metadata) that the environment does not meet."""
    from packaging.requirements import Requirement

    unmet = []
    for line in metadata.requires("nunchaku") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            unmet.append((str(requirement), "none"))
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            unmet.append((str(requirement), installed))
    return unmet


def nunchaku_status() -> str:
    """Which ``nunchaku`` is installed, decided from package metadata: importing nunchaku needs CUDA and is heavy."""
    try:
        dist = metadata.distribution("nunchaku")
    except metadata.PackageNotFoundError:
        return "absent"
    if "piece-wise" in (dist.metadata.get("Summary") or "").lower():
        return "unrelated"
    compiled = any(str(f).replace("\\", "/").startswith("nunchaku/_C") for f in (dist.files or []))
    return "real" if compiled or "+torch" in dist.version else "unrelated"


def detect_facts() -> Facts:
    import torch

    status = nunchaku_status()
    versions = {"torch_version": torch.__version__}
    if status == "real":
        versions.update(
            nunchaku_version=metadata.version("nunchaku"), unmet_requirements=tuple(unmet_nunchaku_requirements())
        )
    if not torch.cuda.is_available():
        return Facts(cuda=False, nunchaku=status, **versions)
    major, minor = torch.cuda.get_device_capability()
    return Facts(cuda=True, sm=10 * major + minor, gpu_name=torch.cuda.get_device_name(), nunchaku=status, **versions)


def checkpoint_float_dtypes(path: str) -> set[str] | None:
    """The floating-point dtypes (safetensors names: "BF16", "F16", ...) in a local safetensors file, read from its
    header only; None if the file is not local."""
    path = Path(path).expanduser()
    if not path.is_file():
        return None
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    tensors = (entry for name, entry in header.items() if name != "__metadata__")
    return {entry["dtype"] for entry in tensors if entry["dtype"].startswith(("F", "BF"))}


@dataclass
class ModelPlan:
    """What will be loaded, decided before loading anything."""

    kind: str  # "embedded", "diffusers" or "nunchaku"
    model: str  # embedded name, local folder or hub id of the base pipeline
    device: str = "cpu"
    dtype: str = "float32"
    transformer: str | None = None  # nunchaku safetensors file or hub path
    nunchaku_class: str = "v2"  # "v1" (NunchakuFluxTransformer2dModel) or "v2" (NunchakuFluxTransformer2DModelV2)
    precision: str | None = None
    notices: list[str] = field(default_factory=list)


def plan_model(
    model: str = "auto",
    transformer: str | None = None,
    nunchaku_class: str = "auto",
    facts: Facts | None = None,
    check_weights: bool = True,
) -> ModelPlan:
    """Decide what to load. ``model``: "auto", an embedded name, "nunchaku", "diffusers", a local folder or hub id.
    ``nunchaku_class``: "auto" (V2, but V1 on Turing unless the checkpoint is fp16), "v1" or "v2"."""
    facts = facts or detect_facts()
    if nunchaku_class not in ("auto", "v1", "v2"):
        raise SetupError(f"--nunchaku-class must be auto, v1 or v2, got {nunchaku_class!r}")
    wants_nunchaku = model == "nunchaku" or transformer is not None
    unusable = None
    if model == "auto":
        if not facts.cuda:
            return ModelPlan("embedded", "tiny", notices=["no CUDA GPU: running the embedded CPU model"])
        unusable = nunchaku_mismatch(facts)
        wants_nunchaku = facts.nunchaku == "real" and facts.sm in NUNCHAKU_PRECISION_BY_SM and unusable is None
    if model in EMBEDDED_NAMES:
        return ModelPlan("embedded", model)

    base = FLUX_DEV if model in ("auto", "nunchaku", "diffusers") else model
    if wants_nunchaku:
        plan = _plan_nunchaku(base, transformer, nunchaku_class, facts)
    else:
        device = "cuda" if facts.cuda else "cpu"
        plan = ModelPlan("diffusers", base, device=device, dtype="bfloat16" if facts.cuda else "float32")
        if model == "auto":
            if facts.nunchaku != "real":
                reason = "nunchaku is not installed"
            else:
                reason = unusable or f"sm_{facts.sm} has no 4-bit kernels"
            plan.notices.append(f"{reason}: running bf16 diffusers FLUX.1-dev")
    if facts.nunchaku == "unrelated" and not wants_nunchaku:
        plan.notices.append("the installed 'nunchaku' is an unrelated PyPI project; " + NUNCHAKU_INSTALL_HINT)
    if check_weights:
        check_pipeline_weights(plan.model)
        if plan.transformer:
            check_transformer_weights(plan.transformer)
    return plan


def _plan_nunchaku(base: str, transformer: str | None, nunchaku_class: str, facts: Facts) -> ModelPlan:
    if facts.nunchaku == "unrelated":
        raise SetupError(
            "the installed 'nunchaku' is the unrelated PyPI project (piece-wise linear segmentation), not "
            "nunchaku-tech's 4-bit inference engine: pip uninstall nunchaku, then " + NUNCHAKU_INSTALL_HINT
        )
    if facts.nunchaku == "absent":
        raise SetupError("nunchaku is not installed: " + NUNCHAKU_INSTALL_HINT + " (never `pip install nunchaku`)")
    mismatch = nunchaku_mismatch(facts)
    if mismatch is not None:
        raise SetupError(mismatch)
    if not facts.cuda:
        raise SetupError(
            "nunchaku needs an NVIDIA GPU with CUDA, and none is available: use --model tiny on this machine"
        )
    precision = NUNCHAKU_PRECISION_BY_SM.get(facts.sm)
    if precision is None:
        raise SetupError(
            f"nunchaku has no 4-bit kernels for {facts.gpu_name or 'this GPU'} (sm_{facts.sm}); supported: "
            "RTX 20/30/40/50, A100, A10/A6000, L4/L40S (not H100/H200/B200/V100). Use --model diffusers instead"
        )
    transformer = transformer or NUNCHAKU_FLUX_DEV.format(precision=precision)
    notices = []
    if facts.sm == 75:
        # Turing has no bf16. V1's C++ loader converts the (bf16) checkpoints to fp16; V2's loader asserts that
        # every tensor already has the model's dtype (nunchaku models/transformers/utils.py).
        dtypes = checkpoint_float_dtypes(transformer)
        fp16_checkpoint = dtypes == {"F16"}
        why = "V2 loads only checkpoints already in fp16, and Turing runs fp16"
        if nunchaku_class == "v2" and dtypes is not None and not fp16_checkpoint:
            raise SetupError(f"{transformer} holds {', '.join(sorted(dtypes))} tensors; {why}: use --nunchaku-class v1")
        if nunchaku_class == "v2" and dtypes is None:
            notices.append(f"Turing (sm_75) with nunchaku V2: {why}; the published checkpoints are bf16")
        if nunchaku_class == "auto":
            nunchaku_class = "v2" if fp16_checkpoint else "v1"
            if nunchaku_class == "v1":
                notices.append(f"Turing (sm_75): running nunchaku V1, which converts the weights; {why}")
    return ModelPlan(
        "nunchaku",
        base,
        device="cuda",
        dtype="float16" if facts.sm == 75 else "bfloat16",
        transformer=transformer,
        nunchaku_class="v2" if nunchaku_class == "auto" else nunchaku_class,
        precision=precision,
        notices=notices,
    )


def _weights_missing(what: str) -> SetupError:
    return SetupError(
        f"{what} is neither in the local Hugging Face cache nor reachable: set HF_HOME to the cache that holds it, "
        f"HF_TOKEN for the gated {FLUX_DEV} (accept its licence on the hub first), or pass --model PATH to a local "
        "diffusers folder"
    )


def _hub_reachable(repo_id: str) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=10)
    except (GatedRepoError, RepositoryNotFoundError):
        return False
    except Exception:  # no network, DNS failure, proxy refusal: all mean "cannot download now"
        return False
    return True


def check_pipeline_weights(model: str) -> None:
    """A local folder must hold a diffusers pipeline; a hub id must be cached or downloadable."""
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        if not (path / "model_index.json").is_file():
            raise SetupError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        return
    if not _hub_reachable(model):
        raise _weights_missing(f"the pipeline {model}")


def check_transformer_weights(transformer: str) -> None:
    """nunchaku's single-file weights: a local file, or ``org/repo/file.safetensors`` cached or downloadable."""
    if Path(transformer).expanduser().is_file():
        return
    parts = transformer.split("/")
    if len(parts) < 3:
        raise SetupError(f"--transformer {transformer}: not a file, and not of the form org/repo/file.safetensors")
    from huggingface_hub import try_to_load_from_cache

    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if not isinstance(try_to_load_from_cache(repo_id, filename), str) and not _hub_reachable(repo_id):
        raise _weights_missing(f"the transformer {transformer}")


def load_planned(plan: ModelPlan, seed: int = 0):
    """Load what ``plan_model`` decided. Heavy: model weights are read here, and only here."""
    if plan.kind == "embedded":
        return load_pipeline(plan.model, seed=seed)
    import torch
    from diffusers import FluxPipeline

    dtype = getattr(torch, plan.dtype)
    if plan.kind == "diffusers" and (Path(plan.model) / embedded.CALL_DEFAULTS_FILE).is_file():
        return embedded.load_folder(plan.model)  # an embedded-model folder, e.g. a fresh training run's output
    if plan.kind == "diffusers":
        return FluxPipeline.from_pretrained(plan.model, torch_dtype=dtype).to(plan.device)
    if plan.nunchaku_class == "v2":
        from nunchaku import NunchakuFluxTransformer2DModelV2 as NunchakuTransformer
    else:
        from nunchaku import NunchakuFluxTransformer2dModel as NunchakuTransformer
    transformer = NunchakuTransformer.from_pretrained(plan.transformer, torch_dtype=dtype)
    if dtype == torch.float16:  # Turing has no bf16: nunchaku's fp16 attention kernel instead of FlashAttention-2
        if plan.nunchaku_class == "v1":
            transformer.set_attention_impl("nunchaku-fp16")
        else:
            for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
                block.attn.set_processor("nunchaku-fp16")
    return FluxPipeline.from_pretrained(plan.model, transformer=transformer, torch_dtype=dtype).to(plan.device)


def parse_lora(value: str | None) -> tuple[str, float] | None:
    """``PATH[:SCALE]``; the scale is split off the last colon only if it is a number (Windows drive letters)."""
    if not value:
        return None
    path, _, scale = value.rpartition(":")
    try:
        return (path, float(scale)) if path else (value, 1.0)
    except ValueError:
        return value, 1.0


def load_lora(pipe, path: str, scale: float) -> None:
    """A LoRA through the API of the backend that runs: nunchaku V1's weight update, or diffusers/PEFT adapters."""
    from .backends import detect_backend

    backend = detect_backend(pipe.transformer).name
    if backend == "nunchaku_v1":
        pipe.transformer.update_lora_params(path)
        pipe.transformer.set_lora_strength(scale)
    elif backend == "nunchaku_v2":
        raise SetupError("nunchaku's V2 transformer has no LoRA API: use --nunchaku-class v1 with --lora")
    else:
        # The adapter wraps to_q / to_k / to_v; a fused to_qkv (the embedded model's loader fuses) would bypass it.
        pipe.transformer.unfuse_qkv_projections()
        pipe.load_lora_weights(path, adapter_name="h2cache_lora")
        pipe.set_adapters(["h2cache_lora"], adapter_weights=[scale])


def load_pipeline(model: str = "tiny", seed: int = 0):
    """A ``FluxPipeline`` by name: "tiny", "random", "flux-proportioned", or a local folder / hub id (diffusers)."""
    if model == "tiny":
        return embedded.load_embedded(seed=seed)
    if model == "random":
        return embedded.build_pipeline(embedded.TinyFluxSpec(), seed=seed)
    if model == "flux-proportioned":
        return embedded.build_pipeline(embedded.FLUX_PROPORTIONED, seed=seed)
    plan = plan_model(model, facts=detect_facts())
    return load_planned(plan, seed=seed)
