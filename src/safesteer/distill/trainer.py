"""Stage 3 trainer: the student samples, the steered teacher scores, the loss of ``loss.py`` is minimised.

One optimizer step (method.md §6.1) is: take the next prompts, let the *current* student sample M
completions each, score every completion teacher-forced by the teacher (no gradient) and by the
student (with gradient), and take one AdamW step on the masked, reduced divergence. The samples are
exactly on-policy, so no importance correction is needed. Everything a run writes goes to one
output directory, from which an interrupted run resumes bit-for-bit (on CPU). Baselines for the
efficacy comparison swap one piece: the teacher samples (--mode sft), the teacher is the base
with a safety system prompt (--teacher-system-prompt), or it is steered only where the
direction's harmfulness gate fires (--conditional-teacher).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available, is_wandb_available
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_cosine_schedule_with_warmup,
)

from safesteer import __version__
from safesteer.data import prompts_sha256
from safesteer.direction import Direction
from safesteer.distill.config import DistillConfig
from safesteer.distill.loss import (
    divergence,
    log_softmax_at,
    loss_mask,
    negative_log_likelihood,
    reduce_loss,
)
from safesteer.errors import SafesteerError, first_line
from safesteer.io import (
    EXPORT_KIND,
    check_apart,
    check_output_dir,
    claim_output_dir,
    clear_output_dir,
    differing_settings,
    guard_output_dir,
    publish_dir,
    read_json,
    settle_file_modes,
    write_json,
)
from safesteer.judge import is_refusal
from safesteer.models import load_adapter, model_device, position_ids, render_prompts, seeded
from safesteer.progress import progress_bar

logger = logging.getLogger(__name__)

CONFIG_FILE = "distill_config.json"
INPUTS_FILE = "distill_inputs.json"
LOG_FILE = "train_log.jsonl"
CHECKPOINTS_DIR = "checkpoints"
STUDENT_DIR = "student"
STATE_FILE = "trainer_state.json"
KEEP_CHECKPOINTS = 2
DISTILL_ARTIFACTS = (CONFIG_FILE, INPUTS_FILE, LOG_FILE, CHECKPOINTS_DIR, STUDENT_DIR)
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")


# ------------------------------------------------------------------------- pure helpers


def completion_mask(completion_ids: Tensor, eos_token_ids: Sequence[int]) -> Tensor:
    """1 on each generated token up to and including the row's first EOS, 0 after it (padding).

    ``completion_ids`` is [batch, T], the tokens ``generate`` appended to the prompts; rows that
    finished early are filled with the pad id, which may itself be an EOS id, so the mask is
    defined by the first EOS, never by the pad id. A row without EOS (truncated at
    --max-new-tokens) is all ones. Returns [batch, T] int64.
    """
    eos = torch.tensor(list(eos_token_ids), device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos
    return (eos_before == 0).long()


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token id rows left-padded to the longest, and their attention mask: two [len(rows), width] int64.

    Left padding puts every prompt's last token in the last column, where generation continues.
    """
    width = max((len(row) for row in rows), default=0)
    input_ids = torch.tensor([[pad_id] * (width - len(row)) + list(row) for row in rows],
                             dtype=torch.long, device=device).view(len(rows), width)
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows],
                                  dtype=torch.long, device=device).view(len(rows), width)
    return input_ids, attention_mask


def completion_logits(model: nn.Module, sequences: Tensor, attention_mask: Tensor,
                      completion_length: int, temperature: float = 1.0) -> Tensor:
    """Next-token logits at the positions that predict the last ``completion_length`` tokens.

    ``sequences`` and ``attention_mask`` are [batch, P + T] (left-padded prompt, then completion);
    returns [batch, T, vocab] in the model's dtype, divided by ``temperature`` (no copy at 1).
    Only these positions are materialised (``logits_to_keep``), and position ids come from the
    attention mask exactly as ``generate`` builds them, so the scored contexts are the sampled ones.
    """
    positions = position_ids(attention_mask)
    output = model(input_ids=sequences[:, :-1], attention_mask=attention_mask[:, :-1],
                   position_ids=positions[:, :-1], logits_to_keep=completion_length,
                   use_cache=False)
    return output.logits if temperature == 1.0 else output.logits / temperature


