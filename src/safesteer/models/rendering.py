"""Prompts as the model reads them: rendered through the tokenizer's chat template, tokenized
left-padded, with positions that ignore the padding."""

from __future__ import annotations

import jinja2
import torch
from transformers import BatchEncoding, PreTrainedTokenizerBase

from safesteer.errors import SafesteerError


def render_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    system_prompt: str | None = None,
    prefixes: list[str] | None = None,
) -> list[str]:
    """Each prompt as a single user turn in the tokenizer's chat template, ready for the answer.

    Without ``system_prompt`` no system message is sent, so templates that insert a default one
    (SmolLM2 does) still do. ``prefixes`` pre-fill the assistant turn (the prefilling attack,
    docs/method.md §8): the template renders each as the start of the answer, with no end-of-turn
    token, so the model continues it.
    """
    if not tokenizer.chat_template:
        raise SafesteerError("model has no chat template; pass --chat-template PATH (a Jinja file)")
    if prefixes is not None and len(prefixes) != len(prompts):
        raise SafesteerError(f"{len(prefixes)} answer prefixes for {len(prompts)} prompts")
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    rendered = []
    for index, prompt in enumerate(prompts):
        conversation = [*system, {"role": "user", "content": prompt}]
        if prefixes is not None:
            conversation.append({"role": "assistant", "content": prefixes[index]})
        try:
            text = tokenizer.apply_chat_template(
                conversation,
                add_generation_prompt=prefixes is None,
                continue_final_message=prefixes is not None,
                tokenize=False,
            )
        except jinja2.TemplateError as error:
            raise SafesteerError(f"the chat template rejected the conversation: {error}") from error
        rendered.append(str(text))
    return rendered


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token of a left-padded batch ``[batch, seq]``,
    so that models with absolute position embeddings see a padded row as they would unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_rendered(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], device: torch.device | str
) -> BatchEncoding:
    """Tokenize rendered chats, left-padded; no special tokens added (the template has them), and
    no token type ids, which the teacher-forced passes never give the model either (before
    transformers 5, ``generate`` refuses them for a model whose forward takes none)."""
    batch = tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False,
        return_token_type_ids=False,
    )
    return batch.to(device)
