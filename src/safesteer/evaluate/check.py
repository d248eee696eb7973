"""Before/after refusal check: base, steered teacher and student scored identically.

With a LoRA student the three targets share one set of weights: the base is the model with the
adapter disabled, the teacher is that plus the steering hook, and the student is the model as is.
This module is the quick check that ``safesteer run`` ends with; ``safesteer eval`` is
:mod:`safesteer.evaluate.harness`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from safesteer.evaluate.targets import Target
from safesteer.keyword_judge import WINDOW, refusal_rate
from safesteer.models.generation import generate_responses

# Characters generated past the judge's window before a row stops: a cut answer decodes
# differently only at its end (a character split across tokens, a space the whole answer would
# lose), so its first WINDOW characters, and so every verdict, are those of the whole answer.
STOP_MARGIN = 16


def refusal_check(tokenizer: Any, targets: dict[str, Target],
                  prompt_sets: dict[str, list[str]], *, max_new_tokens: int,
                  batch_size: int) -> dict[str, dict[str, dict[str, float]]]:
    """Greedy answers of every target to every prompt set, judged by the keyword judge.

    ``targets`` maps a name to a factory of a context that yields the model as that target. An
    answer stops once it is longer than the judge's window (no answer is kept), so the rates
    are those of the full ``max_new_tokens`` answers in fewer steps.
    Returns ``{target: {prompt_set: {"n": count, "refusal": rate}}}``.
    """
    results: dict[str, dict[str, dict[str, float]]] = {}
    for target, context in targets.items():
        results[target] = {}
        for name, prompts in prompt_sets.items():
            with context() as model:
                answers = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                             batch_size=batch_size, stop_at_chars=WINDOW + STOP_MARGIN,
                                             desc=f"{target}: {name}")
            results[target][name] = {"n": len(prompts), "refusal": refusal_rate(answers)}
    return results


def refusal_table(results: dict[str, dict[str, dict[str, float]]], benign: Sequence[str] = ()) -> str:
    """Markdown table: one row per prompt set, one refusal-rate column per target, and, given the
    ``benign`` sets, a last row with each target's worst of them (a mean would hide it)."""
    targets = list(results)
    sets = list(next(iter(results.values()))) if results else []
    lines = ["| prompt set | n | " + " | ".join(targets) + " |",
             "|---|---:|" + "---:|" * len(targets)]
    for name in sets:
        rates = " | ".join(f"{results[target][name]['refusal']:.1%}" for target in targets)
        lines.append(f"| {name} | {results[targets[0]][name]['n']:.0f} | {rates} |")
    if benign:
        worst = [max(benign, key=lambda name, target=target: results[target][name]["refusal"])
                 for target in targets]
        cells = " | ".join(f"{results[target][name]['refusal']:.1%} ({name})"
                           for target, name in zip(targets, worst, strict=True))
        lines.append(f"| worst benign set ↓ | | {cells} |")
    return "\n".join(lines)
