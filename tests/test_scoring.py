"""Teacher-forced scoring on a tiny random model: left-padded rows score like unpadded ones."""

from __future__ import annotations

import torch

from safesteer.scoring import completion_logits, last_logits, left_pad


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
