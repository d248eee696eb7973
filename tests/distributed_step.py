"""One distillation step on fixed samples, run alone or under torchrun by tests/test_distributed.py.

``python tests/distributed_step.py MODEL_DIR OUT_DIR`` runs every case of :data:`CASES` in one
process; under ``torchrun --nproc-per-node 2`` the same cases run as a prepared-DDP (gloo) step.
Each process saves, per case, the step's gradient (after the backward, before the optimizer step),
the metrics, the trainable weights after one optimizer step (which ends in a checkpoint) and after
a second one taken by a run resumed from that checkpoint, for the test to compare.

Sampling is replaced by completions fixed by each row's prompt, so a row has the same tokens
whichever process samples it and in whatever batch; everything else (the split of the step's
prompts, stand-in samples of a process without prompts, micro-batches, loss, synchronisation,
optimizer and checkpoint) is the trainer's own.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from safesteer.direction import Direction
from safesteer.distill import trainer
from safesteer.distill.config import DistillConfig
from safesteer.distill.trainer import Distiller

PROMPTS = [f"our team plans item number {index} before lunch." for index in range(8)]
SAFETY_IDS = list(range(40, 52))
SETTINGS: dict[str, object] = {
    "learning_rate": 1e-2, "samples_per_prompt": 2, "max_new_tokens": 6, "warmup_ratio": 0.0,
    "lora_r": 4, "lora_alpha": 8, "seed": 0, "save_steps": 0}
CASES: dict[str, dict[str, object]] = {
    # 2 prompts per process, 2 micro-batches each (one process: 3).
    "even": {"prompts_per_step": 4, "micro_batch_size": 3},
    # 2 prompts on one process, 1 on the other: 4 and 2 rows, the second pads a micro-batch.
    "uneven-sequence": {"prompts_per_step": 3, "micro_batch_size": 2, "reduction": "sequence"},
    # One prompt per step: the second process has none and runs stand-in samples of weight zero.
    "one-prompt": {"prompts_per_step": 1, "micro_batch_size": 4},
    "full-finetune": {"prompts_per_step": 4, "micro_batch_size": 4, "use_lora": False,
                      "learning_rate": 1e-3},
    "sft": {"prompts_per_step": 4, "micro_batch_size": 3, "mode": "sft"},
}


def fixed_completions(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                      config: DistillConfig, eos_token_ids: list[int], pad_token_id: int, seed: int,
                      step: int, samples: int = 1, share: bool = True) -> torch.Tensor:
    """Stand-in for ``sample_completions``: tokens drawn from a seed made of the row's prompt
    (so a prompt's ``samples`` rows alike)."""
    vocab = model.get_input_embeddings().num_embeddings
    rows = []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
        prompt = [token for token, kept in zip(ids, mask, strict=True) if kept]
        generator = torch.Generator().manual_seed(sum((i + 1) * token for i, token in enumerate(prompt)))
        tokens = torch.randint(3, vocab, (config.max_new_tokens,), generator=generator)
        end = int(torch.randint(2, config.max_new_tokens + 2, (1,), generator=generator))
        if end <= config.max_new_tokens:  # otherwise truncated, without EOS
            tokens[end - 1] = eos_token_ids[0]
            tokens[end:] = pad_token_id
        rows.append(tokens)
    return torch.stack(rows).repeat_interleave(samples, dim=0).to(input_ids.device)


def make_distiller(name: str, model_dir: Path, out_dir: Path, resume: bool) -> Distiller:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 3
    direction = Direction(vector, layer=1, coefficient=1.0,
                          metadata={"num_layers": model.config.num_hidden_layers})
    config = DistillConfig(**{**SETTINGS, **CASES[name]})  # type: ignore[arg-type]
    distiller = Distiller(model, tokenizer, direction, PROMPTS, config, out_dir / name,
                          safety_token_ids=SAFETY_IDS, overwrite=not resume, resume=resume)
    distiller.setup()
    return distiller


def trainable(distiller: Distiller) -> dict[str, torch.Tensor]:
    return {key: p for key, p in distiller.student.named_parameters() if p.requires_grad}


def run_case(name: str, model_dir: Path, out_dir: Path) -> None:
    distiller = make_distiller(name, model_dir, out_dir, resume=False)
    metrics = distiller.backward(distiller.sample(1))
    gradient = {key: p.grad.detach().clone() for key, p in trainable(distiller).items()}
    distiller.optimizer.zero_grad(set_to_none=True)
    result = distiller.train(max_steps=1)
    weights = {key: p.detach().clone() for key, p in trainable(distiller).items()}
    resumed = make_distiller(name, model_dir, out_dir, resume=True)
    resumed.train(max_steps=2)
    torch.save({"gradient": gradient, "metrics": metrics, "step_metrics": result.last_metrics,
                "weights": weights, "resumed_step": resumed.step,
                "resumed_weights": {key: p.detach().clone() for key, p in trainable(resumed).items()}},
               out_dir / f"{name}-rank{distiller.accelerator.process_index}.pt")


def main() -> None:
    model_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    trainer.sample_completions = fixed_completions  # type: ignore[assignment]
    for name in CASES:
        run_case(name, model_dir, out_dir)


if __name__ == "__main__":
    main()
