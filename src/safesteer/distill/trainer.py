"""Stage 3 recipe: the student samples, the steered teacher scores, the divergence is minimised.

One optimizer step (docs/method.md §6.1) is: take the next prompts, let the *current* student sample
M completions each, score every completion teacher-forced by the teacher (no gradient) and by the
student (with gradient), and take one AdamW step on the masked, reduced divergence. Baselines for
the efficacy comparison swap one piece: the teacher samples (--mode sft), the teacher is the base
with a safety system prompt (--teacher-system-prompt), or it is steered only where the
direction's harmfulness gate fires (--conditional-teacher). The run directory, checkpoints and
resume are :mod:`safesteer.distill.checkpoint`; the step's metrics :mod:`safesteer.distill.metrics`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from safesteer.direction.artifact import Direction
from safesteer.distill.checkpoint import RunDirectory, inputs_record
from safesteer.distill.config import DistillConfig
from safesteer.distill.engine import bf16_autocast, make_accelerator, prepare_student, start_accumulation
from safesteer.distill.inputs import check_inputs, stop_token_ids, tokenize_prompts
from safesteer.distill.loss import loss_mask, reduce_loss
from safesteer.distill.metrics import StepTotals, sum_over_processes, token_statistics
from safesteer.distill.rollout import Rollout, completion_mask, sample_completions
from safesteer.distill.teachers import Teachers, build_student
from safesteer.divergence import divergence, negative_log_likelihood
from safesteer.errors import SafesteerError
from safesteer.models.devices import seeded
from safesteer.models.layout import model_device
from safesteer.models.precision import FrozenWeightCasts, resolve_bf16
from safesteer.progress import progress_bar
from safesteer.scoring import left_pad

logger = logging.getLogger(__name__)


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
    """Localized on-policy distillation recipe (docs/method.md §6): ``setup()``, then ``train()``.

    Features, each with its DistillConfig flag:

    * **Student and teacher, one copy of the weights** (--use-lora, --lora-r, --lora-alpha,
      --lora-dropout, --lora-target-modules). The student is a PEFT LoRA adapter on ``model``,
      whose weights are float32 even when the base is bf16/fp16 (peft's adapter autocast), so
      small Adam updates are not rounded away (docs/method.md §9.8). The teacher is the same
      weights with the adapter disabled plus ``direction.steer`` (docs/method.md §9.9). With
      --no-use-lora the whole model is trained: the teacher is a frozen deep copy of the base (a
      second full copy of the weights in memory), and a bf16/fp16 student is upcast to float32,
      which is its own master copy (so the student takes 2x its half-precision memory, plus Adam's
      2 float32 moments). Both live in :mod:`safesteer.distill.teachers`.
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
      --loss-chunk-size): ``divergence.divergence`` on the completion logits only,
      ``loss.loss_mask`` and ``loss.reduce_loss`` with the step's global token (or completion)
      count as denominator. --mode sft is the offline baseline instead: the (per-row) teacher
      samples the completions and the loss is the student's
      ``divergence.negative_log_likelihood`` of them; no teacher forward runs in training.
    * **Micro-batching** (--micro-batch-size, --gradient-checkpointing, --bf16): the forwards and
      backward run on this many completions at a time, gradients accumulating unsynchronised
      (``accelerator.accumulate``) to the same gradient; a prompt's M samples share one reading
      of it, and --bf16 (or =auto) autocasts both forwards with the frozen weights' bfloat16 copies kept.
    * **Optimisation** (--learning-rate, --num-epochs, --warmup-ratio, --max-grad-norm,
      --weight-decay, --adam-beta1, --adam-beta2, --adam-epsilon): AdamW, cosine schedule with
      linear warmup from 0 (transformers' schedule, as the paper's trainer), gradient clipping.
    * **Several processes** (``accelerate launch`` or torchrun, with the user's accelerate config):
      student, optimizer and schedule go through ``accelerator.prepare`` (DDP, FSDP, DeepSpeed;
      :mod:`safesteer.distill.engine`). Each process samples with the unwrapped student and scores
      its share of the step's prompts, all in the same number of micro-batches; the step equals
      the one-process step on the same samples (docs/method.md §6.10).
    * **Logging** (--logging-steps, --report-to): each step's loss, k3 KL(student‖teacher) and
      mass on S (not with --mode sft), the samples' refusal-phrase rate, length, truncated and
      steered shares, tokens/s, learning rate and gradient norm (:mod:`safesteer.distill.metrics`)
      go to ``train_log.jsonl``, the console and, optionally, an accelerate tracker.
    * **Checkpoints and resume** (--save-steps, ``resume``): atomic ``checkpoints/step-N`` (the
      last 2 kept); a resumed run continues from the last complete one to the uninterrupted run's
      adapter; other configs or inputs are refused by key; a non-finite loss stops before its update.
    * **Output**: ``student/`` (the adapter, or the full float32 model, plus the tokenizer), which
      :func:`safesteer.distill.export.merge_student` turns into a plain model directory.

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
        check_inputs(self.base_model, self.tokenizer, self.direction, self.prompts, self.steer_prompts,
                     self.safety_token_ids, cfg)
        if self.accelerator is None:
            self.accelerator = make_accelerator(cfg, self.output_dir)
        accelerator = self.accelerator
        if accelerator.num_processes > 1:
            self.base_model.to(accelerator.device)
        self.device = model_device(self.base_model)
        self.direction.check_compatible(self.base_model)
        self.eos_token_ids = stop_token_ids(self.base_model, self.tokenizer)
        self.prompt_ids = tokenize_prompts(self.tokenizer, self.prompts, cfg.max_prompt_length)
        self.teacher_prompt_ids = (None if cfg.teacher_system_prompt is None else tokenize_prompts(
            self.tokenizer, self.prompts, cfg.max_prompt_length, cfg.teacher_system_prompt))
        self.steps_per_epoch = math.ceil(len(self.prompts) / cfg.prompts_per_step)
        self.total_steps = cfg.num_epochs * self.steps_per_epoch
        self.safety_ids_tensor = (None if self.safety_token_ids is None
                                  else torch.tensor(self.safety_token_ids, device=self.device))

        self.run = RunDirectory(self.output_dir, accelerator)
        inputs = inputs_record(self.base_model, self.tokenizer, self.direction, self.prompts,
                               self.steer_prompts, self.safety_token_ids, cfg.conditional_teacher,
                               accelerator.num_processes)
        checkpoint = self.run.prepare(asdict(cfg), inputs, resume=self.resume, overwrite=self.overwrite)
        student, self.teacher_model = build_student(self.base_model, cfg, self.device)
        optimizer = torch.optim.AdamW(
            [p for p in student.parameters() if p.requires_grad], lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps)
        # self.model, the engine's wrapper, trains; self.student under it generates, teaches, saves.
        self.model, self.optimizer, self.scheduler = prepare_student(accelerator, student, optimizer,
                                                                     scheduler, cfg.micro_batch_size)
        self.student = accelerator.unwrap_model(self.model)  # with LoRA, also self.teacher_model
        self.trainable_parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.share_prompts = (cfg.samples_per_prompt > 1  # 2 forwards, 1 backward: untried when sharded
                              and not (self.run.sharded or cfg.gradient_checkpointing))  # no cache
        self.weight_casts = None if self.run.sharded else FrozenWeightCasts()
        self.bf16 = resolve_bf16(cfg.bf16, next(self.base_model.parameters()).dtype, self.device)
        self.teachers = Teachers(self.student, self.teacher_model, self.direction, self.prompt_ids,
                                 self.teacher_prompt_ids, self.tokenizer.pad_token_id, cfg.temperature,
                                 self.device, self.share_prompts)
        if checkpoint is not None:
            self.step = self.run.load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler,
                                                 cfg.use_lora, self.device)
        if cfg.report_to != "none":
            accelerator.init_trackers("safesteer-distill", config=asdict(cfg))
        self._ready = True

    # ----------------------------------------------------------------- one step

    def step_prompt_indices(self, step: int) -> list[int]:
        """Indices of the prompts this process trains on at ``step`` (1-based)."""
        return self._step_shares(step)[self.accelerator.process_index]

    def _step_shares(self, step: int) -> list[list[int]]:
        """Each process's prompt indices at ``step``: the step's prompts dealt out in turn."""
        epoch, position = divmod(step - 1, self.steps_per_epoch)
        order = list(range(len(self.prompts)))
        random.Random(self.config.seed + epoch).shuffle(order)
        size, processes = self.config.prompts_per_step, self.accelerator.num_processes
        step_indices = order[position * size:(position + 1) * size]
        return [step_indices[rank::processes] for rank in range(processes)]

    def micro_batches_per_process(self, step: int) -> int:
        """Micro-batches every process runs at ``step``: the most any process needs (at least one),
        so every process joins each of the engine's collectives."""
        rows = max(len(share) for share in self._step_shares(step)) * self.config.samples_per_prompt
        return max(math.ceil(rows / self.config.micro_batch_size), 1)

    def steer_mask(self, prompt_indices: Sequence[int], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Which rows get the safety teacher, bool [len(prompt_indices) × M], a prompt's M alike.

        The ``steer_prompts`` labels, or with --conditional-teacher the direction's gate read on
        the unsteered base from the prompts' left-padded ids and mask (the labels are then unused).
        """
        if not self.config.conditional_teacher:
            flagged = torch.tensor([self.steer_prompts[index] for index in prompt_indices])
        else:
            with torch.no_grad(), self.teachers.base() as base:
                flagged = self.direction.gate_rows(base, input_ids, attention_mask)
        return flagged.to(self.device, torch.bool).repeat_interleave(self.config.samples_per_prompt)

    def sample(self, step: int) -> Rollout:
        """M completions of each of ``step``'s prompts (eval mode, no grad): the current student's,
        or with --mode sft the teacher's (after its own prompt), appended to the student's prompt."""
        cfg = self.config
        indices = self.step_prompt_indices(step)
        padding = not indices
        if padding:  # no prompt for this process: sample the step's first one, weighted zero
            indices = self._step_shares(step)[0][:1]
        input_ids, attention_mask = left_pad([self.prompt_ids[index] for index in indices],
                                             self.tokenizer.pad_token_id, self.device)
        steer_mask = self.steer_mask(indices, input_ids, attention_mask)
        row_indices = [index for index in indices for _ in range(cfg.samples_per_prompt)]
        sampling = {"config": cfg, "eos_token_ids": self.eos_token_ids, "step": step,
                    "pad_token_id": self.tokenizer.pad_token_id, "seed": self._step_seed("sample", step)}
        if cfg.mode == "sft":
            with self.teachers.for_rows(row_indices, steer_mask) as (teacher, teacher_ids, teacher_mask):
                completions = sample_completions(teacher, teacher_ids, teacher_mask, **sampling)
        else:
            completions = sample_completions(self.student.eval(), input_ids, attention_mask, **sampling,
                                             samples=cfg.samples_per_prompt, share=self.share_prompts)
        input_ids = input_ids.repeat_interleave(cfg.samples_per_prompt, dim=0)
        attention_mask = attention_mask.repeat_interleave(cfg.samples_per_prompt, dim=0)
        mask = completion_mask(completions, self.eos_token_ids)
        texts = self.tokenizer.batch_decode(
            [row[:length].tolist() for row, length in zip(completions, mask.sum(1).tolist(), strict=True)],
            skip_special_tokens=True)
        return Rollout(torch.cat([input_ids, completions], dim=1),
                       torch.cat([attention_mask, torch.ones_like(completions)], dim=1), mask, texts,
                       row_indices, steer_mask, step, padding)

    def backward(self, rollout: Rollout) -> dict[str, float]:
        """Teacher-forced loss of ``rollout``, backpropagated one micro-batch at a time.

        Each micro-batch's ``reduce_loss`` is divided by the step's global count of loss tokens
        (--reduction token) or completions (sequence), and scaled for the engine's average
        (:func:`safesteer.distill.engine.start_accumulation`), so the synchronised gradient is that
        of one loss over the whole step, whatever --micro-batch-size and the process count.
        Processes with fewer rows repeat their first with weight zero, so all run
        :meth:`micro_batches_per_process` of them. Returns the step's global metrics.
        """
        cfg, accelerator = self.config, self.accelerator
        size = 0 if rollout.padding else len(rollout.texts)
        prompt_length = rollout.prompt_length
        masks = loss_mask(rollout.completion_mask, skip=cfg.skip, keep=cfg.keep) * (not rollout.padding)
        local_items = masks.sum() if cfg.reduction == "token" else torch.tensor(size)
        items = max(sum_over_processes(accelerator, local_items.double().view(1)).item(), 1.0)
        count = self.micro_batches_per_process(rollout.step)
        starts = list(range(0, size, cfg.micro_batch_size))
        scale = start_accumulation(accelerator, count)
        weights = [scale] * len(starts) + [0.0] * (count - len(starts))
        totals = StepTotals.zeros(self.device)
        for start, weight in zip(starts + [0] * (count - len(starts)), weights, strict=True):
            rows = slice(start, start + (cfg.micro_batch_size if weight else 1))
            length = int((completions := rollout.completion_mask[rows]).sum(1).max())
            sampled = rollout.sequences[rows, prompt_length:prompt_length + length]
            with bf16_autocast(self.bf16, self.device, self.weight_casts, self.teacher_model):
                teacher_logits = None if cfg.mode == "sft" else self.teachers.logits(rollout, rows, length)
            self.model.train()
            with accelerator.accumulate(self.model):
                with bf16_autocast(self.bf16, self.device, self.weight_casts, self.student):
                    student_logits = rollout.logits(self.model, rows, length, cfg.temperature,
                                                    self.share_prompts)
                loss = reduce_loss(self._per_token_loss(student_logits, teacher_logits, sampled),
                                   masks[rows, :length], reduction=cfg.reduction,  # type: ignore[arg-type]
                                   num_items_in_step=items)
                accelerator.backward(loss * weight)
            if weight:
                statistics = None if teacher_logits is None else token_statistics(
                    student_logits, teacher_logits, sampled, self.safety_ids_tensor, cfg.loss_chunk_size)
                totals.add_micro_batch(loss, completions[:, :length], statistics)
            del teacher_logits, student_logits  # before the next micro-batch's forwards, not after
        if size:
            eos = torch.tensor(self.eos_token_ids, device=self.device)
            truncated = ~torch.isin(rollout.sequences[:, prompt_length:], eos).any(1)
            totals.count_completions(rollout.texts, truncated, rollout.steer_mask)
        return totals.metrics(accelerator, with_teacher=cfg.mode != "sft",
                              with_safety_tokens=self.safety_token_ids is not None)

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
                # DeepSpeed clips (its config's gradient_clipping) and steps inside the last
                # micro-batch's backward: there this reads the engine's norm, and a non-finite
                # step is reported after it was taken.
                grad_norm = float(accelerator.clip_grad_norm_(self.trainable_parameters, cfg.max_grad_norm))
                if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):
                    self.optimizer.zero_grad(set_to_none=True)
                    checkpoints = self.run.checkpoints()
                    kept = checkpoints[-1] if checkpoints else "none (no checkpoint was written yet)"
                    raise SafesteerError(
                        f"non-finite loss ({metrics['loss']}) or gradient norm ({grad_norm}) at "
                        f"step {step}; the step was not applied. Last good checkpoint: {kept}. Try a "
                        "lower --learning-rate, and check the direction and model for inf/NaN")
                learning_rate = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step = step
                seconds = time.perf_counter() - started
                last_metrics = {"step": step, "epoch": (step - 1) // self.steps_per_epoch, **metrics,
                                 "grad_norm": grad_norm, "lr": learning_rate,
                                 "tokens_per_second": metrics["completion_tokens"] / seconds,
                                 "seconds": seconds}
                self._log(last_metrics, progress)
                if (cfg.save_steps and step % cfg.save_steps == 0) or step == stop < self.total_steps:
                    self.run.save_checkpoint(step, self.total_steps, self.model, self.optimizer,
                                             self.scheduler, cfg.use_lora)
        student_dir = None
        if self.step == self.total_steps:
            student_dir = self.run.save_student(self.model, self.tokenizer, cfg.use_lora)
            if cfg.report_to != "none":
                accelerator.end_training()
        return DistillResult(self.step, self.total_steps, student_dir, last_metrics)

    def _log(self, record: dict[str, float], progress: tqdm) -> None:
        self.run.append_log(record)
        shown = {"loss": f"{record['loss']:.4g}", "refusal": f"{record['refusal_rate']:.2f}"}
        if "kl_k3" in record:
            shown["kl"] = f"{record['kl_k3']:.3g}"
        if "student_mass_s" in record:
            shown["mass_s"] = f"{record['student_mass_s']:.3g}/{record['teacher_mass_s']:.3g}"
        progress.set_postfix(shown)
        progress.update(1)
        if record["step"] % self.config.logging_steps == 0:
            logger.info("step %d/%d %s", record["step"], self.total_steps,
                        " ".join(f"{key}={value:.4g}" for key, value in record.items() if key != "step"))
            if self.config.report_to != "none":
                self.accelerator.log(record, step=int(record["step"]))

    def _step_seed(self, purpose: str, step: int) -> int:
        """A seed for one step's sampling or dropout, from (--seed, purpose, step, process)."""
        key = f"{self.config.seed}:{purpose}:{step}:{self.accelerator.process_index}"
        return random.Random(key).getrandbits(63)
