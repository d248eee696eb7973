"""The command line: help for every option, YAML + flags, and one-line errors on bad input."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from safesteer.cli import COMMANDS, main
from safesteer.validation import flag


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_top_level_help_lists_commands(capsys):
    code, out, _ = _run(capsys)
    assert code == 0
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_is_documented_once_in_kebab_case(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    options = re.findall(r"^  (--[\w-]+)", out, flags=re.MULTILINE)
    assert len(options) == len(set(options)) and not [option for option in options if "_" in option]
    assert "_" not in out.split("\n\n")[0]  # the usage line
    for cls, _ in COMMANDS[command].groups():
        for item in dataclasses.fields(cls):
            if item.metadata.get("positional"):  # an operand: in the usage line, not an option
                assert f" {item.metadata['metavar']} " in out.split("\n\n")[0]
            else:
                assert flag(item.name) in options
            assert item.metadata.get("help"), f"{cls.__name__}.{item.name} has no help"
    assert "(default: None)" not in out


def test_no_command_s_help_imports_torch_or_transformers():
    """The options of every command are plain data: reading them loads no model library, so
    ``--help`` and the checks of the options take a fraction of a second (timed by
    benchmarks/bench_help.py)."""
    code = ("import sys\nfrom safesteer.arguments import build_parser\nfrom safesteer.cli import COMMANDS\n"
            "for command in COMMANDS.values():\n    build_parser(command).format_help()\n"
            "print(sorted(name for name in ('torch', 'transformers', 'peft') if name in sys.modules))")
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert process.stdout.strip() == "[]"


def test_help_marks_required_options_groups_stages_and_spells_switches_once(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: safesteer run --output-dir DIR [options]")
    assert re.search(r"--output-dir DIR +Run directory: .* \(required\)", out)
    titles = re.findall(r"^(\S.*):$", out, flags=re.MULTILINE)
    assert [title.split(":")[0] for title in titles] == [
        "options", "model", "data", "run directory", "stage 1", "stage 2", "stage 3", "stage 3", "check"]
    assert "--overwrite, --no-overwrite" in out and out.count("--no-overwrite") == 2  # option, default
    assert "(default: --filter-by-score)" in out


def test_unknown_command(capsys):
    code, _, err = _run(capsys, "frobnicate")
    assert code == 2 and "unknown command" in err


def test_unknown_model_is_a_one_line_error(capsys, tmp_path):
    code, _, err = _run(capsys, "direction", "--model", "no-such-model",
                        "--output-dir", str(tmp_path / "run"))
    assert code == 2
    assert err.startswith("safesteer: error:") and err.count("\n") == 1
    assert "smollm2-135m" in err


def test_existing_artifacts_need_overwrite(capsys, tmp_path):
    (tmp_path / "direction.json").write_text("{}")
    code, _, err = _run(capsys, "direction", "--output-dir", str(tmp_path))
    assert code == 2 and "--overwrite" in err
    assert [path.name for path in tmp_path.iterdir()] == ["direction.json"]


def test_yaml_config_unknown_key_and_bad_yaml(capsys, tmp_path):
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("n_train: 4\nnot_an_option: 1\n")
    code, _, err = _run(capsys, "direction", "--config", str(bad_key), "--output-dir", str(tmp_path))
    assert code == 2 and "not_an_option" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("n_train: [1,\n")
    code, _, err = _run(capsys, "direction", "--config", str(broken), "--output-dir", str(tmp_path))
    assert code == 2 and "broken.yaml" in err and "line" in err


def test_invalid_option_value_is_a_one_line_error(capsys, tmp_path):
    code, _, err = _run(capsys, "direction", "--method", "response", "--target-refusal", "2",
                        "--output-dir", str(tmp_path))
    assert code == 2 and "--target-refusal" in err


@pytest.fixture
def saved_tiny_model(tiny_model, tiny_tokenizer, tmp_path):
    path = tmp_path / "tiny-model"
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_direction_then_chat_on_a_local_model(capsys, tmp_path, saved_tiny_model):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Tell me about item {i}."}}\n' for i in range(6)))
    config = tmp_path / "direction.yaml"
    config.write_text(
        f"harmful_train: {prompts}\nharmless_train: {prompts}\nharmful_val: {prompts}\n"
        f"harmless_val: {prompts}\nn_train: 4\nn_val: 2\nresponse_n_train: 2\nresponse_n_val: 2\n"
        "val_max_new_tokens: 2\nresponse_betas: [0.5]\nmethod: response\n")
    run = tmp_path / "run"
    code, out, err = _run(capsys, "direction", "--config", str(config), "--model", str(saved_tiny_model),
                          "--dtype", "float32", "--output-dir", str(run))
    assert code == 0, err
    assert "layer:" in out and (run / "direction.safetensors").is_file()
    code, out, err = _run(capsys, "chat", "--model", str(saved_tiny_model), "--dtype", "float32",
                          "--run-dir", str(run), "--prompt", "Hello there", "--max-new-tokens", "3")
    assert code == 0, err
    assert ">>> Hello there" in out and "base    |" in out and "teacher |" in out
    assert "student" not in out  # the run has no student yet


def _answers(out):
    """Each chat target's answer lines, by target name."""
    answers = {}
    for line in out.splitlines():
        name, bar, text = line.strip().partition(" | ")
        if bar:
            answers.setdefault(name.strip(), []).append(text)
    return answers


