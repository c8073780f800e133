"""``MetricSuite``: the one object the experiment runner needs to score an image against its reference.

Usage::

    suite = MetricSuite(weights_dir, metrics=("clip_iqa", "psnr", "ssim", "lpips"), skip_missing=False)
    suite.preflight()                 # before generating anything: raises MissingWeightsError (exit code 3)
    row = suite.score("out/h2/image001.png", "out/baseline/image001.png")
    row = suite.score("out/baseline/image001.png", None)   # the baseline itself

``score`` returns ``{metric: value}``:
- a float (PSNR may be ``inf`` for an image identical to its reference; write rows with
  ``eval.tables.dumps_record``, which stores it as the string ``"inf"``);
- ``None`` for fidelity metrics when ``reference`` is None: the baseline is the reference, it is not compared
  with itself;
- ``"n/a (weights missing: <file>)"`` for a metric whose weights are missing under ``skip_missing=True``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from eval.metrics.images import ImageLike, load_pair, load_rgb_uint8
from eval.weights import (
    ALL_METRICS,
    FIDELITY_METRICS,
    WEIGHT_FILES,
    Missing,
    MissingWeightsError,
    check_weights,
    configure_environment,
    resolve_weights_dir,
    validate_metric_names,
)

MetricValue = float | str | None


class MetricSuite:
    """Scores images with the requested metrics; weights come only from ``weights_dir``, never from the network.

    ``weights_dir`` defaults to ``$METRICS_WEIGHTS_DIR``. With ``skip_missing`` the metrics whose weights are
    missing are reported as ``"n/a (weights missing: …)"`` instead of stopping the run. Models load on first use.
    Construction sets TORCH_HOME, HF_HOME and HF_HUB_OFFLINE for the whole process (``configure_environment``).
    """

    def __init__(
        self,
        weights_dir: str | os.PathLike | None = None,
        metrics: Iterable[str] = ALL_METRICS,
        skip_missing: bool = False,
    ) -> None:
        self.metrics = validate_metric_names(metrics)
        self.weights_dir = resolve_weights_dir(weights_dir)
        self.skip_missing = skip_missing
        configure_environment(self.weights_dir)
        self._unavailable: dict[str, str] | None = None
        self._scorers: dict[str, Callable[..., float]] = {}

    def preflight(self) -> list[Missing]:
        """Check the weight files once; return what is missing, or raise ``MissingWeightsError`` (unless skipping).

        The runner should call this before generating any image, print ``str(error)`` and exit with
        ``error.exit_code`` (``EXIT_MISSING_WEIGHTS``).
        """
        missing = check_weights(self.weights_dir, self.metrics)
        if missing and not self.skip_missing:
            raise MissingWeightsError(missing)
        missing_files: dict[str, list[str]] = {}
        for item in missing:
            missing_files.setdefault(item.metric, []).append(item.relative_path)
        self._unavailable = {
            metric: f"n/a (weights missing: {', '.join(files)})" for metric, files in missing_files.items()
        }
        return missing

    @property
    def available_metrics(self) -> tuple[str, ...]:
        """The requested metrics that will produce numbers (runs the preflight if it has not run yet)."""
        if self._unavailable is None:
            self.preflight()
        return tuple(name for name in self.metrics if name not in self._unavailable)

    def score(self, image: ImageLike, reference: ImageLike | None = None) -> dict[str, MetricValue]:
        """Every requested metric for ``image``; fidelity ones against ``reference`` (None for the baseline)."""
        available = self.available_metrics
        if reference is None:
            image_pixels, reference_pixels = load_rgb_uint8(image), None
        else:
            image_pixels, reference_pixels = load_pair(image, reference)
        scores: dict[str, MetricValue] = {}
        for name in self.metrics:
            if name not in available:
                scores[name] = self._unavailable[name]
            elif name not in FIDELITY_METRICS:
                scores[name] = self._scorer(name)(image_pixels)
            elif reference_pixels is None:
                scores[name] = None
            else:
                scores[name] = self._scorer(name)(image_pixels, reference_pixels)
        return scores

    def _scorer(self, name: str) -> Callable[..., float]:
        if name not in self._scorers:
            self._scorers[name] = self._build_scorer(name)
        return self._scorers[name]

    def _build_scorer(self, name: str) -> Callable[..., float]:
        # Imported here so that configure_environment has run before torchvision/torchmetrics are imported.
        if name == "clip_iqa":
            from eval.metrics.clip_iqa import ClipIqa

            return ClipIqa(Path(self.weights_dir) / WEIGHT_FILES["clip_iqa"][0].relative_path)
        from eval.metrics import fidelity

        if name == "lpips":
            return fidelity.Lpips()
        return {"psnr": fidelity.psnr, "ssim": fidelity.ssim}[name]
