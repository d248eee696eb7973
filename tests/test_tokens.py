"""Safety-token selection (method.md §5) on synthetic log-probabilities with known answers."""

import pytest
import torch

from safesteer.tokens import (
    VoteAccumulator,
    banned_token_mask,
    end_of_turn_valid_mask,
    mean_contrast_tokens,
    select_top_tokens,
    vote_safety_tokens,
)

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
