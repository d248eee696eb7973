"""``safesteer compare``: several alignment methods on one model and one data set, side by side.

A method is either an inference-time target (``teacher``, ``conditional-teacher``: nothing is
trained) or a ``safesteer run`` whose options are applied on top of one preset. Every training
method runs in its own directory ``OUT/runs/NAME``, and all of them reuse the first one's direction
and safety tokens, copied in before they start, so they differ only in what the method changes.
Every target (the base model, the inference-time methods, each student) is then evaluated on the
same prompts, each by a ``safesteer eval`` of its own (``OUT/eval/targets/NAME``, the answers in
``OUT/eval/completions``) that starts once its student is trained; their results are merged into
``OUT/eval`` and become one table (``compare.md``, ``compare.json``) and a Pareto plot
(``pareto.png``). The jobs are :mod:`safesteer.compare_jobs`.

A rerun into the same directory resumes: finished runs are skipped, interrupted ones continue from
their checkpoints, and the saved answers of unchanged targets are reused. The methods and the
command's arguments are :mod:`safesteer.compare_config`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safesteer.arguments import option_flags, parse
from safesteer.compare_config import CompareArguments, Method, chosen_methods
from safesteer.compare_jobs import evaluation_jobs, job_env, part_dir, training_jobs
from safesteer.config import DataArguments, ModelArguments
from safesteer.errors import SafesteerError
from safesteer.evaluate.config import split_target
from safesteer.evaluate.summary import RESULTS_FILE, merge_summaries, write_summary
from safesteer.io import (
    EVAL_KIND,
    atomic_write,
    check_writable,
    claim_output_dir,
    read_json,
    write_json,
)
from safesteer.models.loading import check_model_arguments
from safesteer.report import HARMFUL_KINDS, mean_of_kinds, plot_pareto, worst_of_kinds
from safesteer.run_config import PRESETS, RUN
from safesteer.schedule import run_jobs

# --quick: every training method 2 optimizer steps at a tiny size; stages 1-2 on small sets, the
# direction by the response method alone (the prompt method scores every layer and position: minutes
# on a CPU) with one coefficient on every third layer.
QUICK_RUN: dict[str, Any] = {
    "method": "response", "n_train": 16, "n_val": 8, "response_n_train": 16, "response_n_val": 4,
    "response_betas": [0.3], "response_layer_stride": 3, "val_max_new_tokens": 8, "gate_n_val": 8,
    "vote_n_prompts": 4, "vote_samples_per_prompt": 2, "horizon": 3,
    "n_train_prompts": 4, "prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 8,
    "num_epochs": 1,
}
QUICK_RETAIN_PROMPTS = 2
# The gold-answer NLLs whose mean relative change against the base is the capability drift.
DRIFT_MEASURES = ("mmlu-nll", "gsm8k-nll", "humaneval-nll", "benign-nll")
SHARED_STAGES = ("direction", "tokens")  # check.json stage_seconds keys of stages 1-2
STAGES_POLL_SECONDS = 1.0  # how often waiting jobs look for the first method's direction and stages 1-2


# ------------------------------------------------------------------------- training


def method_options(method: Method, shared: Mapping[str, Any], quick: bool,
                   preset: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The method's ``safesteer run`` options on top of the preset: the shared ones, its own, and
    with ``quick`` the tiny sizes over both, retain prompts included wherever the method ends up
    with some (its own, the shared ones or the ``preset``'s defaults)."""
    options = {**shared, **method.run}
    if quick:
        options.update(QUICK_RUN)
        if {**(preset or {}), **options}.get("n_retain_prompts"):
            options["n_retain_prompts"] = QUICK_RETAIN_PROMPTS
    return options


def _given(config: ModelArguments | DataArguments, preset_options: Mapping[str, Any]) -> dict[str, Any]:
    """``config``'s options less those at their default that the preset sets."""
    defaults = asdict(type(config)())
    return {key: value for key, value in asdict(config).items()
            if key not in preset_options or value != defaults[key]}


