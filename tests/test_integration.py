"""End-to-end checks on the embedded default model (SmolLM2-135M-Instruct) and real data."""

from __future__ import annotations

import pytest

from safesteer.cli import main
from safesteer.config import ModelArguments
from safesteer.data import load_prompts
from safesteer.direction import Direction
from safesteer.judge import refusal_rate
from safesteer.models import generate_responses, load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def direction_run(tmp_path_factory):
    """The default ``auto`` direction, with smaller prompt sets so it fits CI's budget."""
    output_dir = tmp_path_factory.mktemp("direction")
    code = main(["direction", "--output-dir", str(output_dir), "--n-train", "64", "--n-val", "16",
                 "--response-n-val", "12", "--val-max-new-tokens", "16"])
    assert code == 0
    return output_dir


def test_auto_direction_makes_the_teacher_refuse_held_out_harmful_prompts(direction_run):
    direction = Direction.load(direction_run)
    assert direction.metadata["selection_reason"]
    model, tokenizer = load_model(ModelArguments())
    harmful = load_prompts("harmbench-test", limit=24)
    options = {"max_new_tokens": 24, "batch_size": 24}
    base = refusal_rate(generate_responses(model, tokenizer, harmful, **options))
    with direction.steer(model):
        teacher = refusal_rate(generate_responses(model, tokenizer, harmful, **options))
    assert teacher >= base + 0.5, (base, teacher)


def test_chat_answers_side_by_side(direction_run, capsys):
    code = main(["chat", "--run-dir", str(direction_run), "--prompt", "Name a fruit.",
                 "--max-new-tokens", "8"])
    assert code == 0
    out = capsys.readouterr().out
    assert ">>> Name a fruit." in out and "teacher |" in out
