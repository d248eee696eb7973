"""GPU readiness: the whole pipeline on a tiny random model in bf16, offline, stage by stage.

    python benchmarks/gpu_check.py [--work-dir DIR] [--allow-cpu] [--paper-8b]

Builds a random 4-layer Llama (d_model 64) with a word-level chat tokenizer, saves it as a model
directory, and runs each stage as its own process, as a user would:

1. ``run``: ``safesteer run`` on one process: direction, safety tokens, 2 distillation steps of
   LoRA (4 prompts x 2 samples in micro-batches of 2) and the closing check, in bfloat16;
2. ``run-ddp``: the same under ``accelerate launch`` with examples/accelerate/ddp-gpu.yaml on 2
   processes (with 2 or more GPUs);
3. ``run-fsdp``: the full fine-tune (--no-use-lora, float32 student) under
   examples/accelerate/fsdp.yaml on 2 processes (with 2 or more GPUs);
4. ``eval``: ``safesteer eval`` of base, teacher and the student of 1 on a few local prompts;
5. ``paper-8b`` (with ``--paper-8b``): README's one-GPU 8B setting on a random model of
   Llama-3.1-8B's shapes (128,256-word vocabulary): LoRA rank 16 on all linear layers, bfloat16
   weights, 2 steps of 4 prompts x 8 samples x 512 tokens in micro-batches of 1 with gradient
   checkpointing. It passes only if its peak GPU memory stays under 80 GiB. Random weights almost
   never sample the end token, so every completion runs its 512 tokens: the worst case.

Prints PASS, FAIL or SKIP per stage with its seconds, peak GPU memory (the main process's), a run's
stage seconds and each distillation step's seconds, and exits 1 if a stage failed. No network and
no downloads; the device is whatever ``--device auto`` and accelerate pick (the process's own GPU
under a launcher). Without CUDA it checks nothing unless ``--allow-cpu`` (then stages 1 and 4, and
5 if asked, run on the CPU: a dry run of this script).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

REPOSITORY = Path(__file__).resolve().parents[1]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
            "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
            "{% endif %}")
WORDS = ["user", "assistant", "system", "tell", "me", "about", "item", "number", "please", "explain",
         "how", "to", "make", "a", "the", "it", "is", "i", "cannot", "help", "with", "that", "sorry",
         "as", "an", "ai", "can", "not", "will", "do", "here", "steps", "first", "then", "safe",
         "unsafe", "harmful", "request", "refuse", "sure", "of", "course"]
PROMPTS = [f"tell me about item number {index}" for index in range(12)]
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2}
LLAMA_8B_SHAPE = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
                  "vocab_size": 128256}
ONE_GPU_MIB = 80 * 1024
# Settings of stages 1-3 sized for seconds, not results (the keys of `safesteer run --config`).
RUN_SETTINGS = {
    "method": "response", "n_train": 4, "n_val": 2, "response_n_train": 2, "response_n_val": 2,
    "val_max_new_tokens": 2, "response_betas": [0.5], "vote_n_prompts": 2, "vote_samples_per_prompt": 2,
    "horizon": 2, "num_safety_tokens": 8, "inner_top_k": 8, "p_min": 0.0, "n_train_prompts": 8,
    "prompts_per_step": 4, "samples_per_prompt": 2, "micro_batch_size": 2, "max_new_tokens": 8,
    "check_limit": 2, "check_max_new_tokens": 4, "lora_r": 4, "dtype": "bfloat16"}
# README's "8B model, one 80 GB GPU, with LoRA" (the paper's sampling shape; stages 1-2 kept small).
PAPER_8B_SETTINGS = {**RUN_SETTINGS, "use_lora": True, "lora_r": 16, "n_train_prompts": 8,
                     "samples_per_prompt": 8, "max_new_tokens": 512, "micro_batch_size": 1,
                     "gradient_checkpointing": True, "reduction": "sequence"}
PROMPT_SETS = ("harmful_train", "harmless_train", "harmful_val", "harmless_val", "vote_prompts",
               "train_prompts")


def write_model(directory: Path, shape: dict[str, float]) -> None:
    """A random bf16 Llama of ``shape`` and a word-level ChatML tokenizer (every word above, digits
    included, then filler words up to the shape's vocabulary size), built on the GPU when there is one."""
    words = [*SPECIALS, *dict.fromkeys(WORDS + [str(number) for number in range(100)])]
    shape = dict(shape)
    words += [f"w{index}" for index in range(int(shape.pop("vocab_size", 0)) - len(words))]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        unk_token="<unk>", additional_special_tokens=["<|im_start|>"],
                                        padding_side="left")
    tokenizer.chat_template = TEMPLATE
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()