def run_settings(method: Method, run_dir: Path, options: Mapping[str, Any], preset: str,
                 model_args: ModelArguments, data_args: DataArguments) -> tuple[list[str], dict[str, Any]]:
    """The method's ``safesteer run`` arguments, and every setting they resolve to (read by the run
    command's own parser, so a bad option or value fails here, before anything trains). A model
    or data option compare left at its default leaves the preset's value (``--preset demo``'s
    generation dtype)."""
    preset_options = PRESETS[preset][1]
    arguments = ["--preset", preset, *option_flags({
        "output_dir": str(run_dir), "resume": True, "check_limit": 0,
        **_given(model_args, preset_options), **_given(data_args, preset_options), **options})]
    try:
        parsed = parse(RUN, arguments)
    except SafesteerError as error:
        raise SafesteerError(f"{method.where}: method {method.name!r}: {error}") from error
    settings = {key: value for item in parsed for key, value in asdict(item).items()
                if key not in ("output_dir", "resume", "overwrite")}
    return arguments, {"preset": preset, **settings}


def _check(run_dir: Path) -> dict[str, Any]:
    """A finished run's check.json: its stage wall seconds and peak memory ({} without one)."""
    path = run_dir / "check.json"
    return read_json(path) if path.is_file() else {}


def run_costs(check: Mapping[str, Any]) -> dict[str, float | None]:
    """A method's training wall seconds (every stage but the shared stages 1-2) and peak memory,
    from its run's check.json; None where that records none."""
    stages = check.get("stage_seconds")
    return {"train_seconds": (sum(seconds for stage, seconds in stages.items() if stage not in SHARED_STAGES)
                              if stages else None),
            "peak_rss_mib": check.get("peak_rss_mib"), "peak_gpu_mib": check.get("peak_gpu_mib")}


# ------------------------------------------------------------------------- the table


def dominators(points: Mapping[str, Sequence[float]]) -> dict[str, list[str]]:
    """For each point, the other points at least as good on every axis and strictly better on one
    (every axis: higher is better), in the order given."""
    return {name: [other for other, theirs in points.items()
                   if all(t >= m for t, m in zip(theirs, mine, strict=True))
                   and any(t > m for t, m in zip(theirs, mine, strict=True))]
            for name, mine in points.items()}


def pareto_front(points: Mapping[str, Sequence[float]]) -> set[str]:
    """The points no other point dominates."""
    return {name for name, by in dominators(points).items() if not by}


def capability_drift(results: Mapping[str, Mapping[str, Any]],
                     base: Mapping[str, Mapping[str, Any]]) -> float:
    """How far a method moved the model's knowledge: the mean over the gold-answer NLL measures
    (DRIFT_MEASURES) present of the relative change against the base, in %; NaN without any."""
    changes = [100 * (results[name]["value"] - base[name]["value"]) / base[name]["value"]
               for name in DRIFT_MEASURES if name in base]
    return sum(changes) / len(changes) if changes else math.nan


def comparison_rows(results: Mapping[str, Mapping[str, Mapping[str, Any]]],
                    costs: Mapping[str, Mapping[str, float | None]]) -> list[dict[str, Any]]:
    """One row per target of ``results`` (the evaluation's, with ``base``): every benchmark value, the
    three trade-off axes (mean harmful refusal, worst over-refusal, capability drift), the costs, and
    ``dominated_by``, the methods at least as good on all three axes and better on one (None where an
    axis is missing, so the row is not compared)."""
    rows = [{"method": name, "benchmarks": {bench: row["value"] for bench, row in result.items()},
             "harmful_refusal": mean_of_kinds(result, HARMFUL_KINDS),
             "robust_refusal": mean_of_kinds(result, ("robustness",)),
             "over_refusal": worst_of_kinds(result, ("over-refusal",))[0],
             "capability_drift": capability_drift(result, results["base"]), **costs[name]}
            for name, result in results.items()]
    points = {row["method"]: (row["harmful_refusal"], -row["over_refusal"], -row["capability_drift"])
              for row in rows}
    comparable = {name: point for name, point in points.items() if all(map(math.isfinite, point))}
    dominated = dominators(comparable)
    for row in rows:
        row["dominated_by"] = dominated.get(row["method"])
    return rows


def _number(value: float | None, digits: int = 0, percent: bool = False, sign: bool = False) -> str:
    if value is None:
        return "—"
    if math.isnan(value):
        return "n/a"
    return f"{100 * value if percent else value:{'+' if sign else ''}.{digits}f}"


