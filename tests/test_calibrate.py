"""Threshold calibration picks the cheapest configuration that keeps the fidelity target."""

from eval.calibrate import calibrate


def test_calibration_chooses_the_fewest_blocks_that_meet_the_target(make_pipe):
    pipe = make_pipe()
    call = {"num_inference_steps": 10, "max_sequence_length": 32, "guidance_scale": 3.5}
    prompts = ["a small red circle on the left against a white background", "a large blue square at the top"]
    grid = {"tau1": [0.0, 0.1, 1e9], "tau2": [0.0]}
    chosen, candidates, traces = calibrate(pipe, prompts, "h2", grid, target_psnr=25.0, call=call)
    by_tau1 = {c.params["tau1"]: c for c in candidates}
    assert by_tau1[0.0].blocks_fraction == 1.0 and by_tau1[0.0].mean_psnr == float("inf")
    assert by_tau1[1e9].blocks_fraction < by_tau1[0.1].blocks_fraction < 1.0
    passing = [c for c in candidates if c.mean_psnr >= 25.0]
    assert chosen in passing and chosen.blocks_fraction == min(c.blocks_fraction for c in passing)
    assert len(traces) == len(prompts) and traces[0][0]["step"] == 0
    assert not hasattr(pipe.transformer, "_h2cache_controller")  # calibration leaves the pipeline as it found it

    unreachable, _, _ = calibrate(pipe, prompts, "h2", {"tau1": [1e9], "tau2": [1e9]}, target_psnr=1e6, call=call)
    assert unreachable is None
