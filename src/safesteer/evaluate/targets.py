"""The evaluated models ("targets") as context factories, sharing one copy of the base weights.

A target is a function that returns a context manager yielding the model as that target:
``with target() as model``. Base, teacher and adapter targets do not depend on the input. The
conditional teacher does: it steers a row only when the direction's harmfulness gate flags the
row's prompt (docs/method.md §4.2), so a teacher-forced pass over prompt ‖ answer must show it the
prompt alone (:func:`teacher_forced`), or the gate would read the last answer token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict
from functools import cached_property
from pathlib import Path

from peft import PeftModel
from torch import Tensor, nn

from safesteer.config import ModelArguments
from safesteer.direction import Direction
from safesteer.direction.artifact import DIRECTION_FILES
from safesteer.errors import SafesteerError
from safesteer.evaluate.config import BUILT_IN_TARGETS, split_target
from safesteer.models.layout import model_device
from safesteer.models.loading import (
    FoldedAdapters,
    adapters_disabled,
    load_adapter,
    load_model,
    merged_adapter,
)
from safesteer.wheels import sha256_file

Target = Callable[[], AbstractContextManager[nn.Module]]


class ConditionalTeacher:
    """The base plus the direction on the rows whose prompt the harmfulness gate flags.

    Called, it is the gated teacher of generation: the gate reads each multi-token forward's last
    position, which is the last prompt token of a prefill (greedy answers) or of a prompt-only
    pass (MMLU letters). :meth:`on_prompts` is the same teacher for a teacher-forced pass, whose
    last position is the end of the answer: the gate reads the prompts alone and the rows it
    flags are steered at every position, as the distillation teacher does.
    """

    def __init__(self, base: Target, direction: Direction) -> None:
        self.base = base
        self.direction = direction

    @contextmanager
    def __call__(self) -> Iterator[nn.Module]:
        with self.base() as model, self.direction.steer(model, gated=True):
            yield model

    @contextmanager
    def on_prompts(self, input_ids: Tensor, attention_mask: Tensor) -> Iterator[nn.Module]:
        """The teacher for rows whose prompts, left-padded alone, are ``input_ids`` and
        ``attention_mask`` ([rows, prompt length])."""
        with self.base() as model:
            device = model_device(model)
            rows = self.direction.gate_rows(model, input_ids.to(device), attention_mask.to(device))
            with self.direction.steer(model, rows=rows):
                yield model


def teacher_forced(target: Target, prompt_ids: Tensor,
                   prompt_mask: Tensor) -> AbstractContextManager[nn.Module]:
    """``target`` for one teacher-forced pass over prompt ‖ answer rows whose prompts, left-padded
    alone, are ``prompt_ids`` and ``prompt_mask``: the conditional teacher reads its gate there;
    every other target does not depend on them."""
    if isinstance(target, ConditionalTeacher):
        return target.on_prompts(prompt_ids, prompt_mask)
    return target()


def _files_sha256(files: Sequence[Path]) -> str:
    return "/".join(sha256_file(file)[:16] for file in files)


def _is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


class Targets:
    """The evaluated models, built around one loaded base model.

    A LoRA student (or any adapter target) is attached to the base weights as a named PEFT adapter,
    so base, teacher and every adapter share one copy of the weights: the base is the model with
    the adapters disabled, the teacher that plus the steering hook. A full model directory or hub
    id is loaded on its own when its turn comes and released afterwards.
    """

    def __init__(self, specs: Sequence[str], model_args: ModelArguments, run_dir: str | None) -> None:
        self.model_args = model_args
        self.model, self.tokenizer = load_model(model_args)
        self.run_dir = Path(run_dir) if run_dir else None
        self.direction: Direction | None = None
        self.sources = dict(split_target(spec) for spec in specs)
        self.paths: dict[str, Path | str] = {}
        self.adapters: dict[str, str] = {}
        self.peft: PeftModel | None = None
        self._identities: dict[str, str] = {}
        for name, source in self.sources.items():
            if source in ("teacher", "conditional-teacher"):
                if self.direction is None:
                    self.direction = Direction.load(self._run_path(source, "direction.json").parent)
                    self.direction.check_compatible(self.model)
                if source == "conditional-teacher":
                    self.direction.require_gate()  # before anything is evaluated
            elif source == "student":
                self.paths[name] = self._run_path("student", "student")
            elif source != "base":
                self.paths[name] = self._target_path(source)
        for name, path in self.paths.items():
            if isinstance(path, Path) and _is_adapter(path):
                self._attach(name, path)

    @property
    def names(self) -> list[str]:
        """The display names, in the order given."""
        return list(self.sources)

    def identity(self, name: str) -> str:
        """What the target shown as ``name`` is made of, so that saved answers are reused only by
        the same model: the base by name and dtype, a teacher with its direction file's sha256, an
        adapter with its files' sha256, a full model directory by its weight files' sizes and
        times, a hub id by name."""
        if name not in self._identities:
            self._identities[name] = self._identity(name)
        return self._identities[name]

    def _identity(self, name: str) -> str:
        base = f"{self.model_args.model} ({self.model_args.dtype})"
        # "base" is reserved for the base model, which answers kl-benign's reference prompts
        # even when it is not among the targets.
        source = "base" if name == "base" else self.sources[name]
        if source == "base":
            return base
        if source in ("teacher", "conditional-teacher"):
            return f"{base} + {source} {self.run_direction_identity}"
        path = self.paths[name]
        if not isinstance(path, Path):  # a hub id
            return path
        if name not in self.adapters:  # whole weights, too large to hash: their size and time
            stamps = [f"{file.name}:{file.stat().st_size}:{file.stat().st_mtime_ns}"
                      for file in sorted(path.iterdir()) if file.suffix in (".safetensors", ".bin")]
            return f"{path.resolve()} {' '.join(stamps)}"
        return f"{base} + adapter {_files_sha256(sorted(path.glob('adapter_*')))}"

    @cached_property
    def run_direction_identity(self) -> str | None:
        """The sha256 of --run-dir's direction files (the direction the teachers steer with and
        direction-ablation removes, and the gate), None without them."""
        files = [self.run_dir / name for name in DIRECTION_FILES] if self.run_dir else []
        return _files_sha256(files) if files and all(file.is_file() for file in files) else None

    def _run_path(self, target: str, relative: str) -> Path:
        if self.run_dir is None:
            raise SafesteerError(f"target {target!r} needs --run-dir (a `safesteer run` directory)")
        path = self.run_dir / relative
        if not path.exists():
            raise SafesteerError(f"target {target!r}: {path} does not exist; is {self.run_dir} a "
                                 f"finished `safesteer run` directory?")
        return path

    @staticmethod
    def _target_path(name: str) -> Path | str:
        path = Path(name).expanduser()
        if path.is_dir():
            if not (_is_adapter(path) or (path / "config.json").is_file()):
                raise SafesteerError(f"target {name}: neither a model directory (config.json) nor a "
                                     "LoRA adapter directory (adapter_config.json)")
            return path
        if path.exists() or "/" not in name:
            raise SafesteerError(f"unknown target {name!r}: use {', '.join(BUILT_IN_TARGETS)}, a model "
                                 "or adapter directory, or a hub id")
        return name

    def _attach(self, name: str, path: Path) -> None:
        # PEFT adapter names become module keys, which must not contain "."; display names may.
        adapter = self.adapters[name] = f"target{len(self.adapters)}"
        self.peft = load_adapter(self.model if self.peft is None else self.peft, path, adapter).eval()

    def base(self) -> AbstractContextManager[nn.Module]:
        return adapters_disabled(self.model if self.peft is None else self.peft)

    @contextmanager
    def _teacher(self) -> Iterator[nn.Module]:
        assert self.direction is not None
        with self.base() as model, self.direction.steer(model):
            yield model

    @contextmanager
    def session(self, name: str) -> Iterator[Target]:
        """The target as a context factory, valid inside this block (a full model is loaded here)."""
        source = self.sources[name]
        if source == "base":
            yield self.base
        elif source == "teacher":
            yield self._teacher
        elif source == "conditional-teacher":
            assert self.direction is not None
            yield ConditionalTeacher(self.base, self.direction)
        elif name in self.adapters:
            # Folded into copies of the weights it adapts, made once per session: a fifth fewer
            # products per token, logits equal within float rounding (docs/method.md §6.1).
            assert self.peft is not None
            self.peft.set_adapter(self.adapters[name])
            yield FoldedAdapters(self.peft)
        else:
            model = self.load_copy(name)
            try:
                yield lambda: nullcontext(model)
            finally:
                del model

    def load_copy(self, name: str) -> nn.Module:
        """New weights of the target shown as ``name``, a student's adapter merged into them: a
        model of its own that an attacker may fine-tune without touching the shared weights."""
        path = self.paths.get(name)
        if path is None or name in self.adapters:  # built on --model, like the shared copy
            model = load_model(self.model_args)[0]
            return model if path is None else merged_adapter(model, Path(path))
        return load_model(ModelArguments(**{**asdict(self.model_args), "model": str(path)}))[0]

    def served(self, name: str, model: nn.Module) -> AbstractContextManager[None]:
        """``model`` served as the target ``name`` is: under the teacher's steering (gated for the
        conditional teacher), as it is for every other target."""
        source = self.sources[name]
        if source not in ("teacher", "conditional-teacher"):
            return nullcontext()
        assert self.direction is not None
        return self.direction.steer(model, gated=source == "conditional-teacher")
