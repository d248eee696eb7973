"""Teacher-forced scoring on a tiny random model: left-padded rows score like unpadded ones."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from safesteer.scoring import (
    completion_logits,
    last_logits,
    left_pad,
    prompt_groups,
    shared_prompt_completion_logits,
)


def test_left_pad_puts_every_last_token_in_the_last_column() -> None:
    input_ids, attention_mask = left_pad([[5, 6, 7], [8], []], pad_id=0, device="cpu")
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    empty_ids, empty_mask = left_pad([], pad_id=0, device="cpu")
    assert empty_ids.shape == empty_mask.shape == (0, 0)


def test_completion_logits_score_the_sampled_contexts(tiny_model, tiny_tokenizer) -> None:
    """Left padding and position ids as in generate(): padded rows score like unpadded ones."""
    input_ids = tiny_tokenizer(["<|im_start|>user\na small robot finds a bicycle.<|im_end|>\n"],
                               return_tensors="pt", add_special_tokens=False)["input_ids"]
    completion = torch.tensor([[40, 41, 42]])
    sequence = torch.cat([input_ids, completion], 1)
    padded = torch.cat([torch.full((1, 3), tiny_tokenizer.pad_token_id), sequence], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(sequence)], 1)
    with torch.no_grad():
        plain = completion_logits(tiny_model, sequence, torch.ones_like(sequence), 3)
        left_padded = completion_logits(tiny_model, padded, mask, 3)
        reference = tiny_model(sequence).logits[:, -4:-1]
        last = last_logits(tiny_model, padded, mask, 2)
        scaled = completion_logits(tiny_model, padded, mask, 3, temperature=0.5)
    assert plain.shape == (1, 3, len(tiny_tokenizer))
    torch.testing.assert_close(plain, reference)
    torch.testing.assert_close(left_padded, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, tiny_model(sequence).logits[:, -2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scaled, left_padded / 0.5)


def test_prompt_groups_are_runs_of_consecutive_equal_prompts() -> None:
    starts, runs = prompt_groups([4, 4, 4, 1, 1, 4, 7])
    assert starts == [0, 3, 5, 6]
    assert runs.tolist() == [0, 0, 0, 1, 1, 2, 3]
    starts, runs = prompt_groups([])
    assert starts == [] and runs.shape == (0,)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_shared_prompts_give_each_rows_own_logits_and_gradient(make_tiny_model, arch) -> None:
    """Reading a prompt once for its M rows equals every row re-reading it: the logits, and the
    gradient a LoRA student gets through the shared keys and values."""
    torch.manual_seed(1)
    prompts = [[5, 9, 13, 17, 21], [6, 10], [7, 11, 15]]
    samples, length = 3, 4
    rows = torch.arange(len(prompts)).repeat_interleave(samples)
    completions = torch.randint(3, 60, (len(rows), length))
    prompt_ids, prompt_mask = left_pad(prompts, 0, "cpu")
    sequences = torch.cat([prompt_ids[rows], completions], 1)
    mask = torch.cat([prompt_mask[rows], torch.ones_like(completions)], 1)
    student = get_peft_model(make_tiny_model(arch), LoraConfig(r=4, target_modules="all-linear",
                                                                  init_lora_weights=False))
    weights = torch.randn(len(rows), length, student.config.vocab_size)
    results = []
    for shared in (False, True):
        student.zero_grad()
        if shared:
            logits = shared_prompt_completion_logits(student, prompt_ids, prompt_mask, rows, completions, 0.7)
        else:
            logits = completion_logits(student, sequences, mask, length, 0.7)
        (logits * weights).sum().backward()
        results.append((logits.detach(), {name: p.grad.clone() for name, p in student.named_parameters()
                                          if p.requires_grad}))
    (plain, plain_grads), (shared_logits, shared_grads) = results
    assert shared_logits.shape == (len(rows), length, student.config.vocab_size)
    torch.testing.assert_close(shared_logits, plain, atol=1e-5, rtol=1e-4)
    assert plain_grads.keys() == shared_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)
