"""Safety-token selection (docs/method.md §5): the vote maths on synthetic log-probabilities with known
answers, then the model-facing stage on tiny random models."""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from safesteer.direction import Direction
from safesteer.errors import SafesteerError
from safesteer.models.rendering import render_prompts
from safesteer.tokens import (
    SAFETY_TOKENS_FILE,
    SafetyTokenSet,
    VoteAccumulator,
    answer_logprobs,
    banned_token_mask,
    end_of_turn_valid_mask,
    mean_contrast_tokens,
    select_safety_tokens,
    select_top_tokens,
    vote_safety_tokens,
)
from safesteer.tokens.rollouts import _sample_next_tokens, steered_rollouts
from safesteer.tokens.vocabulary import end_of_turn_ids, special_token_ids
from safesteer.tokens_config import TokensConfig

VOCAB = 10
NOTHING_BANNED = torch.zeros(VOCAB, dtype=torch.bool)

# Tokens by falling contrast at each (row, position); the rest of the vocabulary is tied below.
RANKINGS = {
    (0, 0): [3, 5, 9],
    (0, 1): [3, 7, 2],
    (1, 0): [5, 3, 9],
    (1, 1): [6, 5, 4],  # invalid: never votes
    (2, 0): [3, 1, 9],
    (2, 1): [7, 8, 2],
}
VALID = torch.tensor([[True, True], [True, False], [True, True]])


def ranked_logprobs() -> tuple[torch.Tensor, torch.Tensor]:
    """Base and teacher log-probs [3, 2, VOCAB] whose contrast ranks tokens as in RANKINGS."""
    generator = torch.Generator().manual_seed(0)
    base_logits = torch.randn(3, 2, VOCAB, generator=generator, dtype=torch.float64)
    contrast = torch.zeros(3, 2, VOCAB, dtype=torch.float64)
    for (row, position), tokens in RANKINGS.items():
        for rank, token in enumerate(tokens):
            contrast[row, position, token] = 5.0 - rank
    base = torch.log_softmax(base_logits, -1)
    teacher = torch.log_softmax(base_logits + contrast, -1)
    return teacher, base


def test_votes_match_a_hand_count():
    teacher, base = ranked_logprobs()
    result = vote_safety_tokens(teacher, base, VALID, banned=NOTHING_BANNED, top_k=3, inner_top_k=2)
    # votes: 3 -> 4, 5 -> 2, 7 -> 2, 1 -> 1, 8 -> 1; 5 and 7 tie, the lower id goes first.
    assert result.token_ids == [3, 5, 7]
    assert result.scores == [4, 2, 2]
    assert result.aggregation == "vote"
    assert result.num_valid == 5


def test_votes_below_one_are_dropped_so_s_can_be_short():
    teacher, base = ranked_logprobs()
    result = vote_safety_tokens(teacher, base, VALID, banned=NOTHING_BANNED, top_k=9, inner_top_k=2)
    assert result.token_ids == [3, 5, 7, 1, 8]
    assert result.scores == [4, 2, 2, 1, 1]


def test_banned_tokens_are_removed_before_each_positions_top_k():
    teacher, base = ranked_logprobs()
    banned = NOTHING_BANNED.clone()
    banned[7] = True
    result = vote_safety_tokens(teacher, base, VALID, banned=banned, top_k=9, inner_top_k=2)
    # with 7 gone, (0, 1) and (2, 1) vote for their third token, 2, instead
    assert result.token_ids == [3, 2, 5, 1, 8]
    assert result.scores == [4, 2, 2, 1, 1]


def test_banned_tokens_never_vote_even_when_few_tokens_remain():
    teacher, base = ranked_logprobs()
    banned = torch.ones(VOCAB, dtype=torch.bool)
    banned[[3, 5]] = False
    result = vote_safety_tokens(teacher, base, VALID, banned=banned, top_k=9, inner_top_k=4)
    assert result.token_ids == [3, 5]
    assert result.scores == [5, 5]


