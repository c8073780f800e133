"""The controller on the diffusers backend: exactness, block accounting, scoping, API symmetry."""

import warnings

import pytest
import torch
from conftest import PROMPT, count_block_calls

import h2cache
from h2cache.embedded import TinyFluxSpec


def direct_inputs(batch=1, image_tokens=16, text_tokens=4):
    torch.manual_seed(0)
    return dict(
        hidden_states=torch.randn(batch, image_tokens, 64),
        encoder_hidden_states=torch.randn(batch, text_tokens, 32),
        pooled_projections=torch.randn(batch, 32),
        timestep=torch.full((batch,), 0.5),
        guidance=torch.full((batch,), 3.5),
        img_ids=torch.randn(image_tokens, 3),
        txt_ids=torch.zeros(text_tokens, 3),
        return_dict=False,
    )


def test_no_cache_and_zero_thresholds_are_bit_identical_to_the_unpatched_pipeline(make_pipe, run):
    pipe = make_pipe()
    reference = run(pipe)
    h2cache.apply(pipe, "none")
    assert torch.equal(run(pipe), reference)
    h2cache.apply(pipe, "h2", tau1=0, tau2=0)
    assert torch.equal(run(pipe), reference)
    assert all(r["stage1"] == r["stage2"] == "miss" for r in h2cache.stats(pipe))


def test_owned_forward_equals_the_model_forward_on_direct_calls(make_pipe):
    transformer = make_pipe().transformer
    inputs = direct_inputs(batch=2, image_tokens=64, text_tokens=12)
    with torch.no_grad():
        expected = transformer(**inputs)[0]
        h2cache.apply(transformer, "none")
        assert torch.equal(transformer(**inputs)[0], expected)


def test_always_hit_runs_only_the_two_probe_blocks_and_the_trace_counts_what_ran(make_pipe, run):
    pipe = make_pipe(TinyFluxSpec(num_double=3, num_single=6))
    counts = count_block_calls(pipe.transformer.transformer_blocks, pipe.transformer.single_transformer_blocks)
    h2cache.apply(pipe, "h2", tau1=1e9, tau2=1e9)
    run(pipe, steps=6)
    trace = h2cache.stats(pipe)
    assert [r["step"] for r in trace] == list(range(6))
    assert (trace[0]["double_blocks_run"], trace[0]["single_blocks_run"]) == (3, 6)
    for record in trace[1:]:
        assert (record["stage1"], record["stage2"]) == ("hit", "forced")
        assert (record["double_blocks_run"], record["single_blocks_run"]) == (1, 1)
    assert counts["double"] == sum(r["double_blocks_run"] for r in trace) == 3 + 5
    assert counts["single"] == sum(r["single_blocks_run"] for r in trace) == 6 + 5


def test_realistic_thresholds_mix_regimes_and_block_counts_match_hooks(make_pipe, run):
    pipe = make_pipe(TinyFluxSpec(num_double=2, num_single=4))
    counts = count_block_calls(pipe.transformer.transformer_blocks, pipe.transformer.single_transformer_blocks)
    h2cache.apply(pipe, "h2", tau1=0.12, tau2=0.2, mode="independent")
    run(pipe, steps=12)
    trace = h2cache.stats(pipe)
    decisions = {(r["stage1"], r["stage2"]) for r in trace}
    assert ("hit", "hit") in decisions or ("miss", "hit") in decisions, decisions
    assert ("miss", "miss") in decisions
    assert counts["double"] == sum(r["double_blocks_run"] for r in trace)
    assert counts["single"] == sum(r["single_blocks_run"] for r in trace)
    for r in trace[1:]:
        assert r["d1"] is not None and (r["stage1"] == "hit") == (r["d1"] < 0.12)
        assert r["d2"] is not None and (r["stage2"] == "hit") == (r["d2"] < 0.2)


def test_official_mode_never_measures_stage_two_after_a_structure_hit(make_pipe, run):
    pipe = make_pipe()
    h2cache.apply(pipe, "h2", tau1=0.1, tau2=0.15)
    run(pipe, steps=12)
    trace = h2cache.stats(pipe)
    assert any(r["stage1"] == "hit" for r in trace)
    for r in trace:
        if r["stage1"] == "hit":
            assert r["stage2"] == "forced" and r["d2"] is None


def test_cached_output_differs_from_baseline_but_stays_close(make_pipe, run):
    pipe = make_pipe()
    reference = run(pipe, steps=12)
    h2cache.apply(pipe, "h2", tau1=0.1, tau2=0.15)
    cached = run(pipe, steps=12)
    assert h2cache.summary(pipe)["stage1_hits"] > 0
    relative = (cached - reference).norm() / reference.norm()
    assert 0 < relative < 0.2


def test_second_call_starts_with_a_miss_and_repeats_the_first(make_pipe, run):
    pipe = make_pipe()
    h2cache.apply(pipe, "h2", tau1=0.1, tau2=0.15)
    first_images = run(pipe)
    first = h2cache.stats(pipe)
    second_images = run(pipe)
    second = h2cache.stats(pipe)
    assert second[0]["stage1"] == "miss" and second[0]["d1"] is None
    assert first == second
    assert torch.equal(first_images, second_images)