def token_statistics(
    student_logits: Tensor, teacher_logits: Tensor, sampled_ids: Tensor,
    safety_token_ids: Tensor | None, chunk_size: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per-token diagnostics, no gradient: k3 KL estimate and the probability mass on S.

    With y the sampled token, r = p_t(y)/p_s(y) and k3 = (r − 1) − log r, a non-negative estimate
    of KL(student‖teacher) (Schulman's k3), unbiased when y was drawn from exactly these
    (temperature-scaled) student logits, i.e. with --top-p 1. Logits are
    [batch, T, vocab], ``sampled_ids`` [batch, T]; returns [batch, T] float64 k3 and, when S is
    given, the student's and teacher's full-vocabulary mass Σ_{v∈S} p(v), each [batch, T].
    """
    index = sampled_ids.unsqueeze(-1)
    if safety_token_ids is not None:
        index = torch.cat([index, safety_token_ids.view(1, 1, -1).expand(*sampled_ids.shape, -1)], -1)
    student = log_softmax_at(student_logits.detach(), index, chunk_size).double()
    teacher = log_softmax_at(teacher_logits.detach(), index, chunk_size).double()
    log_ratio = teacher[..., 0] - student[..., 0]
    k3 = log_ratio.exp() - 1 - log_ratio
    if safety_token_ids is None:
        return k3, None, None
    return k3, student[..., 1:].logsumexp(-1).exp(), teacher[..., 1:].logsumexp(-1).exp()


def _sha256(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def _publish_dir(staging: Path, final: Path) -> None:
    """Move a fully written ``staging`` directory to ``final``, replacing any older copy: for the
    trainer's own subdirectories of the run (a directory the user names goes through
    :func:`safesteer.io.publish_dir`, which replaces only its own kind)."""
    settle_file_modes(staging)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


def make_accelerator(config: DistillConfig, output_dir: str | Path) -> Accelerator:
    """The run's Accelerator: one process, or each of ``accelerate launch``'s (multi-CPU too)."""
    return Accelerator(log_with=None if config.report_to == "none" else config.report_to,
                       project_dir=str(output_dir))


# ------------------------------------------------------------------------- the recipe


@dataclass
class Rollout:
    """One step's on-policy samples on this process.

    ``sequences`` and ``attention_mask`` are [N, P + T]: the prompt ids left-padded to P (mask 0
    on the padding only), then the T sampled tokens. ``completion_mask`` is [N, T] (see
    :func:`completion_mask`); ``texts`` the decoded completions. N = this process's prompts × M,
    each prompt's M rows together. ``prompt_indices`` names each row's training prompt (a
    system-prompted teacher re-reads it) and ``steer`` [N] bool whether the row's teacher is the
    safety teacher (steered, or system-prompted) rather than the plain base.
    """

    sequences: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    texts: list[str]
    prompt_indices: list[int]
    steer: Tensor

    @property
    def prompt_length(self) -> int:
        return self.sequences.shape[1] - self.completion_mask.shape[1]


@dataclass
class DistillResult:
    """Where :meth:`Distiller.train` stopped; ``student_dir`` is set once every step is done."""

    step: int
    total_steps: int
    student_dir: Path | None
    last_metrics: dict[str, float] | None

    @property
    def completed(self) -> bool:
        return self.step == self.total_steps


class Distiller:
    """Localized on-policy distillation recipe (method.md §6): ``setup()``, then ``train()``.

    Features, each with its DistillConfig flag:

    * **Student and teacher, one copy of the weights** (--use-lora, --lora-r, --lora-alpha,
      --lora-dropout, --lora-target-modules). The student is a PEFT LoRA adapter on ``model``,
      whose weights are float32 even when the base is bf16/fp16 (peft's adapter autocast), so
      small Adam updates are not rounded away (pitfall 3). The teacher is the same weights with
      the adapter disabled plus ``direction.steer`` (pitfall 14). With --no-use-lora the whole
      model is trained: the teacher is a frozen deep copy of the base (a second full copy of the
      weights in memory), and a bf16/fp16 student is upcast to float32, which is its own master
      copy (so the student takes 2x its half-precision memory, plus Adam's 2 float32 moments).
    * **Teacher per prompt** (``steer_prompts``, --conditional-teacher, --teacher-system-prompt).
      Prompts labelled False in ``steer_prompts`` (benign prompts mixed in to retain behaviour)
      are taught by the plain base; with --conditional-teacher the direction's harmfulness gate,
      read from each step's prompts on the base, decides instead of the labels. Rows of one
      forward are steered or not per row (``direction.steer(base, rows=...)``). With
      --teacher-system-prompt the safety teacher is the unsteered base prompted with that system
      message (the paper's ablation): it reads its own prompt, then the same completion tokens,
      so its logits align position by position with the student's.
    * **On-policy sampling** (--prompts-per-step, --samples-per-prompt, --max-new-tokens,
      --temperature, --top-p, --max-prompt-length). Prompts are rendered with the chat template
      and tokenised once at setup, truncated on the left; each epoch visits them in a fresh
      permutation from ``random.Random(seed + epoch)``; sampling (no top-k, min-p or repetition
      penalty, KV cache) is seeded from (--seed, step, process), so a resumed run draws the
      same completions.
    * **Loss** (--mode, --top-k, --alpha, --renormalize, --skip, --keep, --reduction,
      --loss-chunk-size): ``loss.divergence`` on the completion logits only, ``loss.loss_mask``
      and ``loss.reduce_loss`` with the step's global token (or completion) count as denominator.
      --mode sft is the offline baseline instead: the (per-row) teacher samples the completions
      and the loss is the student's ``loss.negative_log_likelihood`` of them; no teacher
      forward runs in training.
    * **Micro-batching** (--micro-batch-size, --gradient-checkpointing): teacher and student
      forwards and the backward run on this many completions at a time; the gradient does not
      depend on it.
    * **Optimisation** (--learning-rate, --num-epochs, --warmup-ratio, --max-grad-norm,
      --weight-decay, --adam-beta1, --adam-beta2, --adam-epsilon): AdamW, cosine schedule with
      linear warmup from 0 (transformers' schedule, as the paper's trainer), gradient clipping.
    * **Several processes** (``accelerate launch``): each process samples and scores its share of
      the step's prompts; gradients are summed across processes, which with the global denominator
      gives the single-process gradient. The model is moved to each process's device.
    * **Logging** (--logging-steps, --report-to): per step, loss, k3 KL(student‖teacher) and mass
      on S of both models (both left out with --mode sft), refusal-phrase rate of the samples,
      completion length, truncated share, share of completions with the safety teacher
      (``steered_rows``), tokens/s, learning rate and gradient norm go to ``train_log.jsonl``
      (every step), to the console and, optionally, to an accelerate tracker.
    * **Checkpoints and resume** (--save-steps, ``resume``): atomic ``checkpoints/step-N``
      directories (the last 2 kept); a resumed run continues from the last complete one and ends
      with the same adapter as an uninterrupted run. A resume with another config or other inputs
      (``steer_prompts`` labels included) is refused with the differing keys. Non-finite loss
      stops the run before the bad update.
    * **Output**: ``student/`` (the adapter, or the full float32 model, plus the tokenizer);
      :func:`merge_student` turns an adapter into a plain model directory.

    The model is modified in place: wrapped in a PeftModel (``self.model``), or, without LoRA,
    trained itself. Pass ``overwrite=True`` to start afresh in a directory that holds a run.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, direction: Direction,
                 prompts: list[str], config: DistillConfig, output_dir: str | Path, *,
                 safety_token_ids: Sequence[int] | None = None,
                 steer_prompts: Sequence[bool] | None = None, resume: bool = False,
                 overwrite: bool = False, accelerator: Accelerator | None = None) -> None:
        self.base_model = model
        self.tokenizer = tokenizer
        self.direction = direction
        self.prompts = list(prompts)
        labels = [True] * len(self.prompts) if steer_prompts is None else steer_prompts
        self.steer_prompts = [bool(flag) for flag in labels]
        self.config = config
        self.output_dir = Path(output_dir)
        self.safety_token_ids = [int(i) for i in safety_token_ids] if safety_token_ids else None
        self.resume = resume
        self.overwrite = overwrite
        self.accelerator = accelerator
        self.step = 0
        self._ready = False

    # ----------------------------------------------------------------- setup

    def setup(self) -> None:
        """Check inputs, prepare the run directory, build student, teacher, optimizer and schedule.

        When resuming, loads the last complete checkpoint. Raises SafesteerError on bad input.
        """
        cfg = self.config
        self._check_inputs()
        if self.accelerator is None:
            self.accelerator = make_accelerator(cfg, self.output_dir)
        accelerator = self.accelerator
        if accelerator.num_processes > 1:
            self.base_model.to(accelerator.device)
        self.device = model_device(self.base_model)
        self.direction.check_compatible(self.base_model)
        self.eos_token_ids = self._eos_token_ids()
        self.prompt_ids = self._tokenize_prompts()
        self.teacher_prompt_ids = (None if cfg.teacher_system_prompt is None
                                   else self._tokenize_prompts(cfg.teacher_system_prompt))
        self.steer_labels = torch.tensor(self.steer_prompts, dtype=torch.bool, device=self.device)
        self.steps_per_epoch = math.ceil(len(self.prompts) / cfg.prompts_per_step)
        self.total_steps = cfg.num_epochs * self.steps_per_epoch
        self.safety_ids_tensor = (None if self.safety_token_ids is None
                                  else torch.tensor(self.safety_token_ids, device=self.device))

        checkpoint = self._prepare_run_dir()
        self._build_student()
        self.optimizer = torch.optim.AdamW(
            self.trainable_parameters, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps)
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)
        if cfg.report_to != "none":
            accelerator.init_trackers("safesteer-distill", config=asdict(cfg))
        self._ready = True

    def _check_inputs(self) -> None:
        cfg = self.config
        if not self.prompts:
            raise SafesteerError("no training prompts: the distillation prompt set is empty")
        if len(self.steer_prompts) != len(self.prompts):
            raise SafesteerError(f"steer_prompts has {len(self.steer_prompts)} labels for "
                                 f"{len(self.prompts)} training prompts; give one per prompt")
        if cfg.conditional_teacher and self.direction.gate is None:
            raise SafesteerError(
                "--conditional-teacher: the direction has no harmfulness gate; re-run stage 1 "
                f"(`safesteer direction`) to make a direction with one (safesteer >= {__version__})")
        if isinstance(self.base_model, PeftModel):
            raise SafesteerError("pass the base model, not a PeftModel: the trainer adds the adapter")
        vocab = self.base_model.config.get_text_config().vocab_size
        ids = self.safety_token_ids
        if cfg.mode == "subset" and not ids:
            raise SafesteerError("--mode subset needs the safety tokens S, and the set is empty; run "
                                 "the token selection first or choose --mode full/topk")
        if ids is not None and (len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= vocab):
            raise SafesteerError(f"safety token ids must be distinct ids in [0, {vocab}), got {ids}")
        if cfg.mode == "topk" and cfg.top_k > vocab:
            raise SafesteerError(f"--top-k {cfg.top_k} exceeds the vocabulary size {vocab}")
        if cfg.report_to == "tensorboard" and not is_tensorboard_available():
            raise SafesteerError("--report-to tensorboard needs the tensorboard package installed")
        if cfg.report_to == "wandb" and not is_wandb_available():
            raise SafesteerError("--report-to wandb needs the wandb package installed")
        if self.tokenizer.pad_token_id is None:
            raise SafesteerError("the tokenizer has no pad token; load the model with load_model()")

    def _eos_token_ids(self) -> list[int]:
        """EOS ids of the generation config and the tokenizer: sampling stops at, and masks, each."""
        configured = self.base_model.generation_config.eos_token_id
        ids = set(configured if isinstance(configured, list) else [configured])
        ids.add(self.tokenizer.eos_token_id)
        ids.discard(None)
        if not ids:
            raise SafesteerError("neither the tokenizer nor the generation config defines an EOS token")
        return sorted(ids)

    def _tokenize_prompts(self, system_prompt: str | None = None) -> list[list[int]]:
        """Render and tokenise every prompt once (pitfall 5), keeping the last max_prompt_length ids.

        Left truncation keeps the end of the template (the assistant header) that the answer must
        follow (pitfall 6); the same ids are used for sampling and scoring. ``system_prompt`` gives
        the system-prompted teacher's version of the prompts.
        """
        limit = self.config.max_prompt_length
        encoded = self.tokenizer(render_prompts(self.tokenizer, self.prompts, system_prompt),
                                 add_special_tokens=False)["input_ids"]
        truncated = sum(len(ids) > limit for ids in encoded)
        what = "training prompts" if system_prompt is None else "system-prompted teacher prompts"
        if truncated:
            logger.warning("%d of %d %s are longer than --max-prompt-length %d tokens; keeping their "
                           "last %d tokens", truncated, len(encoded), what, limit, limit)
        return [ids[-limit:] for ids in encoded]

    def _inputs_record(self) -> dict[str, Any]:
        """What besides the config a resumed run must share: model, prompts and their steering labels,
        S, direction (and the gate of a conditional teacher), topology."""
        ids, gate = self.safety_token_ids, self.direction.gate
        return {
            "model": str(getattr(self.base_model, "name_or_path", "")),
            "num_prompts": len(self.prompts),
            "prompts_sha256": prompts_sha256(self.prompts),
            "num_steer_prompts": sum(self.steer_prompts),
            "steer_prompts_sha256": hashlib.sha256(bytes(self.steer_prompts)).hexdigest(),
            "safety_token_ids": ids,
            "safety_tokens": None if ids is None else self.tokenizer.convert_ids_to_tokens(ids),
            "direction_layer": self.direction.layer,
            "direction_coefficient": self.direction.coefficient,
            "direction_sha256": _sha256(self.direction.vector),
            "gate": (None if gate is None or not self.config.conditional_teacher else
                     {"layer": gate.layer, "threshold": gate.threshold, "sha256": _sha256(gate.vector)}),
            "num_processes": self.accelerator.num_processes,
        }

    def _prepare_run_dir(self) -> Path | None:
        """Write or check the config and inputs records; the checkpoint to resume from, if any."""
        config, inputs = asdict(self.config), self._inputs_record()
        config_path, inputs_path = self.output_dir / CONFIG_FILE, self.output_dir / INPUTS_FILE
        accelerator = self.accelerator
        if self.resume and config_path.is_file():
            for path, current in ((config_path, config), (inputs_path, inputs)):
                saved = read_json(path) if path.is_file() else {}
                differences = differing_settings(saved, current)
                if differences:
                    raise SafesteerError(
                        f"cannot resume {self.output_dir}: {path.name} differs in "
                        f"{'; '.join(differences)}. Resume with the original settings, or start "
                        "afresh with --overwrite or another --output-dir")
            if accelerator.is_main_process:
                for staging in (self.output_dir / CHECKPOINTS_DIR).glob(".step-*.tmp"):
                    shutil.rmtree(staging)
            accelerator.wait_for_everyone()
            checkpoints = self._checkpoints()
            if checkpoints:
                logger.info("resuming from %s", checkpoints[-1])
                return checkpoints[-1]
            logger.info("no complete checkpoint in %s; starting from step 0", self.output_dir)
            if accelerator.is_main_process:
                self._truncate_log()
            return None
        guard_output_dir(self.output_dir, DISTILL_ARTIFACTS, self.overwrite)
        accelerator.wait_for_everyone()  # every process checks before the main one writes
        if accelerator.is_main_process:
            clear_output_dir(self.output_dir, DISTILL_ARTIFACTS)  # an earlier run's, with --overwrite
            write_json(config_path, config)
            write_json(inputs_path, inputs)
        accelerator.wait_for_everyone()
        return None

    def _build_student(self) -> None:
        """Attach the float32 LoRA adapter (or set up the full fine-tune and its teacher copy)."""
        cfg, base = self.config, self.base_model
        if cfg.gradient_checkpointing:
            if not base.supports_gradient_checkpointing:
                raise SafesteerError(f"--gradient-checkpointing: {type(base).__name__} does not "
                                     "support it")
            # transformers >= 5.x renames the API; older releases only have gradient_checkpointing_enable.
            if hasattr(base, "activation_checkpointing_enable"):
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.use_lora:
            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=cfg.target_modules(), task_type="CAUSAL_LM")
            # The adapter's random initialisation is drawn from --seed, leaving the caller's RNG alone.
            with seeded(cfg.seed, self.device):
                self.model: nn.Module = get_peft_model(base, lora)
            self.teacher_model: nn.Module = self.model
        else:
            self.teacher_model = copy.deepcopy(base).eval().requires_grad_(False)
            if base.dtype in (torch.bfloat16, torch.float16):
                base.float()
            self.model = base.requires_grad_(True)
        self.trainable_parameters = [p for p in self.model.parameters() if p.requires_grad]

    @contextmanager
    def base(self) -> Iterator[nn.Module]:
        """The unsteered base model, in eval mode: the adapter disabled, or the frozen copy."""
        self.teacher_model.eval()
        if self.teacher_model is self.model:
            with self.model.disable_adapter():  # type: ignore[operator]
                yield self.model
        else:
            yield self.teacher_model

    @contextmanager
    def teacher(self, rows: Tensor | None = None) -> Iterator[nn.Module]:
        """The steered teacher, in eval mode: the base weights plus the direction.

        ``rows`` (bool [batch]) steers only those rows of every forward inside the block; the
        others see the plain base. An all-true batch takes the plain hook, an all-false one none.
        """
        with self.base() as base:
            if rows is not None and not rows.any():
                steering = nullcontext()
            else:
                steering = self.direction.steer(base, rows=None if rows is None or rows.all() else rows)
            with steering:
                yield base

    @contextmanager
    def _teacher_batch(self, prompt_indices: Sequence[int],
                       steer: Tensor) -> Iterator[tuple[nn.Module, Tensor, Tensor]]:
        """The teacher of these rows with its left-padded prompt ids and attention mask.

        By default the (per-row) steered base on the user prompts; with --teacher-system-prompt
        the unsteered base on the system-prompted prompts of the rows with ``steer`` set, and on
        the user prompts of the others.
        """
        if self.teacher_prompt_ids is None:
            prompts, context = [self.prompt_ids[index] for index in prompt_indices], self.teacher(steer)
        else:
            sources = [self.teacher_prompt_ids if flag else self.prompt_ids for flag in steer.tolist()]
            prompts = [source[index] for source, index in zip(sources, prompt_indices, strict=True)]
            context = self.base()
        input_ids, attention_mask = left_pad(prompts, self.tokenizer.pad_token_id, self.device)
        with context as model:
            yield model, input_ids, attention_mask

    def teacher_logits(self, rollout: Rollout, rows: slice, length: int) -> Tensor:
        """The teacher's temperature-scaled logits on the first ``length`` completion tokens of
        ``rollout``'s ``rows``, [rows, length, vocab], no gradient.

        The teacher reads its own prompt then the sampled tokens; position ids come from the mask,
        so its logits align position by position with the student's whatever the prompts' lengths.
        """
        start = rollout.prompt_length
        completions = rollout.sequences[rows, start:start + length]
        with torch.no_grad(), self._teacher_batch(rollout.prompt_indices[rows],
                                                  rollout.steer[rows]) as (teacher, input_ids, mask):
            return completion_logits(teacher, torch.cat([input_ids, completions], 1),
                                     torch.cat([mask, torch.ones_like(completions)], 1), length,
                                     self.config.temperature)

    # ----------------------------------------------------------------- one step

    def step_prompt_indices(self, step: int) -> list[int]:
        """Indices of the prompts this process trains on at ``step`` (1-based)."""
        epoch, position = divmod(step - 1, self.steps_per_epoch)
        order = list(range(len(self.prompts)))
        random.Random(self.config.seed + epoch).shuffle(order)
        size, accelerator = self.config.prompts_per_step, self.accelerator
        step_indices = order[position * size:(position + 1) * size]
        return step_indices[accelerator.process_index::accelerator.num_processes]

    def steer_rows(self, prompt_indices: Sequence[int], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Which of these prompts get the safety teacher, bool [len(prompt_indices)].

        The ``steer_prompts`` labels, or with --conditional-teacher the direction's gate read on
        the unsteered base from the prompts' left-padded ids and mask (the labels are then unused).
        """
        if not self.config.conditional_teacher:
            return self.steer_labels[list(prompt_indices)]
        with torch.no_grad(), self.base() as base:
            flagged = self.direction.gate_rows(base, input_ids, attention_mask)
        return flagged.to(device=self.device, dtype=torch.bool)

    def sample(self, step: int) -> Rollout:
        """M completions of each of ``step``'s prompts (eval mode, no grad): the current student's,
        or with --mode sft the teacher's (after its own prompt), appended to the student's prompt."""
        cfg = self.config
        indices = self.step_prompt_indices(step)
        input_ids, attention_mask = left_pad([self.prompt_ids[index] for index in indices],
                                             self.tokenizer.pad_token_id, self.device)
        if not indices:
            empty = input_ids.new_zeros(0, 0)
            return Rollout(empty, empty, empty, [], [], torch.zeros(0, dtype=torch.bool, device=self.device))
        steer = self.steer_rows(indices, input_ids, attention_mask).repeat_interleave(cfg.samples_per_prompt)
        row_indices = [index for index in indices for _ in range(cfg.samples_per_prompt)]
        input_ids = input_ids.repeat_interleave(cfg.samples_per_prompt, dim=0)
        attention_mask = attention_mask.repeat_interleave(cfg.samples_per_prompt, dim=0)
        if cfg.mode == "sft":
            with self._teacher_batch(row_indices, steer) as (teacher, teacher_ids, teacher_mask):
                completions = self._generate(teacher, teacher_ids, teacher_mask, step)
        else:
            self.model.eval()
            completions = self._generate(self.model, input_ids, attention_mask, step)
        mask = completion_mask(completions, self.eos_token_ids)
        texts = self.tokenizer.batch_decode(
            [row[:length].tolist() for row, length in zip(completions, mask.sum(1).tolist(), strict=True)],
            skip_special_tokens=True)
        return Rollout(torch.cat([input_ids, completions], dim=1),
                       torch.cat([attention_mask, torch.ones_like(completions)], dim=1), mask, texts,
                       row_indices, steer)

    def _generate(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, step: int) -> Tensor:
        """The tokens ``model`` samples after each left-padded prompt, [batch, T], seeded from
        (--seed, step, process)."""
        cfg = self.config
        try:
            with torch.no_grad(), seeded(self._step_seed("sample", step), self.device):
                sequences = model.generate(  # type: ignore[operator]
                    input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                    temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, min_p=None,
                    repetition_penalty=1.0, max_new_tokens=cfg.max_new_tokens,
                    eos_token_id=self.eos_token_ids, pad_token_id=self.tokenizer.pad_token_id,
                    use_cache=True)
        except torch.OutOfMemoryError as error:
            raise SafesteerError(
                f"out of memory while sampling step {step} ({len(input_ids)} completions of up to "
                f"{cfg.max_new_tokens} tokens): lower --prompts-per-step, --samples-per-prompt or "
                "--max-new-tokens (--micro-batch-size sizes the training passes)") from error
        return sequences[:, input_ids.shape[1]:]

    def backward(self, rollout: Rollout) -> dict[str, float]:
        """Teacher-forced loss of ``rollout``, backpropagated one micro-batch at a time.

        Each micro-batch's ``reduce_loss`` is divided by the step's global count of loss tokens
        (--reduction token) or completions (sequence), so the summed gradients, which are also
        summed across processes, are those of one loss over the whole step, whatever
        --micro-batch-size and the process count. Returns the step's global metrics.
        """
        cfg = self.config
        size = len(rollout.texts)
        prompt_length = rollout.prompt_length
        masks = (loss_mask(rollout.completion_mask, skip=cfg.skip, keep=cfg.keep) if size
                 else rollout.completion_mask)
        local_items = masks.sum() if cfg.reduction == "token" else torch.tensor(size)
        items = max(self._global_sum(local_items.double().view(1)).item(), 1.0)
        # loss, k3 sum, student and teacher mass sums, completion tokens, completions, refusals,
        # truncated, steered completions
        totals = torch.zeros(9, dtype=torch.float64, device=self.device)
        for start in range(0, size, cfg.micro_batch_size):
            rows = slice(start, start + cfg.micro_batch_size)
            completions = rollout.completion_mask[rows]
            length = int(completions.sum(1).max())
            first = int(rollout.attention_mask[rows, :prompt_length].any(0).int().argmax())
            sequences = rollout.sequences[rows, first:prompt_length + length]
            attention = rollout.attention_mask[rows, first:prompt_length + length]
            completions = completions[:, :length]
            sampled = sequences[:, -length:]
            teacher_logits = None if cfg.mode == "sft" else self.teacher_logits(rollout, rows, length)
            self.model.train()
            student_logits = completion_logits(self.model, sequences, attention, length, cfg.temperature)
            loss = reduce_loss(self._per_token_loss(student_logits, teacher_logits, sampled),
                               masks[rows, :length], reduction=cfg.reduction,  # type: ignore[arg-type]
                               num_items_in_step=items)
            self.accelerator.backward(loss)
            weights = completions.double()
            totals[0] += loss.detach().double()
            if teacher_logits is not None:
                k3, student_mass, teacher_mass = token_statistics(
                    student_logits, teacher_logits, sampled, self.safety_ids_tensor, cfg.loss_chunk_size)
                totals[1] += (k3 * weights).sum()
                if student_mass is not None and teacher_mass is not None:
                    totals[2] += (student_mass * weights).sum()
                    totals[3] += (teacher_mass * weights).sum()
            totals[4] += weights.sum()
        if size:
            completions_ids = rollout.sequences[:, prompt_length:]
            eos = torch.tensor(self.eos_token_ids, device=self.device)
            totals[5] = size
            totals[6] = sum(is_refusal(text) for text in rollout.texts)
            totals[7] = (~torch.isin(completions_ids, eos).any(1)).sum()
            totals[8] = rollout.steer.sum()
        self._sum_gradients_across_processes()
        totals = self._global_sum(totals)
        (loss, k3, student_mass, teacher_mass, tokens, completions_count, refusals, truncated,
         steered) = totals.tolist()
        metrics = {"loss": loss}
        if cfg.mode != "sft":
            metrics["kl_k3"] = k3 / max(tokens, 1.0)
            if self.safety_token_ids is not None:
                metrics["student_mass_s"] = student_mass / max(tokens, 1.0)
                metrics["teacher_mass_s"] = teacher_mass / max(tokens, 1.0)
        metrics.update(refusal_rate=refusals / completions_count,
                       completion_length=tokens / completions_count,
                       truncated=truncated / completions_count, steered_rows=steered / completions_count,
                       completion_tokens=tokens)
        return metrics

    def _per_token_loss(self, student_logits: Tensor, teacher_logits: Tensor | None,
                        sampled: Tensor) -> Tensor:
        """[batch, T] loss: the divergence from the teacher, or without teacher logits (--mode sft)
        the negative log-likelihood of the sampled tokens."""
        cfg = self.config
        if teacher_logits is None:
            return negative_log_likelihood(student_logits, sampled, chunk_size=cfg.loss_chunk_size)
        return divergence(
            student_logits, teacher_logits, mode=cfg.mode,  # type: ignore[arg-type]
            token_ids=self.safety_ids_tensor if cfg.mode == "subset" else None,
            top_k=cfg.top_k if cfg.mode == "topk" else None, alpha=cfg.alpha,
            renormalize=cfg.renormalize, complement=cfg.complement, chunk_size=cfg.loss_chunk_size)

    def _global_sum(self, values: Tensor) -> Tensor:
        if self.accelerator.num_processes == 1:
            return values
        return self.accelerator.reduce(values.to(self.accelerator.device), reduction="sum").to(self.device)

    def _sum_gradients_across_processes(self) -> None:
        """Sum gradients over processes; one with no prompts this step contributes zeros."""
        if self.accelerator.num_processes == 1:
            return
        for parameter in self.trainable_parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            parameter.grad.copy_(self._global_sum(parameter.grad))

    # ----------------------------------------------------------------- the loop

    def train(self, max_steps: int | None = None) -> DistillResult:
        """Run optimizer steps until the end of training or, with ``max_steps``, until that step.

        Stopping at ``max_steps`` writes a checkpoint, as if interrupted there, from which a new
        Distiller with ``resume=True`` continues (for time-boxed runs). Calls :meth:`setup` first if
        needed. After the last step the student is saved to ``output_dir/student``.
        """
        if not self._ready:
            self.setup()
        cfg, accelerator = self.config, self.accelerator
        stop = self.total_steps if max_steps is None else min(max_steps, self.total_steps)
        last_metrics: dict[str, float] | None = None
        progress = progress_bar(total=self.total_steps, initial=self.step, desc="distill", unit="step",
                                disable=not accelerator.is_local_main_process)
        with progress:
            while self.step < stop:
                step = self.step + 1
                started = time.perf_counter()
                rollout = self.sample(step)
                # Dropout draws from a step-derived seed, so a resumed run needs no saved RNG state
                # and the caller's global RNG is left as it was.
                with seeded(self._step_seed("backward", step), self.device):
                    metrics = self.backward(rollout)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters, cfg.max_grad_norm)
                if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm.item())):
                    self.optimizer.zero_grad(set_to_none=True)
                    checkpoints = self._checkpoints()
                    kept = checkpoints[-1] if checkpoints else "none (no checkpoint was written yet)"
                    raise SafesteerError(
                        f"non-finite loss ({metrics['loss']}) or gradient norm ({grad_norm.item()}) at "
                        f"step {step}; the step was not applied. Last good checkpoint: {kept}. Try a "
                        "lower --learning-rate, and check the direction and model for inf/NaN")
                learning_rate = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step = step
                seconds = time.perf_counter() - started
                last_metrics = {"step": step, "epoch": (step - 1) // self.steps_per_epoch, **metrics,
                                 "grad_norm": grad_norm.item(), "lr": learning_rate,
                                 "tokens_per_second": metrics["completion_tokens"] / seconds,
                                 "seconds": seconds}
                self._log(last_metrics, progress)
                if (cfg.save_steps and step % cfg.save_steps == 0) or step == stop < self.total_steps:
                    self._save_checkpoint()
        student_dir = None
        if self.step == self.total_steps:
            student_dir = self._save_student()
            if cfg.report_to != "none":
                accelerator.end_training()
        return DistillResult(self.step, self.total_steps, student_dir, last_metrics)

    def _log(self, record: dict[str, float], progress: tqdm) -> None:
        cfg, accelerator = self.config, self.accelerator
        if accelerator.is_main_process:
            with (self.output_dir / LOG_FILE).open("a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")
        shown = {"loss": f"{record['loss']:.4g}", "refusal": f"{record['refusal_rate']:.2f}"}
        if "kl_k3" in record:
            shown["kl"] = f"{record['kl_k3']:.3g}"
        if "student_mass_s" in record:
            shown["mass_s"] = f"{record['student_mass_s']:.3g}/{record['teacher_mass_s']:.3g}"
        progress.set_postfix(shown)
        progress.update(1)
        if record["step"] % cfg.logging_steps == 0:
            logger.info("step %d/%d %s", record["step"], self.total_steps,
                        " ".join(f"{key}={value:.4g}" for key, value in record.items() if key != "step"))
            if cfg.report_to != "none":
                accelerator.log(record, step=int(record["step"]))

    # ----------------------------------------------------------------- checkpoints and outputs

    def _checkpoints(self) -> list[Path]:
        """Complete checkpoints (renamed into place, state file present), oldest first."""
        root = self.output_dir / CHECKPOINTS_DIR
        found = [(int(match.group(1)), path) for path in root.glob("step-*")
                 if (match := _CHECKPOINT_NAME.match(path.name)) and (path / STATE_FILE).is_file()]
        return [path for _, path in sorted(found)]

    def _save_checkpoint(self) -> None:
        """Write ``checkpoints/step-N`` atomically: staged in a hidden directory, then renamed."""
        accelerator = self.accelerator
        root = self.output_dir / CHECKPOINTS_DIR
        staging, final = root / f".step-{self.step}.tmp", root / f"step-{self.step}"
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if self.config.use_lora:
                self.model.save_pretrained(staging, save_embedding_layers=False)  # type: ignore[operator]
            else:
                save_model(self.model, str(staging / "model.safetensors"))
            torch.save(self.optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), staging / "scheduler.pt")
            write_json(staging / STATE_FILE, {"step": self.step, "total_steps": self.total_steps,
                                              "num_processes": accelerator.num_processes,
                                              "safesteer_version": __version__})
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _publish_dir(staging, final)
            for old in self._checkpoints()[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def _step_seed(self, purpose: str, step: int) -> int:
        """A seed for one step's sampling or dropout, from (--seed, purpose, step, process)."""
        key = f"{self.config.seed}:{purpose}:{step}:{self.accelerator.process_index}"
        return random.Random(key).getrandbits(63)

    def _load_checkpoint(self, checkpoint: Path) -> None:
        weights = checkpoint / ("adapter_model.safetensors" if self.config.use_lora else "model.safetensors")
        path = weights
        try:
            if self.config.use_lora:
                set_peft_model_state_dict(self.model, load_file(str(weights), device=str(self.device)))
            else:
                load_model(self.model, str(weights), device=str(self.device))
            for path, state in ((checkpoint / "optimizer.pt", self.optimizer),
                                (checkpoint / "scheduler.pt", self.scheduler)):
                state.load_state_dict(torch.load(path, weights_only=True))
            path = checkpoint / STATE_FILE
            self.step = json.loads(path.read_text(encoding="utf-8"))["step"]
        except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError,
                SafetensorError) as error:
            older = self._checkpoints()[:-1]
            hint = (f"delete {checkpoint} and --resume continues from {older[-1]}" if older
                    else "no older checkpoint is left; start afresh with --overwrite")
            raise SafesteerError(f"{path}: damaged checkpoint ({first_line(error)}); {hint}") from error
        if self.accelerator.is_main_process:
            self._truncate_log()

    def _truncate_log(self) -> None:
        """Drop log lines of steps after the checkpoint (they will be run and logged again) and a
        line cut short by a kill."""
        path = self.output_dir / LOG_FILE
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", self.step + 1) <= self.step:
                kept.append(line)
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def _save_student(self) -> Path:
        """``student/``: the adapter (or full model) with safetensors, plus the tokenizer."""
        final = self.output_dir / STUDENT_DIR
        if self.accelerator.is_main_process:
            staging = self.output_dir / f".{STUDENT_DIR}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            # save_embedding_layers=False: base embeddings are never trained, and peft's "auto" check
            # would look the base model up on the hub.
            extra = {"save_embedding_layers": False} if self.config.use_lora else {}
            self.model.save_pretrained(staging, **extra)  # type: ignore[operator]
            self.tokenizer.save_pretrained(staging)
            _publish_dir(staging, final)
        self.accelerator.wait_for_everyone()
        return final


def merge_student(base: PreTrainedModel | str | Path, adapter_dir: str | Path, output_dir: str | Path,
                  *, dtype: torch.dtype = torch.float32) -> Path:
    """Merge a saved LoRA student into its base weights and save a plain model directory.

    ``base`` is the loaded base model (modified in place: cast to ``dtype`` and merged) or its
    directory. Merging in float32 (the default) keeps updates smaller than a bf16 ulp of the base
    weights (pitfall 3); pass torch.bfloat16 for a half-size file at that cost. The tokenizer saved
    beside the adapter is copied, so the result loads with plain AutoModelForCausalLM/AutoTokenizer.
    An existing ``output_dir`` is replaced only when it is an earlier export (its ``safesteer.json``
    says so) or empty: never the run, nor a folder of the user's.
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    check_apart(output_dir, adapter_dir, "adapter directory")
    check_output_dir(output_dir, EXPORT_KIND, overwrite=True)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise SafesteerError(f"{adapter_dir} holds no LoRA adapter (adapter_config.json); a full "
                             "fine-tune's student directory is already a plain model")
    if isinstance(base, str | Path):
        base = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    merged = load_adapter(base.to(dtype), adapter_dir).merge_and_unload()
    staging = output_dir.parent / f".{output_dir.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    if (adapter_dir / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(staging)
    claim_output_dir(staging, EXPORT_KIND)
    return publish_dir(staging, output_dir, EXPORT_KIND)
