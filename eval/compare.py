"""One prompt, uncached and cached: the two images, where they differ, and what the cache saved.

This is the logic behind ``app.py`` (the web demo), kept free of any UI so it can be tested on the embedded model.
A ``ComparisonSession`` holds one loaded pipeline and remembers the uncached image of the last few
(prompt, seed, steps, size) requests, so changing only the cache's parameters regenerates only the cached image.
"""

from __future__ import annotations

import inspect
import re
import threading
from collections import OrderedDict
from dataclasses import MISSING, dataclass, fields

import numpy as np
from PIL import Image

# Pixel differences of a good cache are a few grey levels: multiplied by this they become visible.
DIFFERENCE_GAIN = 8
# Uncached images remembered per session; each is one full generation to redo when evicted.
MAX_REFERENCES = 16
# The largest seed torch.Generator.manual_seed takes.
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class Request:
    """What determines the uncached image: the cache's parameters do not."""

    prompt: str
    seed: int
    steps: int
    height: int
    width: int


@dataclass(frozen=True)
class Parameter:
    """One field of a method's config dataclass, as a form shows it."""

    name: str
    kind: type  # bool, int, float or str
    default: object
    doc: str  # the field's description from the config's docstring
    choices: tuple | None = None  # the allowed values of a str field


@dataclass
class Comparison:
    """The outcome of one cached generation against the uncached image of the same request."""

    request: Request
    config: object  # the method config the cached image was made with
    uncached: Image.Image
    cached: Image.Image
    difference: Image.Image  # |cached - uncached| per channel, times DIFFERENCE_GAIN
    psnr: float  # dB; inf when the images are identical
    ssim: float
    blocks_run: int
    blocks_total: int  # what the uncached generation ran
    stage1_hits: int
    stage2_hits: int  # hits and forced reuses
    steps_recorded: int  # transformer forwards (steps x CFG branches)
    uncached_seconds: float
    cached_seconds: float
    uncached_remembered: bool  # the uncached image came from memory, not from a generation just now
    trace: list[dict]  # h2cache.stats of the cached generation

    @property
    def blocks_fraction(self) -> float:
        return self.blocks_run / self.blocks_total

    @property
    def wall_time_ratio(self) -> float:
        """Uncached over cached generation time: above 1, the cache was faster."""
        return self.uncached_seconds / self.cached_seconds


def difference_image(image: Image.Image, reference: Image.Image, gain: int = DIFFERENCE_GAIN) -> Image.Image:
    """The absolute per-channel difference of two same-size images, multiplied by ``gain`` and clipped to 255."""
    from eval.metrics.images import load_pair

    pixels, reference_pixels = load_pair(image, reference)
    difference = np.abs(pixels.astype(np.int16) - reference_pixels.astype(np.int16)) * gain
    return Image.fromarray(np.clip(difference, 0, 255).astype(np.uint8))


def field_docs(config_class) -> dict[str, str]:
    """Each field's description from the ``Args:`` section of a config class's docstring (single backticks)."""
    docs, name = {}, None
    for line in inspect.getdoc(config_class).split("Args:", 1)[-1].splitlines():
        entry = re.match(r"^ {4}(\w+) \(`[^`]*`(?:, [^)]*)?\)[:.]?\s*(.*)", line)
        if entry:
            name, docs[entry.group(1)] = entry.group(1), entry.group(2)
        elif name and line.strip():
            docs[name] = f"{docs[name]} {line.strip()}".strip()
    return {field: text.replace("``", "`") for field, text in docs.items()}


def method_parameters(method: str) -> list[Parameter]:
    """The parameters a user sets for ``method``, from its config dataclass: every field with a scalar default.

    Fields without one are not the user's to set here: TeaCache's step count comes from the scheduler and its
    polynomial belongs to the model; Block Cache's optional PFS divisor is off unless asked for in code.
    """
    from h2cache import METHODS

    config_class = METHODS[method][0]
    docs = field_docs(config_class)
    parameters = []
    for field in fields(config_class):
        default = field.default
        if default is MISSING or default is None or not isinstance(default, (bool, int, float, str)):
            continue
        choices = config_class.choices.get(field.name)
        if isinstance(default, str) and choices is None:
            raise TypeError(f"{config_class.__name__}.{field.name}: a text field the page has no choices for")
        parameters.append(Parameter(field.name, type(default), default, docs.get(field.name, ""), choices))
    return parameters


def build_config(method: str, params: dict):
    """The method's config from form values; a bad value raises ``ValueError`` naming the field."""
    from h2cache.methods import build_method

    typed = {}
    for parameter in method_parameters(method):
        value = params.get(parameter.name, parameter.default)
        if value is None or value == "":
            raise ValueError(f"{method} {parameter.name} is empty: enter a value (default {parameter.default})")
        if parameter.kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{method} {parameter.name} must be a whole number, got {value}")
            value = int(value)
        typed[parameter.name] = value
    return build_method(method, **typed).config


def default_request_values(pipe) -> dict:
    """The model's own step count and size, the form's starting values."""
    from h2cache.generate import call_arguments

    call = call_arguments(pipe)
    native = pipe.default_sample_size * pipe.vae_scale_factor
    return {
        "steps": call["num_inference_steps"],
        "height": call.get("height", native),
        "width": call.get("width", native),
    }


def whole_number(name: str, value) -> int:
    """A form number (it may arrive as a float, or None when the field is empty) as an int."""
    if value is None or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{name} must be a whole number, got {value}")
    return int(value)


def checked_seed(seed) -> int:
    seed = whole_number("seed", seed)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be between 0 and {MAX_SEED}, got {seed}")
    return seed


