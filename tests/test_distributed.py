"""Prepared DDP on two CPU processes (torchrun, gloo): one optimizer step equals the one-process
step with the same global batch (tests/distributed_step.py runs the cases in both)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_step import CASES

WORKER = Path(__file__).with_name("distributed_step.py")


def run_worker(model_dir: Path, out_dir: Path, processes: int) -> None:
    launcher = ([] if processes == 1 else
                ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)])
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
                   "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                  os.environ.get("PYTHONPATH", "")])}
    process = subprocess.run([sys.executable, *launcher, str(WORKER), str(model_dir), str(out_dir)],
                             capture_output=True, text=True, timeout=600, env=environment)
    assert process.returncode == 0, process.stderr[-4000:]


@pytest.fixture(scope="module")
def steps(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Per case, the one-process result, then each of the two processes' results."""
    one, two = tmp_path_factory.mktemp("one-process"), tmp_path_factory.mktemp("two-processes")
    run_worker(tiny_model_dir, one, 1)
    run_worker(tiny_model_dir, two, 2)
    return {name: [torch.load(path, weights_only=False) for path in
                   (one / f"{name}-rank0.pt", two / f"{name}-rank0.pt", two / f"{name}-rank1.pt")]
            for name in CASES}


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[key].flatten() for key in sorted(tensors)])


@pytest.mark.parametrize("case", list(CASES))
def test_two_process_gradient_is_the_one_process_gradient(steps, case: str) -> None:
    """Each process ends the backward holding the gradient of the whole step's loss: not its own
    share (no synchronisation) nor the engine's plain average (the loss not scaled)."""
    single, first, second = steps[case]
    expected = flat(single["gradient"])
    assert expected.abs().max() > 0
    torch.testing.assert_close(flat(first["gradient"]), expected, atol=1e-6, rtol=1e-4)
    assert torch.equal(flat(first["gradient"]), flat(second["gradient"]))


@pytest.mark.parametrize("case", list(CASES))
def test_two_process_step_matches_the_one_process_step(steps, case: str) -> None:
    single, first, second = steps[case]
    for key in ("loss", "completion_tokens", "refusal_rate", "truncated", "steered_rows"):
        assert first["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5, abs=1e-7), key
    for key in ("loss", "grad_norm", "lr", "completion_tokens"):
        assert first["step_metrics"][key] == pytest.approx(single["step_metrics"][key], rel=1e-4), key
    # Adam's first step is about lr·sign(g): where |g| is near epsilon a rounding-level difference
    # in g moves the update by up to its own size, so the weights get lr/1000 of slack.
    torch.testing.assert_close(flat(first["weights"]), flat(single["weights"]), atol=1e-5, rtol=1e-4)
    assert torch.equal(flat(first["weights"]), flat(second["weights"]))


@pytest.mark.parametrize("case", list(CASES))
def test_two_process_run_resumes_from_its_checkpoint(steps, case: str) -> None:
    """The checkpoint written after step 1 (adapter or model, prepared optimizer, schedule) lets a
    new two-process run take step 2 as the one-process run does."""
    single, first, second = steps[case]
    assert single["resumed_step"] == first["resumed_step"] == second["resumed_step"] == 2
    assert not torch.equal(flat(first["resumed_weights"]), flat(first["weights"]))
    torch.testing.assert_close(flat(first["resumed_weights"]), flat(single["resumed_weights"]),
                               atol=2e-5, rtol=1e-4)
    assert torch.equal(flat(first["resumed_weights"]), flat(second["resumed_weights"]))
