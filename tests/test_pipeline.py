"""`safesteer run` end to end on a tiny random model: artifacts, resume, refusals to clobber."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

from safesteer import pipeline
from safesteer.cli import main
from safesteer.errors import SafesteerError
from safesteer.run_config import PRESETS, RunArguments, preset_defaults
from safesteer.software import software


@pytest.fixture
def run_setup(tiny_model, tiny_tokenizer, tmp_path):
    model_dir = tmp_path / "tiny-model"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Tell me about item number {i}.\n" for i in range(8)))
    config = tmp_path / "run.yaml"
    sets = ("harmful_train", "harmless_train", "harmful_val", "harmless_val", "vote_prompts",
            "train_prompts")
    config.write_text("".join(f"{name}: {prompts}\n" for name in sets) + (
        "check_harmful: [" + str(prompts) + "]\ncheck_benign: [" + str(prompts) + "]\n"
        "method: response\nn_train: 4\nn_val: 2\nresponse_n_train: 2\nresponse_n_val: 2\n"
        "val_max_new_tokens: 2\nresponse_betas: [0.5]\nvote_n_prompts: 2\nvote_samples_per_prompt: 2\n"
        "horizon: 2\nnum_safety_tokens: 8\ninner_top_k: 8\np_min: 0.0\nn_train_prompts: 4\n"
        "prompts_per_step: 2\nsamples_per_prompt: 2\nmax_new_tokens: 3\ncheck_limit: 2\n"
        "check_max_new_tokens: 2\nlora_r: 2\n"))
    return ["--config", str(config), "--model", str(model_dir), "--dtype", "float32"]


def test_run_writes_every_artifact_and_resumes(capsys, tmp_path, run_setup):
    run_dir = tmp_path / "run"
    assert main(["run", *run_setup, "--output-dir", str(run_dir)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "| prompt set |" in out and "student" in out
    for name in ("direction.json", "direction.safetensors", "safety_tokens.json", "check.json",
                 "student/adapter_model.safetensors", "train_log.jsonl"):
        assert (run_dir / name).exists(), name
    check = json.loads((run_dir / "check.json").read_text())
    assert set(check["refusal"]) == {"base", "teacher", "student"}
    assert check["software"] == software()
    assert out.splitlines()[-1] == f"report: `safesteer report {run_dir}` writes {run_dir / 'report.html'}"
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    for anchor in ("run-settings", "run-curves", "run-tokens", "run-costs", "run-check"):
        assert f'id="{anchor}"' in page
    assert page.count("<polyline") >= 5 and "| prompt set |" not in page and "<td>student</td>" not in page

    code = main(["run", *run_setup, "--output-dir", str(run_dir)])
    assert code == 2 and "--resume" in capsys.readouterr().err
    assert main(["run", *run_setup, "--output-dir", str(run_dir), "--resume"]) == 0
    code = main(["run", *run_setup, "--output-dir", str(run_dir), "--resume", "--horizon", "3"])
    assert code == 2 and "horizon" in capsys.readouterr().err


def test_ctrl_c_during_run_overwrite_leaves_nothing_of_the_previous_run(capsys, tmp_path, run_setup,
                                                                        monkeypatch):
    """The previous run is gone before stage 1 writes, so an interrupted overwrite never leaves its
    check.json, tokens or student beside the new artifacts."""
    run_dir = tmp_path / "run"
    for name in ("direction.json", "safety_tokens.json", "check.json", "student/adapter_model.safetensors"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("{}")  # a run of an older version, without safesteer.json

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "teacher_direction", interrupted)
    assert main(["run", *run_setup, "--output-dir", str(run_dir), "--overwrite"]) == 130
    assert [path.name for path in run_dir.iterdir()] == ["safesteer.json"]
    assert json.loads((run_dir / "safesteer.json").read_text())["kind"] == "run"


def snapshot(root):
    return sorted((str(path.relative_to(root)), path.is_dir() or path.read_bytes())
                  for path in root.rglob("*"))


@pytest.mark.parametrize("flag", ["--overwrite", "--resume", None])
def test_run_never_writes_into_an_unrelated_folder(capsys, tmp_path, flag):
    folder = tmp_path / "mine"
    (folder / "photos").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "direction.json").write_text("{}")
    for target in (folder, tmp_path / "runs"):
        before = snapshot(target)
        code = main(["run", "--output-dir", str(target), *([flag] if flag else [])])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert f"{target}: it holds files that are not a safesteer run" in err
        assert snapshot(target) == before


def test_resume_needs_a_run(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    for name, state in (("missing", "does not exist"), ("empty", "is empty")):
        assert main(["run", "--output-dir", str(tmp_path / name), "--resume"]) == 2
        err = capsys.readouterr().err
        assert err == (f"safesteer: error: cannot resume: {tmp_path / name} {state}, so there is no run to "
                       "continue; check the path, or drop --resume to start a new one there\n")
    assert not (tmp_path / "missing").exists() and not any((tmp_path / "empty").iterdir())


def test_run_with_retain_prompts_and_no_check_records_time_and_memory(capsys, tmp_path, run_setup):
    run_dir = tmp_path / "run"
    retain = tmp_path / "benign.txt"
    retain.write_text("".join(f"Write a haiku about season {i}.\n" for i in range(4)))
    args = ["run", *run_setup, "--output-dir", str(run_dir), "--check-limit", "0",
            "--retain-prompts", str(retain), "--n-retain-prompts", "2"]
    assert main(args) == 0, capsys.readouterr().err
    check = json.loads((run_dir / "check.json").read_text())
    assert "refusal" not in check and check["peak_rss_mib"] > 0 and check["peak_gpu_mib"] is None
    assert set(check["stage_seconds"]) == {"load", "direction", "tokens", "train"}
    inputs = json.loads((run_dir / "distill_inputs.json").read_text())
    assert inputs["num_prompts"] == 6  # 4 harmful + 2 retain, 3 steps of 2
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and 0 < sum(record["steered_rows"] for record in log) / 3 < 1


def test_a_retain_count_needs_a_set_and_a_set_with_count_0_is_off():
    with pytest.raises(SafesteerError, match="--retain-prompts"):
        RunArguments(output_dir="x", n_retain_prompts=3)
    # how `--preset demo --n-retain-prompts 0` turns the preset's retain prompts off
    assert RunArguments(output_dir="x", retain_prompts="direction-harmless-train").n_retain_prompts == 0


def test_presets_are_listed_and_applied(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "--preset" in out and "demo" in out and "paper" in out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_file_sets_options_of_run_to_their_values(name):
    """A preset file (src/safesteer/presets/) is data the parser trusts: each key must be an option
    of `safesteer run`, and each value must reach the configs as written (YAML reads `1e-3`, without
    a dot, as text)."""
    from safesteer.cli import parse

    _, parsed = parse("run", ["--preset", name, "--output-dir", "x"])
    values = {item.name: getattr(config, item.name) for config in parsed for item in fields(config)}
    expected = preset_defaults(name, values["model"])
    assert {key: values.get(key, "not an option") for key in expected} == expected
    assert all(type(values[key]) is type(value) for key, value in expected.items())


def test_preset_then_yaml_then_flags(tmp_path):
    from safesteer.cli import parse
    from safesteer.distill.config import DistillConfig

    def get(parsed, cls):
        return next(item for item in parsed if isinstance(item, cls))

    _, parsed = parse("run", ["--preset", "demo", "--output-dir", "x"])
    assert get(parsed, DistillConfig).max_new_tokens == 32
    assert get(parsed, RunArguments).check_limit == 20
    config = tmp_path / "c.yaml"
    config.write_text("max_new_tokens: 20\ncheck_limit: 5\n")
    _, parsed = parse("run", ["--preset", "demo", "--config", str(config), "--check-limit", "7",
                              "--output-dir", "x"])
    assert get(parsed, DistillConfig).max_new_tokens == 20
    assert get(parsed, RunArguments).check_limit == 7
    # The embedded default is a Llama: the paper preset takes Llama's learning rate.
    _, parsed = parse("run", ["--preset", "paper", "--output-dir", "x"])
    assert get(parsed, DistillConfig).learning_rate == 1e-6


# A real `safesteer run` process, SIGKILLed at a chosen point of training: in the middle of step 3
# (after checkpoint 2 is complete) or while checkpoint 3 is being written (staged, not yet renamed).
_KILLED_RUN = """
import os, signal, sys
import torch
from safesteer.distill import checkpoint, trainer
from safesteer.cli import main

