"""Web demo: a prompt in, the uncached and the cached image side by side, and what each cache stage decided.

    pip install -r requirements-app.txt
    python app.py                       # the embedded model on CPU; on a GPU, nunchaku or diffusers FLUX (as run.py)
    python app.py --host 0.0.0.0 --port 7860 --model diffusers

The model loads once. The uncached image is remembered per (prompt, seed, steps, size), so changing only the
cache's parameters regenerates only the cached image. Generations run one at a time; others wait in a queue.
The logic lives in ``eval.compare``; this file only lays out the page.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

# No telemetry, no version check, no share tunnel: the demo talks to nobody but its own browser tab.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_SHARE"] = "False"

from eval.compare import (  # noqa: E402
    DIFFERENCE_GAIN,
    ComparisonSession,
    build_config,
    default_request_values,
    format_numbers,
    make_request,
    method_parameters,
)

DEFAULT_PORT = 7860
DEFAULT_METHOD = "h2"
# A float parameter's slider spans [0, max(1, this x its default)]; typing a value in its box goes beyond.
SLIDER_TOP_FACTOR = 4
IMAGE_HEIGHT = 260  # pixels on the page for each of the three images, whatever their size
REQUIREMENTS_HINT = "pip install -r requirements-app.txt"


def parse_args(argv=None) -> argparse.Namespace:
    from run import add_model_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    add_model_arguments(parser)
    return parser.parse_args(argv)


def parameter_keys() -> list[tuple[str, str]]:
    """(method, parameter) of every parameter field on the page, in the order the handler receives them."""
    from h2cache import METHODS

    return [(method, p.name) for method in METHODS for p in method_parameters(method)]


def generate(session: ComparisonSession, method, prompt, seed, steps, height, width, *values):
    """The page's outputs for one click: status, uncached, cached, difference, numbers, plot.

    Bad input gives a status message and empty outputs; an unexpected failure is logged here, not shown as a
    traceback in the page.
    """
    from PIL import Image

    from eval.trace_plot import plot_probe_distances

    empty = (None, None, None, "", None)
    params = {name: value for (owner, name), value in zip(parameter_keys(), values, strict=True) if owner == method}
    try:
        request = make_request(prompt, seed, steps, height, width)
        config = build_config(method, params)
        comparison = session.compare(request, config)
    except ValueError as error:
        return (f"**Error:** {error}", *empty)
    except Exception as error:  # a model failure: the page says so, the console has the traceback
        traceback.print_exc()
        return (f"**Error:** generation failed ({type(error).__name__}: {error})", *empty)
    with tempfile.TemporaryDirectory() as folder:
        plot_path = plot_probe_distances(comparison.trace, Path(folder) / "distances.png", config)
        with Image.open(plot_path) as opened:
            plot = opened.convert("RGB")
    source = "remembered" if comparison.uncached_remembered else "generated"
    status = (
        f"**Done:** {method} at {request.width}x{request.height}, {request.steps} steps, seed {request.seed} "
        f"(uncached image {source})."
    )
    return status, comparison.uncached, comparison.cached, comparison.difference, format_numbers(comparison), plot


def parameter_component(gr, parameter):
    """A form field for one config field: its default, its documentation, and the range its type allows."""
    label = parameter.name
    if parameter.kind is bool:
        return gr.Checkbox(value=parameter.default, label=label, info=parameter.doc)
    if parameter.choices:
        return gr.Dropdown(list(parameter.choices), value=parameter.default, label=label, info=parameter.doc)
    if parameter.kind is float:
        top = max(1.0, SLIDER_TOP_FACTOR * parameter.default)
        return gr.Slider(0.0, top, value=parameter.default, step=0.01, label=label, info=parameter.doc)
    return gr.Number(value=parameter.default, precision=0, label=label, info=parameter.doc)


def build_page(session: ComparisonSession, model_label: str):
    """The Gradio page around ``session``."""
    import gradio as gr

    from h2cache import METHODS

    defaults = default_request_values(session.pipe)
    with gr.Blocks(title="h2cache demo", analytics_enabled=False) as page:
        gr.Markdown(f"## h2cache: uncached vs cached\nModel: {model_label}. One generation at a time.")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                prompt = gr.Textbox(
                    "a small red circle on the left against a white background", label="prompt", elem_id="prompt"
                )
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
                    steps = gr.Number(defaults["steps"], precision=0, label="steps", elem_id="steps")
                with gr.Row():
                    height = gr.Number(defaults["height"], precision=0, label="height (px)", elem_id="height")
                    width = gr.Number(defaults["width"], precision=0, label="width (px)", elem_id="width")
                method = gr.Dropdown(sorted(METHODS), value=DEFAULT_METHOD, label="cache method", elem_id="method")
                groups, fields = {}, []
                for name in METHODS:
                    with gr.Group(visible=name == DEFAULT_METHOD) as groups[name]:
                        for parameter in method_parameters(name):
                            fields.append(parameter_component(gr, parameter))
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                status = gr.Markdown("Enter a prompt and press Generate.", elem_id="status")
                with gr.Row():
                    uncached = gr.Image(label="uncached", type="pil", elem_id="uncached", height=IMAGE_HEIGHT)
                    cached = gr.Image(label="cached", type="pil", elem_id="cached", height=IMAGE_HEIGHT)
                    difference = gr.Image(
                        label=f"difference (x{DIFFERENCE_GAIN})",
                        type="pil",
                        elem_id="difference",
                        height=IMAGE_HEIGHT,
                    )
                with gr.Row():
                    numbers = gr.Markdown(elem_id="numbers")
                plot = gr.Image(label="probe distances per step: hits and misses", type="pil", elem_id="plot")

        method.change(
            lambda chosen: [gr.Group(visible=name == chosen) for name in groups], method, list(groups.values())
        )
        inputs = [method, prompt, seed, steps, height, width, *fields]
        outputs = [status, uncached, cached, difference, numbers, plot]
        handler = lambda *values: generate(session, *values)
        button.click(handler, inputs, outputs, concurrency_id="model", concurrency_limit=1)
        for field in fields:
            if isinstance(field, gr.Slider):
                field.release(handler, inputs, outputs, concurrency_id="model", concurrency_limit=1)
    return page


def fail(message: str) -> None:
    print(f"app.py: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import gradio as gr
    except ImportError:
        fail(f"gradio is not installed: {REQUIREMENTS_HINT}")

    from h2cache.models import SetupError, load_planned, plan_model

    try:
        plan = plan_model(args.model, args.transformer, args.nunchaku_class)
    except SetupError as error:
        fail(str(error))
    for notice in plan.notices:
        print(f"app.py: {notice}")
    session = ComparisonSession(load_planned(plan))
    defaults = default_request_values(session.pipe)
    session.warm_up(make_request("warm-up", 0, defaults["steps"], defaults["height"], defaults["width"]))
    page = build_page(session, f"{plan.model} ({plan.kind}, {plan.device})")
    system_fonts = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    page.queue(default_concurrency_limit=1).launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        ssr_mode=False,
        mcp_server=False,
        show_error=True,
        theme=system_fonts,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
