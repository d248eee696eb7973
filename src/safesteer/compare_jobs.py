"""What ``safesteer compare`` runs, as jobs (:mod:`safesteer.schedule`): one ``safesteer run`` per
training method, in ``OUT/runs/NAME``, and one ``safesteer eval`` per target, in
``OUT/eval/targets/NAME``, each a subprocess with its own log and memory peak. Several at a time
(``--jobs``), an evaluation starts as soon as its target is trained, filling a slot the trainings
no longer need; the answers are those one process evaluating every target gives."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

from safesteer.arguments import option_flags
from safesteer.compare_config import Method
from safesteer.config import DataArguments, ModelArguments
from safesteer.direction.artifact import DIRECTION_FILES
from safesteer.errors import SafesteerError
from safesteer.evaluate.config import EvalArguments, split_target
from safesteer.io import (
    EVAL_KIND,
    RUN_KIND,
    atomic_write,
    claim_output_dir,
    differing_settings,
    read_json,
    write_json,
)
from safesteer.schedule import Job

SHARED_FILES = (*DIRECTION_FILES, "safety_tokens.json")
SETTINGS_FILE = "compare_settings.json"  # a finished method's resolved `safesteer run` settings


def _stream(command: list[str], log_path: Path, prefix: str, env: Mapping[str, str] | None = None) -> int:
    """Run ``command`` (with ``env`` added to this process's environment), copying its output
    line by line to the console and to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}) as process:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                print(f"{prefix}{line}", end="", flush=True)
        return process.returncode


def train_method(method: Method, run_dir: Path, arguments: list[str], settings: dict[str, Any],
                 env: Mapping[str, str] | None = None) -> None:
    """Run ``safesteer run`` for ``method`` in ``run_dir`` unless a finished run with the same
    settings is there. Its output also goes to ``run_dir/compare.log``."""
    record = run_dir / SETTINGS_FILE
    if record.is_file() and (run_dir / "student").is_dir():
        differing = differing_settings(read_json(record), settings)
        if differing:
            raise SafesteerError(f"method {method.name!r}: {run_dir} holds a run made with other settings "
                                 f"({'; '.join(differing)}); delete it to retrain, or choose another "
                                 "--output-dir")
        print(f"{method.name}: finished run in {run_dir}, reused")
        return
    claim_output_dir(run_dir, RUN_KIND)  # so that `run --resume` accepts the first method's new directory
    log = run_dir / "compare.log"
    print(f"{method.name}: safesteer run (log: {log})")
    code = _stream([sys.executable, "-m", "safesteer.cli", "run", *arguments], log, f"[{method.name}] ", env)
    if code != 0:
        raise SafesteerError(f"method {method.name!r}: `safesteer run` failed (exit status {code}); "
                             f"see {log}")
    write_json(record, settings)


def job_env(jobs: int) -> dict[str, str] | None:
    """The environment added to every job's process. With ``jobs`` > 1 their OpenMP threads wait
    passively (``OMP_WAIT_POLICY``, unless set): threads that spin while waiting take the cores
    from the other process (two runs at once on 2 cores then took 5x as long a step as one
    alone). The thread count stays torch's own, so every answer is the one a lone process gives."""
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")} if jobs > 1 else None


def training_jobs(methods: Sequence[Method], plans: Mapping[str, tuple[list[str], dict[str, Any]]],
                  output_dir: Path, env: Mapping[str, str] | None) -> list[Job]:
    """One job per method, training it in ``output_dir/runs``. The first starts at once, the
    others once its stages 1-2 are on disk (its files are written whole, by rename), with a copy
    of them, so every training shares the machine alike."""
    source = output_dir / "runs" / methods[0].name

    def train(method: Method) -> None:
        run_dir = output_dir / "runs" / method.name
        if method is not methods[0] and not (run_dir / SETTINGS_FILE).is_file():
            share_stages(source, run_dir)
        train_method(method, run_dir, *plans[method.name], env)

    return [Job(f"train {method.name}", partial(train, method),
                ready=None if method is methods[0] else partial(written, source),
                waits_for=f"method {methods[0].name!r} finished without its stages 1-2 in {source}")
            for method in methods]


def written(run_dir: Path, names: Sequence[str] = SHARED_FILES) -> bool:
    """Whether ``names`` are all in ``run_dir`` (a run writes each whole, by rename)."""
    return all((run_dir / name).is_file() for name in names)


def evaluate_target(spec: str, args: EvalArguments, model_args: ModelArguments, data_args: DataArguments,
                    env: Mapping[str, str] | None) -> None:
    """``safesteer eval`` of the one target ``spec`` in ``args.output_dir/targets/NAME``, its
    answers saved with every other target's in ``args.output_dir/completions``; its output also
    goes to that directory's compare.log."""
    name = split_target(spec)[0]
    part = claim_output_dir(part_dir(args.output_dir, name), EVAL_KIND)
    shared = str(args.completions_path())
    options = {**asdict(model_args), **asdict(data_args),
               **asdict(replace(args, output_dir=str(part), targets=[spec], completions_dir=shared))}
    log = part / "compare.log"
    code = _stream([sys.executable, "-m", "safesteer.cli", "eval", *option_flags(options)], log,
                   f"[eval {name}] ", env)
    if code != 0:
        raise SafesteerError(f"target {name!r}: `safesteer eval` failed (exit status {code}); see {log}")


def part_dir(eval_dir: str | Path, name: str) -> Path:
    return Path(eval_dir) / "targets" / name


def evaluation_jobs(specs: Sequence[str], trained: Mapping[str, str], args: EvalArguments,
                    model_args: ModelArguments, data_args: DataArguments, source: Path,
                    env: Mapping[str, str] | None) -> list[Job]:
    """One job per target (``specs``; base first), each once its method's training (``trained``:
    target name -> training job) is done and the first method's direction is on disk (the teachers
    steer with it, direction-ablation removes it; the base's evaluation may start while stage 2
    still runs). The others also wait for the base's, which answers the prompts kl-benign and
    benign-nll score every target on."""
    jobs = []
    for spec in specs:
        name = split_target(spec)[0]
        after = tuple(filter(None, (trained.get(name), None if name == "base" else "eval base")))
        jobs.append(Job(f"eval {name}", partial(evaluate_target, spec, args, model_args, data_args, env),
                        after=after, ready=partial(written, source, DIRECTION_FILES),
                        waits_for=f"the first method finished without its direction in {source}"))
    return jobs


def share_stages(source: Path, run_dir: Path) -> None:
    """Copy the direction and the safety tokens of ``source`` into ``run_dir``, where
    ``safesteer run --resume`` loads them instead of recomputing stages 1-2."""
    for name in SHARED_FILES:
        atomic_write(run_dir / name, lambda tmp, name=name: shutil.copyfile(source / name, tmp))