def test_ties_inside_a_position_go_to_the_lower_id():
    flat = torch.zeros(4, 1, VOCAB)
    result = vote_safety_tokens(
        flat, flat, torch.ones(4, 1, dtype=torch.bool), banned=NOTHING_BANNED, inner_top_k=3
    )
    assert result.token_ids == [0, 1, 2]
    assert result.scores == [4, 4, 4]


def naive_votes(teacher, base, valid, banned, top_k, inner_top_k):
    """§5 steps 4, 8, 9 with Python loops and explicit (score, id) sort keys."""
    rows, horizon, vocab = teacher.shape
    votes = [0] * vocab
    for row in range(rows):
        for position in range(horizon):
            if not valid[row, position]:
                continue
            contrast = (teacher[row, position] - base[row, position]).tolist()
            allowed = [v for v in range(vocab) if not banned[v]]
            for v in sorted(allowed, key=lambda v: (-contrast[v], v))[:inner_top_k]:
                votes[v] += 1
    final = [-1 if banned[v] else votes[v] for v in range(vocab)]
    ranked = sorted(range(vocab), key=lambda v: (-final[v], v))[:top_k]
    return [v for v in ranked if final[v] > 0], [final[v] for v in ranked if final[v] > 0]


def tied_logprobs(rows: int, horizon: int, vocab: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Integer-valued contrasts, so ties at the K′ cut-off and in the final top K are common."""
    generator = torch.Generator().manual_seed(seed)
    base = -torch.randint(1, 4, (rows, horizon, vocab), generator=generator).double()
    teacher = -torch.randint(1, 4, (rows, horizon, vocab), generator=generator).double()
    valid = torch.rand(rows, horizon, generator=generator) < 0.8
    banned = torch.rand(vocab, generator=generator) < 0.2
    return teacher, base, valid, banned


@pytest.mark.parametrize("seed", range(5))
def test_votes_match_naive_reference_with_many_ties(seed):
    teacher, base, valid, banned = tied_logprobs(7, 3, 30, seed)
    result = vote_safety_tokens(teacher, base, valid, banned=banned, top_k=8, inner_top_k=5)
    ids, votes = naive_votes(teacher, base, valid, banned, top_k=8, inner_top_k=5)
    assert result.token_ids == ids
    assert result.scores == votes


def test_mean_probabilities_are_over_valid_pairs_only():
    teacher, base, valid, banned = tied_logprobs(7, 3, 30, seed=9)
    result = vote_safety_tokens(teacher, base, valid, banned=banned, top_k=8, inner_top_k=5)
    ids = result.token_ids
    expected_teacher = teacher.exp()[valid].mean(0)[ids]
    expected_base = base.exp()[valid].mean(0)[ids]
    assert result.num_valid == int(valid.sum())
    assert result.teacher_mean_probs == pytest.approx(expected_teacher.tolist(), rel=1e-6)
    assert result.base_mean_probs == pytest.approx(expected_base.tolist(), rel=1e-6)


def test_accumulator_fed_in_slices_equals_one_shot():
    teacher, base, valid, banned = tied_logprobs(6, 3, 30, seed=11)
    one_shot = vote_safety_tokens(teacher, base, valid, banned=banned, top_k=10, inner_top_k=4)

    accumulator = VoteAccumulator(30, inner_top_k=4, banned=banned)
    flat_teacher, flat_base, flat_valid = teacher.flatten(0, 1), base.flatten(0, 1), valid.flatten()
    for start, stop in [(0, 1), (1, 7), (7, 8), (8, 18)]:
        accumulator.add(flat_teacher[start:stop], flat_base[start:stop], flat_valid[start:stop])
    streamed = accumulator.select(top_k=10)
    assert (streamed.token_ids, streamed.scores) == (one_shot.token_ids, one_shot.scores)
    assert streamed.teacher_mean_probs == pytest.approx(one_shot.teacher_mean_probs, rel=1e-6)
    assert streamed.base_mean_probs == pytest.approx(one_shot.base_mean_probs, rel=1e-6)

    sums = VoteAccumulator(30, inner_top_k=0)
    sums.add(flat_teacher, flat_base, flat_valid)
    assert not sums.counts.any()
    torch.testing.assert_close(sums.teacher_mean_probs, accumulator.teacher_mean_probs)
    torch.testing.assert_close(sums.base_mean_probs, accumulator.base_mean_probs)


def test_accumulator_without_valid_pairs_refuses_to_average():
    accumulator = VoteAccumulator(VOCAB)
    accumulator.add(torch.zeros(2, VOCAB), torch.zeros(2, VOCAB), torch.zeros(2, dtype=torch.bool))
    assert accumulator.num_valid == 0
    with pytest.raises(ValueError, match="no valid"):
        _ = accumulator.teacher_mean_probs


def test_select_top_tokens_bans_ties_and_drops():
    counts = torch.tensor([0, 3, 5, 3, 9, 1, 3, 0])
    banned = torch.tensor([False, False, False, False, True, False, False, False])
    assert select_top_tokens(counts, banned, 4).tolist() == [2, 1, 3, 6]
    assert select_top_tokens(counts, banned, 8).tolist() == [2, 1, 3, 6, 5]


@pytest.mark.parametrize("seed", range(3))
def test_mean_variant_matches_naive_reference(seed):
    teacher, base, valid, banned = tied_logprobs(5, 3, 30, seed)
    teacher = teacher + 0.1 * torch.randn(teacher.shape, generator=torch.Generator().manual_seed(7))
    result = mean_contrast_tokens(teacher, base, valid, banned=banned, top_k=6)

    pairs = [(r, j) for r in range(5) for j in range(3) if valid[r, j]]
    mean = [sum(float(teacher[r, j, v] - base[r, j, v]) for r, j in pairs) / len(pairs)
            for v in range(30)]
    ranked = sorted((v for v in range(30) if not banned[v]), key=lambda v: (-mean[v], v))[:6]
    assert result.token_ids == ranked
    assert result.scores == pytest.approx([mean[v] for v in ranked])
    assert result.aggregation == "mean"


def test_mean_variant_breaks_ties_by_id_and_never_picks_banned():
    flat = torch.zeros(2, 2, VOCAB)
    banned = NOTHING_BANNED.clone()
    banned[[0, 2]] = True
    result = mean_contrast_tokens(flat, flat, torch.ones(2, 2, dtype=torch.bool), banned=banned,
                                  top_k=VOCAB)
    assert result.token_ids == [1, 3, 4, 5, 6, 7, 8, 9]


def test_banned_token_mask_rules():
    mean_probs = torch.tensor([0.5, 0.2, 0.001, 0.3, 0.1, 0.2], dtype=torch.float64)
    strings = ["Hello", "<|im_end|>", "illegal", "</s>", "x<|y", "Sorry"]
    banned = banned_token_mask(mean_probs, special_ids=[3], token_strings=strings, p_min=0.01)
    assert banned.tolist() == [False, True, True, True, True, False]
    assert not banned_token_mask(mean_probs, [], ["a"] * 6, p_min=0.0).any()
    with pytest.raises(ValueError):
        banned_token_mask(mean_probs, [], ["a"] * 5, p_min=0.0)


def test_end_of_turn_mask_invalidates_the_rest_of_the_row():
    argmax = torch.tensor([[5, 2, 7, 1], [9, 9, 9, 9], [8, 5, 5, 5], [3, 4, 9, 5]])
    valid = end_of_turn_valid_mask(argmax, end_ids=[9, 8])
    assert valid.tolist() == [
        [True, True, True, True],
        [False, False, False, False],
        [False, False, False, False],
        [True, True, False, False],
    ]
    assert end_of_turn_valid_mask(argmax, end_ids=[]).all()


def test_accumulator_rejects_mismatched_inputs():
    accumulator = VoteAccumulator(VOCAB)
    slice_ = torch.zeros(3, VOCAB)
    with pytest.raises(ValueError):
        accumulator.add(slice_, torch.zeros(3, VOCAB + 1), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        accumulator.add(slice_, slice_, torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="bool"):
        VoteAccumulator(VOCAB, banned=torch.zeros(VOCAB, dtype=torch.long))


# ------------------------------------------------------------------ the model-facing stage

PROMPTS = ["Write a short poem about the sea.",
           "Explain how a bicycle works, step by step, for the children of our team."]


def small_config(**overrides) -> TokensConfig:
    """2 prompts x 3 samples = 6 rows in batches of 4 (so one batch mixes prompts and pads)."""
    settings = {"vote_n_prompts": 2, "vote_samples_per_prompt": 3, "horizon": 4,
                "vote_batch_size": 4, "num_safety_tokens": 8, "inner_top_k": 5}
    return TokensConfig(**{**settings, **overrides})


def random_direction(model) -> Direction:
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return Direction(vector, 1, 4.0, {"num_layers": model.config.num_hidden_layers})


def token_direction(model, token_id: int, coefficient: float = 50.0) -> Direction:
    """Steering that pushes the residual stream towards one token's unembedding row."""
    vector = model.get_output_embeddings().weight[token_id].detach().clone()
    return Direction(vector, 1, coefficient, {"num_layers": model.config.num_hidden_layers})


@contextmanager
def logit_bias(model, token_id: int, bias: float) -> Iterator[None]:
    """Add ``bias`` to one token's logit in every forward, steered or not."""
    offset = torch.zeros(model.config.vocab_size)
    offset[token_id] = bias
    handle = model.get_output_embeddings().register_forward_hook(
        lambda _module, _args, output: output + offset)
    try:
        yield
    finally:
        handle.remove()


def prompt_lengths(tokenizer, config: TokensConfig) -> list[int]:
    """Token count of each rollout row's rendered prompt, encoded independently."""
    encoded = tokenizer(render_prompts(tokenizer, PROMPTS), add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in encoded for _ in range(config.vote_samples_per_prompt)]


def naive_valid_count(base_argmax: torch.Tensor, end_ids: list[int]) -> int:
    count = 0
    for row in base_argmax.tolist():
        for token in row:
            if token in end_ids:
                break
            count += 1
    return count


def test_end_of_turn_and_special_ids_come_from_the_tokenizer(tiny_model, tiny_tokenizer):
    specials = special_token_ids(tiny_tokenizer)
    assert specials == sorted(tiny_tokenizer.convert_tokens_to_ids(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    end_ids = end_of_turn_ids(tiny_tokenizer, tiny_model)
    assert end_ids == sorted(tiny_tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))


def test_rollouts_have_exactly_h_minus_1_tokens_even_when_eos_is_likely(tiny_model, tiny_tokenizer):
    config = small_config(horizon=5)
    end_ids = end_of_turn_ids(tiny_tokenizer, tiny_model)
    direction = random_direction(tiny_model)
    with logit_bias(tiny_model, tiny_tokenizer.eos_token_id, 30.0):
        batches = steered_rollouts(tiny_model, tiny_tokenizer, direction, PROMPTS, config, end_ids)
        # The base model now ends every turn at once, so no pair is left to vote.
        with pytest.raises(SafesteerError, match="no valid"):
            select_safety_tokens(tiny_model, tiny_tokenizer, direction, PROMPTS, config)
    assert [ids.shape[0] for ids, _ in batches] == [4, 2]
    lengths = prompt_lengths(tiny_tokenizer, config)
    prompts_only = steered_rollouts(tiny_model, tiny_tokenizer, direction, PROMPTS,
                                    small_config(horizon=1), end_ids)
    assert [mask.sum(1).tolist() for _, mask in prompts_only] == [lengths[:4], lengths[4:]]
    row = 0
    for input_ids, attention_mask in batches:
        rollouts = input_ids[:, -(config.horizon - 1):]
        assert not torch.isin(rollouts, torch.tensor(end_ids)).any()
        assert attention_mask[:, -(config.horizon - 1):].all()
        for real in attention_mask.sum(1).tolist():
            assert real == lengths[row] + config.horizon - 1
            row += 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rollouts_follow_the_steered_model_through_cache_and_padding(make_tiny_model,
                                                                      tiny_tokenizer, arch):
    """Near-greedy rollouts equal the steered teacher-forced argmax: the cached sampler sees the
    same model, positions and steering as the scoring (gpt2 has absolute positions)."""
    model = make_tiny_model(arch)
    config = small_config(vote_temperature=1e-6, horizon=5)
    direction = random_direction(model)
    end_ids = end_of_turn_ids(tiny_tokenizer, model)
    steered_differs = False
    for input_ids, attention_mask in steered_rollouts(model, tiny_tokenizer, direction, PROMPTS,
                                                      config, end_ids):
        teacher, base = answer_logprobs(model, direction, input_ids, attention_mask,
                                        config.horizon)
        ended = torch.zeros(teacher.shape[-1], dtype=torch.bool)
        ended[end_ids] = True
        rollouts = input_ids[:, -(config.horizon - 1):]
        assert torch.equal(teacher[:, :-1].masked_fill(ended, -torch.inf).argmax(-1), rollouts)
        steered_differs |= not torch.equal(base[:, :-1].masked_fill(ended, -torch.inf).argmax(-1),
                                           rollouts)
    assert steered_differs


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_scoring_positions_match_a_naive_per_row_loop(make_tiny_model, tiny_tokenizer, arch):
    model = make_tiny_model(arch)
    config = small_config()
    horizon = config.horizon
    direction = random_direction(model)
    end_ids = end_of_turn_ids(tiny_tokenizer, model)
    input_ids, attention_mask = steered_rollouts(model, tiny_tokenizer, direction, PROMPTS, config,
                                                 end_ids)[0]
    assert not attention_mask.all()  # the batch mixes prompt lengths: left padding is exercised
    teacher, base = answer_logprobs(model, direction, input_ids, attention_mask, horizon)
    assert teacher.shape == base.shape == (4, horizon, model.config.vocab_size)
    assert teacher.dtype == torch.float32
    lengths = prompt_lengths(tiny_tokenizer, config)
    for row in range(input_ids.shape[0]):
        ids = input_ids[row][attention_mask[row].bool()][None]  # unpadded, default positions
        with torch.no_grad():
            with direction.steer(model):
                teacher_logits = model(ids).logits[0]
            base_logits = model(ids).logits[0]
        for j in range(1, horizon + 1):  # answer token j is predicted at prompt_len - 1 + (j - 1)
            position = lengths[row] - 1 + (j - 1)
            naive = (torch.log_softmax(teacher_logits[position], -1)
                     - torch.log_softmax(base_logits[position], -1))
            torch.testing.assert_close(teacher[row, j - 1] - base[row, j - 1], naive,
                                       atol=1e-4, rtol=1e-4)
    assert (teacher - base).abs().max() > 1e-2


def test_selection_is_reproducible_and_leaves_the_global_rng_alone(tiny_model, tiny_tokenizer):
    direction = random_direction(tiny_model)
    config = small_config()
    rng_state = torch.random.get_rng_state()
    first = select_safety_tokens(tiny_model, tiny_tokenizer, direction, PROMPTS, config)
    second = select_safety_tokens(tiny_model, tiny_tokenizer, direction, PROMPTS, config)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert first == second
    assert first.ids and first.scores == sorted(first.scores, reverse=True)

    end_ids = end_of_turn_ids(tiny_tokenizer, tiny_model)
    seeds = [steered_rollouts(tiny_model, tiny_tokenizer, direction, PROMPTS,
                              small_config(vote_seed=seed), end_ids)[0][0] for seed in (1, 2)]
    assert not torch.equal(*seeds)


def test_zero_direction_votes_are_structural(tiny_model, tiny_tokenizer):
    """Δ ≡ 0: every valid pair's top-K′ is the K′ lowest unbanned ids, each with one vote per pair."""
    zero = Direction(torch.zeros(tiny_model.config.hidden_size), 1, 1.0, {"num_layers": 2})
    unbanned = [v for v in range(tiny_model.config.vocab_size)
                if v not in special_token_ids(tiny_tokenizer)]

    votes = select_safety_tokens(tiny_model, tiny_tokenizer, zero, PROMPTS, small_config())
    pairs = votes.settings["num_valid_pairs"]
    assert votes.ids == unbanned[:5]  # |S| = K′ = 5 < K = 8: the other tokens got no vote
    assert votes.scores == [pairs] * 5
    assert votes.teacher_mean_probs == votes.base_mean_probs


    mean = select_safety_tokens(tiny_model, tiny_tokenizer, zero, PROMPTS,
                                small_config(aggregation="mean"))
    assert mean.ids == unbanned[:8]
    assert mean.scores == [0.0] * 8


def test_end_of_turn_mask_uses_the_unsteered_argmax(tiny_model, tiny_tokenizer):
    config = small_config()
    eos = tiny_tokenizer.eos_token_id
    end_ids = end_of_turn_ids(tiny_tokenizer, tiny_model)
    # The teacher ends every turn at once; the mask must not care.
    ends_now = token_direction(tiny_model, eos)
    batches = steered_rollouts(tiny_model, tiny_tokenizer, ends_now, PROMPTS, config, end_ids)
    scored = [answer_logprobs(tiny_model, ends_now, *batch, config.horizon) for batch in batches]
    assert all((teacher.argmax(-1) == eos).all() for teacher, _ in scored)
    expected = sum(naive_valid_count(base.argmax(-1), end_ids) for _, base in scored)
    result = select_safety_tokens(tiny_model, tiny_tokenizer, ends_now, PROMPTS, config)
    assert result.settings["num_valid_pairs"] == expected > 0

    # Now the base model itself ends some rows part-way: an EOS bias just below its smallest
    # margin at j = 1 (the rollouts stay the same: EOS is never sampled).
    direction = random_direction(tiny_model)
    batches = steered_rollouts(tiny_model, tiny_tokenizer, direction, PROMPTS, config, end_ids)
    bases = [answer_logprobs(tiny_model, direction, *batch, config.horizon)[1] for batch in batches]
    bias = min((base[:, 0].max(-1).values - base[:, 0, eos]).min() for base in bases).item() - 1e-3
    with logit_bias(tiny_model, eos, bias):
        result = select_safety_tokens(tiny_model, tiny_tokenizer, direction, PROMPTS, config)
    biased_argmax = [(base + bias * (torch.arange(base.shape[-1]) == eos)).argmax(-1) for base in bases]
    expected = sum(naive_valid_count(argmax, end_ids) for argmax in biased_argmax)
    assert result.settings["num_valid_pairs"] == expected
    assert 0 < expected < 6 * config.horizon


def test_banned_special_tokens_are_never_selected(tiny_model, tiny_tokenizer):
    config = small_config(p_min=0.0)
    im_start = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    promotes_special = token_direction(tiny_model, im_start)
    input_ids, attention_mask = steered_rollouts(
        tiny_model, tiny_tokenizer, promotes_special, PROMPTS, config,
        end_of_turn_ids(tiny_tokenizer, tiny_model))[0]
    teacher, base = answer_logprobs(tiny_model, promotes_special, input_ids, attention_mask,
                                    config.horizon)
    assert ((teacher - base).argmax(-1) == im_start).float().mean() > 0.5  # it would win the vote
    result = select_safety_tokens(tiny_model, tiny_tokenizer, promotes_special, PROMPTS, config)
    assert result.ids
    assert not set(result.ids) & set(special_token_ids(tiny_tokenizer))
    assert all("<|" not in text for text in result.strings)


def test_save_load_round_trip_and_table(tiny_model, tiny_tokenizer, tmp_path):
    result = select_safety_tokens(tiny_model, tiny_tokenizer, random_direction(tiny_model), PROMPTS,
                                  small_config())
    assert result.strings == [tiny_tokenizer.decode([v]) for v in result.ids]
    settings = result.settings
    assert settings["direction_layer"] == 1 and settings["direction_coefficient"] == 4.0
    assert settings["end_of_turn_ids"] == end_of_turn_ids(tiny_tokenizer, tiny_model)
    assert settings["num_rows"] == 6 and settings["horizon"] == 4 and len(settings["prompts_sha256"]) == 64
    path = result.save(tmp_path)
    assert path == tmp_path / SAFETY_TOKENS_FILE
    assert SafetyTokenSet.load(tmp_path) == result
    assert SafetyTokenSet.load(path) == result

    table = result.table().splitlines()
    assert "votes" in table[0] and "token" in table[0]
    assert len(table) == len(result.ids) + 2
    for line, token_id, text in zip(table[2:], result.ids, result.strings, strict=True):
        assert str(token_id) in line and repr(text) in line


def test_load_rejects_missing_and_malformed_files(tmp_path):
    with pytest.raises(SafesteerError, match="safesteer tokens"):
        SafetyTokenSet.load(tmp_path)
    path = tmp_path / SAFETY_TOKENS_FILE
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(SafesteerError, match="invalid JSON"):
        SafetyTokenSet.load(path)
    path.write_text('{"ids": [1, 2]}', encoding="utf-8")
    with pytest.raises(SafesteerError, match="not a safety-token file"):
        SafetyTokenSet.load(tmp_path)
    lists = '"strings": ["a"], "scores": [1], "teacher_mean_probs": [0.1], "base_mean_probs": [0.1]'
    path.write_text(f'{{"ids": [1, 2], {lists}, "settings": {{}}}}', encoding="utf-8")
    with pytest.raises(SafesteerError, match="differ in length"):
        SafetyTokenSet.load(tmp_path)
    lists = '"strings": ["a", "a"], "scores": [1, 1], "teacher_mean_probs": [0.1, 0.1], ' \
        '"base_mean_probs": [0.1, 0.1]'
    path.write_text(f'{{"ids": [1, 1], {lists}, "settings": {{}}}}', encoding="utf-8")
    with pytest.raises(SafesteerError, match="ids must be distinct integers"):
        SafetyTokenSet.load(tmp_path)


def test_too_few_tokens_error_names_the_flags(tiny_model, tiny_tokenizer):
    with pytest.raises(SafesteerError, match="--min-safety-tokens") as error:
        select_safety_tokens(tiny_model, tiny_tokenizer, random_direction(tiny_model), PROMPTS,
                             small_config(p_min=0.5))
    for flag in ("--p-min", "--horizon", "--vote-n-prompts", "--vote-samples-per-prompt"):
        assert flag in str(error.value)


def test_nucleus_sampling_and_blocked_ids():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    assert set(_sample_next_tokens(logits, 1.0, 0.7, [], generator).tolist()) == {0, 1}
    assert set(_sample_next_tokens(logits, 1.0, 1.0, [0], generator).tolist()) == {1, 2, 3}


def test_config_validation():
    for overrides, flag in [({"aggregation": "median"}, "--aggregation"), ({"horizon": 0}, "--horizon"),
                            ({"vote_top_p": 0.0}, "--vote-top-p"),
                            ({"vote_temperature": 0.0}, "--vote-temperature"),
                            ({"p_min": 1.0}, "--p-min"), ({"min_safety_tokens": 60}, "--min-safety-tokens"),
                            ({"vote_prompts": ""}, "--vote-prompts")]:
        with pytest.raises(SafesteerError, match=flag):
            TokensConfig(**overrides)
