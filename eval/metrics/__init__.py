"""Image metrics: ``MetricSuite`` (runner API), and the metrics themselves in ``fidelity`` and ``clip_iqa``.

Only the suite is imported here, so that importing ``eval.metrics`` does not import torchvision before
``eval.weights.configure_environment`` has pointed TORCH_HOME at the weights dir.
"""

from eval.metrics.suite import MetricSuite

__all__ = ["MetricSuite"]