@pytest.mark.parametrize("student_kind", ["adapter", "full"])
def test_chat_shows_the_run_s_student_beside_base_and_teacher(capsys, tmp_path, saved_tiny_model,
                                                              tiny_tokenizer, student_kind):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from safesteer.direction import Direction
    from safesteer.models.generation import generate_responses

    run = tmp_path / "run"
    Direction(torch.ones(32) * 8, 1, 1.0, {"num_layers": 2}).save(run)
    student = AutoModelForCausalLM.from_pretrained(saved_tiny_model)
    if student_kind == "adapter":
        student = get_peft_model(student, LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    else:
        torch.nn.init.normal_(student.lm_head.weight, generator=torch.Generator().manual_seed(3))
    student.save_pretrained(run / "student")
    tiny_tokenizer.save_pretrained(run / "student")
    expected = generate_responses(student.eval(), tiny_tokenizer, ["Hello there"], max_new_tokens=4)
    flags = ["chat", "--model", str(saved_tiny_model), "--run-dir", str(run), "--prompt", "Hello there",
             "--max-new-tokens", "4"]
    code, out, err = _run(capsys, *flags)
    assert code == 0, err
    answers = _answers(out)
    assert list(answers) == ["base", "teacher", "student"] and answers["student"] == expected
    assert len({answers["base"][0], answers["student"][0]}) == 2
    code, out, err = _run(capsys, *flags, "--targets", "student", "base")
    assert code == 0, err
    assert list(_answers(out)) == ["student", "base"]


def test_chat_cuts_a_prompt_too_long_for_the_context_on_the_left(capsys, caplog, tmp_path, saved_tiny_model):
    import torch

    from safesteer.direction import Direction

    run = tmp_path / "run"
    Direction(torch.ones(32), 1, 1.0, {"num_layers": 2}).save(run)
    long_prompt = "the cat writes a poem today. " * 200 + "What did the cat write?"
    code, out, err = _run(capsys, "chat", "--model", str(saved_tiny_model), "--run-dir", str(run),
                          "--prompt", long_prompt, "Short one.", "--max-new-tokens", "16")
    assert code == 0, err
    assert "prompt 1 is" in caplog.text and "fit the model's 256-token context" in caplog.text
    assert "prompt 2" not in caplog.text
    assert "What did the cat write?" in out and ">>> Short one." in out


def test_fit_prompts_keeps_the_end_within_the_context(tiny_tokenizer):
    from safesteer.chat import fit_prompts
    from safesteer.errors import SafesteerError
    from safesteer.models.rendering import render_prompts

    prompts = fit_prompts(tiny_tokenizer, ["a gardener paints the fence quickly? " * 100, "Hi"], 256, 16)
    rendered = tiny_tokenizer(render_prompts(tiny_tokenizer, prompts), add_special_tokens=False)["input_ids"]
    assert 200 < len(rendered[0]) <= 256 - 16 and prompts[0].endswith("quickly? ") and prompts[1] == "Hi"
    with pytest.raises(SafesteerError, match="--max-new-tokens 256 leaves no room"):
        fit_prompts(tiny_tokenizer, ["Hi"], 256, 256)


def test_chat_needs_a_prompt(capsys, tmp_path):
    code, _, err = _run(capsys, "chat", "--run-dir", str(tmp_path))
    assert code == 2 and "--prompt" in err


def test_failed_run_leaves_no_output_directory(capsys, tmp_path):
    run = tmp_path / "run"
    code, _, _ = _run(capsys, "direction", "--model", "no-such-model", "--output-dir", str(run))
    assert code == 2 and not run.exists()


def test_yaml_values_parse_like_flags(tmp_path):
    from safesteer.cli import parse
    from safesteer.direction_config import DirectionConfig

    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nresponse_betas: 0.25\nfilter_by_score: false\n")
    _, parsed = parse("direction", ["--config", str(config)])
    direction = next(item for item in parsed if isinstance(item, DirectionConfig))
    assert direction.response_betas == [0.25] and direction.filter_by_score is False
    _, parsed = parse("direction", ["--config", str(config), "--response-betas", "0.5", "0.7"])
    direction = next(item for item in parsed if isinstance(item, DirectionConfig))
    assert direction.response_betas == [0.5, 0.7]


def test_bf16_is_a_switch_that_also_takes_auto_on_the_command_line_and_in_yaml(capsys, tmp_path):
    from safesteer.cli import parse
    from safesteer.distill.config import DistillConfig

    def bf16(*args: str) -> object:
        parsed = parse("run", ["--output-dir", str(tmp_path / "run"), *args])[1]
        return next(item for item in parsed if isinstance(item, DistillConfig)).bf16

    config = tmp_path / "c.yaml"
    config.write_text("bf16: auto\n")
    assert [bf16(), bf16("--bf16"), bf16("--bf16=auto"), bf16("--bf16", "auto"), bf16("--no-bf16"),
            bf16("--config", str(config)), bf16("--config", str(config), "--no-bf16")] == [
        False, True, "auto", "auto", False, "auto", False]
    assert bf16("--preset", "demo") == "auto"
    for args in (["--bf16=yes"], ["--no-bf16=auto"]):
        code, _, err = _run(capsys, "run", "--output-dir", str(tmp_path / "run"), *args)
        assert code == 2 and err.count("\n") == 1 and "--" in err and "expected no value" in err
    config.write_text("n_train: 4\nbf16: maybe\n")
    code, _, err = _run(capsys, "run", "--output-dir", str(tmp_path / "run"), "--config", str(config))
    assert code == 2 and "line 2" in err and "expected true, false or auto, got 'maybe'" in err
    with pytest.raises(SystemExit):
        main(["run", "--preset", "demo", "--help"])
    assert "(default: --bf16=auto)" in capsys.readouterr().out


def test_option_flags_read_back_to_the_same_configs():
    from dataclasses import asdict

    from safesteer.arguments import option_flags
    from safesteer.cli import parse

    _, parsed = parse("run", ["--output-dir", "x y", "--preset", "demo", "--retain-prompts", "a,b",
                              "--n-retain-prompts", "2", "--response-layers", "1", "3",
                              "--teacher-system-prompt", "-- be safe --", "--no-use-lora", "--bf16=auto"])
    flags = option_flags({key: value for item in parsed for key, value in asdict(item).items()})
    assert parse("run", flags)[1] == parsed


def test_unknown_flag_is_a_one_line_error(capsys, tmp_path):
    code, _, err = _run(capsys, "direction", "--output-dir", str(tmp_path), "--no-such-flag", "1")
    assert code == 2 and "--no-such-flag" in err and err.count("\n") == 1
    code, _, err = _run(capsys, "direction", "--output-dir", str(tmp_path), "--preset", "demo")
    assert code == 2 and "--preset" in err


def test_compare_reads_a_yaml_config_and_its_methods_file_errors_are_one_line(capsys, tmp_path):
    from safesteer.cli import parse
    from safesteer.compare_config import CompareArguments

    methods = tmp_path / "methods.yaml"
    methods.write_text("- name: mine\n  run: {mode: sideways}\n  extra: 1\n")
    config = tmp_path / "compare.yaml"
    config.write_text(f"output_dir: {tmp_path / 'c'}\nmethods: {methods}\nquick: true\n"
                      "benchmarks: [jbb, mmlu-nll]\n")
    _, parsed = parse("compare", ["--config", str(config), "--limit", "2"])
    args = next(item for item in parsed if isinstance(item, CompareArguments))
    assert (args.methods, args.quick, args.benchmarks) == (str(methods), True, ["jbb", "mmlu-nll"])
    assert (args.limit, args.capability_limit) == (2, 4)
    code, _, err = _run(capsys, "compare", "--config", str(config))
    assert code == 2 and err.count("\n") == 1
    assert f"{methods}: line 3: unknown method key 'extra'" in err
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------- output directories


def snapshot(root):
    """Every path under ``root`` with its bytes (True for a directory); None when root is missing."""
    return sorted((str(path.relative_to(root)), path.is_dir() or path.read_bytes())
                  for path in root.rglob("*")) if root.exists() else None


def unrelated_folder(path):
    (path / "photos").mkdir(parents=True)
    (path / "photos" / "cat.jpg").write_bytes(b"jpeg")
    (path / "notes.txt").write_text("mine")
    return path


@pytest.fixture
def run_with_student(saved_tiny_model, tmp_path, capsys):
    """A run directory as `safesteer run` leaves it, with a (zero-initialised) LoRA student."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    student = get_peft_model(AutoModelForCausalLM.from_pretrained(saved_tiny_model),
                             LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    student.save_pretrained(run / "student")
    for name in ("safesteer.json", "direction.json", "safety_tokens.json", "check.json"):
        (run / name).write_text('{"kind": "run"}')
    capsys.readouterr()  # the progress bars of saving and loading
    return run


def _export(capsys, model, run, output, *flags):
    return _run(capsys, "export", "--model", str(model), "--run-dir", str(run), "--output-dir", str(output),
                *flags)


def test_export_never_replaces_or_writes_into_the_run(capsys, tmp_path, saved_tiny_model, run_with_student):
    before = snapshot(tmp_path)
    for output, relation in ((run_with_student, "is the"), (run_with_student / "merged", "is inside the"),
                             (run_with_student / "student", "is inside the"), (tmp_path, "contains the")):
        code, _, err = _export(capsys, saved_tiny_model, run_with_student, output, "--overwrite")
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"safesteer: error: refusing to write into {output}: it {relation} --run-dir "
                              f"{run_with_student}")
        assert snapshot(tmp_path) == before


def test_export_overwrite_refuses_an_unrelated_folder(capsys, tmp_path, saved_tiny_model, run_with_student):
    mine = unrelated_folder(tmp_path / "mine")
    before = snapshot(mine)
    code, _, err = _export(capsys, saved_tiny_model, run_with_student, mine, "--overwrite")
    assert code == 2 and err == (f"safesteer: error: refusing to replace {mine}: it holds files that are "
                                 "not a safesteer export (notes.txt, photos); choose a new or empty "
                                 "--output-dir\n")
    assert snapshot(mine) == before


def test_export_overwrite_replaces_an_earlier_export(capsys, tmp_path, saved_tiny_model, run_with_student):
    from transformers import AutoModelForCausalLM

    merged = tmp_path / "merged"
    code, _, err = _export(capsys, saved_tiny_model, run_with_student, merged)
    assert code == 0, err
    assert json.loads((merged / "safesteer.json").read_text())["kind"] == "export"
    (merged / "stale.txt").write_text("left by the first export")
    before = snapshot(merged)
    code, _, err = _export(capsys, saved_tiny_model, run_with_student, merged)
    assert code == 2 and "already holds an export" in err and "--overwrite" in err
    assert snapshot(merged) == before
    code, _, err = _export(capsys, saved_tiny_model, run_with_student, merged, "--overwrite")
    assert code == 0, err
    assert not (merged / "stale.txt").exists() and (merged / "safesteer.json").is_file()
    AutoModelForCausalLM.from_pretrained(merged)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged", "run", "tiny-model"]


@pytest.mark.parametrize("command", ["direction", "eval"])
def test_direction_and_eval_refuse_an_unrelated_folder_and_a_run(capsys, tmp_path, command,
                                                                 run_with_student):
    mine = unrelated_folder(tmp_path / "mine")
    flags = ["--overwrite"] if command == "direction" else ["--targets", "base"]
    before = snapshot(tmp_path)
    code, _, err = _run(capsys, command, "--output-dir", str(mine), *flags)
    assert code == 2 and "it holds files that are not a safesteer" in err and err.count("\n") == 1
    if command == "eval":
        code, _, err = _run(capsys, command, "--output-dir", str(run_with_student), *flags)
        assert code == 2 and "it is a safesteer run directory, not an eval directory" in err
    assert snapshot(tmp_path) == before


def test_tokens_overwrite_is_refused_once_a_student_learnt_them(capsys, run_with_student):
    before = snapshot(run_with_student)
    code, _, err = _run(capsys, "tokens", "--run-dir", str(run_with_student), "--overwrite")
    assert code == 2 and "student" in err and "made from its safety_tokens.json" in err
    assert snapshot(run_with_student) == before
