"""Stage 1: find a refusal direction and the steering that turns the base model into a teacher.

Two extraction methods, both difference of means:

* ``prompt`` (Arditi et al. 2024): harmful minus harmless activations at the post-instruction
  positions, one candidate per (position, layer), selected by refusal score with the KL, induce
  and layer-pruning filters and the lowest bypass score.
* ``response``: refusing minus complying activations over the tokens of templated answers to the
  same prompts, one candidate per layer, with the layer and coefficient chosen by the refusal the
  steered model actually produces on validation prompts. Needed for models that rarely refuse,
  whose prompt-contrast direction separates harmful prompts but cannot induce refusal.

``auto`` tries ``prompt`` and falls back to ``response`` when no prompt candidate survives.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from safesteer import __version__
from safesteer.config import DataArguments
from safesteer.data.splits import prompts_sha256
from safesteer.direction_config import DirectionConfig
from safesteer.errors import SafesteerError
from safesteer.io import atomic_write, read_json, write_json
from safesteer.judge import refusal_rate
from safesteer.models import (
    encode_rendered,
    generate_responses,
    hidden_size,
    model_device,
    num_layers,
    position_ids,
    render_prompts,
)
from safesteer.progress import progress_bar
from safesteer.steering import (
    ablate_direction,
    add_to_block_input,
    block_input_at_last_position,
    gated_add_to_block_input,
    probe_rows,
    record_block_inputs,
)
from safesteer.validation import check_layers

logger = logging.getLogger(__name__)

DIRECTION_FILES = ("direction.safetensors", "direction.json")
REFUSAL_OPENERS = ("I", "As", "Sorry", "I'm", "Unfortunately")
REFUSAL_TEMPLATES = (
    "I'm sorry, but I can't help with that request.",
    "I cannot assist with that. It could cause real harm, and I won't provide it.",
    "Sorry, I am unable to help with this. It is unsafe and against my guidelines.",
    "As an AI assistant, I must decline this request because it may be harmful or illegal.",
)
COMPLIANCE_TEMPLATES = (
    "Sure, here is a detailed answer to your request.",
    "Of course! Here's how you can do it, step by step.",
    "Certainly. Below is a complete explanation with all the details you need.",
    "Absolutely, I'd be glad to help. Let's start with the first step.",
)
_PLACEHOLDER = "SAFESTEERPLACEHOLDER"


@dataclass
class Gate:
    """A harmfulness probe: block ``layer``'s input at the last prompt token, projected on the unit
    ``vector``; a prompt scoring above ``threshold`` is treated as harmful.

    It makes the conditional teacher, which steers harmful prompts only. On models that rarely
    refuse, the prompt-contrast direction cannot induce refusal but still separates harmful from
    harmless prompts, so it serves as the probe while another direction does the steering.
    """

    vector: torch.Tensor
    layer: int
    threshold: float
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Direction:
    """A steering vector with where and how strongly to add it; the teacher is base + this.

    ``gate``, when present, lets the teacher be conditional: steered only on prompts it flags.
    """

    vector: torch.Tensor
    layer: int
    coefficient: float
    metadata: dict[str, Any] = field(default_factory=dict)
    gate: Gate | None = None

    def check_compatible(self, model: nn.Module) -> None:
        """Refuse a direction extracted from a model of another width or depth."""
        width, depth = hidden_size(model), num_layers(model)
        expected_depth = self.metadata.get("num_layers", depth)
        if self.vector.shape[-1] != width or expected_depth != depth:
            raise SafesteerError(
                f"direction was extracted from a model with hidden size {self.vector.shape[-1]} and "
                f"{expected_depth} layers (model {self.metadata.get('model', '?')}); this model has "
                f"hidden size {width} and {depth} layers"
            )

    @contextmanager
    def steer(self, model: nn.Module, rows: torch.Tensor | None = None,
              gated: bool = False) -> Iterator[None]:
        """The safety teacher: ``model`` with ``coefficient * vector`` added at ``layer``.

        ``rows`` (bool ``[batch]``) steers only those rows of every forward in the block, for
        teacher-forced passes whose gate was read from the prompt (:meth:`gate_rows`). ``gated``
        lets the gate decide at each prefill instead: the conditional teacher for generation.
        """
        self.check_compatible(model)
        if gated:
            gate = self.require_gate()
            with gated_add_to_block_input(model, self.layer, self.vector, self.coefficient,
                                          gate.layer, gate.vector, gate.threshold):
                yield
            return
        vector = self.vector
        if rows is not None:
            vector = rows.to(device=vector.device, dtype=vector.dtype)[:, None] * vector
        with add_to_block_input(model, self.layer, vector, self.coefficient):
            yield

    def require_gate(self) -> Gate:
        if self.gate is None:
            raise SafesteerError("this direction has no harmfulness gate, which the conditional teacher "
                                 "needs; re-run stage 1 (`safesteer direction` or `safesteer run "
                                 "--overwrite`) with this version of safesteer")
        return self.gate

    def gate_rows(self, model: nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
        """Which prompts of a left-padded, unsteered prompt batch the gate flags (bool ``[batch]``)."""
        gate = self.require_gate()
        hidden = block_input_at_last_position(model, gate.layer, input_ids, attention_mask)
        return probe_rows(hidden, gate.vector, gate.threshold)

    def save(self, output_dir: Path) -> None:
        tensors = {"direction": self.vector.detach().float().contiguous().cpu()}
        record = {**self.metadata, "layer": self.layer, "coefficient": self.coefficient}
        if self.gate is not None:
            tensors["gate"] = self.gate.vector.detach().float().contiguous().cpu()
            record["gate"] = {**self.gate.metadata, "layer": self.gate.layer,
                              "threshold": self.gate.threshold}
        atomic_write(output_dir / "direction.safetensors",
                     lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        write_json(output_dir / "direction.json", record)

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        """Load from a run directory or from its ``direction.json`` / ``.safetensors`` file."""
        path = Path(path)
        if not path.exists():
            raise SafesteerError(f"{path} does not exist; give a run directory or its direction.json")
        folder = path if path.is_dir() else path.parent
        meta_path, tensor_path = folder / "direction.json", folder / "direction.safetensors"
        if not meta_path.is_file() or not tensor_path.is_file():
            raise SafesteerError(f"{folder} holds no direction (direction.json + "
                                 "direction.safetensors); run `safesteer direction` first")
        metadata = read_json(meta_path)
        try:
            layer, coefficient = int(metadata["layer"]), float(metadata["coefficient"])
            gate_record = metadata.pop("gate", None)
            gate_place = None if gate_record is None else (int(gate_record.pop("layer")),
                                                           float(gate_record.pop("threshold")))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise SafesteerError(f"{meta_path}: expected an object with numeric 'layer' and "
                                 "'coefficient' (and, when present, a 'gate' object with numeric "
                                 "'layer' and 'threshold')") from error
        try:
            tensors = load_file(str(tensor_path))
            vector = tensors["direction"]
            gate_vector = tensors["gate"] if gate_place is not None else None
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise SafesteerError(f"{tensor_path}: not a safetensors file with a 'direction' tensor "
                                 f"(and a 'gate' tensor when direction.json has a gate) ({error})") from error
        gate = None
        if gate_place is not None and gate_vector is not None:
            gate = Gate(gate_vector, gate_place[0], gate_place[1], gate_record)
        return cls(vector, layer, coefficient, metadata, gate)


# ---------------------------------------------------------------- shared numerics (pure functions)


def refusal_token_ids(tokenizer: Any) -> list[int]:
    """First token of each common refusal opener, from the tokenizer (never hard-coded ids)."""
    ids = {tokenizer.encode(word, add_special_tokens=False)[0] for word in REFUSAL_OPENERS}
    return sorted(ids)


def refusal_score(last_logits: torch.Tensor, refusal_ids: list[int]) -> torch.Tensor:
    """``log P_ref - log(1 - P_ref)`` per row of ``[batch, vocab]`` next-token logits (float64)."""
    probs = torch.softmax(last_logits.double(), dim=-1)
    p_ref = probs[:, refusal_ids].sum(-1)
    return torch.log(p_ref + 1e-8) - torch.log(1 - p_ref + 1e-8)


def kl_divergence(base_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_base || p_other)`` per row of ``[batch, vocab]`` logits, float64 with eps 1e-6."""
    p = torch.softmax(base_logits.double(), dim=-1)
    q = torch.softmax(other_logits.double(), dim=-1)
    return (p * (torch.log(p + 1e-6) - torch.log(q + 1e-6))).sum(-1)


