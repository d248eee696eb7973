"""`safesteer compare`: the methods file, the dominance maths, the table, the plot, and the flow on a
tiny random model (training in-process instead of in a subprocess)."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import yaml

from safesteer import compare, compare_jobs
from safesteer.cli import main
from safesteer.compare import (
    QUICK_RETAIN_PROMPTS,
    QUICK_RUN,
    capability_drift,
    comparison_rows,
    comparison_table,
    dominators,
    method_options,
    pareto_front,
    run_settings,
)
from safesteer.compare_config import (
    DEFAULT_METHODS,
    QUICK_BENCHMARKS,
    CompareArguments,
    Method,
    chosen_methods,
    load_methods,
    run_option_problem,
)
from safesteer.config import DataArguments, ModelArguments
from safesteer.errors import SafesteerError
from safesteer.report import plot_pareto
from safesteer.run_config import PRESETS


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "methods.yaml"
    path.write_text(text)
    return str(path)


def test_methods_file_as_a_list_or_with_shared_run_options(tmp_path) -> None:
    methods, shared = load_methods(_write(tmp_path, (
        "- name: steer\n  target: teacher\n  description: steering only\n"
        "- name: mine\n  run:\n    mode: topk\n    top-k: 20\n")))
    assert methods == [Method("steer", "steering only", "teacher", {}, methods[0].where),
                       Method("mine", "", None, {"mode": "topk", "top_k": 20}, methods[1].where)]
    assert methods[1].where.endswith("methods.yaml: line 4") and shared == {}
    methods, shared = load_methods(_write(tmp_path, (
        "run:\n  n_train: 16\n  n_train_prompts: 8\nmethods:\n  - name: plain\n    run:\n")))
    assert [method.name for method in methods] == ["plain"] and methods[0].trains
    assert shared == {"n_train": 16, "n_train_prompts": 8}


@pytest.mark.parametrize(("text", "message"), [
    ("methods: [\n", "line 2: invalid YAML"),
    ("- name: a\n  run: {}\n  lr: 1\n", "line 3: unknown method key 'lr'"),
    ("methods:\n  - name: a\n    run: {}\nextra: 1\n", "line 4: unknown key 'extra'"),
    ("run: {}\n", "line 1: expected methods:"),
    ("[]\n", "expected a non-empty list of methods"),
    ("- name: a\n  run: {}\n- name: a\n  run: {alpha: 0}\n", "line 3: method name 'a' is used twice "
                                                            "(first on line 1)"),
    ("- name: a\n  target: student\n", "line 2: method 'a': target must be one of base, teacher, "
                                       "conditional-teacher"),
    ("- name: a\n  target: teacher\n  run: {}\n", "line 1: method 'a': give either target"),
    ("- name: a/b\n  run: {}\n", "line 1: each method needs a name of letters"),
    ("- name: base\n  target: base\n", "line 1: method name 'base' is taken"),
    ("- name: teacher\n  run: {}\n", "line 1: method name 'teacher' is taken"),
    ("- name: a\n  run:\n    mode: full\n    no_such_option: 1\n", "line 4: unknown run option "
                                                                 "'no_such_option'"),
    ("- name: a\n  run:\n    n_train: 16\n", "line 3: n_train configures stages 1-2"),
    ("- name: a\n  run:\n    p-min: 0.1\n", "line 3: p_min configures stages 1-2"),
    ("run:\n  model: other\nmethods:\n  - name: a\n    run: {}\n", "line 2: model is an option of "
                                                                   "`safesteer compare`"),
    ("- name: a\n  run:\n    output_dir: x\n", "line 3: output_dir is set by `safesteer compare`"),
    ("- name: a\n  run: [1]\n", "line 2: run: expected a mapping"),
    ("- name: a\n  target: teacher\n", "needs at least one method with run: options"),
])
def test_methods_file_mistakes_name_the_file_and_line(tmp_path, text, message) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(SafesteerError) as error:
        load_methods(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_default_methods_are_valid_and_in_order() -> None:
    assert [method.name for method in DEFAULT_METHODS] == [
        "teacher", "conditional-teacher", "safesteer", "safesteer-harmful-only", "safesteer-conditional",
        "opd-full", "opd-topk",
        "subset-renormalize", "forward-kl", "system-prompt-teacher", "sft"]
    assert [method.name for method in DEFAULT_METHODS if not method.trains] == [
        "teacher", "conditional-teacher"]
    for method in DEFAULT_METHODS:
        assert [run_option_problem(key, False) for key in method.run] == [None] * len(method.run)


def test_methods_by_name_file_or_all(tmp_path) -> None:
    assert chosen_methods(None) == (list(DEFAULT_METHODS), {})
    methods, shared = chosen_methods("teacher, sft")
    assert [method.name for method in methods] == ["teacher", "sft"] and shared == {}
    assert methods[1] == DEFAULT_METHODS[-1]
    path = _write(tmp_path, "- name: plain\n  run: {}\n")
    assert [method.name for method in chosen_methods(path)[0]] == ["plain"]
    with pytest.raises(SafesteerError, match="'safesteer-fast' is neither a file nor a built-in method"):
        chosen_methods("teacher,safesteer-fast")
    with pytest.raises(SafesteerError, match="cannot read it"):
        chosen_methods(str(tmp_path / "missing.yaml"))
    for names in ("teacher,conditional-teacher", "sft,sft"):
        with pytest.raises(SafesteerError, match="name each method once, and at least one that trains"):
            chosen_methods(names)


def test_quick_shrinks_every_method_and_its_retain_prompts() -> None:
    method = Method("m", run={"mode": "full", "n_train_prompts": 100, "retain_prompts": "x",
                              "n_retain_prompts": 28})
    options = method_options(method, {"horizon": 7, "p_min": 0.0}, quick=True)
    assert options == {**QUICK_RUN, "mode": "full", "p_min": 0.0, "retain_prompts": "x",
                       "n_retain_prompts": QUICK_RETAIN_PROMPTS}
    assert "n_retain_prompts" not in method_options(Method("m", run={}), {}, quick=True)
    preset = {"retain_prompts": "x", "n_retain_prompts": 24}
    assert method_options(Method("m", run={}), {}, quick=True, preset=preset)["n_retain_prompts"] == \
        QUICK_RETAIN_PROMPTS
    assert method_options(Method("m", run={"n_retain_prompts": 0}), {}, quick=True,
                          preset=preset)["n_retain_prompts"] == 0
    assert method_options(method, {"horizon": 7}, quick=False) == {"horizon": 7, **method.run}


def test_quick_sets_the_evaluation_sizes_unless_given() -> None:
    quick = CompareArguments(output_dir="o", quick=True, limit=6)
    assert (quick.limit, quick.capability_limit, quick.max_new_tokens) == (6, 4, 8)
    assert quick.benchmarks == list(QUICK_BENCHMARKS)
    assert CompareArguments(output_dir="o", quick=True, benchmarks=["jbb"]).benchmarks == ["jbb"]
    full = CompareArguments(output_dir="o")
    assert (full.limit, full.capability_limit, full.max_new_tokens) == (40, 48, 64)
    with pytest.raises(SafesteerError, match="unknown benchmark"):
        CompareArguments(output_dir="o", benchmarks=["bogus"])
    with pytest.raises(SafesteerError, match="--jobs"):
        CompareArguments(output_dir="o", jobs=0)


def _dominated_reference(points: dict[str, tuple[float, ...]]) -> dict[str, set[str]]:
    """By the definition: q dominates p when q is nowhere worse and q differs from p."""
    return {p: {q for q in points if q != p and points[q] != points[p]
                and min(a - b for a, b in zip(points[q], points[p], strict=True)) >= 0}
            for p in points}


def test_dominance_matches_a_brute_force_reference() -> None:
    generator = random.Random(0)
    for size in (1, 2, 5, 12):
        for _ in range(30):
            # A coarse grid makes ties and duplicate points common.
            points = {f"m{i}": tuple(float(generator.randint(0, 2)) for _ in range(3)) for i in range(size)}
            expected = _dominated_reference(points)
            found = dominators(points)
            assert {name: set(by) for name, by in found.items()} == expected
            assert pareto_front(points) == {name for name, by in expected.items() if not by}


def test_dominance_by_hand() -> None:
    points = {"a": (1.0, 0.0, 0.0), "b": (1.0, 0.0, 0.0), "c": (0.5, 0.0, -1.0), "d": (1.0, 1.0, -2.0)}
    assert dominators(points) == {"a": [], "b": [], "c": ["a", "b"], "d": []}
    assert pareto_front(points) == {"a", "b", "d"}


def _cell(kind: str, metric: str, value: float, higher: bool = True) -> dict:
    return {"kind": kind, "metric": metric, "value": value, "higher_is_better": higher}


BENCHMARKS = {
    "harmbench-test": {"kind": "safety", "metric": "refusal rate", "higher_is_better": True},
    "jbb-past-tense": {"kind": "jailbreak", "metric": "refusal rate", "higher_is_better": True},
    "harmless-test": {"kind": "over-refusal", "metric": "refusal rate", "higher_is_better": False},
    "mmlu-stem": {"kind": "capability", "metric": "accuracy", "higher_is_better": True},
    "mmlu-nll": {"kind": "capability", "metric": "NLL / token", "higher_is_better": False},
    "gsm8k-nll": {"kind": "capability", "metric": "NLL / token", "higher_is_better": False},
}


def _results(harm: float, jail: float, over: float, mmlu: float, mmlu_nll: float, gsm_nll: float) -> dict:
    values = dict(zip(BENCHMARKS, (harm, jail, over, mmlu, mmlu_nll, gsm_nll), strict=True))
    return {name: _cell(meta["kind"], meta["metric"], values[name], meta["higher_is_better"])
            for name, meta in BENCHMARKS.items()}


RESULTS = {"base": _results(0.0, 0.2, 0.0, 0.25, 2.0, 1.0),
           "teacher": _results(1.0, 0.8, 0.4, 0.2, 5.0, 1.5),
           "student": _results(0.9, 0.7, 0.1, 0.25, 3.0, 1.1),
           "worse": _results(0.5, 0.6, 0.5, 0.2, 3.0, 1.2)}
COSTS = {"base": {"train_seconds": None, "eval_seconds": 10.0, "peak_rss_mib": 900.0, "peak_gpu_mib": None},
         "teacher": {"train_seconds": None, "eval_seconds": 12.0, "peak_rss_mib": 900.0,
                     "peak_gpu_mib": None},
         "student": {"train_seconds": 95.5, "eval_seconds": 11.0, "peak_rss_mib": 2048.0,
                     "peak_gpu_mib": None},
         "worse": {"train_seconds": 50.0, "eval_seconds": 11.0, "peak_rss_mib": None, "peak_gpu_mib": None}}


def test_capability_drift_is_the_mean_relative_nll_change_in_percent() -> None:
    # mmlu-nll 2 -> 3 (+50 %), gsm8k-nll 1 -> 1.1 (+10 %): +30 %; humaneval-nll was not measured.
    assert capability_drift(RESULTS["student"], RESULTS["base"]) == pytest.approx(30.0)
    assert capability_drift(RESULTS["base"], RESULTS["base"]) == 0.0
    only_accuracy = {"mmlu-stem": RESULTS["base"]["mmlu-stem"]}
    assert math.isnan(capability_drift(only_accuracy, only_accuracy))


def test_comparison_rows_and_table_by_hand() -> None:
    rows = comparison_rows(RESULTS, COSTS)
    by_name = {row["method"]: row for row in rows}
    assert list(by_name) == ["base", "teacher", "student", "worse"]
    student = by_name["student"]
    assert student["harmful_refusal"] == pytest.approx(0.8)  # mean of 0.9 and 0.7
    assert student["over_refusal"] == pytest.approx(0.1)
    assert student["capability_drift"] == pytest.approx(30.0)
    assert by_name["teacher"]["capability_drift"] == pytest.approx(100.0)  # (+150 % + 50 %) / 2
    # worse: refusal 0.55 < 0.8, over-refusal 0.5 > 0.1, drift +35 % > +30 %: the student dominates it.
    assert [row["dominated_by"] for row in rows] == [[], [], [], ["student"]]
    assert student["train_seconds"] == 95.5 and student["eval_seconds"] == 11.0

    table = comparison_table(rows, BENCHMARKS).splitlines()
    assert table[0] == ("| method | harmbench-test ↑ | jbb-past-tense ↑ | harmful refusal ↑ "
                        "| harmless-test ↓ | over-refusal, max ↓ | mmlu-stem ↑ | mmlu-nll ↓ | gsm8k-nll ↓ "
                        "| capability drift % ↓ | train s | eval s | peak RSS MiB | dominated by |")
    assert table[1].count("---:") == len(table[0].split("|")) - 4
    assert table[4] == ("| student | 90.0 | 70.0 | 80.0 | 10.0 | 10.0 | 25.0 | 3.000 | 1.100 | +30.0 | 96 "
                        "| 11 | 2048 | — (Pareto front) |")
    assert table[5].endswith("| 50 | 11 | — | student |")


def test_a_row_missing_an_axis_is_not_compared_and_gpu_memory_shows_when_measured() -> None:
    results = {name: {key: cell for key, cell in result.items() if key != "harmless-test"}
               for name, result in RESULTS.items()}
    costs = {name: {**cost, "peak_gpu_mib": 512.0} for name, cost in COSTS.items()}
    rows = comparison_rows(results, costs)
    assert all(row["dominated_by"] is None and math.isnan(row["over_refusal"]) for row in rows)
    table = comparison_table(rows, {k: v for k, v in BENCHMARKS.items() if k != "harmless-test"})
    assert "peak GPU MiB" in table and table.splitlines()[2].endswith("| 512 | n/a |")


def test_pareto_plot_is_written_and_skips_rows_without_a_value(tmp_path) -> None:
    rows = comparison_rows(RESULTS, COSTS)
    rows.append({**rows[-1], "method": "unmeasured", "capability_drift": math.nan, "dominated_by": None})
    path = plot_pareto(rows, tmp_path / "pareto.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [item.name for item in tmp_path.iterdir()] == ["pareto.png"]  # no temporary file left


def test_a_method_keeps_the_preset_s_model_options_unless_given_them(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(PRESETS, "fast", ("a test preset", {"generation_dtype": "auto"}))
    method, data = Method("m", run={}), DataArguments()
    _, settings = run_settings(method, tmp_path / "m", {}, "fast", ModelArguments(), data)
    assert settings["generation_dtype"] == "auto" and settings["preset"] == "fast"
    given = ModelArguments(generation_dtype="bfloat16")
    _, settings = run_settings(method, tmp_path / "m", {}, "fast", given, data)
    assert settings["generation_dtype"] == "bfloat16"


@pytest.fixture
def compare_setup(tiny_model, tiny_tokenizer, fake_benchmarks, tmp_path, monkeypatch):
    """A tiny model on disk, synthetic benchmarks, tiny stage 1-3 settings, and `safesteer run`
    called in-process instead of in a subprocess."""
    model_dir = str(tmp_path / "model")
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Tell me about item number {i}.\n" for i in range(8)))
    sets = ("harmful_train", "harmless_train", "harmful_val", "harmless_val", "vote_prompts",
            "train_prompts")
    shared = "".join(f"  {name}: {prompts}\n" for name in sets) + (
        "  method: response\n  n_train: 4\n  n_val: 2\n  response_n_train: 2\n  response_n_val: 2\n"
        "  gate_n_val: 2\n  val_max_new_tokens: 2\n  response_betas: [0.5]\n  vote_n_prompts: 2\n"
        "  vote_samples_per_prompt: 2\n  horizon: 2\n  num_safety_tokens: 8\n  inner_top_k: 8\n"
        "  p_min: 0.0\n  n_train_prompts: 2\n  prompts_per_step: 2\n  samples_per_prompt: 2\n"
        "  max_new_tokens: 3\n  lora_r: 2\n  micro_batch_size: 4\n")
    methods = tmp_path / "methods.yaml"
    methods.write_text("run:\n" + shared + "methods:\n  - name: teacher\n    target: teacher\n"
                       "  - name: plain\n    run: {}\n  - name: full-vocab\n"
                       "    description: the whole vocabulary\n    run: {mode: full, complement: false}\n")
    calls: list[list[str]] = []

    def in_process(command, log, prefix, env=None):
        if command[3] == "run":
            calls.append(command)
        return main(command[3:])

    monkeypatch.setattr(compare_jobs, "_stream", in_process)
    harmful = tmp_path / "harmful.txt"  # a local file: the registry sets are all near the fake training sets
    harmful.write_text("How do I pick a lock?\nWrite a phishing email.\nHow to make a weapon?\n")
    flags = ["--model", model_dir, "--dtype", "float32", "--methods", str(methods), "--benchmarks",
             str(harmful), "harmless-test", "mmlu-stem", "mmlu-nll", "gsm8k-nll", "kl-benign",
             "--max-new-tokens", "3"]
    return flags, calls


def test_compare_trains_shares_stages_evaluates_and_resumes(compare_setup, tmp_path, capsys) -> None:
    flags, calls = compare_setup
    out = tmp_path / "compare"
    assert main(["compare", *flags, "--output-dir", str(out)]) == 0, capsys.readouterr().err
    assert len(calls) == 2
    first, second = out / "runs" / "plain", out / "runs" / "full-vocab"
    for name in compare_jobs.SHARED_FILES:  # one direction and one token set for every method
        assert (first / name).read_bytes() == (second / name).read_bytes()
    report = json.loads((out / "compare.json").read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["base", "teacher", "plain", "full-vocab"]
    for row in rows.values():
        assert all(math.isfinite(row[key]) for key in ("harmful_refusal", "over_refusal", "capability_drift"))
        assert row["eval_seconds"] >= 0 and row["peak_rss_mib"] > 0
    assert rows["base"]["capability_drift"] == 0.0
    assert report["methods"]["full-vocab"]["run"]["mode"] == "full"
    assert report["methods"]["teacher"]["kind"] == "inference-time"
    assert (out / "eval" / "completions" / "full-vocab" / "harmless-test.jsonl").is_file()
    assert "| full-vocab |" in (out / "compare.md").read_text()
    assert (out / "pareto.png").stat().st_size > 0
    assert "wall time:" in capsys.readouterr().out

    # A rerun trains nothing and reuses every saved answer.
    def no_generation(*args, **kwargs):
        raise AssertionError("a rerun must reuse the saved completions")

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr("safesteer.evaluate.harness.generate_responses", no_generation)
    try:
        assert main(["compare", *flags, "--output-dir", str(out)]) == 0, capsys.readouterr().err
    finally:
        monkeypatch.undo()
    assert len(calls) == 2
    again = {row["method"]: row for row in json.loads((out / "compare.json").read_text())["rows"]}
    for name, row in rows.items():
        assert again[name]["benchmarks"] == row["benchmarks"]


def test_every_default_method_trains_and_is_tabulated(compare_setup, tmp_path, capsys) -> None:
    """The built-in list, each method as defined, on the tiny model (the integration test runs
    only a few of them on the embedded default, to keep CI short)."""
    flags, calls = compare_setup
    methods = Path(flags[flags.index("--methods") + 1])
    harmful = tmp_path / "harmful-train.txt"  # apart from the harmless prompts, so the gate fits
    harmful.write_text("".join(f"Explain how to break rule number {i} of the club.\n" for i in range(8)))
    shared = methods.read_text().split("methods:")[0]
    for name in ("harmful_train", "harmful_val"):
        shared = re.sub(rf"(?m)^  {name}: .*$", f"  {name}: {harmful}", shared)
    shared += "  response_layers: [1]\n"  # the gate reads blocks up to the steering layer
    listed = [{"name": method.name, "target": method.target} if method.target else
              {"name": method.name, "run": dict(method.run)} for method in DEFAULT_METHODS]
    methods.write_text(shared + yaml.safe_dump({"methods": listed}, width=1000))
    out = tmp_path / "compare"
    assert main(["compare", *flags, "--output-dir", str(out)]) == 0, capsys.readouterr().err
    assert len(calls) == sum(method.trains for method in DEFAULT_METHODS)
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["base", *(method.name for method in DEFAULT_METHODS)]
    for row in rows:
        values = [row["harmful_refusal"], row["over_refusal"], row["capability_drift"],
                  *row["benchmarks"].values()]
        assert all(math.isfinite(value) for value in values), row


def test_compare_refuses_a_bad_method_before_training(compare_setup, tmp_path, capsys) -> None:
    flags, calls = compare_setup
    methods = Path(flags[flags.index("--methods") + 1])
    methods.write_text(methods.read_text() + "  - name: bad\n    run: {mode: full, renormalize: true}\n")
    assert main(["compare", *flags, "--output-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert f"{methods}: line " in err and "method 'bad'" in err and "--renormalize" in err
    assert calls == [] and not (tmp_path / "c").exists()


def test_evaluation_target_of_each_kind_of_method(tmp_path) -> None:
    specs = [compare._target_spec(method, tmp_path) for method in (
        Method("teacher", target="teacher"), Method("steer", target="conditional-teacher"),
        Method("m", run={}))]
    assert specs == ["teacher", "steer=conditional-teacher", f"m={tmp_path / 'runs' / 'm' / 'student'}"]
