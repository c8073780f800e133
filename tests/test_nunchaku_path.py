"""What a GPU user of nunchaku would hit first, checked against stand-ins that keep nunchaku's contracts
(packing order, index wrapping, dtype checks, V1's fused forward, V2 in fp16) and against package metadata."""

import types
import warnings

import pytest
import torch
from conftest import count_block_calls
from nunchaku_standins import (
    TILE_ORDER,
    install_nunchaku_rotary_module,
    leave_nunchaku_v1_cache,
    leave_nunchaku_v2_cache,
    nunchaku_v1_standin,
    nunchaku_v2_standin,
    pack_rotemb,
    real_blocks,
    unpack_rotemb,
)
from test_backends import SPEC, traced_run, with_transformer
from test_run_cli import fake_distribution, run_cli

import h2cache
from h2cache.embedded import TinyFluxSpec
from h2cache.models import Facts, SetupError, nunchaku_mismatch, plan_model, unmet_nunchaku_requirements

THREE_DOUBLE = TinyFluxSpec(num_double=3, num_single=4)


def direct_inputs(dtype=torch.float32, image_tokens=16, text_tokens=4):
    generator = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, image_tokens, 64, generator=generator).to(dtype),
        encoder_hidden_states=torch.randn(1, text_tokens, 32, generator=generator).to(dtype),
        pooled_projections=torch.randn(1, 32, generator=generator).to(dtype),
        timestep=torch.full((1,), 0.5, dtype=dtype),
        guidance=torch.full((1,), 3.5, dtype=dtype),
        img_ids=torch.randn(image_tokens, 3, generator=generator),
        txt_ids=torch.zeros(text_tokens, 3),
        return_dict=False,
    )


# --- the stand-ins keep nunchaku's contracts -------------------------------------------------------------------------
def test_packing_follows_the_mma_accumulator_layout():
    rotemb = torch.arange(2 * 32 * 8 * 2, dtype=torch.float32).reshape(2, 32, 8, 1, 2)
    packed = pack_rotemb(rotemb)
    rows = rotemb.reshape(2, 32, 16)
    # Lane 1 of the warp holds (row 0, columns 2-3) then (row 8, columns 2-3): storage positions 4..7 of tile 0.
    assert packed[0, 0, 4:8].tolist() == [*rows[0, 0, 2:4].tolist(), *rows[0, 8, 2:4].tolist()]
    # Lane 2 starts at column 4; tiles are 128 values apart, channel tiles inner: (tokens 0-15, channels 8-15)
    # starts at value 128 (packed token 8), (tokens 16-31, channels 0-7) at value 256 (packed token 16).
    assert packed[0, 0, 8] == rows[0, 0, 4] and packed[0, 8, 0] == rows[0, 0, 8] and packed[1, 16, 0] == rows[1, 16, 0]
    assert sorted(TILE_ORDER.tolist()) == list(range(128)) and not torch.equal(packed, rows)
    assert torch.equal(unpack_rotemb(packed), rotemb.reshape(2, 32, 8, 2))


def test_v1_layers_wrap_indices_check_dtypes_and_run_fused(make_pipe):
    model = nunchaku_v1_standin(make_pipe(THREE_DOUBLE).transformer.to(torch.bfloat16))
    m, width = model.transformer_blocks[0].m, model.inner_dim
    img, txt, temb = torch.randn(1, 16, width), torch.randn(1, 4, width), torch.randn(1, width)
    rot_img, rot_txt = (pack_rotemb(torch.randn(1, 256, 8, 1, 2)) for _ in range(2))
    with pytest.raises(TypeError, match="bfloat16"):
        m.forward_layer(1, img, txt, temb, rot_img, rot_txt, None, None)
    img, txt, temb = img.bfloat16(), txt.bfloat16(), temb.bfloat16()
    # Index 3 + 1 silently runs double block 1 again, as FluxModel::forward_layer does.
    assert all(
        map(
            torch.equal,
            m.forward_layer(4, img, txt, temb, rot_img, rot_txt),
            m.forward_layer(1, img, txt, temb, rot_img, rot_txt),
        )
    )
    with pytest.raises(RuntimeError, match="contiguous"):
        m.norm_one_forward(0, torch.randn(1, width, 16, dtype=torch.bfloat16).transpose(1, 2), temb)

    inputs = direct_inputs(torch.bfloat16)
    m.layer_calls = 0
    with torch.no_grad():
        native = model(**inputs)[0]
        h2cache.apply(model, "none")
        assert torch.equal(model(**inputs)[0], native)
        assert (m.fused_calls, m.layer_calls) == (2, 0)  # h2cache's `none` on V1: nunchaku's fused call too
        h2cache.apply(model, "fbcache")
        assert torch.equal(model(**inputs)[0], native)  # a first step misses: the probe layer, then 1.. fused
        assert (m.fused_calls, m.layer_calls) == (3, 1)
        h2cache.apply(model, "h2")
        assert torch.equal(model(**inputs)[0], native)  # H2's probes split the model: one call per layer
    assert (m.fused_calls, m.layer_calls) == (3, 1 + 3 + 4)


