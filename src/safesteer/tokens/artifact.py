"""Stage 2's artifact: the frozen safety-token set S with the evidence for it, saved as
``safety_tokens.json`` for the distillation stage (docs/method.md §5 step 10).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safesteer.errors import SafesteerError
from safesteer.io import read_json, write_json
from safesteer.validation import token_ids_problem

SAFETY_TOKENS_FILE = "safety_tokens.json"
_TOKEN_COLUMN = 24


@dataclass
class SafetyTokenSet:
    """The frozen safety-token set S (docs/method.md §5 step 10), best first; ``safety_tokens.json``.

    ``scores`` are votes (aggregation "vote") or mean contrasts in nats ("mean");
    ``teacher_mean_probs``/``base_mean_probs`` are p̄_t and p̄_0 over the valid pairs. ``settings``
    records how S was chosen: the :class:`TokensConfig`, end-of-turn ids, pair counts, the prompts'
    sha256 and the steering layer and coefficient.
    """

    ids: list[int]
    strings: list[str]
    scores: list[float]
    teacher_mean_probs: list[float]
    base_mean_probs: list[float]
    settings: dict[str, Any] = field(default_factory=dict)

    def save(self, output_dir: str | Path) -> Path:
        path = Path(output_dir) / SAFETY_TOKENS_FILE
        write_json(path, asdict(self))
        return path

    @classmethod
    def load(cls, path: str | Path) -> SafetyTokenSet:
        """Load from a run directory or its ``safety_tokens.json``."""
        path = Path(path)
        file = path / SAFETY_TOKENS_FILE if path.is_dir() else path
        if not file.is_file():
            raise SafesteerError(f"{file} does not exist; run `safesteer tokens` first or give a run "
                                 f"directory holding {SAFETY_TOKENS_FILE}")
        payload = read_json(file)
        lists = ("ids", "strings", "scores", "teacher_mean_probs", "base_mean_probs")
        if (not isinstance(payload, dict) or not isinstance(payload.get("settings"), dict)
                or any(not isinstance(payload.get(name), list) for name in lists)):
            raise SafesteerError(f"{file}: not a safety-token file (needs the lists "
                                 f"{', '.join(lists)} and a settings object)")
        if len({len(payload[name]) for name in lists}) != 1:
            raise SafesteerError(f"{file}: the lists {', '.join(lists)} differ in length")
        if problem := token_ids_problem(payload["ids"]):
            raise SafesteerError(f"{file}: {problem}")
        if not all(isinstance(text, str) for text in payload["strings"]):
            raise SafesteerError(f"{file}: strings must be strings")
        return cls(**{name: payload[name] for name in (*lists, "settings")})

    def table(self) -> str:
        """Fixed-width table of S for the terminal: rank, id, token repr, score, p̄_0, p̄_t."""
        score_name = "votes" if self.settings.get("aggregation", "vote") == "vote" else "mean_delta"
        header = (f"{'rank':>4}  {'id':>7}  {'token':<{_TOKEN_COLUMN}}  {score_name:>10}  "
                  f"{'mean_p_base':>11}  {'mean_p_teacher':>14}")
        lines = [header, "-" * len(header)]
        rows = zip(self.ids, self.strings, self.scores, self.base_mean_probs,
                   self.teacher_mean_probs, strict=True)
        for rank, (token_id, text, score, base, teacher) in enumerate(rows, start=1):
            shown = repr(text)
            if len(shown) > _TOKEN_COLUMN:
                shown = shown[:_TOKEN_COLUMN - 1] + "…"
            score_text = f"{score:.0f}" if score_name == "votes" else f"{score:.4f}"
            lines.append(f"{rank:>4}  {token_id:>7}  {shown:<{_TOKEN_COLUMN}}  {score_text:>10}  "
                         f"{base:>11.3e}  {teacher:>14.3e}")
        return "\n".join(lines)
