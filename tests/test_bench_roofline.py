"""The FLOP count of benchmarks/bench_roofline.py against torch's own operator-level counter."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def roofline(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports its sibling bench_distill
    return importlib.import_module("bench_roofline")


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # untied and tied output head
def test_forward_flops_match_the_counted_products(roofline, make_tiny_model, arch: str) -> None:
    model = make_tiny_model(arch)
    model.config._attn_implementation = "eager"  # attention as plain matmuls, which the counter sees
    body, head, _ = roofline.weight_counts(model)
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    assert body + head + (0 if tied else embedding.numel()) == sum(p.numel() for p in model.parameters())

    batch, length, keep = 3, 12, 5
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, logits_to_keep=keep, use_cache=False)
    config = model.config
    # QK^T and attention x V: 2 x (2 x length^2 x head_dim) per head of each layer, per row.
    heads = config.num_hidden_layers * config.num_attention_heads
    attention = 4 * heads * batch * length**2 * config.head_dim
    expected = roofline.forward_flops(body, head, batch * length, batch * keep) + attention
    # forward_flops counts the norms' few weights as products too: well under 2% here.
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.02)
    assert counter.get_total_flops() < expected
