"""The experiment runner and run_exper.sh, run as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval.runner import load_prompts, parse_config

ROOT = Path(__file__).resolve().parents[1]
QUICK_ROWS = ("baseline", "h2cache none", "Block Cache", "TeaCache", "H2-Cache")


def run_exper(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        ["bash", str(ROOT / "run_exper.sh"), *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


def runner(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "eval.runner", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )


def snapshot(folder: Path) -> dict:
    """Every file below ``folder``: images as bytes, records as dicts without the wall-clock time."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".png" and "images" in path.parts:
            out[str(path.relative_to(folder))] = path.read_bytes()
        elif path.suffix == ".json" and "records" in path.parts:
            record = json.loads(path.read_text())
            record.pop("time_s")
            out[str(path.relative_to(folder))] = record
    return out


def test_config_strings():
    assert parse_config("baseline").method == "native" and parse_config("none").method == "none"
    config = parse_config("h2:tau1=0.15,tau2=0.22,pfs=false,label=H2 no PFS")
    assert (config.method, config.params, config.label) == (
        "h2",
        {"tau1": 0.15, "tau2": 0.22, "pfs": False},
        "H2 no PFS",
    )
    assert config.folder == "h2-no-pfs"
    assert parse_config("fbcache:threshold=0.12").label == "fbcache_threshold0.12"
    with pytest.raises(ValueError, match="key=value"):
        parse_config("h2:tau1")


def test_prompt_files_of_every_kind(tmp_path):
    cute = load_prompts(str(ROOT / "eval/prompts/cute80.jsonl"))
    assert len(cute) == 80 and cute[0][0] == "image001" and cute[-1][0] == "image080"
    assert cute[0][1].startswith("The image shows a male soccer player")
    text = load_prompts(str(ROOT / "eval/prompts/text-prompts-220.jsonl"), limit=5)
    assert len(text) == 5 and text[0][0] == "b5ee75723f78c834"
    plain = tmp_path / "prompts.txt"
    plain.write_text("a cat\n\na dog\n")
    assert load_prompts(str(plain)) == [("p000", "a cat"), ("p002", "a dog")]
    grammar = load_prompts("grammar:3")
    assert [p[0] for p in grammar] == ["g000", "g001", "g002"] and all(p[1].startswith("a ") for p in grammar)
    assert load_prompts("grammar:3") == grammar


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One single-process ``run_exper.sh --quick``: what the reproduction and the two-process tests start from."""
    out = tmp_path_factory.mktemp("quick-one")
    return run_exper("--quick", "--out", str(out)), out


def test_quick_reproduction_prints_the_four_row_table_and_resumes_without_regenerating(quick_run):
    result, tmp_path = quick_run
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0].strip("| ") for row in table] == list(QUICK_ROWS)
    folder = tmp_path / "quick"
    for name in ("table.md", "table.csv", "table.json", "records.jsonl", "figures/speed_quality.png"):
        assert (folder / name).is_file(), name
    assert len(list((folder / "images").rglob("*.png"))) == len(QUICK_ROWS) * 6
    rows = json.loads((folder / "table.json").read_text())["rows"]
    assert all(row["psnr"] is None or row["psnr"]["mean"] is not None for row in rows)
    before = {p: p.stat().st_mtime_ns for p in (folder / "images").rglob("*.png")}

    again = run_exper("--quick", "--out", str(tmp_path))
    assert again.returncode == 0 and "generated 0 image(s)" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (folder / "images").rglob("*.png")} == before


def test_two_processes_give_the_results_of_one(quick_run, tmp_path):
    one, one_folder = quick_run
    two = run_exper("--quick", "--processes", "2", "--out", str(tmp_path / "two"))
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert f"process 1: generated {3 * len(QUICK_ROWS)} image(s)" in two.stdout
    first, second = snapshot(one_folder / "quick"), snapshot(tmp_path / "two" / "quick")
    assert first.keys() == second.keys() and len(first) == 2 * 6 * len(QUICK_ROWS)
    for key, value in first.items():
        if isinstance(value, bytes):
            assert value == second[key], key
            continue
        other = second[key]
        for metric in ("psnr", "ssim"):  # float32 reductions: thread counts differ between launches
            if isinstance(value.get(metric), float):
                assert value.pop(metric) == pytest.approx(other.pop(metric), rel=1e-6), key
        assert value == other, key


def test_runner_resumes_an_interrupted_run(tmp_path):
    args = [
        "--prompts",
        "grammar:4",
        "--model",
        "random",
        "--steps",
        "4",
        "--skip-missing",
        "--out",
        str(tmp_path),
        "--config",
        "baseline",
        "--config",
        "h2:tau1=0.1,tau2=0.15",
    ]
    assert runner(*args, "--limit", "2").returncode == 0
    kept = {p: p.read_bytes() for p in (tmp_path / "records").rglob("*.json")}
    result = runner(*args)
    assert result.returncode == 0 and "generated 4 image(s)" in result.stdout
    assert all(p.read_bytes() == data for p, data in kept.items())
    records = sorted((tmp_path / "records").rglob("*.json"))
    assert len(records) == 8
    # a record made before a default changed (here pool1) is made again; the others stay as they are
    stale = next(p for p in records if "h2" in p.parent.name)
    record = json.loads(stale.read_text())
    assert record["settings"]["pool1"] == 2048 and record["settings"]["tau2"] == 0.15
    stale.write_text(json.dumps({**record, "settings": {**record["settings"], "pool1": 1024}}))
    result = runner(*args)
    assert result.returncode == 0 and "generated 1 image(s)" in result.stdout
    assert json.loads(stale.read_text())["settings"] == record["settings"]


def test_missing_metric_weights_stop_before_any_generation(tmp_path):
    result = runner(
        "--prompts",
        "grammar:2",
        "--model",
        "random",
        "--out",
        str(tmp_path / "out"),
        "--weights-dir",
        str(tmp_path / "weights"),
        "--config",
        "baseline",
    )
    assert result.returncode == 3
    assert "clip/RN50.pt" in result.stderr and "alexnet-owt-7be5be79.pth" in result.stderr
    assert not (tmp_path / "out" / "images").exists()


@pytest.mark.parametrize(
    "configs, message",
    [(["h2:tau1=-1"], "tau1"), (["h2"], "exactly one baseline"), (["baseline", "teacache:threshld=1"], "threshld")],
)
def test_bad_configurations_are_refused(tmp_path, configs, message):
    args = [arg for config in configs for arg in ("--config", config)]
    result = runner("--prompts", "grammar:2", "--model", "random", "--out", str(tmp_path), *args)
    assert result.returncode == 2 and message in result.stderr
    assert not any(tmp_path.iterdir())


def test_quick_ablations_run_on_the_cpu(tmp_path):
    result = run_exper("--quick", "--pfs-ablation", "--limit", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        json.loads(line)["config"] for line in (tmp_path / "pfs-ablation" / "records.jsonl").read_text().splitlines()
    ]
    assert sorted(set(rows)) == ["Double FB cache", "H2 PFS", "H2 no PFS", "baseline"]
    sweep = run_exper("--quick", "--steps-sweep", "--limit", "1", "--out", str(tmp_path))
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    for steps in (10, 20, 50, 100):
        record = json.loads(next((tmp_path / f"steps-{steps}" / "records" / "h2-cache").glob("*.json")).read_text())
        assert record["steps"] == steps and len(record["trace"]) == steps
