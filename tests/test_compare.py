"""eval.compare and app.py's page handler, on the shipped embedded model: what the web demo shows, without a browser."""

from dataclasses import fields

import numpy as np
import pytest
from PIL import Image

import h2cache
from eval.compare import (
    ComparisonSession,
    build_config,
    calibration_inputs,
    default_request_values,
    difference_image,
    field_docs,
    format_numbers,
    make_request,
    method_parameters,
)

PROMPT = "a large blue square at the top against a black background"
STEPS = 6


@pytest.fixture(scope="module")
def session():
    return ComparisonSession(h2cache.load_pipeline("tiny"))


@pytest.fixture
def transformer_calls(session):
    """How many times the real transformer ran (a forward hook), i.e. denoising steps actually computed."""
    calls = []
    handle = h2cache.backends.unwrap(session.pipe.transformer).register_forward_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


def request(**overrides):
    values = {"prompt": PROMPT, "seed": 3, "steps": STEPS, "height": 64, "width": 64, **overrides}
    return make_request(**values)


def test_difference_image_is_the_absolute_difference_times_the_gain_clipped():
    reference = np.zeros((4, 4, 3), np.uint8)
    image = reference.copy()
    image[0, 0] = (3, 10, 200)
    reference[1, 1] = (5, 0, 0)
    difference = np.asarray(difference_image(Image.fromarray(image), Image.fromarray(reference), gain=8))
    assert difference[0, 0].tolist() == [24, 80, 255]
    assert difference[1, 1].tolist() == [40, 0, 0]  # |0 - 5|, not a wrapped uint8 subtraction
    assert difference.sum() == 24 + 80 + 255 + 40


def test_difference_image_refuses_images_of_different_sizes():
    with pytest.raises(ValueError, match="reference"):
        difference_image(Image.new("RGB", (8, 8)), Image.new("RGB", (16, 8)))


@pytest.mark.parametrize("method", sorted(h2cache.METHODS))
def test_every_method_form_starts_at_its_config_defaults(method):
    config_class = h2cache.METHODS[method][0]
    parameters = method_parameters(method)
    assert build_config(method, {}) == config_class()
    defaults = config_class()
    for parameter in parameters:
        assert parameter.default == getattr(defaults, parameter.name)
        assert isinstance(parameter.default, parameter.kind)
        if parameter.kind is str:  # the page offers exactly the values the config accepts
            assert parameter.default in parameter.choices
            for choice in parameter.choices:
                assert getattr(build_config(method, {parameter.name: choice}), parameter.name) == choice
    shown = {p.name for p in parameters}
    hidden = {f.name for f in fields(config_class)} - shown
    assert all(getattr(defaults, name) is None or isinstance(getattr(defaults, name), tuple) for name in hidden)


def test_field_docs_are_read_from_the_config_docstrings():
    docs = field_docs(h2cache.H2CacheConfig)
    assert set(docs) == {f.name for f in fields(h2cache.H2CacheConfig)}
    assert docs["tau1"].startswith("Structure threshold.") and "``" not in docs["pool1"]
    assert docs["mode"].endswith("as the paper's text describes.")  # continuation lines are joined
    assert "order" not in field_docs(h2cache.HiCacheConfig)["interval"]  # a one-line entry ends at the next field
    assert {p.name: p.choices for p in method_parameters("h2")}["mode"] == ("official", "independent")


@pytest.mark.parametrize(
    "method, params, message",
    [
        ("h2", {"tau1": -0.1}, "tau1"),
        ("h2", {"pool1": 2048.5}, "pool1 must be a whole number"),
        ("h2", {"mode": "fast"}, "mode"),
        ("teacache", {"threshold": None}, "threshold is empty"),
        ("taylorseer", {"interval": 0}, "interval"),
    ],
)
def test_bad_method_values_raise_one_value_error_naming_the_field(method, params, message):
    with pytest.raises(ValueError, match=message):
        build_config(method, params)