def make_request(prompt, seed, steps, height, width) -> Request:
    """A checked ``Request`` from form values; ``ValueError`` names the fix."""
    from h2cache.generate import check_call_values

    prompt = (prompt or "").strip()
    if not prompt:
        raise ValueError("the prompt is empty: describe the image to draw")
    seed = checked_seed(seed)
    steps, height, width = (whole_number(n, v) for n, v in (("steps", steps), ("height", height), ("width", width)))
    check_call_values(steps, height, width)
    return Request(prompt, seed, steps, height, width)


class ComparisonSession:
    """One pipeline, and the uncached images of its last ``max_references`` requests.

    Generations run one at a time (a reentrant lock): the cache state lives on the one transformer they share.
    """

    def __init__(self, pipe, max_references: int = MAX_REFERENCES):
        self.pipe = pipe
        self.max_references = max_references
        self._references: OrderedDict[Request, tuple[Image.Image, float]] = OrderedDict()
        self.lock = threading.RLock()

    def _generate(self, request: Request, config) -> tuple[Image.Image, float]:
        import h2cache
        from h2cache.generate import call_arguments, timed_call

        h2cache.apply(self.pipe, config)
        call = call_arguments(self.pipe, request.steps, None, request.height, request.width)
        return timed_call(self.pipe, request.prompt, request.seed, call)

    def reference(self, request: Request) -> tuple[Image.Image, float]:
        """The uncached image of ``request`` and its generation time, generated only if not remembered."""
        from h2cache import NoCacheConfig

        with self.lock:
            if request in self._references:
                self._references.move_to_end(request)
            else:
                self._references[request] = self._generate(request, NoCacheConfig())
                while len(self._references) > self.max_references:
                    self._references.popitem(last=False)
            return self._references[request]

    def is_remembered(self, request: Request) -> bool:
        return request in self._references

    def warm_up(self, request: Request) -> None:
        """One untimed short generation, so that the first timed one does not pay for one-off setup."""
        from h2cache import NoCacheConfig

        with self.lock:
            self._generate(Request(request.prompt, request.seed, 1, request.height, request.width), NoCacheConfig())

    def compare(self, request: Request, config) -> Comparison:
        """Generate ``request`` with the cache ``config`` and compare it with the uncached image."""
        import h2cache
        from eval.metrics.fidelity import psnr, ssim

        with self.lock:
            remembered = self.is_remembered(request)
            uncached, uncached_seconds = self.reference(request)
            cached, cached_seconds = self._generate(request, config)
            trace = h2cache.stats(self.pipe)
        totals = h2cache.summary(self.pipe)
        return Comparison(
            request=request,
            config=config,
            uncached=uncached,
            cached=cached,
            difference=difference_image(cached, uncached),
            psnr=psnr(cached, uncached),
            ssim=ssim(cached, uncached),
            blocks_run=totals["blocks_run"],
            blocks_total=totals["blocks_total"],
            stage1_hits=totals["stage1_hits"],
            stage2_hits=totals["stage2_hits"],
            steps_recorded=totals["steps"],
            uncached_seconds=uncached_seconds,
            cached_seconds=cached_seconds,
            uncached_remembered=remembered,
            trace=trace,
        )


def format_numbers(comparison: Comparison) -> str:
    """The comparison's numbers as a Markdown table."""
    psnr = "inf (identical)" if comparison.psnr == float("inf") else f"{comparison.psnr:.2f} dB"
    rows = [
        ("PSNR vs uncached", psnr),
        ("SSIM vs uncached", f"{comparison.ssim:.4f}"),
        (
            "blocks computed",
            f"{comparison.blocks_run} / {comparison.blocks_total} ({100 * comparison.blocks_fraction:.1f}%)",
        ),
        (
            "stage hits (structure / detail)",
            f"{comparison.stage1_hits} / {comparison.stage2_hits} of {comparison.steps_recorded} steps",
        ),
        ("uncached time", f"{comparison.uncached_seconds:.2f} s"),
        ("cached time", f"{comparison.cached_seconds:.2f} s"),
        ("wall-time ratio (uncached / cached)", f"{comparison.wall_time_ratio:.2f}x"),
    ]
    return "| measure | value |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def calibration_inputs(prompts_text: str, method: str, grid_texts: dict[str, str], target_psnr, steps, seed) -> dict:
    """``calibrate_session``'s keyword arguments from form values (prompts one a line), every value checked."""
    from eval.calibrate import THRESHOLD_NAMES, parse_grid
    from h2cache.generate import check_call_values

    if method not in THRESHOLD_NAMES:
        raise ValueError(f"calibration covers {', '.join(THRESHOLD_NAMES)}, not {method!r}")
    prompts = [line.strip() for line in (prompts_text or "").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts: enter one prompt a line")
    grid = parse_grid(method, grid_texts)
    for name, values in grid.items():
        for value in values:
            build_config(method, {name: value})  # a value the method refuses fails now, not mid-grid
    if target_psnr is None or not np.isfinite(target_psnr):
        raise ValueError(f"the target PSNR must be a number of dB, got {target_psnr}")
    steps = whole_number("steps", steps)
    check_call_values(steps)
    return {
        "prompts": prompts,
        "method": method,
        "grid": grid,
        "target_psnr": float(target_psnr),
        "steps": steps,
        "seed": checked_seed(seed),
    }


def calibrate_session(session: ComparisonSession, prompts, method: str, grid: dict, target_psnr: float, steps, seed):
    """``eval.calibrate.calibrate`` on the session's pipeline, between its generations: (chosen, candidates, traces)."""
    from eval.calibrate import calibrate
    from h2cache.generate import call_arguments

    with session.lock:
        call = call_arguments(session.pipe, steps)
        return calibrate(session.pipe, prompts, method, grid, target_psnr, seed, call)
