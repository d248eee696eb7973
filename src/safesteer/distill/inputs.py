"""What a distillation run trains on, checked and tokenised once before anything is written."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from accelerate.utils import is_tensorboard_available, is_wandb_available
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safesteer import __version__
from safesteer.direction.artifact import Direction
from safesteer.distill.config import DistillConfig
from safesteer.errors import SafesteerError
from safesteer.models.generation import eos_token_ids
from safesteer.models.rendering import render_prompts
from safesteer.validation import token_ids_problem

logger = logging.getLogger(__name__)


def check_inputs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, direction: Direction,
                 prompts: Sequence[str], steer_prompts: Sequence[bool],
                 safety_token_ids: Sequence[int] | None, config: DistillConfig) -> None:
    """Raise SafesteerError on anything the run would otherwise fail on later, or train wrongly."""
    if not prompts:
        raise SafesteerError("no training prompts: the distillation prompt set is empty")
    if len(steer_prompts) != len(prompts):
        raise SafesteerError(f"steer_prompts has {len(steer_prompts)} labels for "
                             f"{len(prompts)} training prompts; give one per prompt")
    if config.conditional_teacher and direction.gate is None:
        raise SafesteerError(
            "--conditional-teacher: the direction has no harmfulness gate; re-run stage 1 "
            f"(`safesteer direction`) to make a direction with one (safesteer >= {__version__})")
    if isinstance(model, PeftModel):
        raise SafesteerError("pass the base model, not a PeftModel: the trainer adds the adapter")
    vocab = model.config.get_text_config().vocab_size
    ids = safety_token_ids
    if config.mode == "subset" and not ids:
        raise SafesteerError("--mode subset needs the safety tokens S, and the set is empty; run "
                             "the token selection first or choose --mode full/topk")
    if ids is not None and (problem := token_ids_problem(ids, vocab)):
        raise SafesteerError(f"safety token {problem}")
    if config.mode == "topk" and config.top_k > vocab:
        raise SafesteerError(f"--top-k {config.top_k} exceeds the vocabulary size {vocab}")
    if config.report_to == "tensorboard" and not is_tensorboard_available():
        raise SafesteerError("--report-to tensorboard needs the tensorboard package installed")
    if config.report_to == "wandb" and not is_wandb_available():
        raise SafesteerError("--report-to wandb needs the wandb package installed")
    if tokenizer.pad_token_id is None:
        raise SafesteerError("the tokenizer has no pad token; load the model with load_model()")


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The EOS ids sampling stops at and the loss masks after; a run cannot do without one."""
    ids = eos_token_ids(model, tokenizer)
    if not ids:
        raise SafesteerError("neither the tokenizer nor the generation config defines an EOS token")
    return ids


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_prompt_length: int,
                     system_prompt: str | None = None) -> list[list[int]]:
    """Render and tokenise every prompt once (docs/method.md §9.2), keeping the last
    ``max_prompt_length`` ids.

    Left truncation keeps the end of the template (the assistant header) that the answer must
    follow (docs/method.md §9.3); the same ids are used for sampling and scoring. ``system_prompt``
    gives the system-prompted teacher's version of the prompts.
    """
    encoded = tokenizer(render_prompts(tokenizer, prompts, system_prompt),
                        add_special_tokens=False)["input_ids"]
    truncated = sum(len(ids) > max_prompt_length for ids in encoded)
    what = "training prompts" if system_prompt is None else "system-prompted teacher prompts"
    if truncated:
        logger.warning("%d of %d %s are longer than --max-prompt-length %d tokens; keeping their "
                       "last %d tokens", truncated, len(encoded), what, max_prompt_length,
                       max_prompt_length)
    return [ids[-max_prompt_length:] for ids in encoded]