def run_stage(name: str, command: list[str], summary_file: Path | None,
              limit_mib: float | None = None) -> bool:
    """Run one stage's process; print its verdict, seconds, the peak GPU memory it recorded in
    ``summary_file`` and, for a run, its stage seconds and each distillation step's seconds.
    With ``limit_mib`` the stage fails if that peak is above it (on a GPU; a CPU run records none)."""
    started = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, cwd=REPOSITORY)
    seconds = time.perf_counter() - started
    summary = {}
    if process.returncode == 0 and summary_file is not None and summary_file.is_file():
        summary = json.loads(summary_file.read_text())
    peak = summary.get("peak_gpu_mib")
    passed = process.returncode == 0 and (limit_mib is None or peak is None or peak <= limit_mib)
    memory = "" if peak is None else f", peak GPU {peak:,.1f} MiB"
    print(f"{'PASS' if passed else 'FAIL'}  {name:<9} {seconds:6.1f} s{memory}"
          + ("" if limit_mib is None else f" (limit {limit_mib:.0f} MiB)"), flush=True)
    if summary.get("stage_seconds"):
        print("      stages: " + ", ".join(f"{stage} {value:.1f} s" for stage, value in
                                          summary["stage_seconds"].items()))
    log = summary_file.parent / "train_log.jsonl" if summary_file is not None else None
    if process.returncode == 0 and log is not None and log.is_file():
        steps = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        print("      steps: " + ", ".join(f"{step['seconds']:.1f} s ({step['completion_tokens']:.0f} tokens)"
                                         for step in steps), flush=True)
    if process.returncode != 0:
        print("      " + "\n      ".join((process.stderr or process.stdout).strip().splitlines()[-15:]))
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path,
                        help="where to build the model and runs (default: temporary)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without CUDA, run the single-process stages on the CPU")
    parser.add_argument("--paper-8b", action="store_true",
                        help="also run stage 5, the 8B LoRA setting (writes a 16 GB model; minutes)")
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    if not gpus and not args.allow_cpu:
        print("SKIP  no CUDA device: nothing checked (--allow-cpu runs the single-process stages on the CPU)")
        return 0
    print(f"torch {torch.__version__}, {gpus} CUDA device(s)"
          + (f": {torch.cuda.get_device_name()}" if gpus else ""), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        model_dir, prompts = work / "tiny-model", work / "prompts.txt"
        write_model(model_dir, TINY_SHAPE)
        prompts.write_text("".join(line + "\n" for line in PROMPTS))
        sets = {**dict.fromkeys(PROMPT_SETS, str(prompts)), "check_harmful": [str(prompts)],
                "check_benign": [str(prompts)]}
        config = work / "run.yaml"
        config.write_text(yaml.safe_dump({**RUN_SETTINGS, **sets}))
        cli = ["-m", "safesteer.cli", "run", "--config", str(config), "--model", str(model_dir)]
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                  "--config_file"]
        results = [run_stage("run", [sys.executable, *cli, "--output-dir", str(work / "run")],
                             work / "run" / "check.json")]
        for name, config_file, extra in (("run-ddp", "ddp-gpu.yaml", []),
                                         ("run-fsdp", "fsdp.yaml", ["--no-use-lora"])):
            if gpus < 2:
                print(f"SKIP  {name:<9} (needs 2 GPUs)")
                continue
            config_path = REPOSITORY / "examples" / "accelerate" / config_file
            results.append(run_stage(name, [*launch, str(config_path), *cli, *extra, "--output-dir",
                                            str(work / name)], work / name / "check.json"))
        peak_file = work / "eval" / "peak.json"  # beside eval's results, after they are written
        report_peak = (f"import json, sys, torch; from safesteer.cli import main; code = main(sys.argv[1:]); "
                       f"json.dump({{'peak_gpu_mib': torch.cuda.max_memory_allocated() / 2**20 "
                       f"if torch.cuda.is_available() else None}}, open({str(peak_file)!r}, 'w')); "
                       f"sys.exit(code)")
        results.append(run_stage("eval", [
            sys.executable, "-c", report_peak, "eval", "--model", str(model_dir), "--dtype", "bfloat16",
            "--run-dir", str(work / "run"), "--targets", "base", "teacher", "student",
            "--benchmarks", str(prompts), "--limit", "4", "--max-new-tokens", "4",
            "--exclude-near", str(prompts), "--output-dir", str(work / "eval")], peak_file))
        if args.paper_8b:
            large_dir, large_config = work / "llama-8b-shaped", work / "paper-8b.yaml"
            started = time.perf_counter()
            write_model(large_dir, LLAMA_8B_SHAPE)
            print(f"      (random 8B-shaped model written in {time.perf_counter() - started:.0f} s)",
                  flush=True)
            large_config.write_text(yaml.safe_dump({**PAPER_8B_SETTINGS, **sets}))
            results.append(run_stage("paper-8b", [
                sys.executable, "-m", "safesteer.cli", "run", "--config", str(large_config), "--model",
                str(large_dir), "--output-dir", str(work / "paper-8b")], work / "paper-8b" / "check.json",
                limit_mib=ONE_GPU_MIB))
    print("GPU check: " + ("all stages passed" if all(results) else "FAILED"))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
