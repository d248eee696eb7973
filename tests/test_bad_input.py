"""Every mistake a user can make on the command line, as a table: each must fail with status 2,
exactly one stderr line ``safesteer: error: ...`` naming what is wrong, no traceback, and leave
every file and folder as it was (listed, with its bytes, before and after).

The CLI runs in-process (``safesteer.cli.main``); a few cases also run as a real process, where
library warnings and log lines would show on stderr. Cases that need a model use the tiny random
model of ``tests/conftest.py``.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from safesteer.cli import main
from safesteer.config import DataArguments
from safesteer.direction import Direction
from safesteer.errors import SafesteerError
from safesteer.io import RUN_KIND, claim_output_dir

OUT = "{ws}/out"
TINY = ("--model", "{model}")


@dataclass(frozen=True)
class Case:
    """``argv`` with ``{ws}`` (the workspace below) and ``{model}`` (the tiny model directory)
    filled in; ``message`` must appear in the error line."""

    name: str
    argv: tuple[str, ...]
    message: str
    env: tuple[tuple[str, str], ...] = ()
    in_subprocess: bool = False
    without_cuda: bool = False  # run as on a machine without CUDA, whatever this one has


def case(name: str, argv: str | tuple[str, ...], message: str, **options: object) -> Case:
    return Case(name, tuple(argv.split()) if isinstance(argv, str) else argv, message, **options)  # type: ignore[arg-type]


CASES = [
    # --- the command line itself
    case("unknown command", "frobnicate", "unknown command 'frobnicate'; the commands are direction"),
    case("unknown option", f"direction --output-dir {OUT} --no-such-flag 1",
         "unknown option(s) --no-such-flag",
         in_subprocess=True),
    case("snake_case option", f"direction --output-dir {OUT} --n_train 4",
         "unknown option(s) --n_train (did you mean --n-train?)"),
    case("switch given a value", f"run --output-dir {OUT} --overwrite yes", "unexpected value(s) yes"),
    case("required option missing", "run --preset demo",
         "the following arguments are required: --output-dir"),
    case("not an integer", f"direction --output-dir {OUT} --n-train many",
         "argument --n-train: invalid int value: 'many'"),
    case("unknown choice", f"direction --output-dir {OUT} --method sideways",
         "argument --method: invalid choice: 'sideways'"),
    case("unknown preset", f"run --output-dir {OUT} --preset huge",
         "argument --preset: invalid choice: 'huge'"),
    case("preset of another command", f"direction --output-dir {OUT} --preset demo",
         "unknown option(s) --preset"),
    case("unknown dtype", f"direction --output-dir {OUT} --dtype float8", "argument --dtype: invalid choice"),
    case("config file missing", f"direction --output-dir {OUT} --config {{ws}}/none.yaml",
         "config file {ws}/none.yaml does not exist"),
    case("config file broken YAML", f"direction --output-dir {OUT} --config {{ws}}/broken.yaml",
         "{ws}/broken.yaml: line 2: invalid YAML (mapping values are not allowed here)"),
    case("config file not a mapping", f"direction --output-dir {OUT} --config {{ws}}/list.yaml",
         "{ws}/list.yaml: expected a mapping of option names to values"),
    case("config file unknown key", f"direction --output-dir {OUT} --config {{ws}}/unknown.yaml",
         "{ws}/unknown.yaml: line 2: unknown option 'not_an_option'"),
    case("config file bad value", f"direction --output-dir {OUT} --config {{ws}}/badvalue.yaml",
         "{ws}/badvalue.yaml: line 1: n_train: invalid int value 'lots'"),
    case("resume and overwrite", f"run --output-dir {OUT} --resume --overwrite",
         "--resume and --overwrite exclude each other"),
    # --- numbers out of range, per stage
    case("beta NaN", f"direction --output-dir {OUT} --response-betas nan",
         "--response-betas must be a finite number, got nan"),
    case("beta infinite", f"run --output-dir {OUT} --response-betas 0.1 inf",
         "--response-betas must be a finite number, got inf"),
    case("negative KL threshold", f"direction --output-dir {OUT} --kl-threshold -1",
         "--kl-threshold must be >= 0, got -1"),
    case("target refusal above 1", f"direction --output-dir {OUT} --target-refusal 2",
         "--target-refusal must be in [0, 1], got 2"),
    case("no training prompts per side", f"direction --output-dir {OUT} --n-train 0",
         "--n-train must be >= 1, got 0"),
    case("prune everything", f"direction --output-dir {OUT} --prune-layer-fraction 1",
         "--prune-layer-fraction must be in [0, 1), got 1"),
    case("negative layer", f"direction --output-dir {OUT} --response-layers 2 -1",
         "--response-layers must be >= 0"),
    case("layer beyond the model", ("direction", *TINY, "--output-dir", OUT, "--response-layers", "1", "5"),
         "--response-layers: layer(s) 5 outside 0..1 (the model has 2 layers)"),
    case("p_min above 1", f"run --output-dir {OUT} --p-min 1.5", "--p-min must be in [0, 1), got 1.5"),
    case("vote top-p 0", "tokens --run-dir {ws}/run --vote-top-p 0", "--vote-top-p must be in (0, 1], got 0"),
    case("more safety tokens required than kept", f"run --output-dir {OUT} --min-safety-tokens 60",
         "--min-safety-tokens (60) must not exceed --num-safety-tokens (50)"),
    case("learning rate 0", f"run --output-dir {OUT} --learning-rate 0",
         "--learning-rate must be > 0, got 0"),
    case("warm-up over the whole run", f"run --output-dir {OUT} --warmup-ratio 1",
         "--warmup-ratio must be in [0, 1), got 1"),
    case("alpha above 1", f"run --output-dir {OUT} --alpha 2", "--alpha must be in [0, 1], got 2"),
    case("keep not beyond skip", f"run --output-dir {OUT} --skip 3 --keep 2", "--keep must exceed --skip"),
    case("renormalised complement", f"run --output-dir {OUT} --renormalize --complement",
         "--complement needs"),
    case("retain count without a set", f"run --output-dir {OUT} --n-retain-prompts 5",
         "--n-retain-prompts > 0 needs --retain-prompts"),
    case("negative check limit", f"run --output-dir {OUT} --check-limit -1",
         "--check-limit must be >= 0, got -1"),
    case("eval negative limit", f"eval --output-dir {OUT} --targets base --limit -1", "--limit must be >= 0"),
    case("eval no new tokens", f"eval --output-dir {OUT} --targets base --max-new-tokens 0",
         "--max-new-tokens must be >= 1"),
    case("compare negative limit", f"compare --output-dir {OUT} --limit -1", "--limit must be >= 0"),
    case("chat batch size 0", "chat --run-dir {ws}/run --prompt Hi --batch-size 0",
         "--batch-size must be >= 1, got 0"),
    case("chat negative new tokens", "chat --run-dir {ws}/run --prompt Hi --max-new-tokens -5",
         "--max-new-tokens must be >= 1, got -5"),
    case("chat empty prompt", ("chat", "--run-dir", "{ws}/run", "--prompt", "Hi", "  "),
         "--prompt: prompt 2 is empty"),
    case("chat nothing to ask", "chat --run-dir {ws}/run", "give --prompt TEXT or --prompts-file FILE"),
    # --- prompt sets and files, found before any model is loaded
    case("unknown training set", f"run --output-dir {OUT} --train-prompts no-such-set",
         "unknown dataset 'no-such-set'; known: "),
    case("unknown check set", f"run --output-dir {OUT} --check-harmful jbb no-such-set",
         "unknown dataset 'no-such-set'"),
    case("unknown gate set", f"direction --output-dir {OUT} --gate-harmful-train no-such-set",
         "unknown dataset 'no-such-set'"),
    case("unknown vote set", "tokens --run-dir {ws}/run --vote-prompts no-such-set",
         "unknown dataset 'no-such-set'"),
    case("missing prompt file", f"direction --output-dir {OUT} --harmful-train {{ws}}/missing.jsonl",
         "{ws}/missing.jsonl: no such file"),
    case("malformed JSONL line", f"direction --output-dir {OUT} --harmless-val {{ws}}/malformed.jsonl",
         "{ws}/malformed.jsonl: line 2: invalid JSON"),
    case("empty prompt file", f"run --output-dir {OUT} --vote-prompts {{ws}}/empty.txt",
         "{ws}/empty.txt: file is empty"),
    case("prompt field missing", f"run --output-dir {OUT} --retain-prompts {{ws}}/wrongfield.json "
                                 "--n-retain-prompts 1", "{ws}/wrongfield.json: record 1: no 'prompt' field"),
    case("unknown benchmark", f"eval --output-dir {OUT} --benchmarks mmlu-pro",
         "unknown benchmark 'mmlu-pro'"),
    case("unknown near-duplicate set", f"eval --output-dir {OUT} --targets base --exclude-near no-such-set",
         "unknown dataset 'no-such-set'"),
    case("malformed benchmark file",
         f"eval --output-dir {OUT} --targets base --benchmarks {{ws}}/malformed.jsonl",
         "{ws}/malformed.jsonl: line 2: invalid JSON"),
    case("chat prompt file missing", "chat --run-dir {ws}/run --prompts-file {ws}/missing.txt",
         "{ws}/missing.txt: no such file"),
    # --- models and devices
    case("unknown model name", f"direction --output-dir {OUT} --model no-such-model",
         "unknown model 'no-such-model': not an embedded model (smollm2-135m)"),
    case("model path missing", f"direction --output-dir {OUT} --model {{ws}}/missing-model",
         "--model {ws}/missing-model: no such file or directory"),
    case("folder that is not a model", f"direction --output-dir {OUT} --model {{ws}}/not-a-model",
         "not a model directory (a model directory holds config.json and the weights"),
    case("damaged weights", f"direction --output-dir {OUT} --model {{ws}}/damaged-model",
         "{ws}/damaged-model/model.safetensors: could not load the model (Error while deserializing header",
         in_subprocess=True),
    case("damaged model config", f"direction --output-dir {OUT} --model {{ws}}/damaged-config",
         "{ws}/damaged-config/config.json: line 1: invalid JSON"),
    case("adapter whose base is gone", f"direction --output-dir {OUT} --model {{ws}}/orphan-adapter",
         "is a LoRA adapter for '/nonexistent/base-model', which cannot be loaded here"),
    case("hub id offline", f"direction --output-dir {OUT} --model some-org/some-model",
         "--model some-org/some-model: a Hugging Face hub id, but HF_HUB_OFFLINE is set",
         env=(("HF_HUB_OFFLINE", "1"),), in_subprocess=True),
    case("paper preset offline", f"run --output-dir {OUT} --preset paper --model some-org/some-model",
         "--model some-org/some-model: a Hugging Face hub id, but HF_HUB_OFFLINE is set",
         env=(("HF_HUB_OFFLINE", "1"),)),
    case("hub unreachable", f"direction --output-dir {OUT} --model some-org/some-model",
         "cannot reach the Hugging Face hub at http://127.0.0.1:9", env=(("HF_ENDPOINT", "http://127.0.0.1:9"),)),
    case("chat template missing", f"direction --output-dir {OUT} --chat-template {{ws}}/missing.jinja",
         "--chat-template {ws}/missing.jinja: no such file"),
    case("gguf file missing", f"direction --output-dir {OUT} --model {{ws}}/missing.gguf",
         "--model {ws}/missing.gguf: no such file or directory"),
    case("device name", ("direction", *TINY, "--output-dir", OUT, "--device", "gpu0"),
         "--device 'gpu0' is not a torch device"),
    case("device absent", ("direction", *TINY, "--output-dir", OUT, "--device", "cuda"),
         "--device cuda: this machine has no cuda device", without_cuda=True),
    # --- output directories
    case("output under /proc", "direction --output-dir /proc/safesteer-test/run",
         "cannot create /proc/safesteer-test/run: /proc is not writable"),
    case("output under a file", "direction --output-dir {ws}/notes.txt/run",
         "cannot create {ws}/notes.txt/run: {ws}/notes.txt is a file, not a directory"),
    case("output is a file", "direction --output-dir {ws}/notes.txt",
         "{ws}/notes.txt is a file, not a directory"),
    case("overwrite a folder of the user's", "direction --output-dir {ws}/mine --overwrite",
         "refusing to replace {ws}/mine: it holds files that are not a safesteer run"),
    case("resume a mistyped run", f"run --output-dir {OUT} --resume",
         "cannot resume: {ws}/out does not exist, so there is no run to continue"),
    case("eval into a run", "eval --output-dir {ws}/run --targets base",
         "it is a safesteer run directory, not an eval directory"),
    # --- run directories: missing or damaged artifacts
    case("export without a student", ("export", *TINY, "--run-dir", "{ws}/run", "--output-dir", OUT),
         "{ws}/run has no student yet (no student/"),
    case("export of a full fine-tune", ("export", *TINY, "--run-dir", "{ws}/full-run", "--output-dir", OUT),
         "{ws}/full-run/student is a full fine-tune"),
    case("export into the run", ("export", *TINY, "--run-dir", "{ws}/run", "--output-dir", "{ws}/run/merged"),
         "refusing to write into {ws}/run/merged: it is inside the --run-dir"),
    case("export of a missing run", ("export", *TINY, "--run-dir", "{ws}/no-run", "--output-dir", OUT),
         "--run-dir {ws}/no-run: no such run directory"),
    case("damaged adapter", ("export", *TINY, "--run-dir", "{ws}/damaged-run", "--output-dir", OUT),
         "{ws}/damaged-run/student/adapter_model.safetensors: could not load the LoRA adapter"),
    case("damaged direction tensors", "chat --run-dir {ws}/damaged-run --prompt Hi",
         "{ws}/damaged-run/direction.safetensors: not a safetensors file"),
    case("damaged direction record", "chat --run-dir {ws}/broken-run --prompt Hi",
         "{ws}/broken-run/direction.json: line 1: invalid JSON"),
    case("tokens without a direction", "tokens --run-dir {ws}/empty", "{ws}/empty holds no direction"),
    case("chat with a student not trained yet", "chat --run-dir {ws}/run --prompt Hi --targets student",
         "--targets student: {ws}/run has no student yet"),
    case("eval teacher without a run", f"eval --output-dir {OUT} --targets base teacher",
         "target 'teacher' needs --run-dir"),
    # --- reports
    case("report without a directory", "report", "the following arguments are required: DIR"),
    case("report of a missing directory", "report {ws}/no-run", "{ws}/no-run: no such directory"),
    case("report of a folder of the user's", "report {ws}/mine",
         "{ws}/mine: not a directory safesteer wrote; nothing to report"),
    case("report of a damaged run", "report {ws}/broken-run",
         "{ws}/broken-run/direction.json: line 1: invalid JSON"),
    case("report onto a directory", "report {ws}/run --output {ws}/empty",
         "--output {ws}/empty is a directory"),
    case("report under /proc", "report {ws}/run --output /proc/safesteer-test/report.html",
         "--output /proc/safesteer-test/report.html: cannot write it"),
]


def snapshot(root: Path) -> list[tuple[str, bytes | bool]] | None:
    """Every path under ``root`` with its bytes (True for a directory); None when root is missing."""
    return sorted((str(path.relative_to(root)), path.is_dir() or path.read_bytes())
                  for path in root.rglob("*")) if root.exists() else None


def _direction() -> Direction:
    return Direction(torch.ones(32), 1, 1.0, {"num_layers": 2, "hidden_size": 32, "model": "tiny"})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """Inputs for every case: prompt files good and bad, folders that are not models, run
    directories missing or damaging an artifact, YAML files, and a folder of the user's."""
    ws = tmp_path_factory.mktemp("bad-input")
    files = {"malformed.jsonl": '{"prompt": "fine"}\n{"prompt": \n', "empty.txt": "\n", "notes.txt": "mine",
             "wrongfield.json": '[{"text": "hello"}]', "broken.yaml": "n_train: 4\n  bad: indent\n",
             "list.yaml": "- n_train\n- 4\n", "unknown.yaml": "n_train: 4\nnot_an_option: 1\n",
             "badvalue.yaml": "n_train: lots\n", "not-a-model/readme.txt": "not weights",
             "mine/photo.jpg": "jpeg", "empty/.keep": "", "damaged-config/config.json": "{"}
    for name, text in files.items():
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).write_text(text)
    damaged = ws / "damaged-model"
    damaged.mkdir()
    for path in tiny_model_dir.iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    (damaged / "model.safetensors").write_bytes(b"\xff" * 64)
    for name in ("run", "damaged-run", "full-run", "broken-run"):
        _direction().save(claim_output_dir(ws / name, RUN_KIND))
    (ws / "broken-run" / "direction.json").write_text("{")
    (ws / "damaged-run" / "direction.safetensors").write_bytes(b"\x00" * 8)
    student = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                             LoraConfig(r=2, target_modules=["q_proj"]))
    student.save_pretrained(ws / "damaged-run" / "student")
    (ws / "damaged-run" / "student" / "adapter_model.safetensors").write_bytes(b"\x00" * 8)
    student.save_pretrained(ws / "orphan-adapter")
    config = json.loads((ws / "orphan-adapter" / "adapter_config.json").read_text())
    (ws / "orphan-adapter" / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "/nonexistent/base-model"}))
    (ws / "full-run" / "student").mkdir()
    (ws / "full-run" / "student" / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    return ws


def _run_case(case: Case, argv: list[str], capsys: pytest.CaptureFixture[str],
              monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    if case.in_subprocess:
        process = subprocess.run([sys.executable, "-m", "safesteer.cli", *argv], capture_output=True,
                                 text=True, timeout=120,
                                 env={**os.environ, "OMP_NUM_THREADS": "1", **dict(case.env)})
        return process.returncode, process.stderr
    for name, value in case.env:
        monkeypatch.setenv(name, value)
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_fails_in_one_line_and_changes_nothing(case: Case, workspace: Path, tiny_model_dir: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if case.without_cuda:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    places = {"ws": str(workspace), "model": str(tiny_model_dir)}
    argv = [arg.format(**places) for arg in case.argv]
    before = [snapshot(workspace), snapshot(tiny_model_dir)]
    code, err = _run_case(case, argv, capsys, monkeypatch)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("safesteer: error: "), err
    assert "Traceback" not in err
    assert case.message.format(**places) in err
    assert [snapshot(workspace), snapshot(tiny_model_dir)] == before
    assert not Path("/proc/safesteer-test").exists()


def test_there_are_at_least_forty_cases_each_named_once() -> None:
    names = [case.name for case in CASES]
    assert len(names) >= 40 and len(set(names)) == len(names)


# --- --data-source hub: the datasets package, the offline switches and the network, before any work

HUB_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT")
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: refused at once


def _datasets_package(monkeypatch: pytest.MonkeyPatch, cache: Path | None) -> None:
    """A stand-in for the ``datasets`` package whose datasets cache is ``cache``; None: not installed."""
    if cache is None:
        monkeypatch.setitem(sys.modules, "datasets", None)
        return
    package = types.ModuleType("datasets")
    package.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    package.config = types.SimpleNamespace(HF_DATASETS_CACHE=str(cache))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", package)


@pytest.mark.parametrize(("installed", "env", "message"), [
    (False, {}, "--data-source hub needs the 'datasets' package (pip install datasets); or use the "
                "default --data-source offline"),
    (True, {"HF_HUB_OFFLINE": "1"}, "--data-source hub: the Hugging Face libraries are offline "
                                    "(HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) and no dataset is cached in "
                                    "{ws}/datasets-cache; use the default --data-source offline"),
    (True, {"HF_ENDPOINT": UNREACHABLE}, f"--data-source hub: cannot reach the Hugging Face hub at "
                                         f"{UNREACHABLE} (")],
    ids=["no datasets package", "hub switched off, nothing cached", "hub unreachable"])
@pytest.mark.parametrize("command", [
    f"direction --output-dir {OUT}", f"run --output-dir {OUT}", f"eval --output-dir {OUT} --targets base",
    f"compare --output-dir {OUT}", "tokens --run-dir {ws}/run"], ids=lambda command: command.split()[0])
def test_hub_data_source_without_a_usable_hub_fails_before_any_work(
        command: str, installed: bool, env: dict[str, str], message: str, workspace: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    cache = workspace / "datasets-cache"
    for name in HUB_OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _datasets_package(monkeypatch, cache if installed else None)
    before = snapshot(workspace)
    code = main([arg.format(ws=workspace) for arg in [*command.split(), "--data-source", "hub"]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("safesteer: error: "), err
    assert message.format(ws=workspace) in err
    assert snapshot(workspace) == before


def test_hub_data_source_is_checked_only_for_named_sets_and_accepts_a_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Local files need no hub; with the hub switched off, datasets cached earlier are read."""
    for name in HUB_OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    _datasets_package(monkeypatch, tmp_path / "cache")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Describe cats.\n")
    hub = DataArguments(data_source="hub")
    hub.check(str(prompts), None)
    with pytest.raises(SafesteerError, match="cannot reach the Hugging Face hub"):
        hub.check(str(prompts), "jbb")
    with pytest.raises(SafesteerError, match="cannot reach the Hugging Face hub"):
        hub.check(f"{prompts},advbench")
    DataArguments().check("jbb")  # offline: no hub at all
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "cache" / "walledai___adv_bench").mkdir(parents=True)
    hub.check("jbb")