def test_two_pipelines_share_nothing(make_pipe, run):
    solo = make_pipe()
    h2cache.apply(solo, "h2", tau1=0.1, tau2=0.15)
    expected = run(solo, prompt="a large blue square")
    expected_trace = h2cache.stats(solo)

    first, second = make_pipe(), make_pipe()
    h2cache.apply(first, "h2", tau1=0.1, tau2=0.15)
    h2cache.apply(second, "h2", tau1=0.3, tau2=0.3)

    # Interleave the two pipelines step by step: the second's calls happen inside the first's denoising loop.
    def interleave(pipe, step, timestep, callback_kwargs):
        if step == 2:
            run(second)
        return callback_kwargs

    images = run(first, prompt="a large blue square", callback_on_step_end=interleave)
    assert torch.equal(images, expected)
    assert h2cache.stats(first) == expected_trace
    assert type(first) is not type(second)  # each instance got its own subclass; FluxPipeline itself is untouched
    assert "__call__" not in type(first).__mro__[1].__dict__ or type(first).__mro__[1].__name__ == "FluxPipeline"


def test_true_cfg_keeps_one_state_per_branch(make_pipe, run):
    pipe = make_pipe()
    h2cache.apply(pipe, "h2", tau1=0.1, tau2=0.15)
    run(pipe, negative_prompt="a green triangle", true_cfg_scale=2.0, steps=6)
    trace = h2cache.stats(pipe)
    by_branch = {b: [r for r in trace if r["branch"] == b] for b in ("cond", "uncond")}
    assert [r["step"] for r in by_branch["cond"]] == [r["step"] for r in by_branch["uncond"]] == list(range(6))
    # With shared state the uncond pass's first step would be judged against the cond pass's residual.
    assert by_branch["uncond"][0]["stage1"] == "miss" and by_branch["uncond"][0]["d1"] is None

    # Identical branches (negative prompt = prompt) must make identical decisions; a shared state would instead
    # judge each uncond pass against the cond pass it just followed (distance 0, a hit at step 0).
    run(pipe, negative_prompt=PROMPT, true_cfg_scale=2.0, steps=6)
    trace = h2cache.stats(pipe)
    cond = [(r["stage1"], r["d1"], r["stage2"], r["d2"]) for r in trace if r["branch"] == "cond"]
    uncond = [(r["stage1"], r["d1"], r["stage2"], r["d2"]) for r in trace if r["branch"] == "uncond"]
    assert cond == uncond and any(c[0] == "hit" for c in cond)


def test_batch_decides_per_sample_and_reuses_only_when_all_pass():
    from h2cache.methods.base import StageMemory

    reference = torch.ones(2, 8, 4)
    current = reference.clone()
    current[1] += 0.5  # sample 1 drifted by 50%, sample 0 not at all
    memory = StageMemory(reference=reference)
    decision = memory.judge(current, threshold=0.1)
    assert decision.decision == "miss" and decision.distance == pytest.approx(0.5)
    assert memory.judge(current, threshold=0.6).decision == "hit"


def test_batched_generation_runs_and_records_one_decision_per_step(make_pipe, run):
    pipe = make_pipe()
    h2cache.apply(pipe, "h2", tau1=0.1, tau2=0.15)
    latents = run(pipe, prompt=[PROMPT, "a large green square"], steps=6)
    assert latents.shape[0] == 2
    assert len(h2cache.stats(pipe)) == 6


def test_apply_twice_replaces_and_remove_restores(make_pipe, run):
    pipe = make_pipe()
    original_class = type(pipe)
    reference = run(pipe)
    h2cache.apply(pipe, "h2", tau1=1e9, tau2=1e9)
    h2cache.apply(pipe, "none")
    assert torch.equal(run(pipe), reference)  # the second apply replaced the first; nothing stacked
    assert type(pipe).__mro__[1] is original_class
    h2cache.remove(pipe)
    assert type(pipe) is original_class
    assert "forward" not in vars(pipe.transformer) and "cache_context" not in vars(pipe.transformer)
    assert not hasattr(pipe.transformer, "_h2cache_controller")
    assert torch.equal(run(pipe), reference)
    with pytest.raises(RuntimeError, match="h2cache.apply"):
        h2cache.stats(pipe)


def test_foreign_caches_are_refused(make_pipe):
    from diffusers import FirstBlockCacheConfig

    pipe = make_pipe()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(RuntimeError, match="FirstBlockCacheConfig"):
        h2cache.apply(pipe, "h2")
    other = make_pipe()
    other.transformer._is_cached = True  # what nunchaku's apply_cache_on_pipe leaves behind
    with pytest.raises(RuntimeError, match="nunchaku"):
        h2cache.apply(other, "h2")