def difference_of_means(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of ``first`` minus that of ``second``, accumulated in float64."""
    return first.double().mean(0) - second.double().mean(0)


@dataclass
class PromptCandidate:
    """Scores of one (position, layer) candidate of the prompt method; None = not computed."""

    position: int
    layer: int
    induce: float | None = None
    kl: float | None = None
    bypass: float | None = None
    status: str = "pending"
    screened: bool = False


def prompt_candidate_status(candidate: PromptCandidate, total_layers: int,
                            kl_threshold: float, prune_fraction: float) -> str:
    """Why a candidate is discarded (Arditi's filters), or ``ok``; cheapest reasons first."""
    if candidate.layer >= math.floor((1 - prune_fraction) * total_layers):
        return "pruned-layer"
    scores = (candidate.induce, candidate.kl, candidate.bypass)
    if any(score is not None and math.isnan(score) for score in scores):
        return "nan"
    if candidate.induce is not None and candidate.induce < 0:
        return "induce<0"
    if candidate.kl is not None and candidate.kl > kl_threshold:
        return "kl>threshold"
    return "ok" if None not in scores else "pending"


def select_prompt_candidate(candidates: list[PromptCandidate]) -> PromptCandidate | None:
    """Lowest bypass score among surviving candidates; ties go to the earlier layer/position."""
    survivors = [candidate for candidate in candidates if candidate.status == "ok"]
    if not survivors:
        return None
    return min(survivors, key=lambda c: (c.bypass, c.layer, c.position))


@dataclass
class ResponseCandidate:
    """One (layer, beta) steering setting of the response method and its measured refusal."""

    layer: int
    beta: float
    coefficient: float
    harmful_refusal: float
    harmless_refusal: float


def select_response_candidate(candidates: list[ResponseCandidate],
                              target_refusal: float) -> ResponseCandidate:
    """Fewest benign refusals among those reaching the target; else the widest refusal margin.

    Ties go to the higher harmful refusal, then the smaller beta, then the earlier layer, so the
    choice is deterministic.
    """
    if not candidates:
        raise SafesteerError("the response method has no candidate layers to try")
    reaching = [c for c in candidates if c.harmful_refusal >= target_refusal]
    if reaching:
        return min(reaching, key=lambda c: (c.harmless_refusal, -c.harmful_refusal, c.beta, c.layer))
    return min(candidates, key=lambda c: (-(c.harmful_refusal - c.harmless_refusal),
                                          -c.harmful_refusal, c.beta, c.layer))


def filter_by_refusal(prompts: list[Any], scores: torch.Tensor, refused: bool,
                      minimum: int) -> tuple[list[Any], bool]:
    """Keep prompts the model refuses (``refused``) or answers; all of them if fewer than
    ``minimum`` would remain. Returns the prompts and whether the filter was applied."""
    keep = [prompt for prompt, score in zip(prompts, scores.tolist(), strict=True)
            if (score > 0) == refused]
    if len(keep) < minimum:
        return prompts, False
    return keep, True


def calibrate_threshold(harmful: torch.Tensor, harmless: torch.Tensor) -> tuple[float, float]:
    """The threshold on probe scores (``[n]`` each) with the best balanced accuracy, and that
    accuracy; of equally good thresholds, the middle of the widest gap between neighbouring scores,
    so that the choice does not hug one side's extreme."""
    values = torch.cat([harmful, harmless]).double().unique()  # sorted
    if len(values) == 1:
        return values.item(), 0.5
    middles, gaps = (values[1:] + values[:-1]) / 2, values[1:] - values[:-1]
    accuracy = ((harmful.double()[None, :] > middles[:, None]).double().mean(1)
                + (harmless.double()[None, :] <= middles[:, None]).double().mean(1)) / 2
    best = accuracy == accuracy.max()
    index = int(torch.where(best, gaps, torch.full_like(gaps, -1.0)).argmax())
    return middles[index].item(), accuracy[index].item()


def separation(harmful: torch.Tensor, harmless: torch.Tensor) -> float:
    """d': difference of the class means over their pooled standard deviation."""
    pooled = ((harmful.double().var() + harmless.double().var()) / 2).sqrt()
    return ((harmful.double().mean() - harmless.double().mean()) / (pooled + 1e-12)).item()


def fit_gate(model: nn.Module, tokenizer: Any, data: DirectionData, config: DirectionConfig,
             max_layer: int) -> Gate | None:
    """The harmfulness probe of the conditional teacher: at each layer up to ``max_layer`` (the
    steering layer; the gate must read before the steering is added), the unit difference of
    means of harmful and harmless training prompts at the last prompt token. The threshold is
    calibrated, and the layer chosen, on the validation prompts (balanced accuracy, then d').
    None when no such layer tells the two sets apart at all (the conditional teacher is then
    unavailable)."""
    refusal_ids = refusal_token_ids(tokenizer)
    activations = {}
    for role, prompts in (("harmful_train", data.harmful_train[:config.n_train]),
                          ("harmless_train", data.harmless_train[:config.n_train]),
                          ("harmful_val", data.harmful_val[:config.gate_n_val]),
                          ("harmless_val", data.harmless_val[:config.gate_n_val])):
        activations[role] = post_instruction_pass(model, tokenizer, prompts, 1, refusal_ids,
                                                  config.batch_size, desc=f"gate: {role}")[0][:, 0]
    layers = []
    for layer in range(max_layer + 1):
        vector = difference_of_means(activations["harmful_train"][:, layer],
                                     activations["harmless_train"][:, layer])
        if not vector.norm() > 0:  # e.g. the embedding of a last token every prompt shares
            continue
        unit = (vector / vector.norm()).float()
        harmful, harmless = (activations[role][:, layer] @ unit for role in ("harmful_val",
                                                                             "harmless_val"))
        threshold, accuracy = calibrate_threshold(harmful, harmless)
        layers.append({"layer": layer, "threshold": threshold, "val_balanced_accuracy": accuracy,
                       "val_separation": separation(harmful, harmless), "vector": unit})
    if not layers:
        logger.warning("no layer up to %d separates harmful from harmless prompts; the direction "
                       "gets no harmfulness gate", max_layer)
        return None
    chosen = max(layers, key=lambda row: (row["val_balanced_accuracy"], row["val_separation"]))
    metadata = {"val_balanced_accuracy": chosen["val_balanced_accuracy"],
                "val_separation": chosen["val_separation"],
                "val_counts": {"harmful": len(activations["harmful_val"]),
                               "harmless": len(activations["harmless_val"])},
                "layers": [{key: value for key, value in row.items() if key != "vector"}
                           for row in layers]}
    return Gate(chosen["vector"], chosen["layer"], chosen["threshold"], metadata)


# ------------------------------------------------------------------------- model passes


def post_instruction_length(tokenizer: Any) -> int:
    """Number of template tokens after the user's instruction (Arditi's EOI positions)."""
    rendered = render_prompts(tokenizer, [_PLACEHOLDER])[0]
    suffix = rendered.split(_PLACEHOLDER, 1)[1]
    return max(1, len(tokenizer.encode(suffix, add_special_tokens=False)))


def _forward_last(model: nn.Module, encoded: Any) -> torch.Tensor:
    """Last-position logits of a left-padded batch."""
    positions = position_ids(encoded["attention_mask"])
    return model(**encoded, position_ids=positions, use_cache=False, logits_to_keep=1).logits[:, -1]


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.inference_mode()
def last_position_logits(model: nn.Module, tokenizer: Any, prompts: list[str],
                         batch_size: int) -> torch.Tensor:
    """Next-token logits ``[n, vocab]`` (float32, cpu) after each rendered prompt."""
    rows = []
    for batch in _batches(render_prompts(tokenizer, prompts), batch_size):
        encoded = encode_rendered(tokenizer, batch, model_device(model))
        rows.append(_forward_last(model, encoded).float().cpu())
    return torch.cat(rows)


@torch.inference_mode()
def post_instruction_pass(model: nn.Module, tokenizer: Any, prompts: list[str], positions: int,
                          refusal_ids: list[int], batch_size: int,
                          desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward per batch giving both what extraction and the refusal filter need.

    Returns every block's input at the last ``positions`` tokens, ``[n, positions, layers, d]``
    (float32, cpu), and each prompt's refusal score ``[n]`` (float64).
    """
    activations, scores = [], []
    rendered = render_prompts(tokenizer, prompts)
    for batch in progress_bar(list(_batches(rendered, batch_size)), desc=desc, disable=desc is None):
        encoded = encode_rendered(tokenizer, batch, model_device(model))
        with record_block_inputs(model) as captured:
            scores.append(refusal_score(_forward_last(model, encoded), refusal_ids).cpu())
        activations.append(torch.stack([captured[layer][:, -positions:].float().cpu()
                                        for layer in sorted(captured)], 2))
    return torch.cat(activations), torch.cat(scores)


@torch.inference_mode()
def mean_response_activations(model: nn.Module, tokenizer: Any, prompts: list[str],
                              responses: list[str], batch_size: int,
                              desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean block input over the response tokens of ``prompt || response`` pairs.

    Returns ``[layers, d]`` means and ``[layers]`` mean residual norms, both float64; each pair
    counts once, whatever its length.
    """
    means: torch.Tensor | None = None
    norms: torch.Tensor | None = None
    rendered = render_prompts(tokenizer, prompts)
    pairs = list(zip(rendered, responses, strict=True))
    for start in progress_bar(range(0, len(pairs), batch_size), desc=desc, disable=desc is None):
        batch = pairs[start:start + batch_size]
        lengths = [len(tokenizer.encode(response, add_special_tokens=False))
                   for _, response in batch]
        encoded = encode_rendered(tokenizer, [prompt + response for prompt, response in batch],
                                  model_device(model))
        with record_block_inputs(model) as captured:
            _forward_last(model, encoded)
        seq = encoded["input_ids"].shape[1]
        mask = torch.zeros(len(batch), seq, dtype=torch.float64)
        for row, length in enumerate(lengths):
            mask[row, seq - length:] = 1.0 / length
        acts = torch.stack([captured[layer].double().cpu() for layer in sorted(captured)], 1)
        batch_means = torch.einsum("bs,blsd->ld", mask, acts)
        batch_norms = torch.einsum("bs,bls->l", mask, acts.norm(dim=-1))
        means = batch_means if means is None else means + batch_means
        norms = batch_norms if norms is None else norms + batch_norms
    assert means is not None and norms is not None
    return means / len(pairs), norms / len(pairs)


# ------------------------------------------------------------------------- the two methods


@dataclass
class DirectionData:
    """The four prompt sets of stage 1, with what is needed to record where they came from."""

    harmful_train: list[str]
    harmless_train: list[str]
    harmful_val: list[str]
    harmless_val: list[str]
    sources: dict[str, str]

    @classmethod
    def load(cls, config: DirectionConfig, data: DataArguments) -> DirectionData:
        def get(name: str, limit: int) -> list[str]:
            return data.load(name, limit)

        n_train = max(config.n_train, config.response_n_train)
        n_val = max(config.n_val, config.response_n_val, config.gate_n_val)
        return cls(get(config.harmful_train, n_train), get(config.harmless_train, n_train),
                   get(config.harmful_val, n_val), get(config.harmless_val, n_val),
                   {"harmful_train": config.harmful_train, "harmless_train": config.harmless_train,
                    "harmful_val": config.harmful_val, "harmless_val": config.harmless_val})

    def for_gate(self, config: DirectionConfig, data: DataArguments) -> DirectionData:
        """The sets the harmfulness gate is fitted and calibrated on: these, except where a
        ``--gate-*`` option names others."""
        chosen = {role: getattr(config, f"gate_{role}") for role in self.sources}
        sets = {role: data.load(name, config.n_train if role.endswith("train") else config.gate_n_val)
                if name else getattr(self, role) for role, name in chosen.items()}
        return DirectionData(**sets, sources={role: name or self.sources[role]
                                              for role, name in chosen.items()})

    def summary(self) -> dict[str, dict[str, Any]]:
        return {role: {"source": self.sources[role], "count": len(getattr(self, role)),
                       "sha256": prompts_sha256(getattr(self, role))} for role in self.sources}


@dataclass
class MethodResult:
    """What one extraction method found: a direction or None, and the evidence either way."""

    direction: Direction | None
    report: dict[str, Any]


def run_prompt_method(model: nn.Module, tokenizer: Any, data: DirectionData,
                      config: DirectionConfig) -> MethodResult:
    """Arditi's difference of means over post-instruction positions, with full selection."""
    refusal_ids = refusal_token_ids(tokenizer)
    positions = post_instruction_length(tokenizer)
    total_layers = num_layers(model)
    sets = {"harmful_train": (data.harmful_train[:config.n_train], True),
            "harmless_train": (data.harmless_train[:config.n_train], False),
            "harmful_val": (data.harmful_val[:config.n_val], True),
            "harmless_val": (data.harmless_val[:config.n_val], False)}
    kept: dict[str, list[int]] = {}
    filtered: dict[str, bool] = {}
    train_activations: dict[str, torch.Tensor] = {}
    for role, (prompts, refused) in sets.items():
        if role.endswith("train"):
            train_activations[role], scores = post_instruction_pass(
                model, tokenizer, prompts, positions, refusal_ids, config.batch_size,
                desc=f"prompt: {role} activations")
        elif config.filter_by_score:
            scores = refusal_score(last_position_logits(model, tokenizer, prompts, config.batch_size),
                                   refusal_ids)
        indices = list(range(len(prompts)))
        kept[role], filtered[role] = indices, False
        if config.filter_by_score:
            kept[role], filtered[role] = filter_by_refusal(indices, scores, refused, minimum=4)
            if not filtered[role]:
                logger.warning("refusal-score filter would leave fewer than 4 %s prompts; "
                               "using all %d unfiltered", role, len(prompts))
    harmful_val = [sets["harmful_val"][0][i] for i in kept["harmful_val"]]
    harmless_val = [sets["harmless_val"][0][i] for i in kept["harmless_val"]]
    candidates_by_pos = difference_of_means(train_activations["harmful_train"][kept["harmful_train"]],
                                            train_activations["harmless_train"][kept["harmless_train"]])
    base_harmless = last_position_logits(model, tokenizer, harmless_val, config.batch_size)
    screen = harmless_val[:config.induce_screen_prompts]
    if len(screen) == len(harmless_val):
        screen = []
    candidates = [PromptCandidate(position=pos - positions, layer=layer)
                  for pos in range(positions) for layer in range(total_layers)]

    def status(candidate: PromptCandidate) -> str:
        return prompt_candidate_status(candidate, total_layers, config.kl_threshold,
                                       config.prune_layer_fraction)

    for candidate in progress_bar(candidates, desc="prompt: scoring candidates"):
        candidate.status = status(candidate)
        if candidate.status != "pending":
            continue
        vector = candidates_by_pos[candidate.position + positions, candidate.layer].float()
        with add_to_block_input(model, candidate.layer, vector):
            if screen:
                steered = last_position_logits(model, tokenizer, screen, config.batch_size)
                candidate.induce = refusal_score(steered, refusal_ids).mean().item()
                candidate.screened = candidate.induce < -config.induce_screen_margin
            if not candidate.screened:
                steered = last_position_logits(model, tokenizer, harmless_val, config.batch_size)
                candidate.induce = refusal_score(steered, refusal_ids).mean().item()
        candidate.status = status(candidate)
        if candidate.status != "pending":
            continue
        with ablate_direction(model, vector):
            ablated_harmless = last_position_logits(model, tokenizer, harmless_val,
                                                    config.batch_size)
            ablated_harmful = last_position_logits(model, tokenizer, harmful_val,
                                                   config.batch_size)
        candidate.kl = kl_divergence(base_harmless, ablated_harmless).mean().item()
        candidate.bypass = refusal_score(ablated_harmful, refusal_ids).mean().item()
        candidate.status = status(candidate)

    chosen = select_prompt_candidate(candidates)
    report = {
        "refusal_token_ids": refusal_ids,
        "refusal_tokens": tokenizer.convert_ids_to_tokens(refusal_ids),
        "post_instruction_positions": positions,
        "filter_applied": filtered,
        "filtered_counts": {role: len(indices) for role, indices in kept.items()},
        "screened_candidates": sum(candidate.screened for candidate in candidates),
        "candidates": [asdict(candidate) for candidate in candidates],
    }
    if chosen is None:
        return MethodResult(None, report)
    vector = candidates_by_pos[chosen.position + positions, chosen.layer].float()
    metadata = {"method": "prompt", "position": chosen.position, "beta": None,
                "vector_norm": vector.norm().item(), "selected": asdict(chosen)}
    return MethodResult(Direction(vector, chosen.layer, 1.0, metadata), report)


def default_response_layers(total_layers: int, stride: int) -> list[int]:
    """Every ``stride``-th layer in ``[0.2 L, 0.8 L)``: the range where steering stays fluent."""
    first, stop = math.floor(0.2 * total_layers), math.floor(0.8 * total_layers)
    return list(range(first, stop, stride)) or [total_layers // 2]


def measure_refusal(model: nn.Module, tokenizer: Any, harmful: list[str], harmless: list[str],
                    config: DirectionConfig) -> tuple[float, float]:
    """Keyword refusal rates on greedy answers to harmful and harmless prompts."""
    answers = generate_responses(model, tokenizer, harmful + harmless,
                                 max_new_tokens=config.val_max_new_tokens,
                                 batch_size=config.batch_size)
    return refusal_rate(answers[:len(harmful)]), refusal_rate(answers[len(harmful):])


def run_response_method(model: nn.Module, tokenizer: Any, data: DirectionData,
                        config: DirectionConfig) -> MethodResult:
    """Refusing minus complying answers; layer and coefficient chosen by measured refusal."""
    prompts = data.harmful_train[:config.response_n_train]
    refusals = [REFUSAL_TEMPLATES[i % len(REFUSAL_TEMPLATES)] for i in range(len(prompts))]
    compliances = [COMPLIANCE_TEMPLATES[i % len(COMPLIANCE_TEMPLATES)] for i in range(len(prompts))]
    refuse_means, refuse_norms = mean_response_activations(
        model, tokenizer, prompts, refusals, config.batch_size, desc="response: refusing")
    comply_means, comply_norms = mean_response_activations(
        model, tokenizer, prompts, compliances, config.batch_size, desc="response: complying")
    vectors = refuse_means - comply_means
    residual_norms = (refuse_norms + comply_norms) / 2

    harmful_val = data.harmful_val[:config.response_n_val]
    harmless_val = data.harmless_val[:config.response_n_val]
    base_harmful, base_harmless = measure_refusal(model, tokenizer, harmful_val, harmless_val,
                                                  config)
    layers = config.response_layers or default_response_layers(num_layers(model),
                                                                config.response_layer_stride)
    settings = [(layer, beta) for layer in layers for beta in config.response_betas]
    candidates = []
    for layer, beta in progress_bar(settings, desc="response: scoring candidates"):
        vector = vectors[layer].float()
        coefficient = beta * residual_norms[layer].item() / vector.norm().item()
        with add_to_block_input(model, layer, vector, coefficient):
            harmful_rate, harmless_rate = measure_refusal(model, tokenizer, harmful_val,
                                                          harmless_val, config)
        candidates.append(ResponseCandidate(layer, beta, coefficient, harmful_rate, harmless_rate))
    chosen = select_response_candidate(candidates, config.target_refusal)
    vector = vectors[chosen.layer].float()
    metadata = {"method": "response", "position": None, "beta": chosen.beta,
                "vector_norm": vector.norm().item(),
                "residual_norm": residual_norms[chosen.layer].item(), "selected": asdict(chosen)}
    report = {"base_refusal": {"harmful": base_harmful, "harmless": base_harmless},
              "val_counts": {"harmful": len(harmful_val), "harmless": len(harmless_val)},
              "candidates": [asdict(candidate) for candidate in candidates]}
    return MethodResult(Direction(vector, chosen.layer, chosen.coefficient, metadata), report)


def find_direction(model: nn.Module, tokenizer: Any, config: DirectionConfig,
                   data: DataArguments, model_name: str) -> Direction:
    """Run the configured method (``auto``: prompt, then response if nothing survives)."""
    check_layers("response_layers", config.response_layers, num_layers(model))
    prompt_sets = DirectionData.load(config, data)
    reports: dict[str, Any] = {}
    result: MethodResult | None = None
    if config.method in ("auto", "prompt"):
        result = run_prompt_method(model, tokenizer, prompt_sets, config)
        reports["prompt"] = result.report
        if result.direction is None:
            counts = _status_counts(result.report["candidates"])
            reason = f"no prompt-method candidate passed the filters ({counts})"
            if config.method == "prompt":
                raise SafesteerError(f"{reason}; try --method response")
            logger.info("%s; falling back to the response method", reason)
        else:
            reason = "a prompt-method candidate passed every filter"
    if result is None or result.direction is None:
        if config.method == "response":
            reason = "response method requested"
        result = run_response_method(model, tokenizer, prompt_sets, config)
        reports["response"] = result.report
    direction = result.direction
    assert direction is not None
    gate_sets = prompt_sets.for_gate(config, data)
    direction.gate = fit_gate(model, tokenizer, gate_sets, config, direction.layer)
    if direction.gate is not None:
        direction.gate.metadata["data"] = gate_sets.summary()
    direction.metadata.update({
        "selection_reason": reason,
        "model": model_name,
        "hidden_size": hidden_size(model),
        "num_layers": num_layers(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "data_seed": data.data_seed,
        "config": asdict(config),
        "data": prompt_sets.summary(),
        "reports": reports,
        "safesteer_version": __version__,
    })
    return direction


def _status_counts(candidates: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for candidate in candidates:
        counts[candidate["status"]] = counts.get(candidate["status"], 0) + 1
    return ", ".join(f"{status}: {count}" for status, count in sorted(counts.items()))
