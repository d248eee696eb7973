"""``safesteer chat``: the models of a run answering the same prompts, side by side.

Base (``--model``), teacher (base + the run's direction) and student (the run's ``student/``: a
LoRA adapter attached to the same weights, or a full fine-tune loaded beside them), each greedy,
so what the pipeline made can be tried by hand before exporting anything.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safesteer.config import DataArguments, ModelArguments
from safesteer.direction.artifact import Direction
from safesteer.distill.checkpoint import STUDENT_DIR
from safesteer.errors import SafesteerError
from safesteer.models.generation import generate_responses
from safesteer.models.layout import context_length
from safesteer.models.loading import check_model_arguments, load_adapter, load_model
from safesteer.models.rendering import render_prompts

if TYPE_CHECKING:
    from safesteer.cli import ChatArguments

logger = logging.getLogger(__name__)

_SHOWN_PROMPT_CHARS = 300


def _rendered_length(tokenizer: PreTrainedTokenizerBase, prompt: str) -> int:
    return len(tokenizer(render_prompts(tokenizer, [prompt]), add_special_tokens=False)["input_ids"][0])


def fit_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], context: int | None,
                max_new_tokens: int) -> list[str]:
    """Each prompt cut on the left, with a warning, until it and its answer fit the model's
    ``context``: the end of a request (usually the question) matters most, and the chat template
    around it is kept whole."""
    if context is None:
        return prompts
    limit = context - max_new_tokens
    room = limit - _rendered_length(tokenizer, "")
    if room < 1:
        raise SafesteerError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the "
                             f"model's {context}-token context")
    fitted = []
    for number, prompt in enumerate(prompts, 1):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        keep, text = room, prompt
        if len(ids) > room:
            text = tokenizer.decode(ids[-keep:])
            while keep > 1 and _rendered_length(tokenizer, text) > limit:  # re-tokenised boundary
                keep -= 1
                text = tokenizer.decode(ids[-keep:])
            logger.warning("prompt %d is %d tokens long; keeping its last %d, so that it and a %d-token "
                           "answer fit the model's %d-token context", number, len(ids), keep,
                           max_new_tokens, context)
        fitted.append(text)
    return fitted


def _student(run_dir: Path, requested: bool) -> Path | None:
    student = run_dir / STUDENT_DIR
    if student.is_dir():
        return student
    if requested:
        raise SafesteerError(f"--targets student: {run_dir} has no student yet (no {STUDENT_DIR}/); "
                             f"finish the run with `safesteer run --resume --output-dir {run_dir}`")
    logger.info("%s has no student yet; answering with base and teacher", run_dir)
    return None


def _student_answers(model: PreTrainedModel, model_args: ModelArguments, student: Path,
                     answer: Callable[[PreTrainedModel], list[str]]) -> list[str]:
    """The student's answers: its adapter on the loaded base weights, or its own full model."""
    if (student / "adapter_config.json").is_file():
        return answer(load_adapter(model, student).eval())
    full, _ = load_model(ModelArguments(**{**asdict(model_args), "model": str(student)}))
    return answer(full)


def chat_command(model_args: ModelArguments, data_args: DataArguments, chat: ChatArguments) -> None:
    prompts = list(chat.prompt or [])
    if chat.prompts_file:
        data_args.check(chat.prompts_file)
        prompts += data_args.load(chat.prompts_file)
    path = Path(chat.run_dir)
    run_dir = path if path.is_dir() else path.parent
    if not run_dir.is_dir():
        raise SafesteerError(f"--run-dir {path}: no such run directory")
    targets = list(dict.fromkeys(chat.targets or ["base", "teacher", "student"]))
    direction = Direction.load(path) if "teacher" in targets else None
    student = _student(run_dir, chat.targets is not None) if "student" in targets else None
    targets = [name for name in targets if name != "student" or student is not None]
    check_model_arguments(model_args)
    model, tokenizer = load_model(model_args)
    if direction is not None:
        direction.check_compatible(model)
    prompts = fit_prompts(tokenizer, prompts, context_length(model), chat.max_new_tokens)

    def answer(target: PreTrainedModel, name: str) -> list[str]:
        return generate_responses(target, tokenizer, prompts, max_new_tokens=chat.max_new_tokens,
                                  batch_size=chat.batch_size, desc=name)

    answers: dict[str, list[str]] = {}
    if "base" in targets:
        answers["base"] = answer(model, "base")
    if direction is not None:
        with direction.steer(model):
            answers["teacher"] = answer(model, "teacher")
    if student is not None:  # last: attaching the adapter changes ``model``
        answers["student"] = _student_answers(model, model_args, student,
                                              lambda target: answer(target, "student"))
    width = max(map(len, targets))
    for index, prompt in enumerate(prompts):
        shown = prompt if len(prompt) <= _SHOWN_PROMPT_CHARS else "…" + prompt[-_SHOWN_PROMPT_CHARS:]
        print(f"\n>>> {shown}")
        for name in targets:
            print(textwrap.indent(answers[name][index], f"  {name:<{width}} | ", lambda _: True))
