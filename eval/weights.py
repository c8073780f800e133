"""Where metric weights live, and the preflight that checks them before any image is generated or scored.

Every weight file sits under one directory (``--weights-dir DIR`` or ``$METRICS_WEIGHTS_DIR``)::

    DIR/clip/RN50.pt                                  CLIP-IQA (OpenAI RN50, TorchScript or a state dict)
    DIR/torch/hub/checkpoints/alexnet-owt-7be5be79.pth LPIPS backbone (torchvision AlexNet)
    DIR/hf/                                           optional HF cache (not used by these metrics)

PSNR and SSIM need no weights. The libraries behind LPIPS would otherwise download silently into ``~``, and
fail with an unhelpful URLError offline; so the preflight checks each file (existence and sha256) and reports
all problems in one table, and the CLI exits with ``EXIT_MISSING_WEIGHTS`` (3; 2 is argparse's usage error).

Check from the shell: ``python -m eval.weights --weights-dir DIR --metrics clip_iqa lpips``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

EXIT_MISSING_WEIGHTS = 3
WEIGHTS_DIR_ENV = "METRICS_WEIGHTS_DIR"
ALL_METRICS = ("clip_iqa", "psnr", "ssim", "lpips")
# Full-reference metrics: each image is compared with the uncached image of the same prompt and seed.
FIDELITY_METRICS = ("psnr", "ssim", "lpips")
ALEXNET_CHECKPOINT = "alexnet-owt-7be5be79.pth"


@dataclass(frozen=True)
class WeightFile:
    """One weight file a metric needs.

    ``sha256`` is a full hex digest, or a prefix when only a prefix is published: torchvision puts the first
    8 hex digits of the sha256 in the file name, and that prefix is all ``torch.hub`` itself checks.
    """

    metric: str
    relative_path: str
    source_url: str
    sha256: str


WEIGHT_FILES: dict[str, tuple[WeightFile, ...]] = {
    "clip_iqa": (
        WeightFile(
            "clip_iqa",
            "clip/RN50.pt",
            "https://openaipublic.azureedge.net/clip/models/"
            "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
            "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
        ),
    ),
    "lpips": (
        WeightFile(
            "lpips",
            f"torch/hub/checkpoints/{ALEXNET_CHECKPOINT}",
            f"https://download.pytorch.org/models/{ALEXNET_CHECKPOINT}",
            "7be5be79",
        ),
    ),
    "psnr": (),
    "ssim": (),
}


@dataclass(frozen=True)
class Missing:
    """A weight file that is absent or has the wrong checksum; ``expected_path`` is where it must be put."""

    metric: str
    relative_path: str
    expected_path: str
    source_url: str
    sha256: str
    problem: str


class MissingWeightsError(RuntimeError):
    """Raised instead of any download; ``str()`` is the table of missing files, ``exit_code`` the CLI's."""

    exit_code = EXIT_MISSING_WEIGHTS

    def __init__(self, missing: Sequence[Missing]):
        self.missing = list(missing)
        super().__init__(format_missing(self.missing))


def resolve_weights_dir(weights_dir: str | os.PathLike | None = None) -> Path | None:
    """The explicit ``weights_dir``, else ``$METRICS_WEIGHTS_DIR``, else None (only PSNR/SSIM can then run)."""
    chosen = weights_dir if weights_dir is not None else os.environ.get(WEIGHTS_DIR_ENV)
    return Path(chosen).expanduser().resolve() if chosen else None


def configure_environment(weights_dir: str | os.PathLike | None) -> None:
    """Point torch hub and the HF cache into ``weights_dir`` and forbid HF downloads.

    Call this before importing torchvision- or transformers-based metric code: whether every library reads these
    variables only at import time is unverified, so set them first. Without a weights dir only HF_HUB_OFFLINE is
    set, so nothing can be fetched behind the preflight's back.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    if weights_dir is None:
        return
    weights_dir = Path(weights_dir)
    os.environ["TORCH_HOME"] = str(weights_dir / "torch")
    os.environ["HF_HOME"] = str(weights_dir / "hf")


def validate_metric_names(metrics: Iterable[str]) -> tuple[str, ...]:
    """Return ``metrics`` as a tuple, or raise naming the allowed choices."""
    metrics = tuple(metrics)
    unknown = [name for name in metrics if name not in WEIGHT_FILES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(ALL_METRICS)}")
    return metrics


def check_weights(weights_dir: str | os.PathLike | None, metrics: Iterable[str] = ALL_METRICS) -> list[Missing]:
    """Every weight file the requested ``metrics`` need that is absent or fails its sha256; [] when all is well.

    Hashes each present file in full (about a second for RN50), so call it once per run, not per image.
    """
    root = resolve_weights_dir(weights_dir)
    missing = []
    for metric in validate_metric_names(metrics):
        for weight in WEIGHT_FILES[metric]:
            if root is None:
                path_text = f"<--weights-dir or ${WEIGHTS_DIR_ENV}>/{weight.relative_path}"
                missing.append(_missing(weight, path_text, "no weights dir given"))
                continue
            path = root / weight.relative_path
            if not path.is_file():
                missing.append(_missing(weight, str(path), "absent"))
                continue
            digest = sha256_of_file(path)
            if not digest.startswith(weight.sha256):
                missing.append(_missing(weight, str(path), f"sha256 mismatch (got {digest[:16]}…)"))
    return missing


def sha256_of_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks so a large checkpoint never sits in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def format_missing(missing: Sequence[Missing]) -> str:
    """One plain-text table of the missing files with where each must go and where to get it."""
    if not missing:
        return "all metric weight files present"
    header = ("metric", "problem", "expected path", "source URL", "sha256")
    rows = [header] + [(m.metric, m.problem, m.expected_path, m.source_url, m.sha256) for m in missing]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    fix = (
        f"Download each file to its expected path (layout: DIR/clip/RN50.pt, DIR/torch/hub/checkpoints/"
        f"{ALEXNET_CHECKPOINT}; DIR from --weights-dir or ${WEIGHTS_DIR_ENV}), or pass --skip-missing "
        "to score only what is available."
    )
    return "Missing metric weights:\n" + "\n".join(lines) + "\n" + fix


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--weights-dir`` and ``--skip-missing`` with the documented meaning, for any CLI that scores images."""
    parser.add_argument(
        "--weights-dir",
        default=None,
        help=f"directory with clip/RN50.pt and torch/hub/checkpoints/{ALEXNET_CHECKPOINT} "
        f"(default: ${WEIGHTS_DIR_ENV})",
    )
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="score the metrics whose weights are present and write 'n/a (weights missing: …)' for the rest",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Preflight from the shell: print the missing-weights table and return EXIT_MISSING_WEIGHTS, else 0."""
    parser = argparse.ArgumentParser(description="Check metric weight files without downloading anything.")
    parser.add_argument("--weights-dir", default=None, help=f"weights directory (default: ${WEIGHTS_DIR_ENV})")
    parser.add_argument("--metrics", nargs="+", default=list(ALL_METRICS), choices=ALL_METRICS)
    args = parser.parse_args(argv)
    missing = check_weights(args.weights_dir, args.metrics)
    print(format_missing(missing))
    return EXIT_MISSING_WEIGHTS if missing else 0


def _missing(weight: WeightFile, path_text: str, problem: str) -> Missing:
    return Missing(weight.metric, weight.relative_path, path_text, weight.source_url, weight.sha256, problem)


if __name__ == "__main__":
    raise SystemExit(main())
