"""The sections of a run directory: its settings, training curves, safety tokens, costs and the
before/after check (docs/method.md names the stages).

Read from the artifacts as JSON only, never through the training code, so any run directory
(an interrupted one included) can be shown; a stage that has not written its file yet is said to
be missing rather than failing the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safesteer.htmlreport.page import Markup, definitions, figures, note, number, percent, section, table, tag
from safesteer.htmlreport.sources import TRAIN_LOG, load, load_lines
from safesteer.htmlreport.svg import line_chart

Section = tuple[str, str, Markup]  # (anchor, title, body)

# The train_log.jsonl curves: chart title, y label and the logged keys drawn on it.
CURVES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("loss", "loss", ("loss",)),
    ("KL(student ‖ teacher), k3 estimate", "nats / token", ("kl_k3",)),
    ("probability mass on S", "mass / token", ("student_mass_s", "teacher_mass_s")),
    ("refusal rate of the samples", "keyword judge", ("refusal_rate",)),
    ("learning rate", "", ("lr",)),
    ("gradient norm", "before clipping", ("grad_norm",)),
)
TOKEN_ROWS = 25  # a longer token table continues in a column beside it
SERIES_NAMES = {"student_mass_s": "student", "teacher_mass_s": "teacher"}


def settings(directory: Path) -> list[tuple[str, str]]:
    """The settings that matter when reading the results, as (name, value) text."""
    direction = load(directory / "direction.json") or {}
    tokens = load(directory / "safety_tokens.json") or {}
    distill = load(directory / "distill_config.json") or {}
    inputs = load(directory / "distill_inputs.json") or {}
    steps = [record["step"] for record in load_lines(directory / TRAIN_LOG) if "step" in record]
    pairs: list[tuple[str, str]] = [("model", str(direction.get("model", inputs.get("model", "—"))))]
    if direction:
        selected = direction.get("selected") or {}
        pairs.append(
            (
                "direction",
                f"{direction.get('method')} method, layer {direction.get('layer')}, "
                f"β {direction.get('beta')}, coefficient {number(direction.get('coefficient'))}",
            )
        )
        if "harmful_refusal" in selected:
            pairs.append(
                (
                    "steered refusal (validation)",
                    f"harmful {percent(selected['harmful_refusal'], 0)}, "
                    f"harmless {percent(selected.get('harmless_refusal'), 0)}",
                )
            )
    if tokens:
        aggregation = (tokens.get("settings") or {}).get("aggregation", "?")
        pairs.append(("safety tokens |S|", f"{len(tokens.get('ids', []))} (by {aggregation})"))
    if distill:
        mode = distill.get("mode", "?")
        detail = f", top-k {distill['top_k']}" if mode != "subset" and "top_k" in distill else ""
        pairs.append(
            (
                "loss",
                f"{mode}{detail}, α {distill.get('alpha')}, complement "
                f"{'on' if distill.get('complement') else 'off'}, reduction {distill.get('reduction')}",
            )
        )
        pairs.append(
            (
                "optimisation",
                f"learning rate {distill.get('learning_rate')}, "
                f"{distill.get('prompts_per_step')} prompts × {distill.get('samples_per_prompt')} "
                f"samples per step, {distill.get('max_new_tokens')} new tokens",
            )
        )
        lora = (
            f"LoRA r {distill.get('lora_r')}, α {distill.get('lora_alpha')}"
            if distill.get("use_lora")
            else "full fine-tune"
        )
        pairs.append(("student", lora))
    if inputs:
        pairs.append(
            (
                "training prompts",
                f"{inputs.get('num_prompts')} ({inputs.get('num_steer_prompts')} "
                "taught by the steered teacher)",
            )
        )
    pairs.append(("steps logged", str(max(steps)) if steps else "none yet"))
    return pairs


def curves(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """One SVG line chart per logged quantity, against the step; quantities never logged are skipped."""
    steps = [record for record in records if "step" in record]
    charts = []
    for title, y_label, keys in CURVES:
        present = [key for key in keys if any(key in record for record in steps)]
        if present:
            series = {
                SERIES_NAMES.get(key, key): [
                    (float(record["step"]), float(record[key]))
                    for record in steps
                    if record.get(key) is not None
                ]
                for key in present
            }
            charts.append(line_chart(title, series, "step", y_label))
    return charts


def visible(token: str) -> str:
    """A token as text with its whitespace shown (␣ for a space, ⏎ for a newline)."""
    return token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "(empty)"


def token_table(tokens: Mapping[str, Any]) -> Markup:
    ids, strings = tokens.get("ids", []), tokens.get("strings", [])
    scores = tokens.get("scores") or [None] * len(ids)
    teacher = tokens.get("teacher_mean_probs") or [None] * len(ids)
    base = tokens.get("base_mean_probs") or [None] * len(ids)
    rows = [
        [
            str(rank),
            visible(text),
            str(token_id),
            number(score, 0) if score is not None else "—",
            number(p_teacher, 4),
            number(p_base, 4),
            number(p_teacher / p_base, 1) if p_teacher is not None and p_base else "—",
        ]
        for rank, (token_id, text, score, p_teacher, p_base) in enumerate(
            zip(ids, strings, scores, teacher, base, strict=False), 1
        )
    ]
    header = ["#", "token", "id", "votes", "teacher p", "base p", "teacher / base"]
    halves = [rows[start : start + TOKEN_ROWS] for start in range(0, len(rows), TOKEN_ROWS)]
    return tag("div", *(table(header, half, numeric_from=2) for half in halves), class_="columns")


def costs(check: Mapping[str, Any]) -> Markup:
    stages = check.get("stage_seconds") or {}
    rows = [[stage, f"{seconds:.1f}"] for stage, seconds in stages.items()]
    if stages:
        rows.append(["total", f"{sum(stages.values()):.1f}"])
    memory = [
        ("peak resident memory", f"{check['peak_rss_mib']:.0f} MiB" if check.get("peak_rss_mib") else "—"),
        (
            "peak GPU memory",
            f"{check['peak_gpu_mib']:.0f} MiB" if check.get("peak_gpu_mib") else "— (not on a GPU)",
        ),
    ]
    return Markup(table(["stage", "wall seconds"], rows) + definitions(memory))


def check_table(check: Mapping[str, Any]) -> Markup:
    """The before/after refusal check: one row per prompt set, one column per target."""
    results = check.get("refusal") or {}
    if not results:
        return note("No before/after check in this run (it ran with --check-limit 0, or has not finished).")
    targets = list(results)
    benign = set(check.get("benign_sets", []))
    sets = list(results[targets[0]])
    rows = [
        [
            name,
            "benign ↓" if name in benign else "harmful ↑",
            f"{results[targets[0]][name]['n']:.0f}",
            *(percent(results[target][name]["refusal"]) for target in targets),
        ]
        for name in sets
    ]
    return Markup(
        table(["prompt set", "kind", "n", *targets], rows, numeric_from=2)
        + note(
            f"Refusal rate by the {check.get('judge', 'keyword judge')} on greedy "
            f"{check.get('max_new_tokens', '?')}-token answers."
        )
    )


def run_sections(
    directory: Path, prefix: str = "run", level: int = 2, only: Sequence[str] | None = None
) -> list[Section]:
    """The run's sections (``only`` those named, of settings, curves, tokens, costs and check),
    their anchors starting with ``prefix``."""
    check = load(directory / "check.json") or {}
    tokens = load(directory / "safety_tokens.json")
    records = load_lines(directory / TRAIN_LOG)
    charts = curves(records)
    parts: list[tuple[str, str, Markup]] = [
        ("settings", "Run settings", definitions(settings(directory))),
        (
            "curves",
            "Training curves",
            figures(charts, "Per step, from train_log.jsonl; S is the safety-token set.")
            if charts
            else note("No training step logged yet."),
        ),
        (
            "tokens",
            "Safety tokens",
            token_table(tokens) if tokens else note("No safety_tokens.json yet (stage 2 has not run)."),
        ),
        (
            "costs",
            "Wall time and memory",
            costs(check) if check else note("No check.json yet: the run has not finished."),
        ),
        ("check", "Before/after check", check_table(check)),
    ]
    return [
        (f"{prefix}-{anchor}", title, section(f"{prefix}-{anchor}", title, body, level=level))
        for anchor, title, body in parts
        if only is None or anchor in only
    ]
