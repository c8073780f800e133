"""run.py as a user runs it (a subprocess), and the model selection it rests on."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from h2cache.models import Facts, SetupError, nunchaku_status, parse_lora, plan_model

ROOT = Path(__file__).resolve().parents[1]
UNRELATED_SUMMARY = "Optimally partitioning data into piece-wise linear segments"


def run_cli(*args, env=None, cwd=None):
    environment = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd or ROOT,
        timeout=300,
    )


def fake_distribution(folder: Path, summary: str, version: str, files=()) -> Path:
    """An installed-package record (dist-info) for ``nunchaku``, as pip leaves it, without the package itself."""
    info = folder / f"nunchaku-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: nunchaku\nVersion: {version}\nSummary: {summary}\n")
    (info / "RECORD").write_text("".join(f"{name},,\n" for name in files))
    return folder


def test_happy_path_writes_png_json_and_a_summary(tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "--model",
        "random",
        "--steps",
        "6",
        "--tau1",
        "0.1",
        "--tau2",
        "0.15",
        "--out",
        str(out),
        "--plot",
        "--prompt",
        "a red circle",
    )
    assert result.returncode == 0, result.stderr
    png, record_file = out / "a-red-circle-h2-seed0.png", out / "a-red-circle-h2-seed0.json"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "a-red-circle-h2-seed0-distances.png").is_file()
    record = json.loads(record_file.read_text())
    for key in (
        "method",
        "params",
        "model",
        "backend",
        "device",
        "dtype",
        "seed",
        "steps",
        "height",
        "width",
        "time_s",
        "double_blocks_run",
        "single_blocks_run",
        "blocks_run",
        "blocks_total",
        "speedup_blocks",
        "trace",
    ):
        assert key in record, key
    assert record["params"]["tau1"] == 0.1 and record["backend"] == "diffusers" and record["steps"] == 6
    assert len(record["trace"]) == 6 and record["blocks_total"] == 6 * (2 + 4)
    assert record["speedup_blocks"] == pytest.approx(record["blocks_total"] / record["blocks_run"])
    assert record["time_s"] > 0
    assert "blocks" in result.stdout.strip().splitlines()[-1] and str(png) in result.stdout
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_same_seed_gives_byte_identical_png(tmp_path):
    for folder in ("a", "b"):
        assert run_cli("--model", "random", "--steps", "4", "--out", str(tmp_path / folder)).returncode == 0
    name = next((tmp_path / "a").glob("*.png")).name
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_auto_without_cuda_says_it_runs_the_embedded_model(tmp_path):
    result = run_cli("--steps", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU: running the embedded CPU model" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tau1", "-1"], "tau1"),
        (["--tau2", "nan"], "tau2"),
        (["--pool1", "0"], "pool1"),
        (["--height", "100"], "multiple of 16"),
        (["--width", "0"], "multiple of 16"),
        (["--steps", "0"], "--steps"),
        (["--lora", "missing.safetensors:0.8"], "no file at missing.safetensors"),
        (["--model", "nunchaku"], "nunchaku is not installed"),
        (["--model", "/no/such/folder"], "not a diffusers pipeline folder"),
    ],
)
def test_errors_exit_nonzero_with_one_message_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = (
        run_cli("--model", "random", *args, "--out", str(out))
        if "--model" not in args
        else run_cli(*args, "--out", str(out))
    )
    assert result.returncode != 0
    assert message in result.stderr and result.stderr.count("error:") == 1, result.stderr
    assert not out.exists()


def test_unwritable_output_folder_is_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("--model", "random", "--out", str(blocker / "images"))
    assert result.returncode != 0 and "cannot be written" in result.stderr


def test_missing_weights_name_hf_home_token_and_model_path(tmp_path):
    result = run_cli(
        "--model", "black-forest-labs/FLUX.1-dev", "--out", str(tmp_path / "o"), env={"HF_HOME": str(tmp_path / "hf")}
    )
    assert result.returncode != 0
    for hint in ("HF_HOME", "HF_TOKEN", "--model PATH"):
        assert hint in result.stderr
    assert not (tmp_path / "o").exists()


def test_unrelated_nunchaku_package_is_named_with_the_install_fix(tmp_path):
    site = fake_distribution(tmp_path / "site", UNRELATED_SUMMARY, "0.16.1")
    result = run_cli("--model", "nunchaku", "--out", str(tmp_path / "o"), env={"PYTHONPATH": str(site)})
    assert result.returncode != 0
    assert "unrelated PyPI project" in result.stderr and "nunchaku-tech/nunchaku/releases" in result.stderr


def test_nunchaku_status_reads_package_metadata(tmp_path, monkeypatch):
    assert nunchaku_status() == "absent"
    monkeypatch.syspath_prepend(str(fake_distribution(tmp_path / "a", UNRELATED_SUMMARY, "0.16.1")))
    assert nunchaku_status() == "unrelated"
    monkeypatch.syspath_prepend(
        str(fake_distribution(tmp_path / "b", "Nunchaku", "1.0.2+torch2.9", ["nunchaku/_C.cpython-311.so"]))
    )
    assert nunchaku_status() == "real"


@pytest.mark.parametrize(
    "facts, kind, precision, notice",
    [
        (Facts(cuda=False), "embedded", None, "no CUDA"),
        (Facts(cuda=True, sm=89, nunchaku="real"), "nunchaku", "int4", None),
        (Facts(cuda=True, sm=120, nunchaku="real"), "nunchaku", "fp4", None),
        (Facts(cuda=True, sm=90, nunchaku="real"), "diffusers", None, "sm_90 has no 4-bit kernels"),
        (Facts(cuda=True, sm=86, nunchaku="absent"), "diffusers", None, "nunchaku is not installed"),
        (Facts(cuda=True, sm=86, nunchaku="unrelated"), "diffusers", None, "unrelated PyPI project"),
    ],
)
def test_auto_selection_follows_the_machine(facts, kind, precision, notice):
    plan = plan_model("auto", facts=facts, check_weights=False)
    assert plan.kind == kind and plan.precision == precision
    if notice:
        assert any(notice in n for n in plan.notices), plan.notices
    if kind == "nunchaku":
        assert plan.transformer == f"nunchaku-tech/nunchaku-flux.1-dev/svdq-{precision}_r32-flux.1-dev.safetensors"
        assert plan.device == "cuda" and plan.dtype == "bfloat16"


@pytest.mark.parametrize(
    "facts, message",
    [
        (Facts(cuda=False, nunchaku="real"), "needs an NVIDIA GPU"),
        (Facts(cuda=True, sm=90, gpu_name="NVIDIA H100", nunchaku="real"), "NVIDIA H100 (sm_90)"),
        (Facts(cuda=True, sm=70, nunchaku="real"), "not H100/H200/B200/V100"),
        (Facts(cuda=True, sm=89, nunchaku="unrelated"), "pip uninstall nunchaku"),
    ],
)
def test_explicit_nunchaku_is_refused_where_it_cannot_run(facts, message):
    with pytest.raises(SetupError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_model("nunchaku", facts=facts, check_weights=False)


def test_explicit_transformer_and_turing_precision():
    plan = plan_model(
        "auto",
        transformer="me/my-flux/model.safetensors",
        nunchaku_class="v1",
        facts=Facts(cuda=True, sm=75, nunchaku="real"),
        check_weights=False,
    )
    assert (plan.transformer, plan.nunchaku_class, plan.dtype) == ("me/my-flux/model.safetensors", "v1", "float16")


def test_lora_argument_parsing():
    assert parse_lora("realism.safetensors:0.8") == ("realism.safetensors", 0.8)
    assert parse_lora("realism.safetensors") == ("realism.safetensors", 1.0)
    assert parse_lora(r"C:\loras\realism.safetensors") == (r"C:\loras\realism.safetensors", 1.0)
    assert parse_lora(r"C:\loras\realism.safetensors:0.5") == (r"C:\loras\realism.safetensors", 0.5)
    assert parse_lora(None) is None


def test_lora_through_diffusers_changes_the_image(tmp_path):
    import torch
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from h2cache.embedded import TinyFluxSpec, build_pipeline

    transformer = build_pipeline(TinyFluxSpec()).transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    FluxPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(transformer))
    lora_file = next((tmp_path / "lora").glob("*.safetensors"))

    plain, with_lora = tmp_path / "plain", tmp_path / "lora-out"
    assert run_cli("--model", "random", "--steps", "3", "--out", str(plain)).returncode == 0
    result = run_cli("--model", "random", "--steps", "3", "--out", str(with_lora), "--lora", f"{lora_file}:0.7")
    assert result.returncode == 0, result.stderr
    name = next(plain.glob("*.png")).name
    assert (plain / name).read_bytes() != (with_lora / name).read_bytes()
    assert json.loads((with_lora / name).with_suffix(".json").read_text())["lora"]["scale"] == 0.7


@pytest.mark.parametrize("method", ["h2", "h2-forecast"])
def test_each_method_gets_its_own_defaults_unless_a_flag_is_given(method, tmp_path):
    import run
    from h2cache import METHODS

    config = run.validate(run.build_parser().parse_args(["--method", method, "--out", str(tmp_path)]))[0]
    assert config == METHODS[method][0]()
    flags = ["--method", method, "--tau1", "0.05", "--max-run", "0.1", "--lazy-probes", "0", "--warmup", "2"]
    config = run.validate(run.build_parser().parse_args(flags))[0]
    assert config.tau1 == 0.05 and getattr(config, "max_run", 0.1) == 0.1
    assert getattr(config, "lazy_probes", 0) == 0 and getattr(config, "warmup", 2) == 2


def test_h2_forecast_runs_from_the_command_line(tmp_path):
    result = run_cli("--model", "random", "--method", "h2-forecast", "--steps", "8", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    record = json.loads(
        (tmp_path / "a-small-red-circle-on-the-left-against-a-white-b-h2-forecast-seed0.json").read_text()
    )
    assert record["method"] == "h2-forecast" and record["params"]["distance"] == "forecast"


def test_prompt_words_the_embedded_model_never_saw_are_named_and_it_still_draws(tmp_path):
    out = tmp_path / "out"
    prompt = "a red zebra near the park"
    result = run_cli("--model", "random", "--steps", "2", "--prompt", prompt, "--out", str(out))
    assert result.returncode == 0, result.stderr
    warning = next(line for line in result.stderr.splitlines() if "never saw" in line)
    assert "'zebra'" in warning and "'park'" in warning and "'red'" not in warning
    assert "circle" in warning.split("the words it knows:")[1]
    assert (out / "a-red-zebra-near-the-park-h2-seed0.png").is_file()
    known = run_cli("--model", "random", "--steps", "2", "--prompt", "a red circle", "--out", str(out))
    assert known.returncode == 0 and "never saw" not in known.stderr
