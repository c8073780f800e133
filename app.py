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

from eval.calibrate import DEFAULT_GRIDS, DEFAULT_SEED, DEFAULT_TARGET_PSNR, THRESHOLD_NAMES  # noqa: E402
from eval.compare import (  # noqa: E402
    DIFFERENCE_GAIN,
    ComparisonSession,
    build_config,
    calibrate_session,
    calibration_inputs,
    default_request_values,
    format_numbers,
    make_request,
    method_parameters,
)

DEFAULT_PORT = 7860
DEFAULT_METHOD = "h2"
# A float parameter's slider spans [0, max(1, this x its default)]; typing a value in its box goes beyond.
SLIDER_TOP_FACTOR = 4
CALIBRATION_PROMPTS = 4  # grammar captions offered on the calibrate tab
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
    plot = distances_image(comparison.trace, config)
    source = "remembered" if comparison.uncached_remembered else "generated"
    status = (
        f"**Done:** {method} at {request.width}x{request.height}, {request.steps} steps, seed {request.seed} "
        f"(uncached image {source})."
    )
    return status, comparison.uncached, comparison.cached, comparison.difference, format_numbers(comparison), plot


def distances_image(trace: list[dict], config):
    """eval.trace_plot's probe-distance figure as an image for the page."""
    from PIL import Image

    from eval.trace_plot import plot_probe_distances

    with tempfile.TemporaryDirectory() as folder:
        with Image.open(plot_probe_distances(trace, Path(folder) / "distances.png", config)) as opened:
            return opened.convert("RGB")


def calibrate(session: ComparisonSession, prompts_text, method, target_psnr, steps, seed, *grid_texts):
    """The calibrate tab's outputs: status, the grid's table, the chosen configuration's distances plot, and the
    chosen (method, thresholds) for the compare tab (None if no configuration meets the target)."""
    from eval.calibrate import format_candidates

    try:
        inputs = calibration_inputs(
            prompts_text, method, dict(zip(DEFAULT_GRIDS, grid_texts, strict=True)), target_psnr, steps, seed
        )
        chosen, candidates, traces = calibrate_session(session, **inputs)
    except ValueError as error:
        return f"**Error:** {error}", "", None, None
    except Exception as error:  # a model failure: the page says so, the console has the traceback
        traceback.print_exc()
        return f"**Error:** calibration failed ({type(error).__name__}: {error})", "", None, None
    table = format_candidates(candidates, chosen, inputs["target_psnr"])
    if chosen is None:
        return f"**No configuration** keeps a mean PSNR of {inputs['target_psnr']} dB.", table, None, None
    thresholds = ", ".join(f"{name} {value}" for name, value in chosen.params.items())
    status = (
        f"**Chosen:** {method} with {thresholds}: {100 * chosen.blocks_fraction:.1f}% of the blocks, "
        f"mean PSNR {chosen.mean_psnr:.2f} dB over {len(inputs['prompts'])} prompts."
    )
    plot = distances_image(traces[0], build_config(method, chosen.params))
    return status, table, plot, (method, chosen.params)


def chosen_form_values(chosen) -> list:
    """The compare tab's parameter values for a calibration's choice: its thresholds, None where nothing changes."""
    method, params = chosen
    return [params.get(name) if owner == method else None for owner, name in parameter_keys()]


def parameter_component(gr, parameter, elem_id: str):
    """A form field for one config field: its default, its documentation, and the range its type allows."""
    shown = {"value": parameter.default, "label": parameter.name, "info": parameter.doc, "elem_id": elem_id}
    if parameter.kind is bool:
        return gr.Checkbox(**shown)
    if parameter.choices:
        return gr.Dropdown(list(parameter.choices), **shown)
    if parameter.kind is float:
        return gr.Slider(0.0, max(1.0, SLIDER_TOP_FACTOR * parameter.default), step=0.01, **shown)
    return gr.Number(precision=0, **shown)


