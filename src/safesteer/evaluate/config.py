"""What ``safesteer eval`` evaluates: its arguments, and how a ``--targets`` entry reads.

Imports nothing heavy (the registry of :mod:`safesteer.evaluate.benchmarks` and the judge formats
are plain data), so ``safesteer eval --help`` and every check of these options run without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from safesteer.config import GENERATION_DTYPES
from safesteer.errors import SafesteerError
from safesteer.evaluate.benchmarks import BENCHMARKS, DEFAULT_BENCHMARKS, RUN_DIRECTION_BENCHMARKS, lookup
from safesteer.evaluate.judge_formats import JUDGE_FORMATS
from safesteer.validation import check_choice, check_range

BUILT_IN_TARGETS = ("base", "teacher", "conditional-teacher", "student")
DEFAULT_TARGETS = ("base", "teacher", "student")


def split_target(spec: str) -> tuple[str, str]:
    """A ``--targets`` entry as (display name, what to evaluate): ``NAME=TARGET`` is shown as NAME,
    any other entry as itself."""
    name, equals, source = spec.partition("=")
    return (name, source) if equals else (spec, spec)


@dataclass
class EvalArguments:
    """What to evaluate, on which benchmarks, how much of each."""

    output_dir: str = field(metadata={"help": "Directory for results.json, results.md, the plots and "
                                              "(unless --completions-dir) the saved completions."})
    completions_dir: str | None = field(default=None, metadata={
        "help": "Directory of the saved completions (default: OUTPUT_DIR/completions). Evaluations "
                "that share one reuse each other's answers, as those of `safesteer compare` reuse "
                "the base model's answers that kl-benign and benign-nll score."})
    targets: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        metadata={"help": "base (--model), teacher (base + the direction of --run-dir), "
                          "conditional-teacher (the teacher steering only the prompts the "
                          "direction's harmfulness gate flags), student (--run-dir/student), or a "
                          "model directory / LoRA adapter directory / hub id, evaluated the same "
                          "way. NAME=TARGET shows TARGET under NAME (in the tables and the saved "
                          "completions), e.g. opd=runs/opd/student."})
    run_dir: str | None = field(default=None, metadata={"help": "A `safesteer run` directory: its "
                                                                 "direction and student."})
    benchmarks: list[str] = field(
        default_factory=lambda: list(DEFAULT_BENCHMARKS),
        metadata={"help": "Benchmarks to run: " + ", ".join(BENCHMARKS) + "; or a local prompt "
                          "file of harmful requests (.json/.jsonl/.csv/.txt), scored like the "
                          "safety benchmarks. Default: " + ", ".join(DEFAULT_BENCHMARKS) + " (without "
                          "direction-ablation when there is no --run-dir)."})
    limit: int = field(default=50, metadata={"help": "Prompts per safety, jailbreak and over-refusal "
                                                     "benchmark (seeded sample; 0 = all)."})
    capability_limit: int = field(default=64, metadata={"help": "Items per capability benchmark "
                                                                 "(seeded sample; 0 = all)."})
    gsm8k_limit: int = field(default=20, metadata={"help": "GSM8K problems answered by generation "
                                                           "(0 = all 100)."})
    max_new_tokens: int = field(default=64, metadata={
        "help": "Tokens generated per safety, jailbreak and over-refusal answer. The keyword judge "
                "reads its first 200 characters (about 50 tokens), so shorter answers hide refusals "
                "that follow a helpful opening."})
    gsm8k_max_new_tokens: int = field(default=256, metadata={"help": "Tokens per GSM8K / HumanEval "
                                                                     "answer."})
    eval_batch_size: int = field(default=64, metadata={
        "help": "Prompts per generation batch. A CPU decode step costs about as much for 8 rows as "
                "for 40, so one batch per benchmark is fastest."})
    score_batch_size: int = field(
        default=8, metadata={"help": "Rows per teacher-forced forward (MMLU letters, gold-answer NLLs, "
                                     "kl-benign). Each row's logits span the whole vocabulary, so on a "
                                     "CPU small batches are faster and use less memory; raise it on "
                                     "a GPU."})
    score_dtype: str = field(default="model", metadata={
        "help": "Dtype of the linear products of the teacher-forced measures (MMLU letters, gold-answer "
                "NLLs, kl-benign): model (the weights' own), bfloat16 (bfloat16 copies of float32 "
                "weights; about 2x faster on CPUs with AVX512-BF16 or AMX, NLLs move by up to about "
                "2 percent, docs/method.md §8), auto (bfloat16 on such a CPU, else model).",
        "choices": GENERATION_DTYPES})
    exclude_near: list[str] = field(
        default_factory=lambda: ["safesteer-train", "direction-harmful-train", "direction-harmful-val"],
        metadata={"help": "Prompt sets the models were trained or selected on: harmful benchmark "
                          "prompts with Jaccard >= 0.6 to any of them are dropped and counted."})
    benign_reference: str = field(default="ordinary-test", metadata={
        "help": "Benign prompts whose base-model answers kl-benign and benign-nll score (use "
                "ordinary-val when choosing settings)."})
    attack_prompts: str = field(default="harmbench-test", metadata={
        "help": "Harmful prompts the robustness benchmarks (direction-ablation, "
                "own-direction-ablation, prefill) attack; each is compared with the same target's "
                "refusal of these prompts unattacked."})
    own_direction_prompts: int = field(default=32, metadata={
        "help": "Prompts per side (direction-harmful-train, direction-harmless-train) from which "
                "own-direction-ablation extracts each target's own refusal direction."})
    own_direction_layer: int | None = field(default=None, metadata={
        "help": "Block whose input gives the target's own refusal direction (default: the layer of "
                "--run-dir's direction, else the middle block)."})
    finetune_steps: int = field(default=20, metadata={
        "help": "harmful-finetune: LoRA steps (AdamW) on harmful request/compliance pairs."})
    finetune_examples: int = field(default=16, metadata={
        "help": "harmful-finetune: pairs, the first N direction-harmful-train prompts each with a "
                "compliant opener (no harmful content)."})
    finetune_learning_rate: float = field(default=2e-4, metadata={"help": "harmful-finetune: learning rate."})
    finetune_rank: int = field(default=8, metadata={
        "help": "harmful-finetune: LoRA rank (alpha = 2 x rank)."})
    eval_seed: int = field(default=42, metadata={"help": "Seed of the benchmark samples."})
    judge_model: str | None = field(
        default=None, metadata={"help": "A local safety-classifier model (e.g. Llama Guard 3) that "
                                        "also judges every safety, jailbreak and over-refusal "
                                        "answer; its harmful-response rate is reported beside the "
                                        "keyword refusal rate."})
    judge_format: str = field(default="llama-guard-3", metadata={
        "help": "Prompt format of --judge-model: " + ", ".join(JUDGE_FORMATS)})
    lm_eval_tasks: str | None = field(
        default=None, metadata={"help": "Comma-separated lm-evaluation-harness tasks: writes "
                                        "lm_eval/commands.sh (one lm-eval call per target) and the "
                                        "teacher in lm-eval's `steered` format; run it where lm-eval "
                                        "and the hub are available."})

    def completions_path(self) -> Path:
        """Where the answers are saved: --completions-dir, else OUTPUT_DIR/completions."""
        return Path(self.completions_dir or Path(self.output_dir) / "completions")

    def __post_init__(self) -> None:
        # Both "--targets base teacher" and "--targets base,teacher" work.
        self.targets = [name for entry in self.targets for name in entry.split(",") if name]
        self.benchmarks = [name for entry in self.benchmarks for name in entry.split(",") if name]
        for name in [*self.benchmarks, self.benign_reference]:
            lookup(name)
        if lookup(self.attack_prompts).kind not in ("safety", "jailbreak"):
            raise SafesteerError(f"--attack-prompts {self.attack_prompts}: the robustness benchmarks "
                                 "attack harmful prompts; name a safety or jailbreak benchmark")
        if self.run_dir is None and self.benchmarks == DEFAULT_BENCHMARKS:
            # Without a run there is no run direction to ablate: the default list goes without it.
            self.benchmarks = [name for name in self.benchmarks if name not in RUN_DIRECTION_BENCHMARKS]
        needs_run = [name for name in self.benchmarks if name in RUN_DIRECTION_BENCHMARKS]
        if needs_run and self.run_dir is None:
            raise SafesteerError(f"--benchmarks {', '.join(needs_run)} ablates the direction of a run: "
                                 "give --run-dir (own-direction-ablation needs none)")
        check_choice(self, "score_dtype", GENERATION_DTYPES)
        if not self.targets:
            raise SafesteerError("--targets needs at least one target")
        names = []
        for spec in self.targets:
            name, source = split_target(spec)
            if not name or not source:
                raise SafesteerError(f"--targets: expected NAME=TARGET with both parts, got {spec!r}")
            if name in BUILT_IN_TARGETS and source != name:
                raise SafesteerError(f"--targets: {name!r} is the built-in target of that name; "
                                     f"choose another name for {spec!r}")
            names.append(name)
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise SafesteerError(f"--targets: each target needs its own name; {', '.join(duplicates)} "
                                 "appear(s) twice (give one NAME=TARGET)")
        check_choice(self, "judge_format", JUDGE_FORMATS)
        check_range(self, ("limit", "capability_limit", "gsm8k_limit"), low=0)
        check_range(self, ("own_direction_prompts", "finetune_steps", "finetune_examples", "finetune_rank"),
                    low=1)
        check_range(self, ("finetune_learning_rate",), low=0, low_open=True)
        check_range(self, ("own_direction_layer",), low=0)
        check_range(self, ("max_new_tokens", "gsm8k_max_new_tokens", "eval_batch_size", "score_batch_size"),
                    low=1)
