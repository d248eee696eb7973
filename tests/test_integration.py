"""End-to-end checks on the embedded default model (SmolLM2-135M-Instruct) and real data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from safesteer.cli import main
from safesteer.config import ModelArguments
from safesteer.data import load_prompts
from safesteer.direction import Direction
from safesteer.keyword_judge import refusal_rate
from safesteer.models.generation import generate_responses
from safesteer.models.loading import load_model
from safesteer.models.precision import native_bfloat16_cpu

pytestmark = pytest.mark.integration


DIRECTION_FLAGS = ["--method", "response", "--n-train", "64", "--n-val", "16", "--response-n-val", "12",
                   "--response-layer-stride", "3", "--response-betas", "0.2", "0.3"]


@pytest.fixture(scope="module")
def direction_run(tmp_path_factory):
    """The demo preset's response direction (``auto`` falls back to it on this model after every
    prompt-method candidate fails), with smaller prompt sets so it fits CI's budget."""
    output_dir = tmp_path_factory.mktemp("direction")
    code = main(["direction", "--output-dir", str(output_dir), *DIRECTION_FLAGS])
    assert code == 0
    return output_dir


def test_response_direction_makes_the_teacher_refuse_held_out_harmful_prompts(direction_run):
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


def test_demo_run_trains_a_student_that_plain_peft_loads(direction_run, tmp_path, capsys):
    """`safesteer run --preset demo` reduced to CI size, reusing the direction above (the preset's
    direction settings are DIRECTION_FLAGS, so --resume accepts it and skips that stage)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("direction.json", "direction.safetensors"):
        shutil.copy(direction_run / name, run_dir / name)
    code = main(["run", "--preset", "demo", "--output-dir", str(run_dir), "--resume",
                 "--vote-n-prompts", "4", "--vote-samples-per-prompt", "2", "--horizon", "3",
                 "--n-train-prompts", "4", "--prompts-per-step", "2", "--samples-per-prompt", "2",
                 "--max-new-tokens", "8", "--check-limit", "4", "--check-max-new-tokens", "8"])
    assert code == 0, capsys.readouterr().err
    check = json.loads((run_dir / "check.json").read_text())
    assert check["bf16_autocast"] is native_bfloat16_cpu()  # the preset's --bf16=auto, resolved here
    script = textwrap.dedent(f"""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from safesteer.models import pretrained_location
        base = AutoModelForCausalLM.from_pretrained(pretrained_location("smollm2-135m"))
        student = PeftModel.from_pretrained(base, {str(run_dir / "student")!r})
        tokenizer = AutoTokenizer.from_pretrained({str(run_dir / "student")!r})
        ids = tokenizer("Hello", return_tensors="pt").input_ids
        assert student(ids).logits.isfinite().all()
        print("loaded")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "loaded" in result.stdout, result.stderr[-2000:]


def test_eval_scores_base_teacher_and_student_on_real_benchmarks(direction_run, tmp_path, capsys):
    """`safesteer eval` on the embedded model with every default benchmark, at CI size; the
    student is a LoRA adapter with random (non-zero) weights, so it differs from the base."""
    from peft import LoraConfig, get_peft_model

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("direction.json", "direction.safetensors"):
        shutil.copy(direction_run / name, run_dir / name)
    model, _ = load_model(ModelArguments())
    student = get_peft_model(model, LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj"]))
    student.save_pretrained(run_dir / "student", save_embedding_layers=False)
    out = tmp_path / "eval"
    flags = ["eval", "--targets", "base,teacher,student", "--run-dir", str(run_dir), "--output-dir",
             str(out), "--limit", "4", "--capability-limit", "4", "--gsm8k-limit", "2",
             "--max-new-tokens", "16", "--gsm8k-max-new-tokens", "16"]
    assert main(flags) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())["results"]
    kinds = {row["kind"] for row in results["base"].values()}
    assert kinds == {"safety", "jailbreak", "over-refusal", "robustness", "capability"}
    for attack in ("direction-ablation", "prefill"):  # the default eval's two cheap attacks
        cell = results["teacher"][attack]
        assert cell["unattacked"] == results["teacher"]["harmbench-test"]["value"]
        assert cell["drop"] == cell["unattacked"] - cell["value"]
    assert results["teacher"]["harmbench-test"]["value"] >= results["base"]["harmbench-test"]["value"]
    assert results["student"]["kl-benign"]["value"] > 0
    assert main(flags) == 0  # a rerun reuses every saved completion ...
    assert json.loads((out / "results.json").read_text())["results"] == results  # ... and agrees


def test_quick_compare_tabulates_each_kind_of_method(tmp_path, capsys):
    """`safesteer compare --quick` on the two inference-time methods and SafeSteer as the demo
    preset makes it (trained 2 steps), all evaluated on 4 items per benchmark; the table has a
    finite value on every axis for every method. Every built-in method runs in
    tests/test_compare.py on the tiny model; here the embedded model and the real data."""
    import math

    out = tmp_path / "compare"
    flags = ["--quick", "--methods", "teacher,conditional-teacher,safesteer", "--output-dir", str(out)]
    assert main(["compare", *flags]) == 0, capsys.readouterr().err
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["base", "teacher", "conditional-teacher", "safesteer"]
    for row in rows:
        values = [row["harmful_refusal"], row["robust_refusal"], row["over_refusal"], row["capability_drift"],
                  *row["benchmarks"].values()]
        assert all(math.isfinite(value) for value in values), row
        assert row["dominated_by"] is not None
    assert rows[-1]["train_seconds"] > 0
    assert (out / "pareto.png").stat().st_size > 0 and "| safesteer |" in (out / "compare.md").read_text()
    assert (out / "pareto-robust.png").stat().st_size > 0