def test_form_numbers_arrive_as_floats_and_become_ints():
    assert build_config("h2", {"pool1": 1024.0}).pool1 == 1024
    assert make_request(" a cat ", 1.0, 4.0, 32.0, 48.0) == make_request("a cat", 1, 4, 32, 48)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"prompt": "  "}, "prompt is empty"),
        ({"height": 50}, "height must be a positive multiple of 16, got 50"),
        ({"width": 0}, "width must be a positive multiple of 16"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"steps": None}, "steps must be a whole number"),
        ({"seed": -1}, "seed must be between 0"),
        ({"seed": 1.5}, "seed must be a whole number"),
    ],
)
def test_bad_request_values_raise_one_value_error_naming_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        request(**overrides)


def test_default_request_values_are_the_models_own(session):
    defaults = default_request_values(session.pipe)
    image = session.pipe(PROMPT, num_inference_steps=1, output_type="pil").images[0]
    assert (defaults["width"], defaults["height"]) == image.size
    assert defaults["steps"] == session.pipe.h2cache_call_defaults["num_inference_steps"]


def test_no_cache_gives_the_uncached_image_exactly(session):
    comparison = session.compare(request(seed=11), h2cache.NoCacheConfig())
    assert np.array_equal(np.asarray(comparison.cached), np.asarray(comparison.uncached))
    assert comparison.psnr == float("inf") and comparison.ssim == pytest.approx(1.0, abs=1e-4)  # float32 SSIM
    assert not np.asarray(comparison.difference).any()
    assert comparison.blocks_run == comparison.blocks_total
    assert "inf (identical)" in format_numbers(comparison)


def test_h2_comparison_reports_what_the_cache_skipped_and_how_close_it_stayed(session):
    comparison = session.compare(request(seed=12), h2cache.H2CacheConfig(tau1=0.3, tau2=0.5))
    assert comparison.cached.size == comparison.uncached.size == (64, 64)
    assert 0 < comparison.blocks_run < comparison.blocks_total
    transformer = session.pipe.transformer
    blocks_per_step = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert comparison.blocks_total == STEPS * blocks_per_step
    assert comparison.stage1_hits > 0 and comparison.steps_recorded == STEPS == len(comparison.trace)
    assert 10 < comparison.psnr < float("inf") and 0 < comparison.ssim < 1
    assert np.asarray(comparison.difference).any()
    assert comparison.wall_time_ratio == comparison.uncached_seconds / comparison.cached_seconds
    table = format_numbers(comparison)
    assert f"{comparison.blocks_run} / {comparison.blocks_total}" in table and f"{comparison.psnr:.2f} dB" in table


def test_changing_only_the_cache_regenerates_only_the_cached_image(session, transformer_calls):
    first = session.compare(request(seed=21), h2cache.H2CacheConfig())
    assert len(transformer_calls) == 2 * STEPS and not first.uncached_remembered
    transformer_calls.clear()
    second = session.compare(request(seed=21), h2cache.H2CacheConfig(tau1=0.05, tau2=0.05))
    assert len(transformer_calls) == STEPS and second.uncached_remembered
    assert second.uncached is first.uncached
    transformer_calls.clear()
    session.compare(request(seed=22), h2cache.H2CacheConfig())  # a new seed is a new uncached image
    assert len(transformer_calls) == 2 * STEPS


def test_remembered_uncached_images_are_bounded_least_recently_used_first():
    pipe = h2cache.load_pipeline("random")
    small = ComparisonSession(pipe, max_references=2)
    requests = [make_request(PROMPT, seed, 2, 32, 32) for seed in range(3)]
    for each in requests[:2]:
        small.reference(each)
    small.reference(requests[0])  # now the most recently used
    small.reference(requests[2])
    assert [small.is_remembered(r) for r in requests] == [True, False, True]


