"""`safesteer run` end to end on a tiny random model: artifacts, resume, refusals to clobber."""

from __future__ import annotations

import json

import pytest

from safesteer.cli import main


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

    code = main(["run", *run_setup, "--output-dir", str(run_dir)])
    assert code == 2 and "--resume" in capsys.readouterr().err
    assert main(["run", *run_setup, "--output-dir", str(run_dir), "--resume"]) == 0
    code = main(["run", *run_setup, "--output-dir", str(run_dir), "--resume", "--horizon", "3"])
    assert code == 2 and "horizon" in capsys.readouterr().err


def test_presets_are_listed_and_applied(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "--preset" in out and "demo" in out and "paper" in out


def test_preset_then_yaml_then_flags(tmp_path):
    from safesteer.cli import parse
    from safesteer.distill.config import DistillConfig
    from safesteer.pipeline import RunArguments

    def get(parsed, cls):
        return next(item for item in parsed if isinstance(item, cls))

    _, parsed = parse("run", ["--preset", "demo", "--output-dir", "x"])
    assert get(parsed, DistillConfig).max_new_tokens == 32
    assert get(parsed, RunArguments).check_limit == 40
    config = tmp_path / "c.yaml"
    config.write_text("max_new_tokens: 20\ncheck_limit: 5\n")
    _, parsed = parse("run", ["--preset", "demo", "--config", str(config), "--check-limit", "7",
                              "--output-dir", "x"])
    assert get(parsed, DistillConfig).max_new_tokens == 20
    assert get(parsed, RunArguments).check_limit == 7