def compare_tab(gr, session: ComparisonSession, defaults: dict):
    """Prompt and cache in, the two images and what the cache did out. Returns the method and parameter fields."""
    from h2cache import METHODS

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
                        fields.append(parameter_component(gr, parameter, elem_id=f"{name}-{parameter.name}"))
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=2):
            status = gr.Markdown("Enter a prompt and press Generate.", elem_id="status")
            with gr.Row():
                uncached = gr.Image(label="uncached", type="pil", elem_id="uncached", height=IMAGE_HEIGHT)
                cached = gr.Image(label="cached", type="pil", elem_id="cached", height=IMAGE_HEIGHT)
                difference = gr.Image(
                    label=f"difference (x{DIFFERENCE_GAIN})", type="pil", elem_id="difference", height=IMAGE_HEIGHT
                )
            numbers = gr.Markdown(elem_id="numbers")
            plot = gr.Image(label="probe distances per step: hits and misses", type="pil", elem_id="plot")

    method.change(lambda chosen: [gr.Group(visible=name == chosen) for name in groups], method, list(groups.values()))
    inputs = [method, prompt, seed, steps, height, width, *fields]
    outputs = [status, uncached, cached, difference, numbers, plot]
    handler = lambda *values: generate(session, *values)
    button.click(handler, inputs, outputs, concurrency_id="model", concurrency_limit=1)
    for field in fields:
        if isinstance(field, gr.Slider):
            field.release(handler, inputs, outputs, concurrency_id="model", concurrency_limit=1)
    return method, fields


def calibrate_tab(gr, session: ComparisonSession, defaults: dict, tabs, method, fields):
    """eval.calibrate on a few prompts; its choice can be carried to the compare tab's method and fields."""
    from eval.runner import load_prompts

    gr.Markdown(
        "Every grid point generates every prompt; the configuration computing the fewest blocks while its mean "
        "PSNR against the uncached images stays at the target wins (`python -m eval.calibrate` does the same)."
    )
    with gr.Row():
        with gr.Column(scale=1, min_width=320):
            prompts = gr.Textbox(
                "\n".join(p for _, p in load_prompts(f"grammar:{CALIBRATION_PROMPTS}")),
                lines=CALIBRATION_PROMPTS,
                label="prompts, one a line",
                elem_id="calibration-prompts",
            )
            calibrated = gr.Dropdown(
                sorted(THRESHOLD_NAMES), value=DEFAULT_METHOD, label="cache method", elem_id="calibration-method"
            )
            grids = [
                gr.Textbox(
                    values,
                    label=f"{name} grid (comma-separated)",
                    visible=name in THRESHOLD_NAMES[DEFAULT_METHOD],
                    elem_id=f"grid-{name}",
                )
                for name, values in DEFAULT_GRIDS.items()
            ]
            with gr.Row():
                target = gr.Number(DEFAULT_TARGET_PSNR, label="target mean PSNR (dB)", elem_id="target-psnr")
                steps = gr.Number(defaults["steps"], precision=0, label="steps", elem_id="calibration-steps")
                seed = gr.Number(DEFAULT_SEED, precision=0, label="seed", elem_id="calibration-seed")
            button = gr.Button("Calibrate", variant="primary", elem_id="calibrate")
        with gr.Column(scale=2):
            status = gr.Markdown("Choose a grid and press Calibrate.", elem_id="calibration-status")
            use = gr.Button("Use the chosen thresholds in Compare", interactive=False, elem_id="use-chosen")
            table = gr.Markdown(elem_id="calibration-table")
            plot = gr.Image(label="the chosen configuration's probe distances (first prompt)", type="pil")
    chosen = gr.State(None)

    calibrated.change(
        lambda name: [gr.Textbox(visible=grid in THRESHOLD_NAMES[name]) for grid in DEFAULT_GRIDS], calibrated, grids
    )
    button.click(
        lambda *values: calibrate(session, *values),
        [prompts, calibrated, target, steps, seed, *grids],
        [status, table, plot, chosen],
        concurrency_id="model",
        concurrency_limit=1,
    ).then(lambda choice: gr.Button(interactive=choice is not None), chosen, use)
    use.click(
        lambda choice: [
            gr.Tabs(selected="compare"),
            choice[0],
            *(gr.skip() if value is None else value for value in chosen_form_values(choice)),
        ],
        chosen,
        [tabs, method, *fields],
    )


def build_page(session: ComparisonSession, model_label: str):
    """The Gradio page around ``session``."""
    import gradio as gr

    defaults = default_request_values(session.pipe)
    with gr.Blocks(title="h2cache demo", analytics_enabled=False) as page:
        gr.Markdown(f"## h2cache: uncached vs cached\nModel: {model_label}. One generation at a time.")
        with gr.Tabs() as tabs:
            with gr.Tab("Compare", id="compare"):
                method, fields = compare_tab(gr, session, defaults)
            with gr.Tab("Calibrate", id="calibrate"):
                calibrate_tab(gr, session, defaults, tabs, method, fields)
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
