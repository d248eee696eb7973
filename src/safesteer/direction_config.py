"""Settings of stage 1 (refusal direction and steering coefficient), apart from the code that uses
them so that the command line can list and check them without loading torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from safesteer.validation import check_choice, check_not_empty, check_range

METHODS = ("auto", "prompt", "response")


@dataclass
class DirectionConfig:
    """Settings of stage 1 (refusal direction and steering coefficient)."""

    method: str = field(
        default="auto",
        metadata={"help": "prompt (Arditi), response (refusing vs complying answers), or auto: "
                          "prompt when a candidate passes its filters, else response.",
                  "choices": METHODS},
    )
    harmful_train: str = field(default="direction-harmful-train",
                               metadata={"help": "Harmful prompts for extraction (name or file)."})
    harmless_train: str = field(default="direction-harmless-train",
                                metadata={"help": "Harmless prompts for extraction."})
    harmful_val: str = field(default="direction-harmful-val",
                             metadata={"help": "Harmful prompts for candidate selection."})
    harmless_val: str = field(default="direction-harmless-val",
                              metadata={"help": "Harmless prompts for candidate selection."})
    n_train: int = field(default=128, metadata={"help": "Prompts per side for extraction."})
    n_val: int = field(default=32, metadata={"help": "Prompts per side for prompt-method scores."})
    batch_size: int = field(default=32, metadata={"help": "Prompts per forward pass."})
    filter_by_score: bool = field(
        default=True,
        metadata={"help": "Keep only harmful prompts the model refuses and harmless ones it answers "
                          "(refusal score > 0 / < 0); skipped with a warning when too few remain."},
    )
    kl_threshold: float = field(default=0.1, metadata={"help": "Prompt method: max KL on harmless "
                                                               "prompts under ablation."})
    prune_layer_fraction: float = field(
        default=0.2, metadata={"help": "Prompt method: discard candidates in the last fraction of "
                                       "layers."})
    induce_screen_prompts: int = field(
        default=8, metadata={"help": "Prompt method: first score each candidate's induce on this many "
                                     "harmless validation prompts and discard it when that mean is below "
                                     "-induce-screen-margin, without the full evaluation (0 = exact "
                                     "procedure, every candidate on every prompt)."})
    induce_screen_margin: float = field(
        default=2.0, metadata={"help": "Prompt method: refusal-score margin of the induce screen (the full "
                                       "filter is induce >= 0)."})
    response_n_train: int = field(default=64, metadata={"help": "Response method: prompts whose "
                                                                "templated answers are contrasted."})
    response_layers: list[int] | None = field(
        default=None, metadata={"help": "Response method: layers to try (default: every "
                                        "--response-layer-stride-th layer in [0.2 L, 0.8 L))."})
    response_layer_stride: int = field(default=2, metadata={"help": "Response method: layer step."})
    response_betas: list[float] = field(
        default_factory=lambda: [0.1, 0.2, 0.3],
        metadata={"help": "Response method: coefficients as fractions of the mean residual norm "
                          "at the steered layer."})
    response_n_val: int = field(default=16, metadata={"help": "Response method: validation prompts "
                                                              "per side, answered by generation."})
    val_max_new_tokens: int = field(default=16, metadata={"help": "Tokens generated per validation "
                                                              "answer when judging refusal."})
    gate_n_val: int = field(
        default=64, metadata={"help": "Validation prompts per side on which the harmfulness gate of "
                                      "the conditional teacher picks its layer and threshold."})
    gate_harmful_train: str | None = field(default=None, metadata={
        "help": "Harmful prompts the gate's probe is fitted on (default: --harmful-train). A gate "
                "fitted on one style (AdvBench instructions) misses others (questions): give diverse "
                "sets, comma-separated, e.g. direction-harmful-train,safesteer-train,"
                "borderline-unsafe-train."})
    gate_harmless_train: str | None = field(default=None, metadata={
        "help": "Benign prompts the gate's probe is fitted on (default: --harmless-train), e.g. "
                "direction-harmless-train,borderline-train."})
    gate_harmful_val: str | None = field(default=None, metadata={
        "help": "Harmful prompts the gate's layer and threshold are chosen on (default: --harmful-val)."})
    gate_harmless_val: str | None = field(default=None, metadata={
        "help": "Benign prompts the gate's layer and threshold are chosen on (default: --harmless-val), "
                "e.g. ordinary-val,borderline-val."})
    target_refusal: float = field(
        default=0.9,
        metadata={"help": "Response method: among candidates refusing at least this share of "
                          "harmful validation prompts, take the one refusing the fewest benign ones."
                 })

    def __post_init__(self) -> None:
        check_choice(self, "method", METHODS)
        check_range(self, ("n_train", "n_val", "batch_size", "response_n_train", "response_n_val",
                           "val_max_new_tokens", "response_layer_stride", "gate_n_val"), low=1)
        check_range(self, ("kl_threshold", "induce_screen_prompts", "induce_screen_margin",
                           "response_layers"), low=0)
        check_range(self, "prune_layer_fraction", low=0, high=1, high_open=True)
        check_range(self, "target_refusal", low=0, high=1)
        check_range(self, "response_betas", low=0, low_open=True)
        check_not_empty(self, ("harmful_train", "harmless_train", "harmful_val", "harmless_val",
                               "response_betas", "gate_harmful_train", "gate_harmless_train",
                               "gate_harmful_val", "gate_harmless_val"))

    def prompt_sets(self) -> list[str | None]:
        """Every prompt set stage 1 reads (None where a gate set falls back to another)."""
        return [self.harmful_train, self.harmless_train, self.harmful_val, self.harmless_val,
                self.gate_harmful_train, self.gate_harmless_train, self.gate_harmful_val,
                self.gate_harmless_val]