def test_page_handler_shows_images_numbers_and_plot(session):
    import app

    values = [default for _, default in page_parameter_defaults()]
    status, uncached, cached, difference, numbers, plot = app.generate(session, "h2", PROMPT, 5, STEPS, 64, 64, *values)
    assert status.startswith("**Done:**")
    assert all(isinstance(image, Image.Image) for image in (uncached, cached, difference, plot))
    assert "PSNR vs uncached" in numbers and "wall-time ratio" in numbers
    assert plot.width > 300 and len(set(plot.getdata())) > 10  # a drawn figure, not a blank


def test_page_handler_turns_bad_input_into_a_message_and_clears_the_outputs(session):
    import app

    values = [default for _, default in page_parameter_defaults()]
    outputs = app.generate(session, "h2", PROMPT, 5, STEPS, 50, 64, *values)
    assert outputs[0] == "**Error:** height must be a positive multiple of 16, got 50"
    assert outputs[1:] == (None, None, None, "", None)
    values[[name for name, _ in page_parameter_defaults()].index(("h2", "tau1"))] = -1.0
    assert "tau1" in app.generate(session, "h2", PROMPT, 5, STEPS, 64, 64, *values)[0]


def page_parameter_defaults():
    import app

    defaults = {(m, p.name): p.default for m in h2cache.METHODS for p in method_parameters(m)}
    return [(key, defaults[key]) for key in app.parameter_keys()]


def test_app_flags_are_run_py_model_choices_plus_host_and_port():
    import app
    import run

    args = app.parse_args([])
    assert (args.host, args.port, args.model, args.transformer, args.nunchaku_class) == (
        "127.0.0.1",
        app.DEFAULT_PORT,
        run.MODEL,
        None,
        run.NUNCHAKU_CLASS,
    )
    assert app.parse_args(["--model", "tiny", "--port", "9000"]).port == 9000


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"prompts_text": " \n "}, "no prompts"),
        ({"method": "taylorseer"}, "calibration covers"),
        ({"grid_texts": {"tau1": "0.1,x", "tau2": "0.2"}}, "tau1: expected comma-separated numbers"),
        ({"grid_texts": {"tau1": "0.1,-1", "tau2": "0.2"}}, "tau1"),
        ({"target_psnr": None}, "target PSNR"),
        ({"steps": 0}, "steps must be at least 1"),
    ],
)
def test_bad_calibration_inputs_are_refused_before_any_generation(overrides, message):
    values = {
        "prompts_text": PROMPT,
        "method": "h2",
        "grid_texts": {"tau1": "0.1", "tau2": "0.2"},
        "target_psnr": 30.0,
        "steps": 4,
        "seed": 0,
        **overrides,
    }
    with pytest.raises(ValueError, match=message):
        calibration_inputs(**values)


def test_calibrate_tab_handler_chooses_thresholds_the_compare_tab_can_take(session):
    import app

    grids = {"tau1": "0.05, 0.3", "tau2": "0.5", "threshold": "not used by h2"}
    prompts = f"{PROMPT}\n\na small red circle on the left against a white background\n"
    status, table, plot, chosen = app.calibrate(session, prompts, "h2", 20.0, 4, 1000, *grids.values())
    assert status.startswith("**Chosen:** h2 with tau1 ") and "over 2 prompts" in status
    assert table.count("| tau1=") == 2 and "**chosen**" in table
    assert isinstance(plot, Image.Image)
    method, params = chosen
    assert method == "h2" and params["tau1"] in (0.05, 0.3) and params["tau2"] == 0.5
    form = dict(zip(app.parameter_keys(), app.chosen_form_values(chosen), strict=True))
    assert form[("h2", "tau1")] == params["tau1"] and form[("h2", "tau2")] == 0.5
    assert form[("h2", "pool1")] is None and form[("dbfcache", "tau1")] is None  # untouched fields


def test_calibrate_tab_says_when_no_configuration_meets_the_target(session):
    import app

    status, table, plot, chosen = app.calibrate(
        session, PROMPT, "fbcache", 1e6, 3, 0, "", "", "100"
    )  # reuses every step
    assert status.startswith("**No configuration**") and "threshold=100.0" in table
    assert plot is None and chosen is None
