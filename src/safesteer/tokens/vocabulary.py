"""What stage 2 needs to know of the tokenizer: its special ids, the ids that end an answer
(docs/method.md §5 step 5) and the text of every id, never hard-coded per model family.
"""

from __future__ import annotations

import re

from torch import nn
from transformers import PreTrainedTokenizerBase

from safesteer.models.generation import eos_token_ids

# Special-token names that end an answer: <|im_end|>, <|eot_id|>, <|endoftext|>, <end_of_turn>, ...
_END_OF_TURN_NAME = re.compile(r"end|eot|eos", re.IGNORECASE)


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every special id: the named ones (BOS, EOS, pad, ...) and added tokens flagged special,
    which is where chat markers such as Llama-3's ``<|eot_id|>`` live."""
    ids = set(tokenizer.all_special_ids)
    ids.update(index for index, token in tokenizer.added_tokens_decoder.items() if token.special)
    return sorted(ids)


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, model: nn.Module) -> list[int]:
    """Ids that end an answer (docs/method.md §5 step 5): EOS of the tokenizer and of the
    generation config, and every special token whose name contains "end", "eot" or "eos".

    Generous on purpose: an extra id only invalidates positions where the base model's argmax is
    that token, while a missing one lets positions after the answer's end vote.
    """
    ids = set(eos_token_ids(model, tokenizer))
    specials = special_token_ids(tokenizer)
    names = tokenizer.convert_ids_to_tokens(specials)
    ids.update(index for index, name in zip(specials, names, strict=True)
               if _END_OF_TURN_NAME.search(name))
    return sorted(ids)


def token_strings(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> list[str]:
    """The decoded text of ids 0..vocab_size−1; "" for ids beyond the tokenizer (padded rows of
    the embedding matrix)."""
    known = min(vocab_size, len(tokenizer))
    decoded = tokenizer.batch_decode([[index] for index in range(known)],
                                     clean_up_tokenization_spaces=False)
    return [*decoded, *[""] * (vocab_size - known)]
