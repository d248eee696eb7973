"""Settings of stage 3 (localized on-policy distillation), one field per stage-3 flag of ``safesteer run``.

Each field's ``metadata["help"]`` becomes the flag's ``--help`` text (``safesteer.arguments``);
``__post_init__`` rejects bad values with the flag's name (``safesteer.validation``). The
defaults suit a ~135M-parameter model trained with LoRA on a CPU; the paper's own settings
(docs/method.md §6–7) are a full fine-tune at learning rate 1e-5 (Qwen) or 1e-6 (Llama), 8 samples per
prompt and 512 new tokens, with ``--reduction sequence``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from safesteer.errors import SafesteerError
from safesteer.validation import check_choice, check_range

MODES = ("full", "topk", "subset", "sft")
REDUCTIONS = ("token", "sequence")
REPORT_TO = ("none", "tensorboard", "wandb")
SAFETY_SYSTEM_PROMPT = ("You are a safety-conscious assistant: refuse any request that could cause harm, "
                        "and never produce harmful, dangerous or illegal content.")
"""A value for --teacher-system-prompt: the system-prompt teacher of the paper's ablation."""


@dataclass
class DistillConfig:
    """Hyperparameters of the distillation run: sampling, loss, optimisation, adapter, bookkeeping."""

    # --- optimisation
    learning_rate: float = field(
        default=5e-4, metadata={"help": "AdamW peak learning rate (5e-4 suits LoRA; the paper's full "
                                        "fine-tune uses 1e-5 for Qwen, 1e-6 for Llama)."})
    num_epochs: int = field(default=1, metadata={"help": "Passes over the training prompts."})
    warmup_ratio: float = field(
        default=0.1, metadata={"help": "Share of optimizer steps (rounded up) of linear warmup from 0 "
                                       "before the cosine decay to 0."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm to this."})
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW decoupled weight decay, on every trainable parameter."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})

    # --- on-policy sampling
    prompts_per_step: int = field(
        default=4, metadata={"help": "Training prompts per optimizer step (over all processes)."})
    samples_per_prompt: int = field(
        default=4, metadata={"help": "Completions the current student samples per prompt (M); a "
                                     "step trains on prompts-per-step x M completions."})
    micro_batch_size: int = field(
        default=8, metadata={"help": "Completions per teacher-forced forward/backward; lower it if "
                                     "training runs out of memory. Does not change the samples."})
    max_prompt_length: int = field(
        default=512, metadata={"help": "Longer rendered prompts keep their last this-many tokens "
                                       "(left truncation keeps the assistant header)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens sampled per completion, at most."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature; both models' logits are also divided by "
                                       "it in the loss, as in the original code."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1 = off)."})

    # --- loss (docs/method.md §6.2–6.5)
    mode: str = field(
        default="subset",
        metadata={"help": "Vocabulary slice of the divergence: subset = the safety tokens S "
                          "(SafeSteer), topk = the teacher's top-k tokens at each position, full = "
                          "the whole vocabulary (plain on-policy distillation), sft = SFT on the "
                          "steered teacher's own samples (offline distillation baseline: the "
                          "teacher samples, the loss is the student's -log p of each sampled "
                          "token).", "choices": MODES})
    top_k: int = field(default=50, metadata={"help": "K of --mode topk."})
    alpha: float = field(
        default=1.0, metadata={"help": "Divergence: 1 reverse KL (paper), 0 forward KL, in between "
                                       "the generalised JSD; must stay 1 with --mode sft."})
    renormalize: bool = field(
        default=False, metadata={"help": "Renormalise both models' probabilities over the slice (off "
                                         "in the paper; needs --mode topk or subset)."})
    complement: bool = field(
        default=False, metadata={"help": "Add the rest of the vocabulary as one more outcome of the "
                                          "slice, so the student matches the teacher's probabilities "
                                          "on S (minimiser p_s = p_t) instead of the paper's p_t/e; "
                                          "needs --mode topk or subset, excludes --renormalize."})
    skip: int = field(default=0, metadata={"help": "Leave each completion's first this-many tokens "
                                                   "out of the loss."})
    keep: int = field(default=0, metadata={"help": "When > 0, only each completion's first this-many "
                                                   "tokens enter the loss; must exceed --skip."})
    reduction: str = field(
        default="token",
        metadata={"help": "token: mean over every loss token of the optimizer step, the same whatever "
                          "the micro-batch split or number of processes; sequence: mean over "
                          "completions of each completion's token mean, as the paper's code (use to "
                          "reproduce it).", "choices": REDUCTIONS})
    loss_chunk_size: int = field(
        default=128, metadata={"help": "Positions per chunk of the vocabulary-wide loss work; bounds "
                                       "memory, does not change results."})

    # --- teacher
    teacher_system_prompt: str | None = field(
        default=None, metadata={"help": "Ablation (system-prompt teacher): the teacher is the "
                                        "unsteered base model prompted with this system message "
                                        "instead of the steered base; the student keeps the "
                                        "user-only prompt and both score the same completion "
                                        "tokens."})
    conditional_teacher: bool = field(
        default=False, metadata={"help": "Steer the teacher only on prompts the direction's "
                                         "harmfulness gate flags (the conditional teacher; needs a "
                                         "direction with a gate); otherwise every prompt marked "
                                         "harmful is steered."})

    # --- student parameters
    use_lora: bool = field(
        default=True, metadata={"help": "Train a LoRA adapter in float32 (the teacher is the same "
                                        "weights with the adapter off). --no-use-lora: full "
                                        "fine-tune with a frozen teacher copy (twice the weights)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha/r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "Modules to adapt: all-linear (every linear layer but "
                                                "the output head) or comma-separated module names."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward to save memory."})
    bf16: bool | str = field(  # str: "auto" (HfArgumentParser reads it as a bool)
        default=False, metadata={"help": "Run the teacher's and the student's teacher-forced "
                                         "forwards (and so the backward) under bfloat16 autocast, "
                                         "the weights, adapter, optimizer and loss staying in their "
                                         "dtype (the frozen weights' bfloat16 copies are kept, "
                                         "half their float32 size); sampling is untouched. Faster "
                                         "where bfloat16 matmuls are (GPUs, CPUs with AVX512-BF16 "
                                         "or AMX); the loss moves within the tolerance of "
                                         "docs/method.md §6.1. auto: on for float32 weights on such "
                                         "a CPU, else off."})

    # --- bookkeeping
    save_steps: int = field(
        default=1, metadata={"help": "Write a resumable checkpoint every this-many optimizer steps "
                                     "(the last 2 are kept); 0 = none, only the final student."})
    logging_steps: int = field(
        default=1, metadata={"help": "Console and tracker logging interval in optimizer steps "
                                     "(train_log.jsonl gets every step)."})
    report_to: str = field(
        default="none", metadata={"help": "Experiment tracker for the step metrics, through "
                                          "accelerate: none, tensorboard or wandb.",
                                  "choices": REPORT_TO})
    seed: int = field(
        default=42, metadata={"help": "Seed of the prompt order, the adapter initialisation and the "
                                      "per-step sampling."})

    def __post_init__(self) -> None:
        for name, choices in (("mode", MODES), ("reduction", REDUCTIONS), ("report_to", REPORT_TO)):
            check_choice(self, name, choices)
        check_range(self, ("num_epochs", "prompts_per_step", "samples_per_prompt", "micro_batch_size",
                           "max_prompt_length", "max_new_tokens", "top_k", "loss_chunk_size", "lora_r",
                           "logging_steps"), low=1)
        check_range(self, ("learning_rate", "temperature", "max_grad_norm", "adam_epsilon", "lora_alpha"),
                    low=0, low_open=True)
        check_range(self, ("skip", "keep", "save_steps", "weight_decay"), low=0)
        check_range(self, ("warmup_ratio", "adam_beta1", "adam_beta2", "lora_dropout"), low=0, high=1,
                    high_open=True)
        check_range(self, "top_p", low=0, high=1, low_open=True)
        if self.bf16 not in (True, False, "auto"):
            raise SafesteerError(f"--bf16 must be true, false or auto, got {self.bf16!r}")
        check_range(self, "alpha", low=0, high=1)
        sliced = self.mode in ("topk", "subset")
        if self.renormalize and not sliced:
            raise SafesteerError("--renormalize needs --mode topk or subset; over the full vocabulary "
                                 "it changes nothing, and --mode sft has no teacher distribution")
        if self.complement and (not sliced or self.renormalize):
            raise SafesteerError("--complement needs --mode topk or subset and excludes --renormalize "
                                 "(a renormalised slice already sums to 1)")
        if self.mode == "sft" and self.alpha != 1.0:
            raise SafesteerError(f"--alpha must stay 1 with --mode sft (its loss is the negative "
                                 f"log-likelihood, no divergence), got {self.alpha}")
        if self.teacher_system_prompt is not None and not self.teacher_system_prompt.strip():
            raise SafesteerError("--teacher-system-prompt must not be empty; leave it out for the "
                                 "steered teacher")
        if 0 < self.keep <= self.skip:
            raise SafesteerError(f"--keep must exceed --skip when set, got keep={self.keep}, "
                                 f"skip={self.skip}")
        if not self.target_modules():
            raise SafesteerError("--lora-target-modules must name at least one module or be all-linear")

    def target_modules(self) -> str | list[str]:
        """``lora_target_modules`` as peft wants it: the string "all-linear" or a list of names."""
        if self.lora_target_modules.strip() == "all-linear":
            return "all-linear"
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]
