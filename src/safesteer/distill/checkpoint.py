"""A distillation run's directory: its records, atomic checkpoints, resume, the log and the student.

Everything a run writes goes to one output directory, from which an interrupted run resumes
bit-for-bit (on CPU): the config and inputs records a resume must match, ``checkpoints/step-N``
(adapter or model, optimizer and scheduler state), ``train_log.jsonl`` and finally ``student/``.
Directories are staged under a hidden name and renamed into place, so a kill leaves either the
old or the new version, never half of one. Only the main process writes, except a sharding
engine's (FSDP, DeepSpeed) checkpoint, which every process writes through accelerate; every method
is called by all processes, which wait for each other around the writes. Methods take the
engine's prepared model and optimizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from peft import set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safesteer import __version__
from safesteer.data.splits import prompts_sha256
from safesteer.direction.artifact import Direction
from safesteer.errors import SafesteerError, first_line
from safesteer.io import (
    clear_output_dir,
    differing_settings,
    guard_output_dir,
    read_json,
    settle_file_modes,
    write_json,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "distill_config.json"
INPUTS_FILE = "distill_inputs.json"
LOG_FILE = "train_log.jsonl"
CHECKPOINTS_DIR = "checkpoints"
STUDENT_DIR = "student"
STATE_FILE = "trainer_state.json"
ENGINE_STATE_DIR = "engine"
KEEP_CHECKPOINTS = 2
DISTILL_ARTIFACTS = (CONFIG_FILE, INPUTS_FILE, LOG_FILE, CHECKPOINTS_DIR, STUDENT_DIR)
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")


def _sha256(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def _publish_dir(staging: Path, final: Path) -> None:
    """Move a fully written ``staging`` directory to ``final``, replacing any older copy: for the
    run's own subdirectories (a directory the user names goes through
    :func:`safesteer.io.publish_dir`, which replaces only its own kind)."""
    settle_file_modes(staging)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


def inputs_record(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, direction: Direction,
                  prompts: Sequence[str], steer_prompts: Sequence[bool],
                  safety_token_ids: list[int] | None, conditional_teacher: bool,
                  num_processes: int) -> dict[str, Any]:
    """What besides the config a resumed run must share: model, prompts and their steering labels,
    S, direction (and the gate of a conditional teacher), topology."""
    gate = direction.gate
    return {
        "model": str(getattr(model, "name_or_path", "")),
        "num_prompts": len(prompts),
        "prompts_sha256": prompts_sha256(list(prompts)),
        "num_steer_prompts": sum(steer_prompts),
        "steer_prompts_sha256": hashlib.sha256(bytes(steer_prompts)).hexdigest(),
        "safety_token_ids": safety_token_ids,
        "safety_tokens": (None if safety_token_ids is None
                          else tokenizer.convert_ids_to_tokens(safety_token_ids)),
        "direction_layer": direction.layer,
        "direction_coefficient": direction.coefficient,
        "direction_sha256": _sha256(direction.vector),
        "gate": (None if gate is None or not conditional_teacher else
                 {"layer": gate.layer, "threshold": gate.threshold, "sha256": _sha256(gate.vector)}),
        "num_processes": num_processes,
    }


class RunDirectory:
    """The output directory of one distillation run, as seen by every process of it."""

    def __init__(self, path: Path, accelerator: Accelerator) -> None:
        self.path = path
        self.accelerator = accelerator
        # Sharded weights and optimizer state are each process's own: accelerate saves and loads them.
        self.sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def prepare(self, config: dict[str, Any], inputs: dict[str, Any], *, resume: bool,
                overwrite: bool) -> Path | None:
        """Write or check the config and inputs records; the checkpoint to resume from, if any.

        A resume with another config or other inputs is refused with the differing keys; a fresh
        start refuses a directory holding a run unless ``overwrite``.
        """
        config_path, inputs_path = self.path / CONFIG_FILE, self.path / INPUTS_FILE
        accelerator = self.accelerator
        if resume and config_path.is_file():
            for path, current in ((config_path, config), (inputs_path, inputs)):
                saved = read_json(path) if path.is_file() else {}
                differences = differing_settings(saved, current)
                if differences:
                    raise SafesteerError(
                        f"cannot resume {self.path}: {path.name} differs in "
                        f"{'; '.join(differences)}. Resume with the original settings, or start "
                        "afresh with --overwrite or another --output-dir")
            if accelerator.is_main_process:
                for staging in (self.path / CHECKPOINTS_DIR).glob(".step-*.tmp"):
                    shutil.rmtree(staging)
            accelerator.wait_for_everyone()
            checkpoints = self.checkpoints()
            if checkpoints:
                logger.info("resuming from %s", checkpoints[-1])
                return checkpoints[-1]
            logger.info("no complete checkpoint in %s; starting from step 0", self.path)
            if accelerator.is_main_process:
                self.truncate_log(0)
            return None
        guard_output_dir(self.path, DISTILL_ARTIFACTS, overwrite)
        accelerator.wait_for_everyone()  # every process checks before the main one writes
        if accelerator.is_main_process:
            clear_output_dir(self.path, DISTILL_ARTIFACTS)  # an earlier run's, with --overwrite
            write_json(config_path, config)
            write_json(inputs_path, inputs)
        accelerator.wait_for_everyone()
        return None

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints (renamed into place, state file present), oldest first."""
        root = self.path / CHECKPOINTS_DIR
        found = [(int(match.group(1)), path) for path in root.glob("step-*")
                 if (match := _CHECKPOINT_NAME.match(path.name)) and (path / STATE_FILE).is_file()]
        return [path for _, path in sorted(found)]

    def save_checkpoint(self, step: int, total_steps: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any, use_lora: bool) -> None:
        """Write ``checkpoints/step-N`` atomically (the last :data:`KEEP_CHECKPOINTS` are kept)."""
        accelerator = self.accelerator
        root = self.path / CHECKPOINTS_DIR
        staging, final = root / f".step-{step}.tmp", root / f"step-{step}"
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if self.sharded:
            accelerator.save_state(str(staging / ENGINE_STATE_DIR))
        elif accelerator.is_main_process:
            student = accelerator.unwrap_model(model)
            if use_lora:
                student.save_pretrained(staging, save_embedding_layers=False)
            else:
                save_model(student, str(staging / "model.safetensors"))
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        if accelerator.is_main_process:
            write_json(staging / STATE_FILE, {"step": step, "total_steps": total_steps,
                                              "num_processes": accelerator.num_processes,
                                              "safesteer_version": __version__})
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _publish_dir(staging, final)
            for old in self.checkpoints()[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def load_checkpoint(self, checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any, use_lora: bool, device: torch.device) -> int:
        """Restore the weights, optimizer and scheduler of ``checkpoint``; returns its step.

        A damaged file is a one-line error naming it and the older checkpoint --resume can use.
        """
        path = checkpoint / ("adapter_model.safetensors" if use_lora else "model.safetensors")
        try:
            if self.sharded:
                path = checkpoint / ENGINE_STATE_DIR
                self.accelerator.load_state(str(path))
            elif use_lora:
                set_peft_model_state_dict(self.accelerator.unwrap_model(model),
                                          load_file(str(path), device=str(device)))
            else:
                load_model(self.accelerator.unwrap_model(model), str(path), device=str(device))
            for path, state in (() if self.sharded else ((checkpoint / "optimizer.pt", optimizer),
                                                          (checkpoint / "scheduler.pt", scheduler))):
                state.load_state_dict(torch.load(path, weights_only=True))
            path = checkpoint / STATE_FILE
            step: int = json.loads(path.read_text(encoding="utf-8"))["step"]
        except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError,
                SafetensorError) as error:
            older = [kept for kept in self.checkpoints() if kept != checkpoint]
            hint = (f"delete {checkpoint} and --resume continues from {older[-1]}" if older
                    else "no older checkpoint is left; start afresh with --overwrite")
            raise SafesteerError(f"{path}: damaged checkpoint ({first_line(error)}); {hint}") from error
        if self.accelerator.is_main_process:
            self.truncate_log(step)
        return step

    def append_log(self, record: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            with (self.path / LOG_FILE).open("a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")

    def truncate_log(self, step: int) -> None:
        """Drop log lines of steps after ``step`` (they will be run and logged again) and a line cut
        short by a kill."""
        path = self.path / LOG_FILE
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", step + 1) <= step:
                kept.append(line)
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def save_student(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, use_lora: bool) -> Path:
        """``student/``: the adapter (or full model) with safetensors, plus the tokenizer."""
        final = self.path / STUDENT_DIR
        state = self.accelerator.get_state_dict(model)  # gathered from the shards, on every process
        if self.accelerator.is_main_process:
            staging = self.path / f".{STUDENT_DIR}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            # save_embedding_layers=False: base embeddings are never trained, and peft's "auto" check
            # would look the base model up on the hub.
            extra = {"save_embedding_layers": False} if use_lora else {}
            self.accelerator.unwrap_model(model).save_pretrained(staging, state_dict=state, **extra)
            tokenizer.save_pretrained(staging)
            _publish_dir(staging, final)
        self.accelerator.wait_for_everyone()
        return final
