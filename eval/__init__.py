"""Evaluation for h2cache: metrics (CLIP-IQA, PSNR, SSIM, LPIPS), weight preflight, bootstrap, tables, figures.

Spec: ``shared/specs/metrics.md``. Nothing here downloads: missing weight files are reported by
``eval.weights.check_weights`` as one table, and the CLI exits with ``EXIT_MISSING_WEIGHTS``.
"""