def comparison_table(rows: Sequence[Mapping[str, Any]], benchmarks: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: one row per method; per-benchmark refusal rates and accuracies in %, NLL and KL per
    token, the three trade-off axes, costs and ``dominated by``."""
    def columns_of(kinds: Sequence[str]) -> list[str]:
        return [name for name, bench in benchmarks.items() if bench["kind"] in kinds]

    def arrow(name: str) -> str:
        return "↑" if benchmarks[name]["higher_is_better"] else "↓"

    def cell(name: str, value: float) -> str:
        per_token = benchmarks[name]["metric"] in ("NLL / token", "KL / token")
        return _number(value, 3) if per_token else _number(value, 1, percent=True)

    harmful, robust, over, capability = (columns_of(HARMFUL_KINDS), columns_of(("robustness",)),
                                         columns_of(("over-refusal",)), columns_of(("capability",)))
    gpu = any(row["peak_gpu_mib"] is not None for row in rows)
    header = ["method", *(f"{name} {arrow(name)}" for name in harmful), "harmful refusal ↑",
              *(f"{name} {arrow(name)}" for name in robust), *(["robust refusal ↑"] if robust else []),
              *(f"{name} {arrow(name)}" for name in over), "over-refusal, max ↓",
              *(f"{name} {arrow(name)}" for name in capability), "capability drift % ↓", "train s",
              "eval s", "peak RSS MiB", *(["peak GPU MiB"] if gpu else []), "dominated by"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 2) + "---|"]
    for row in rows:
        values = row["benchmarks"]
        dominated = row["dominated_by"]
        cells = [row["method"], *(cell(name, values[name]) for name in harmful),
                 _number(row["harmful_refusal"], 1, percent=True),
                 *(cell(name, values[name]) for name in robust),
                 *([_number(row["robust_refusal"], 1, percent=True)] if robust else []),
                 *(cell(name, values[name]) for name in over), _number(row["over_refusal"], 1, percent=True),
                 *(cell(name, values[name]) for name in capability),
                 _number(row["capability_drift"], 1, sign=True), _number(row["train_seconds"]),
                 _number(row["eval_seconds"]), _number(row["peak_rss_mib"]),
                 *([_number(row["peak_gpu_mib"])] if gpu else []),
                 "n/a" if dominated is None else ", ".join(dominated) or "— (Pareto front)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------- the command


def _target_spec(method: Method, output_dir: Path) -> str:
    if method.trains:
        return f"{method.name}={output_dir / 'runs' / method.name / 'student'}"
    return method.name if method.name == method.target else f"{method.name}={method.target}"


def compare_methods(model_args: ModelArguments, data_args: DataArguments,
                    args: CompareArguments) -> dict[str, Any]:
    """Train every method, evaluate them all with the base, write the table and the Pareto plot."""
    started = time.perf_counter()
    methods, shared = chosen_methods(args.methods)
    output_dir = Path(args.output_dir)
    check_writable(output_dir)
    check_model_arguments(model_args)
    data_args.check(*args.evaluation(["base"], args.output_dir).exclude_near)  # also the hub, if used
    trained = [method for method in methods if method.trains]
    plans = {method.name: run_settings(method, output_dir / "runs" / method.name,
                                       method_options(method, shared, args.quick,
                                                      PRESETS[args.preset][1]), args.preset,
                                       model_args, data_args)
             for method in trained}
    source = output_dir / "runs" / trained[0].name  # its stages 1-2 serve every method
    specs = ["base", *(_target_spec(method, output_dir) for method in methods)]
    # A retrained student or a new direction is answered anew: saved answers carry what made them.
    evaluation = args.evaluation(specs, str(source))
    eval_dir = claim_output_dir(Path(evaluation.output_dir), EVAL_KIND)
    env = job_env(args.jobs)
    trainings = training_jobs(trained, plans, output_dir, env)
    finished = run_jobs([*trainings, *evaluation_jobs(
        specs, {method.name: job.name for method, job in zip(trained, trainings, strict=True)},
        evaluation, model_args, data_args, source, env)], args.jobs, STAGES_POLL_SECONDS)
    training_seconds = max(finished[job.name] for job in trainings) - started
    parts = [read_json(part_dir(eval_dir, split_target(spec)[0]) / RESULTS_FILE) for spec in specs]
    summary = merge_summaries(parts, {**parts[0]["settings"], "output_dir": str(eval_dir), "targets": specs,
                                      "completions_dir": None})
    write_summary(summary, eval_dir)
    costs: dict[str, dict[str, float | None]] = {
        name: {"train_seconds": None, **summary["memory"][name]}
        for name in ["base", *(method.name for method in methods if not method.trains)]}
    costs.update({method.name: run_costs(_check(output_dir / "runs" / method.name)) for method in trained})
    for name, seconds in summary["seconds"].items():
        costs[name]["eval_seconds"] = seconds
    rows = comparison_rows(summary["results"], costs)
    stages = _check(source).get("stage_seconds")
    seconds = {"total": round(time.perf_counter() - started, 1),
               "training": round(training_seconds, 1), "evaluation": sum(summary["seconds"].values()),
               "shared_stages": sum(stages.get(stage, 0.0) for stage in SHARED_STAGES) if stages else None}
    entries = {"base": {"kind": "reference", "description": "the model as given"}}
    for method in methods:
        entries[method.name] = {"kind": "trained" if method.trains else "inference-time",
                                "description": method.description,
                                **({"run": plans[method.name][1]} if method.trains else {})}
    comparison = {"rows": rows, "methods": entries, "benchmarks": summary["benchmarks"],
                  "seconds": seconds, "settings": {"model": model_args.model, **asdict(args)}}
    table = comparison_table(rows, summary["benchmarks"])
    write_json(output_dir / "compare.json", comparison)
    text = _markdown(comparison, table)
    atomic_write(output_dir / "compare.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    plots = [plot_pareto(rows, output_dir / "pareto.png")]
    if any(math.isfinite(row["robust_refusal"]) for row in rows):
        plots.append(plot_pareto(rows, output_dir / "pareto-robust.png", safety="robust_refusal"))
    print("\n" + table)
    print(f"\n{_timing(seconds)}\nwrote {output_dir / 'compare.md'}, {output_dir / 'compare.json'}, "
          + ", ".join(str(plot) for plot in plots))
    return comparison


def _timing(seconds: Mapping[str, float | None]) -> str:
    shared = seconds["shared_stages"]
    stages = f", stages 1-2, shared, {shared:.0f} s of it" if shared is not None else ""
    return (f"wall time: {seconds['total']:.0f} s in all (the last training done after "
            f"{seconds['training']:.0f} s{stages}; the targets' evaluations {seconds['evaluation']:.0f} s "
            "summed, beside the trainings)")


def _markdown(report: Mapping[str, Any], table: str) -> str:
    settings = report["settings"]
    methods = "\n".join(f"- **{name}** ({entry['kind']})" + (f": {entry['description']}"
                                                               if entry["description"] else "")
                        for name, entry in report["methods"].items())
    return (f"# safesteer compare\n\nModel {settings['model']}, preset {settings['preset']}"
            f"{' (--quick)' if settings['quick'] else ''}; greedy answers judged by the keyword judge, "
            f"{settings['limit']} prompts per refusal benchmark and {settings['capability_limit']} items "
            f"per capability benchmark.\n\n{table}\n\nRefusal rates and accuracies in %, NLL and KL in "
            "nats per token. Harmful refusal: mean over the safety and jailbreak benchmarks; robust "
            "refusal: mean over the robustness benchmarks (the attacked harmful prompts); "
            "over-refusal: the maximum over the benign ones (the worst set a user meets); capability "
            "drift: mean relative change of the "
            "gold-answer NLLs (" + ", ".join(DRIFT_MEASURES) + ") against the base. Dominated by: the "
            "methods at least as good on those three axes and better on one. Train s: the method's "
            "own training (stages 1-2 are shared and counted once, below)"
            + (f", with {settings['jobs']} jobs (trainings and evaluations) at a time, sharing the "
               "machine" if settings.get("jobs", 1) > 1 else "") + "; eval s: its evaluation; "
            "peak RSS of an inference-time method or the base: its evaluation process's.\n\n"
            f"{methods}\n\n{_timing(report['seconds'])}\n")