torch.set_num_threads(1)
where = sys.argv[1]
original_backward, original_publish = trainer.Distiller.backward, checkpoint._publish_dir

def backward(self, rollout):
    if where == "step" and self.step + 1 == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return original_backward(self, rollout)

def publish(staging, final):
    if where == "checkpoint" and final.name == "step-3":
        os.kill(os.getpid(), signal.SIGKILL)
    original_publish(staging, final)

trainer.Distiller.backward, checkpoint._publish_dir = backward, publish
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("where", ["step", "checkpoint"])
def test_kill_9_during_training_then_resume_gives_the_uninterrupted_adapter(where, tmp_path, run_setup,
                                                                          capsys):
    from safetensors.torch import load_file

    flags = [*run_setup, "--n-train-prompts", "8", "--prompts-per-step", "2", "--check-limit", "0"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(["run", *flags, "--output-dir", str(straight)]) == 0, capsys.readouterr().err

    process = subprocess.run([sys.executable, "-c", _KILLED_RUN, where, "run", *flags,
                              "--output-dir", str(killed)], capture_output=True, text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr
    checkpoints = sorted(path.name for path in (killed / "checkpoints").iterdir())
    assert checkpoints == (["step-1", "step-2"] if where == "step" else [".step-3.tmp", "step-1", "step-2"])
    assert not (killed / "student").exists()

    assert main(["run", *flags, "--output-dir", str(killed), "--resume"]) == 0, capsys.readouterr().err
    expected = load_file(straight / "student" / "adapter_model.safetensors")
    actual = load_file(killed / "student" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=0)
    steps = [json.loads(line)["step"] for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize(("architecture", "learning_rate", "horizon", "p_min"), [
    ("llama", 1e-6, 5, 1e-7), ("qwen2", 1e-5, 7, 1e-8), ("gemma2", 1e-5, 7, 1e-8)])
def test_paper_preset_takes_the_family_settings_of_the_model(architecture, learning_rate, horizon, p_min,
                                                             make_tiny_model, tmp_path, caplog):
    from safesteer.cli import parse
    from safesteer.distill.config import DistillConfig
    from safesteer.tokens_config import TokensConfig

    model_dir = tmp_path / architecture
    make_tiny_model(architecture).save_pretrained(model_dir)
    _, parsed = parse("run", ["--preset", "paper", "--model", str(model_dir), "--output-dir", "x"])
    distill = next(item for item in parsed if isinstance(item, DistillConfig))
    tokens = next(item for item in parsed if isinstance(item, TokensConfig))
    assert (distill.learning_rate, tokens.horizon, tokens.p_min) == (learning_rate, horizon, p_min)
    assert (distill.samples_per_prompt, distill.max_new_tokens, distill.use_lora) == (8, 512, False)
    assert ("no per-family settings" in caplog.text) == (architecture == "gemma2")

    _, parsed = parse("run", ["--preset", "paper", "--model", str(model_dir), "--mode", "full",
                              "--learning-rate", "3e-6", "--output-dir", "x"])
    distill = next(item for item in parsed if isinstance(item, DistillConfig))
    assert (distill.learning_rate, distill.mode) == (3e-6, "full")


def test_two_processes_make_the_stages_once_and_train_together(tmp_path, run_setup, capsys):
    """`safesteer run` in two CPU processes (torchrun, as `accelerate launch` starts a multi-CPU
    run): the main process makes the direction and tokens, which equal a one-process run's, and
    each optimizer step trains on both processes' samples."""
    flags = [*run_setup, "--check-limit", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["run", *flags, "--output-dir", str(one)]) == 0, capsys.readouterr().err
    process = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "safesteer.cli", "run", *flags, "--output-dir", str(two)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"})
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stderr.count("selected 8 safety tokens") == 1
    assert (two / "direction.safetensors").read_bytes() == (one / "direction.safetensors").read_bytes()
    assert json.loads((two / "safety_tokens.json").read_text())["ids"] == \
        json.loads((one / "safety_tokens.json").read_text())["ids"]
    assert json.loads((two / "distill_inputs.json").read_text())["num_processes"] == 2
    log = [json.loads(line) for line in (two / "train_log.jsonl").read_text().splitlines()]
    assert [record["completion_tokens"] for record in log] == [12, 12]  # 2 prompts x 2 samples x 3
    assert (two / "student" / "adapter_model.safetensors").is_file()
