"""Backends: detection by class name, and nunchaku V1/V2 stand-ins giving the diffusers backend's exact numbers."""

import sys

import pytest
import torch
from conftest import count_block_calls
from nunchaku_standins import install_nunchaku_rotary_module, nunchaku_v1_standin, nunchaku_v2_standin, real_blocks

import h2cache
from h2cache.backends import detect_backend
from h2cache.backends.nunchaku import packed_rotary, pad_tokens
from h2cache.embedded import TinyFluxSpec

SPEC = TinyFluxSpec(num_double=2, num_single=4)


def with_transformer(pipe, transformer):
    from diffusers import FluxPipeline

    from h2cache.embedded.builder import finish_pipeline

    other = FluxPipeline(**dict(pipe.components, transformer=transformer))
    return finish_pipeline(other, pipe.default_sample_size * pipe.vae_scale_factor, pipe.h2cache_call_defaults)


def traced_run(pipe, run, method="h2", **params):
    h2cache.apply(pipe, method, **params)
    latents = run(pipe, steps=10)
    return latents, [{k: r[k] for k in ("stage1", "d1", "stage2", "d2")} for r in h2cache.stats(pipe)]


def test_detection_by_class_name_without_importing_nunchaku(make_pipe):
    transformer = make_pipe(SPEC).transformer
    assert detect_backend(transformer).name == "diffusers"
    assert detect_backend(nunchaku_v2_standin(transformer)).name == "nunchaku_v2"
    assert detect_backend(nunchaku_v1_standin(transformer)).name == "nunchaku_v1"
    assert "nunchaku" not in sys.modules
    with pytest.raises(TypeError, match="FLUX transformer"):
        detect_backend(torch.nn.Linear(2, 2))


def test_packed_rotary_is_padded_to_256_tokens_per_range():
    rotary = torch.randn(1, 1, 12 + 300, 8, 1, 2)
    pack = lambda r: r.reshape(1, r.shape[1], -1)  # noqa: E731
    rot_txt, rot_img, rot_single = packed_rotary(rotary, 12, pack)
    assert rot_txt.shape == (1, 256, 16) and rot_img.shape == (1, 512, 16) and rot_single.shape == (1, 512, 16)
    assert torch.equal(rot_img[0, :300], rotary[0, 0, 12:].reshape(300, 16))
    assert torch.count_nonzero(rot_img[0, 300:]) == 0
    assert pad_tokens(torch.ones(1, 256, 3)).shape == (1, 256, 3)


@pytest.mark.parametrize("params", [{"tau1": 0.1, "tau2": 0.15}, {"tau1": 0.1, "tau2": 0.15, "mode": "independent"}])
def test_nunchaku_v2_standin_matches_diffusers_images_and_decisions(make_pipe, run, monkeypatch, params):
    install_nunchaku_rotary_module(monkeypatch)
    pipe = make_pipe(SPEC)
    standin = with_transformer(pipe, nunchaku_v2_standin(pipe.transformer))
    expected, expected_trace = traced_run(pipe, run, **params)
    latents, trace = traced_run(standin, run, **params)
    assert trace == expected_trace and any(r["stage1"] == "hit" for r in trace)
    assert torch.equal(latents, expected)


def test_nunchaku_v1_standin_matches_diffusers_in_bf16(make_pipe, run):
    pipe = make_pipe(SPEC).to(torch.bfloat16)
    standin = with_transformer(pipe, nunchaku_v1_standin(pipe.transformer))
    expected, expected_trace = traced_run(pipe, run, tau1=0.1, tau2=0.15)
    latents, trace = traced_run(standin, run, tau1=0.1, tau2=0.15)
    assert trace == expected_trace and any(r["stage1"] == "hit" for r in trace)
    assert torch.equal(latents, expected)


def test_standin_block_counts_equal_the_trace(make_pipe, run, monkeypatch):
    install_nunchaku_rotary_module(monkeypatch)
    pipe, bf16_pipe = make_pipe(SPEC), make_pipe(SPEC).to(torch.bfloat16)  # V1's layers run in bf16/fp16 only
    for base, make_standin in ((pipe, nunchaku_v2_standin), (bf16_pipe, nunchaku_v1_standin)):
        model = make_standin(base.transformer)
        standin = with_transformer(base, model)
        counts = count_block_calls(*real_blocks(model))
        h2cache.apply(standin, "h2", tau1=1e9, tau2=1e9)
        run(standin, steps=5)
        summary = h2cache.summary(standin)
        assert (counts["double"], counts["single"]) == (summary["double_blocks_run"], summary["single_blocks_run"])
        assert summary["blocks_run"] == SPEC.num_double + SPEC.num_single + 4 * 2