@pytest.mark.parametrize(
    "params, field",
    [
        ({"tau1": -0.1}, "tau1"),
        ({"tau2": float("nan")}, "tau2"),
        ({"tau1": float("inf")}, "tau1"),
        ({"pool1": 0}, "pool1"),
        ({"pool2": 2.5}, "pool2"),
        ({"mode": "fast"}, "mode"),
        ({"pfs": "yes"}, "pfs"),
    ],
)
def test_invalid_parameters_raise_value_error_naming_the_field(make_pipe, params, field):
    pipe = make_pipe()
    with pytest.raises(ValueError, match=field):
        h2cache.apply(pipe, "h2", **params)
    assert "forward" not in vars(pipe.transformer)  # nothing was installed


def test_unknown_method_and_parameter_are_clear_errors(make_pipe):
    pipe = make_pipe()
    with pytest.raises(ValueError, match="unknown cache method 'teacash'"):
        h2cache.apply(pipe, "teacash")
    with pytest.raises(ValueError, match="threshold"):
        h2cache.apply(pipe, "h2", threshold=0.1)


def test_training_mode_falls_back_to_the_original_forward_once_warned(make_pipe):
    transformer = make_pipe().transformer
    h2cache.apply(transformer, "h2")
    transformer.train()
    inputs = direct_inputs()
    with pytest.warns(UserWarning, match="training mode"):
        transformer(**inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transformer(**inputs)  # said once, not at every call
    assert h2cache.stats(transformer) == []


def test_bare_transformer_starts_a_new_generation_when_the_timestep_rises(make_pipe, run):
    pipe = make_pipe()
    h2cache.apply(pipe.transformer, "h2", tau1=0.1, tau2=0.15)  # on the transformer only: no pipeline session
    run(pipe, steps=6)
    first = h2cache.stats(pipe.transformer)
    run(pipe, steps=6)
    assert h2cache.stats(pipe.transformer) == first


def test_lora_scale_in_joint_attention_kwargs_is_honoured(make_pipe):
    pytest.importorskip("peft")
    from peft import LoraConfig

    transformer = make_pipe().transformer
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    )
    inputs = direct_inputs()
    with torch.no_grad():
        half = transformer(**inputs, joint_attention_kwargs={"scale": 0.5})[0]
        full = transformer(**inputs)[0]
        h2cache.apply(transformer, "none")
        assert torch.equal(transformer(**inputs, joint_attention_kwargs={"scale": 0.5})[0], half)
        assert torch.equal(transformer(**inputs)[0], full)
    assert not torch.equal(half, full)


@pytest.mark.parametrize("repeat", [False, True])
def test_controlnet_residuals_are_added_as_diffusers_adds_them(make_pipe, repeat):
    transformer = make_pipe(TinyFluxSpec(num_double=3, num_single=5)).transformer
    inputs = direct_inputs()
    width = transformer.inner_dim
    controlnet = dict(
        controlnet_block_samples=[torch.randn(1, 16, width) for _ in range(2)],
        controlnet_single_block_samples=[torch.randn(1, 16, width) for _ in range(2)],
        controlnet_blocks_repeat=repeat,
    )
    with torch.no_grad():
        expected = transformer(**inputs, **controlnet)[0]
        plain = transformer(**inputs)[0]
        h2cache.apply(transformer, "none")
        assert torch.equal(transformer(**inputs, **controlnet)[0], expected)
    assert not torch.equal(expected, plain)


def test_accelerate_hook_keeps_running_around_the_owned_forward(make_pipe):
    from accelerate.hooks import ModelHook, add_hook_to_module

    class CountingHook(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            CountingHook.calls += 1
            return args, kwargs

    transformer = make_pipe().transformer
    inputs = direct_inputs()
    with torch.no_grad():
        expected = transformer(**inputs)[0]
        add_hook_to_module(transformer, CountingHook())
        h2cache.apply(transformer, "none")
        assert "_old_forward" in vars(transformer)
        assert torch.equal(transformer(**inputs)[0], expected)
        assert CountingHook.calls == 1 and len(h2cache.stats(transformer)) == 1
        h2cache.remove(transformer)
        transformer(**inputs)
    assert CountingHook.calls == 2 and not hasattr(transformer, "_h2cache_controller")


def test_cached_model_moves_saves_and_reloads_without_recursion(make_pipe, run, tmp_path):
    # The authors' adapter made transformer -> blocks -> transformer a module cycle: .to() and state_dict() failed.
    from diffusers import FluxTransformer2DModel

    pipe = make_pipe()
    h2cache.apply(pipe, "h2", tau1=0.1, tau2=0.15)
    pipe.to("cpu", torch.float32)
    state = pipe.transformer.state_dict()
    assert not any("h2cache" in key for key in state)
    pipe.transformer.save_pretrained(tmp_path / "transformer")
    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer")
    assert "forward" not in vars(reloaded) and not hasattr(reloaded, "_h2cache_controller")
    run(pipe, steps=4)
    assert len(h2cache.stats(pipe)) == 4
