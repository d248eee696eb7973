"""Settings of stage 2 (safety-token selection by vote), apart from the code that uses them so
that the command line can list and check them without loading torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from safesteer.errors import SafesteerError
from safesteer.validation import check_choice, check_not_empty, check_range

AGGREGATIONS = ("vote", "mean")


@dataclass
class TokensConfig:
    """Settings of stage 2 (safety-token selection by vote, docs/method.md §5)."""

    vote_prompts: str = field(
        default="direction-harmless-val",
        metadata={"help": "Prompts the steered rollouts answer (registry name or file); the "
                          "original code uses the filtered harmless-val prompts."},
    )
    vote_n_prompts: int = field(default=32, metadata={"help": "Use at most this many prompts."})
    vote_samples_per_prompt: int = field(default=8,
                                         metadata={"help": "Steered rollouts per prompt (N)."})
    horizon: int = field(
        default=5,
        metadata={"help": "Answer positions scored per rollout (H): the last prompt position and "
                          "H-1 sampled tokens. The paper uses 7 for Qwen and 5 for Llama."},
    )
    inner_top_k: int = field(
        default=200, metadata={"help": "Tokens each valid position votes for: its K' highest "
                                       "contrasts log p_teacher - log p_base."})
    num_safety_tokens: int = field(default=50, metadata={"help": "Most safety tokens kept (K)."})
    p_min: float = field(
        default=1e-6,
        metadata={"help": "Ban tokens whose mean steered-teacher probability is below this "
                          "(paper: 1e-8 for Qwen, 1e-7 for Llama)."},
    )
    aggregation: str = field(
        default="vote",
        metadata={"help": "vote (paper): most-voted tokens; mean (legacy): highest mean contrast.",
                  "choices": AGGREGATIONS},
    )
    vote_temperature: float = field(default=1.0,
                                    metadata={"help": "Sampling temperature of the rollouts."})
    vote_top_p: float = field(default=1.0,
                              metadata={"help": "Nucleus mass of the rollouts (1 = off)."})
    vote_batch_size: int = field(default=32, metadata={"help": "Rollout rows per forward pass."})
    min_safety_tokens: int = field(
        default=1, metadata={"help": "Fail when fewer safety tokens than this survive the votes "
                                     "and the banned set."})
    vote_seed: int = field(default=42, metadata={"help": "Seed of the rollout sampling (a local "
                                                         "generator; the global RNG is untouched)."})

    def __post_init__(self) -> None:
        check_choice(self, "aggregation", AGGREGATIONS)
        check_not_empty(self, "vote_prompts")
        check_range(self, ("vote_n_prompts", "vote_samples_per_prompt", "horizon", "inner_top_k",
                           "num_safety_tokens", "vote_batch_size", "min_safety_tokens"), low=1)
        check_range(self, "p_min", low=0, high=1, high_open=True)
        check_range(self, "vote_temperature", low=0, low_open=True)
        check_range(self, "vote_top_p", low=0, high=1, low_open=True)
        if self.min_safety_tokens > self.num_safety_tokens:
            raise SafesteerError(f"--min-safety-tokens ({self.min_safety_tokens}) must not exceed "
                                 f"--num-safety-tokens ({self.num_safety_tokens})")