def test_v2_standin_in_fp16_clips_and_matches_the_owned_forward(make_pipe, run, monkeypatch):
    install_nunchaku_rotary_module(monkeypatch)
    pipe = make_pipe(SPEC).to(torch.float16)
    model = nunchaku_v2_standin(pipe.transformer)
    standin = with_transformer(pipe, model)
    native = run(standin, steps=4)
    h2cache.apply(standin, "none")
    assert torch.equal(run(standin, steps=4), native)
    expected, expected_trace = traced_run(pipe, run, tau1=0.1, tau2=0.15)
    latents, trace = traced_run(standin, run, tau1=0.1, tau2=0.15)
    assert latents.dtype == torch.float16 and trace == expected_trace and torch.equal(latents, expected)
    block = model.single_transformer_blocks[0]
    huge = torch.full((1, 20, model.inner_dim), 6e4, dtype=torch.float16)
    rot = pack_rotemb(torch.zeros(1, 256, 8, 1, 2))
    assert torch.isfinite(block(huge, torch.full((1, model.inner_dim), 50.0, dtype=torch.float16), rot)).all()


# --- 1. Turing: V2 cannot load the bf16 checkpoints in fp16 ---------------------------------------------------------
def test_turing_runs_nunchaku_v1_unless_the_checkpoint_is_already_fp16(tmp_path):
    from safetensors.torch import save_file

    facts = Facts(cuda=True, sm=75, nunchaku="real")
    plan = plan_model("nunchaku", facts=facts, check_weights=False)
    assert (plan.nunchaku_class, plan.dtype) == ("v1", "float16")
    assert any("V2 loads only checkpoints already in fp16" in notice for notice in plan.notices), plan.notices

    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    for name, dtype, expected in (("bf16", torch.bfloat16, "v1"), ("fp16", torch.float16, "v2")):
        path = tmp_path / f"{name}.safetensors"
        save_file(
            {"blocks.0.wscales": torch.ones(4, dtype=dtype), "blocks.0.qweight": torch.ones(4, dtype=torch.int8)}, path
        )
        plan = plan_model(str(folder), transformer=str(path), facts=facts)
        assert plan.nunchaku_class == expected, name
    with pytest.raises(SetupError, match="holds BF16 tensors; V2 loads only .* use --nunchaku-class v1"):
        plan_model(str(folder), transformer=str(tmp_path / "bf16.safetensors"), nunchaku_class="v2", facts=facts)
    ampere = plan_model(
        str(folder), transformer=str(tmp_path / "bf16.safetensors"), facts=Facts(cuda=True, sm=86, nunchaku="real")
    )
    assert (ampere.nunchaku_class, ampere.dtype) == ("v2", "bfloat16")


