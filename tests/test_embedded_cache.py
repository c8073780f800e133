"""The documented cache settings on the shipped embedded model: half the blocks or fewer, PSNR >= 30 dB."""

import pytest

from eval.calibrate import calibrate
from h2cache.embedded import SHIPPED_FOLDER, load_folder, shipped_model_available
from h2cache.generate import call_arguments

PROMPTS = [
    "a small red circle on the left against a white background",
    "a large blue square at the top against a black background",
    "a small yellow triangle in the center against a gray background",
]

pytestmark = pytest.mark.skipif(not shipped_model_available(), reason="no shipped embedded model in this checkout")


# H2-Cache at the authors' thresholds; Block Cache at the README's threshold for this model, the lowest of 0.12, 0.15,
# 0.2, 0.25, 0.3 and 0.4 that halves the blocks on these prompts: nunchaku's FLUX.1 default 0.12 computes 54% of them
# and 0.15 44% (57 blocks of which a hit skips 56). Re-derived for each shipped model: 0.15 for the previous one too
# (49%), 0.2 for the one before (0.15 computed 51% there).
@pytest.mark.parametrize(
    "method, params",
    [("h2", {"tau1": [0.15], "tau2": [0.22]}), ("fbcache", {"threshold": [0.15]})],
)
def test_documented_thresholds_halve_the_blocks_and_keep_30_db(method, params):
    pipe = load_folder(SHIPPED_FOLDER)
    chosen, candidates, traces = calibrate(
        pipe, PROMPTS, method, params, target_psnr=30.0, seed=1000, call=call_arguments(pipe)
    )
    assert chosen is not None, candidates
    assert chosen.blocks_fraction <= 0.5 and chosen.mean_psnr >= 30.0
    assert any(r["stage1"] == "hit" for trace in traces for r in trace)