# --- 2. V1 ControlNet ignores controlnet_blocks_repeat ----------------------------------------------------------------
def test_v1_controlnet_residuals_follow_nunchakus_interval_rule_even_with_repeat(make_pipe):
    model = nunchaku_v1_standin(make_pipe(THREE_DOUBLE).transformer.to(torch.bfloat16))
    inputs = direct_inputs(torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    controlnet = dict(
        controlnet_block_samples=[torch.randn(1, 16, 32, generator=generator).bfloat16() for _ in range(2)],
        controlnet_single_block_samples=[torch.randn(1, 16, 32, generator=generator).bfloat16() for _ in range(2)],
        controlnet_blocks_repeat=True,  # XLabs-style; nunchaku's C++ maps by interval anyway
    )
    with torch.no_grad():
        native = model(**inputs, **controlnet)[0]
        h2cache.apply(model, "none")
        assert torch.equal(model(**inputs, **controlnet)[0], native)


# --- 3. V2 cannot run ControlNet or attention kwargs, cached or not -------------------------------------------------
def test_v2_refuses_attention_kwargs_before_the_text_encoders_run(make_pipe, monkeypatch):
    install_nunchaku_rotary_module(monkeypatch)
    pipe = make_pipe(SPEC)
    standin = with_transformer(pipe, nunchaku_v2_standin(pipe.transformer))
    encoded = count_block_calls([standin.text_encoder], [])
    h2cache.apply(standin, "h2")
    with pytest.raises(h2cache.UnsupportedCall, match="--nunchaku-class v1"):
        standin("a red circle", num_inference_steps=2, joint_attention_kwargs={"ip_hidden_states": None})
    assert encoded["double"] == 0


def test_v2_refuses_controlnet_on_a_direct_call_before_any_block_runs(make_pipe, monkeypatch):
    install_nunchaku_rotary_module(monkeypatch)
    model = nunchaku_v2_standin(make_pipe(SPEC).transformer)
    counts = count_block_calls(*real_blocks(model))
    h2cache.apply(model, "h2")
    samples = [torch.zeros(1, 16, model.inner_dim)]
    with pytest.raises(h2cache.UnsupportedCall, match="ControlNet"):
        model(**direct_inputs(), controlnet_block_samples=samples)
    assert counts == {"double": 0, "single": 0}


def test_v2_refuses_a_controlnet_pipeline_when_the_cache_is_applied(make_pipe, monkeypatch):
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    install_nunchaku_rotary_module(monkeypatch)
    pipe = make_pipe(SPEC)
    transformer = nunchaku_v2_standin(pipe.transformer)
    config = pipe.transformer.config
    controlnet = FluxControlNetModel.from_transformer(
        pipe.transformer,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
    )
    controlled = FluxControlNetPipeline(**dict(pipe.components, transformer=transformer), controlnet=controlnet)
    with pytest.raises(h2cache.UnsupportedCall, match="ControlNet"):
        h2cache.apply(controlled, "h2")
    assert "forward" not in vars(transformer)  # nothing installed


# --- 4. nunchaku too old, built for another torch, or missing its dependencies ---------------------------------------
@pytest.mark.parametrize(
    "version, torch_version, unmet, message",
    [
        ("0.3.2+torch2.9", "2.9.1", (), "nunchaku 0.3.2+torch2.9 is too old"),
        ("1.1.0+torch2.8", "2.9.1+cu130", (), "built for torch 2.8, but torch 2.9.1+cu130"),
        ("1.1.0+torch2.9", "2.14.1", (), "no wheel for torch 2.14 (only for torch 2.7, 2.8, 2.9)"),
        ("1.2.0.dev20251231+torch2.9", "2.9.0", (("diffusers>=0.36", "0.35.2"),), "pip install 'diffusers>=0.36'"),
    ],
)
def test_nunchaku_mismatches_are_named_with_the_fix(version, torch_version, unmet, message):
    facts = Facts(
        cuda=True,
        sm=89,
        nunchaku="real",
        nunchaku_version=version,
        torch_version=torch_version,
        unmet_requirements=unmet,
    )
    assert message in nunchaku_mismatch(facts)
    with pytest.raises(SetupError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        plan_model("nunchaku", facts=facts, check_weights=False)
    auto = plan_model("auto", facts=facts, check_weights=False)
    assert auto.kind == "diffusers" and any(message in notice for notice in auto.notices)
    good = Facts(cuda=True, sm=89, nunchaku="real", nunchaku_version="1.1.0+torch2.9", torch_version="2.9.1")
    assert nunchaku_mismatch(good) is None and plan_model("auto", facts=good, check_weights=False).kind == "nunchaku"


def test_run_py_names_an_old_or_mismatched_nunchaku_before_loading_anything(tmp_path):
    compiled = ["nunchaku/_C.cpython-311-x86_64-linux-gnu.so"]
    old = fake_distribution(tmp_path / "old", "Nunchaku", "0.3.2+torch2.9", compiled)
    result = run_cli("--model", "nunchaku", "--out", str(tmp_path / "o"), env={"PYTHONPATH": str(old)})
    assert result.returncode == 1 and "is too old: h2cache needs nunchaku >= 1.0.0" in result.stderr, result.stderr
    new = fake_distribution(tmp_path / "new", "Nunchaku", "1.1.0+torch2.9", compiled)
    result = run_cli("--model", "nunchaku", "--out", str(tmp_path / "o"), env={"PYTHONPATH": str(new)})
    assert (
        result.returncode == 1
        and "built for torch 2.9" in result.stderr
        and "scripts/install_nunchaku.py" in result.stderr
    )
    assert not (tmp_path / "o").exists()


def test_unmet_requirements_are_read_from_nunchakus_metadata(tmp_path, monkeypatch):
    site = fake_distribution(tmp_path / "site", "Nunchaku", "1.2.0.dev20251231+torch2.9", ["nunchaku/_C.so"])
    metadata_file = next(site.glob("*.dist-info")) / "METADATA"
    metadata_file.write_text(
        metadata_file.read_text()
        + "Requires-Dist: diffusers>=99\nRequires-Dist: torch>=2.0\nRequires-Dist: pytest==1.0; extra == 'ci'\n"
    )
    monkeypatch.syspath_prepend(str(site))
    assert [req for req, _ in unmet_nunchaku_requirements()] == ["diffusers>=99"]


# --- 5. nunchaku's own caches are named correctly ---------------------------------------------------------------------
@pytest.mark.parametrize("after_first_call", [False, True])
def test_nunchakus_v1_cache_is_named_as_v1s_whether_or_not_it_has_run(make_pipe, after_first_call):
    model = leave_nunchaku_v1_cache(nunchaku_v1_standin(make_pipe(SPEC).transformer), after_first_call)
    with pytest.raises(
        RuntimeError, match=r"nunchaku's V1 first-block cache \(nunchaku.caching.diffusers_adapters.flux\)"
    ):
        h2cache.apply(model, "h2")


def test_nunchakus_v2_cache_is_named_as_v2s(make_pipe):
    model = leave_nunchaku_v2_cache(nunchaku_v2_standin(make_pipe(SPEC).transformer))
    with pytest.raises(RuntimeError, match=r"nunchaku's V2 first-block cache \(.*flux_v2\)"):
        h2cache.apply(model, "h2")


# --- 6. PuLID arrives as id_embeddings / id_weight keywords -----------------------------------------------------------
def test_pulid_keywords_cache_while_inactive_and_fall_back_while_active(make_pipe):
    model = nunchaku_v1_standin(make_pipe(SPEC).transformer.to(torch.bfloat16))
    received = []

    def pulid_forward(self, hidden_states, id_embeddings=None, id_weight=None, **kwargs):
        # As nunchaku's PuLID pipeline installs it: an instance forward taking the identity keywords.
        received.append(id_embeddings)
        return type(self).forward(self, hidden_states, **kwargs)

    model.forward = types.MethodType(pulid_forward, model)
    h2cache.apply(model, "none")
    inputs = direct_inputs(torch.bfloat16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**inputs, id_embeddings=None, id_weight=1.0)  # no identity image: an ordinary, cached step
    assert len(h2cache.stats(model)) == 1 and received == []
    with torch.no_grad(), pytest.warns(UserWarning, match="PuLID identity embeddings"):
        model(**inputs, id_embeddings=torch.ones(1, 32, 128), id_weight=1.0)
    assert len(received) == 1 and received[0] is not None


# --- 7. speedups are measured against the native pipeline, with h2cache's `none` beside it ---------------------------
def test_the_runners_baseline_is_nunchakus_fused_forward_and_none_runs_beside_it(make_pipe, tmp_path):
    from argparse import Namespace

    from eval.runner import Experiment, parse_config
    from eval.tables import build_table

    pipe = make_pipe(THREE_DOUBLE).to(torch.bfloat16)
    standin = with_transformer(pipe, nunchaku_v1_standin(pipe.transformer))
    m = standin.transformer.transformer_blocks[0].m
    args = Namespace(out=tmp_path, steps=3, guidance=None, height=None, width=None, seed=0)
    prompts = [("p0", "a red circle")]
    baseline, none = parse_config("baseline"), parse_config("none")
    assert Experiment(args, [baseline], prompts).generate_with(standin, "tiny", prompts) == 1
    assert (m.fused_calls, m.layer_calls) == (2 + 3, 0)  # warm-up and timed call: nunchaku's own forward only
    experiment = Experiment(args, [baseline, none], prompts)
    assert experiment.generate_with(standin, "tiny", prompts) == 1  # the baseline is resumed, `none` generated
    assert (m.fused_calls, m.layer_calls) == (2 * (2 + 3), 0)  # `none` runs V1's fused call as well
    assert "forward" not in vars(standin.transformer)  # the cache is taken off after its configuration
    assert experiment.image_path(baseline, "p0").read_bytes() == experiment.image_path(none, "p0").read_bytes()
    rows = build_table(experiment.records())
    assert [(row.config, row.method, row.is_baseline) for row in rows] == [
        ("baseline", "native", True),
        ("h2cache none", "none", False),
    ]
    assert all(record["blocks_run"] == record["blocks_total"] == 3 * 7 for record in experiment.records())


def test_run_py_reports_the_speedup_against_the_native_pipeline(tmp_path):
    import json

    out = tmp_path / "out"
    result = run_cli("--model", "random", "--steps", "3", "--method", "fbcache", "--baseline", "--out", str(out))
    assert result.returncode == 0, result.stderr
    record = json.loads(next(out.glob("*.json")).read_text())
    assert record["native_time_s"] > 0 and record["none_time_s"] > 0
    assert record["speedup_time"] == pytest.approx(record["native_time_s"] / record["time_s"])
    assert f"{record['speedup_time']:.2f}x faster than native" in result.stdout
    assert "h2cache none" in result.stdout


# --- installing the real nunchaku: the wheel for this torch and Python, or a reason -----------------------------------
@pytest.mark.parametrize(
    "environment, expected",
    [
        (("2.9.1+cu130", "3.11", "linux", "x86_64"), "v1.1.0/nunchaku-1.1.0+torch2.9-cp311-cp311-linux_x86_64.whl"),
        (("2.7.0", "3.13", "linux", "x86_64"), "v1.1.0/nunchaku-1.1.0+torch2.7-cp313-cp313-linux_x86_64.whl"),
        (("2.9.0+cu130", "3.10", "win32", "AMD64"), "v1.1.0/nunchaku-1.1.0+torch2.9-cp310-cp310-win_amd64.whl"),
        (("2.14.1", "3.11", "linux", "x86_64"), "no linux_x86_64 wheel for torch 2.14 (only for torch 2.7, 2.8, 2.9)"),
        (("2.8.0", "3.12", "win32", "AMD64"), "no win_amd64 wheel for torch 2.8 (only for torch 2.9)"),
        (("2.9.0", "3.9", "linux", "x86_64"), "wheels for Python 3.10, 3.11, 3.12, 3.13, not 3.9"),
        (("2.9.0", "3.11", "linux", "aarch64"), "Linux x86_64 and Windows x86_64 only"),
    ],
)
def test_the_wheel_matches_torch_python_and_platform_or_the_reason_is_named(environment, expected):
    from h2cache.nunchaku_wheels import RELEASES_URL, Environment, NoWheel, wheel_url

    if expected.endswith(".whl"):
        assert wheel_url(Environment(*environment)) == f"{RELEASES_URL}/download/{expected}"
    else:
        with pytest.raises(NoWheel, match=expected.replace("(", r"\(").replace(")", r"\)")):
            wheel_url(Environment(*environment))


def test_install_script_refuses_this_torch_and_installs_nothing(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from h2cache.nunchaku_wheels import major_minor

    script = Path(__file__).resolve().parents[1] / "scripts" / "install_nunchaku.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert (
        result.returncode == 1 and f"no linux_x86_64 wheel for torch {major_minor(torch.__version__)}" in result.stderr
    )
    assert "pip install 'torch==2.9.*'" in result.stderr and "Collecting" not in result.stdout
