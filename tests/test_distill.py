"""Stage 3 trainer on tiny random models: config, masks, learning, teacher, resume, outputs, errors."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, HfArgumentParser, PreTrainedModel

from safesteer.direction import Direction, Gate
from safesteer.distill.config import SAFETY_SYSTEM_PROMPT, DistillConfig
from safesteer.distill.export import merge_student
from safesteer.distill.rollout import Rollout, completion_mask
from safesteer.distill.trainer import Distiller
from safesteer.errors import SafesteerError
from safesteer.models import precision
from safesteer.models.layout import decoder_layers
from safesteer.models.rendering import render_prompts
from safesteer.scoring import completion_logits

PROMPTS = ["the cat writes a poem today.", "a gardener paints the fence quickly?",
           "my neighbour cooks a recipe for bread.", "our team plans the weekly schedule before lunch."]
SAFETY_IDS = list(range(40, 52))
ModelFactory = Callable[[str], PreTrainedModel]


def make_config(**overrides: object) -> DistillConfig:
    settings: dict[str, object] = {
        "learning_rate": 1e-2, "prompts_per_step": 2, "samples_per_prompt": 2, "micro_batch_size": 4,
        "max_new_tokens": 6, "warmup_ratio": 0.0, "lora_r": 4, "lora_alpha": 8, "seed": 0}
    return DistillConfig(**{**settings, **overrides})  # type: ignore[arg-type]


@pytest.fixture
def direction() -> Direction:
    vector = torch.randn(32, generator=torch.Generator().manual_seed(1)) * 3
    return Direction(vector, layer=1, coefficient=1.0, metadata={"num_layers": 2})


def make_distiller(model: PreTrainedModel, tokenizer, direction: Direction, output_dir: Path,
                   config: DistillConfig | None = None, **kwargs: object) -> Distiller:
    distiller = Distiller(model, tokenizer, direction, PROMPTS, config or make_config(), output_dir,
                          safety_token_ids=SAFETY_IDS, **kwargs)  # type: ignore[arg-type]
    distiller.setup()
    return distiller


def probe(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = tokenizer(["<|im_start|>user\na small robot finds a bicycle.<|im_end|>\n"],
                        return_tensors="pt", add_special_tokens=False)
    return encoded["input_ids"], encoded["attention_mask"]


def logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    input_ids, attention_mask = probe(tokenizer)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


def chat_ids(tokenizer, prompt: str, system_prompt: str | None = None) -> list[int]:
    rendered = render_prompts(tokenizer, [prompt], system_prompt)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"][0]


def unpadded_prompt(rollout: Rollout, row: int) -> list[int]:
    length = rollout.prompt_length
    return rollout.sequences[row, :length][rollout.attention_mask[row, :length] == 1].tolist()


def unpadded_completion_logits(model: torch.nn.Module, prompt_ids: Sequence[int], completion: torch.Tensor,
                               temperature: float = 1.0) -> torch.Tensor:
    """Reference: one row without padding (natural positions); the logits predicting each completion token."""
    sequence = torch.tensor([[*prompt_ids, *completion.tolist()]])
    with torch.no_grad():
        return model(sequence).logits[0, len(prompt_ids) - 1:-1] / temperature


# ------------------------------------------------------------------------- config


@pytest.mark.parametrize(("overrides", "flag"), [
    ({"learning_rate": 0.0}, "--learning-rate"),
    ({"prompts_per_step": 0}, "--prompts-per-step"),
    ({"top_p": 0.0}, "--top-p"),
    ({"mode": "bogus"}, "--mode"),
    ({"reduction": "mean"}, "--reduction"),
    ({"alpha": 1.5}, "--alpha"),
    ({"skip": 3, "keep": 2}, "--keep"),
    ({"renormalize": True, "mode": "full"}, "--renormalize"),
    ({"complement": True, "mode": "full"}, "--complement"),
    ({"complement": True, "renormalize": True}, "--complement"),
    ({"warmup_ratio": 1.0}, "--warmup-ratio"),
    ({"save_steps": -1}, "--save-steps"),
    ({"report_to": "mlflow"}, "--report-to"),
    ({"lora_target_modules": " , "}, "--lora-target-modules"),
    ({"mode": "sft", "renormalize": True}, "--renormalize"),
    ({"mode": "sft", "complement": True}, "--complement"),
    ({"mode": "sft", "alpha": 0.5}, "--alpha"),
    ({"teacher_system_prompt": " "}, "--teacher-system-prompt"),
])
def test_config_rejects_bad_values_naming_the_flag(overrides: dict, flag: str) -> None:
    with pytest.raises(SafesteerError, match=flag):
        DistillConfig(**overrides)


def test_config_parses_flags_and_documents_every_field() -> None:
    parser = HfArgumentParser(DistillConfig)
    (config,) = parser.parse_args_into_dataclasses(
        ["--learning-rate", "1e-3", "--mode", "topk", "--no-use-lora",
         "--lora-target-modules", "q_proj,v_proj"])
    assert (config.learning_rate, config.mode, config.use_lora) == (1e-3, "topk", False)
    assert (config.teacher_system_prompt, config.conditional_teacher) == (None, False)
    (baseline,) = parser.parse_args_into_dataclasses(
        ["--mode", "sft", "--teacher-system-prompt", SAFETY_SYSTEM_PROMPT, "--conditional-teacher"])
    assert (baseline.mode, baseline.teacher_system_prompt, baseline.conditional_teacher) == (
        "sft", SAFETY_SYSTEM_PROMPT, True)
    assert config.target_modules() == ["q_proj", "v_proj"]
    assert DistillConfig().target_modules() == "all-linear"
    # HfArgumentParser reads the bool of `bool | str`; "auto" is safesteer's own spelling (tests/test_cli.py)
    flagged = [parser.parse_args_into_dataclasses(flags)[0].bf16
               for flags in ([], ["--bf16"], ["--bf16", "false"])]
    assert flagged == [False, True, False]
    undocumented = [f.name for f in DistillConfig.__dataclass_fields__.values() if not f.metadata.get("help")]
    assert not undocumented


# ------------------------------------------------------------------------- pure pieces


@pytest.mark.parametrize("pad", [2, 0])
def test_completion_mask_includes_first_eos_and_excludes_padding(pad: int) -> None:
    eos = 2
    generated = torch.tensor([[5, 7, eos, pad, pad],
                              [eos, pad, pad, pad, pad],
                              [5, 6, 7, 8, 9],
                              [5, 9, 3, eos, pad]])
    expected = torch.tensor([[1, 1, 1, 0, 0],
                             [1, 0, 0, 0, 0],
                             [1, 1, 1, 1, 1],
                             [1, 1, 1, 1, 0]])
    assert torch.equal(completion_mask(generated, [eos]), expected)
    # A second end-of-turn id ends the completion as well.
    assert completion_mask(generated, [eos, 3])[3].tolist() == [1, 1, 1, 0, 0]



# ------------------------------------------------------------------------- training


def test_training_lowers_the_loss_on_a_fixed_rollout(make_tiny_model: ModelFactory, tiny_tokenizer,
                                                     direction, tmp_path) -> None:
    distiller = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path,
                               make_config(num_epochs=2))
    fixed = distiller.sample(1)
    before = distiller.backward(fixed)
    distiller.optimizer.zero_grad()
    result = distiller.train()
    after = distiller.backward(fixed)
    assert result.completed and result.step == 4
    assert before["loss"] - after["loss"] > 0.2 * abs(before["loss"])
    # The minimiser on S is p_t/e (docs/method.md §6.6): the student's mass on S heads there.
    target = before["teacher_mass_s"] / torch.e
    assert abs(after["student_mass_s"] - target) < abs(before["student_mass_s"] - target)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    for key in ("loss", "kl_k3", "student_mass_s", "teacher_mass_s", "refusal_rate", "completion_length",
                "tokens_per_second", "lr", "grad_norm"):
        assert all(key in row for row in log), key
    assert all(row["kl_k3"] >= 0 for row in log)


def test_teacher_is_the_steered_base_after_training(make_tiny_model: ModelFactory, tiny_tokenizer,
                                                    direction, tmp_path) -> None:
    distiller = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path)
    distiller.train()
    reference = make_tiny_model("llama")
    with direction.steer(reference):
        steered_base = logits(reference, tiny_tokenizer)
    with distiller.teachers.teacher() as teacher:
        teacher_logits = logits(teacher, tiny_tokenizer)
    torch.testing.assert_close(teacher_logits, steered_base, atol=1e-6, rtol=0)
    assert not torch.allclose(steered_base, logits(reference, tiny_tokenizer), atol=1e-3)
    assert not torch.allclose(logits(distiller.model, tiny_tokenizer), logits(reference, tiny_tokenizer),
                              atol=1e-4)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_gradient_does_not_depend_on_micro_batch_size(make_tiny_model: ModelFactory, tiny_tokenizer,
                                                      direction, tmp_path, reduction: str) -> None:
    gradients, samples = [], []
    for micro_batch_size in (1, 3):
        config = make_config(reduction=reduction, micro_batch_size=micro_batch_size, max_new_tokens=8)
        distiller = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction,
                                   tmp_path / str(micro_batch_size), config)
        rollout = distiller.sample(1)
        distiller.backward(rollout)
        samples.append(rollout.sequences)
        gradients.append(torch.cat([p.grad.flatten() for p in distiller.trainable_parameters]))
    assert torch.equal(samples[0], samples[1])
    assert gradients[0].abs().max() > 0
    torch.testing.assert_close(gradients[0], gradients[1], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("system_prompt", [None, SAFETY_SYSTEM_PROMPT])
def test_reading_a_prompt_once_for_its_samples_changes_no_logit_or_gradient(
        make_tiny_model: ModelFactory, tiny_tokenizer, direction, tmp_path,
        system_prompt: str | None) -> None:
    """Each prompt's 3 samples share one reading of it (micro-batches of 4 split a prompt's rows),
    against every row re-reading its prompt: the samples, the teachers (per-row steering or system
    prompt) and the student's gradient agree."""
    config = make_config(prompts_per_step=4, samples_per_prompt=3, micro_batch_size=4, max_new_tokens=8,
                         teacher_system_prompt=system_prompt)
    samples, teachers, gradients = [], [], []
    for share in (True, False):
        distiller = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path / str(share),
                                   config, steer_prompts=[True, False, False, True])
        assert distiller.share_prompts
        distiller.share_prompts = distiller.teachers.share_prompts = share
        rollout = distiller.sample(1)
        samples.append(rollout.sequences)
        teachers.append(distiller.teachers.logits(rollout, slice(2, 9), rollout.completion_mask.shape[1]))
        distiller.backward(rollout)
        gradients.append(torch.cat([p.grad.flatten() for p in distiller.trainable_parameters]))
    assert torch.equal(samples[0], samples[1])
    assert gradients[0].abs().max() > 0
    torch.testing.assert_close(teachers[0], teachers[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gradients[0], gradients[1], atol=1e-6, rtol=1e-4)


def test_bf16_autocast_scores_in_bfloat16_and_stays_close(make_tiny_model: ModelFactory, tiny_tokenizer,
                                                          direction, tmp_path) -> None:
    """--bf16: the same samples (sampling untouched), the teacher's and the student's products in
    bfloat16, float32 gradients, and loss and gradient within the tolerance of docs/method.md §6.1."""
    results = []
    for bf16 in (False, True):
        distiller = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path / str(bf16),
                                   make_config(max_new_tokens=8, bf16=bf16), steer_prompts=[True, False] * 2)
        heads: list[tuple[bool, torch.dtype]] = []  # (gradient on, dtype) of each output-head call
        distiller.student.get_output_embeddings().register_forward_hook(
            lambda module, args, output, heads=heads: heads.append((torch.is_grad_enabled(), output.dtype)))
        rollout = distiller.sample(1)
        sampling = len(heads)
        metrics = distiller.backward(rollout)
        gradient = torch.cat([p.grad.flatten() for p in distiller.trainable_parameters])
        results.append((rollout.sequences, metrics["loss"], gradient, set(heads[:sampling]),
                        set(heads[sampling:])))
    (samples, loss, gradient, _, _), (bf16_samples, bf16_loss, bf16_gradient, sampled, scored) = results
    assert torch.equal(samples, bf16_samples)
    assert sampled == {(False, torch.float32)}
    assert scored == {(False, torch.bfloat16), (True, torch.bfloat16)}  # teacher, then student
    assert bf16_gradient.dtype == torch.float32 and gradient.abs().max() > 0
    assert bf16_loss == pytest.approx(loss, rel=0.02)
    assert torch.nn.functional.cosine_similarity(gradient, bf16_gradient, dim=0) > 0.999


@pytest.mark.parametrize("native", [True, False])
def test_bf16_auto_autocasts_on_a_cpu_with_native_bfloat16_only(make_tiny_model: ModelFactory, tiny_tokenizer,
                                                                  direction, tmp_path, native: bool,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "native_bfloat16_cpu", lambda: native)
    distiller = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path,
                               make_config(max_new_tokens=4, bf16="auto"))
    heads: list[torch.dtype] = []
    distiller.student.get_output_embeddings().register_forward_hook(
        lambda module, args, output: heads.append(output.dtype) if torch.is_grad_enabled() else None)
    distiller.backward(distiller.sample(1))
    assert distiller.bf16 is native and set(heads) == {torch.bfloat16 if native else torch.float32}
    with pytest.raises(SafesteerError, match="--bf16 must be true, false or auto, got 'yes'"):
        make_config(bf16="yes")


def test_bf16_keeps_the_frozen_weights_bfloat16_copies_without_changing_a_bit(
        make_tiny_model: ModelFactory, tiny_tokenizer, direction, tmp_path) -> None:
    """The frozen base's bfloat16 copies, kept across forwards, give the loss and gradient of
    autocast casting every weight at every forward; each linear weight is copied once, however
    many steps fold the adapter for sampling."""
    results = []
    for keep in (False, True):
        distiller = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path / str(keep),
                                   make_config(max_new_tokens=8, bf16=True), steer_prompts=[True, False] * 2)
        if not keep:
            distiller.weight_casts = None
        rollout = distiller.sample(1)
        metrics = distiller.backward(rollout)
        gradient = torch.cat([p.grad.flatten() for p in distiller.trainable_parameters])
        results.append((metrics["loss"], gradient))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])
    linears = {id(module.base_layer.weight if hasattr(module, "base_layer") else module.weight)
               for module in distiller.student.modules() if isinstance(module, torch.nn.Linear)
               and not module.weight.requires_grad}
    assert {id(weight) for weight in distiller.weight_casts.copies.originals()} == linears
    distiller.backward(distiller.sample(1))  # sampling again folds the adapter into new weights
    assert len(distiller.weight_casts.copies) == len(linears)


def test_lora_adapter_is_float32_on_a_bf16_base(make_tiny_model: ModelFactory, tiny_tokenizer,
                                                direction, tmp_path) -> None:
    distiller = make_distiller(make_tiny_model("llama").to(torch.bfloat16), tiny_tokenizer, direction,
                               tmp_path, make_config(num_epochs=1, prompts_per_step=4))
    assert {p.dtype for p in distiller.trainable_parameters} == {torch.float32}
    result = distiller.train()
    assert result.completed and result.last_metrics is not None
    assert torch.isfinite(torch.tensor(result.last_metrics["loss"]))


def test_full_finetune_trains_float32_student_against_frozen_copy(make_tiny_model: ModelFactory,
                                                                 tiny_tokenizer, direction,
                                                                 tmp_path) -> None:
    config = make_config(use_lora=False, learning_rate=1e-3, prompts_per_step=4, gradient_checkpointing=True)
    distiller = make_distiller(make_tiny_model("llama").to(torch.bfloat16), tiny_tokenizer, direction,
                               tmp_path, config)
    assert not distiller.share_prompts  # checkpointing turns the KV cache off
    teacher_before = logits(distiller.teacher_model, tiny_tokenizer)
    result = distiller.train()
    assert {p.dtype for p in distiller.trainable_parameters} == {torch.float32}
    assert torch.equal(logits(distiller.teacher_model, tiny_tokenizer), teacher_before)
    assert result.student_dir is not None
    loaded = AutoModelForCausalLM.from_pretrained(result.student_dir)
    torch.testing.assert_close(logits(loaded, tiny_tokenizer), logits(distiller.model, tiny_tokenizer))


# ------------------------------------------------------------------------- baselines and per-prompt teachers


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_sft_loss_is_the_students_nll_of_the_samples(make_tiny_model: ModelFactory, tiny_tokenizer,
                                                     direction, tmp_path, reduction: str) -> None:
    config = make_config(mode="sft", reduction=reduction, temperature=0.7, micro_batch_size=3,
                         max_new_tokens=8)
    distiller = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path, config)
    rollout = distiller.sample(1)
    metrics = distiller.backward(rollout)
    length = rollout.completion_mask.shape[1]
    distiller.model.eval()
    per_row = []
    for row in range(len(rollout.texts)):
        completion = rollout.sequences[row, -length:]
        student = unpadded_completion_logits(distiller.model, unpadded_prompt(rollout, row), completion, 0.7)
        nll = -torch.log_softmax(student.double(), -1).gather(-1, completion[:, None])[:, 0]
        per_row.append((nll * rollout.completion_mask[row]).sum())
    counts = rollout.completion_mask.sum(1).double()
    expected = (sum(per_row) / counts.sum() if reduction == "token"
                else (torch.stack(per_row) / counts).mean())
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert metrics["steered_rows"] == 1.0
    assert not {"kl_k3", "student_mass_s", "teacher_mass_s"} & metrics.keys()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in distiller.trainable_parameters)


@pytest.mark.parametrize("system_prompt", [None, SAFETY_SYSTEM_PROMPT])
def test_sft_samples_come_from_the_teacher(make_tiny_model: ModelFactory, tiny_tokenizer, direction,
                                          tmp_path, system_prompt: str | None) -> None:
    def first_samples(name: str, mode: str, labels: list[bool] | None = None) -> torch.Tensor:
        # A low temperature makes the near-uniform tiny model's samples follow its logits' shifts.
        config = make_config(mode=mode, teacher_system_prompt=system_prompt, max_new_tokens=8,
                             temperature=0.05)
        distiller = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path / name,
                                   config, steer_prompts=labels)
        return distiller.sample(1).sequences

    on_policy = first_samples("student", "subset")
    # The untrained student is the base (LoRA starts at zero), so the plain-base teacher draws the
    # student's samples, and the safety teacher others; the student always keeps its user-only prompt.
    assert torch.equal(first_samples("base", "sft", [False] * len(PROMPTS)), on_policy)
    safety = first_samples("safety", "sft")
    width = on_policy.shape[1] - 8
    assert torch.equal(safety[:, :width], on_policy[:, :width])
    assert not torch.equal(safety, on_policy)


def test_system_prompt_teacher_reads_its_prompt_then_the_same_tokens(make_tiny_model: ModelFactory,
                                                                   tiny_tokenizer, direction,
                                                                   tmp_path) -> None:
    labels = [True, False, True, True]
    config = make_config(teacher_system_prompt=SAFETY_SYSTEM_PROMPT, prompts_per_step=4,
                         samples_per_prompt=1, temperature=0.5)
    distiller = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path, config,
                               steer_prompts=labels)
    rollout = distiller.sample(1)
    length = rollout.completion_mask.shape[1]
    teacher = distiller.teachers.logits(rollout, slice(None), length)
    base = make_tiny_model("llama")
    prompts = [chat_ids(tiny_tokenizer, PROMPTS[index], SAFETY_SYSTEM_PROMPT if labels[index] else None)
               for index in rollout.prompt_indices]
    assert len({len(ids) for ids in prompts}) > 1  # the teacher's batch is left-padded
    for row, prompt_ids in enumerate(prompts):
        assert unpadded_prompt(rollout, row) == chat_ids(tiny_tokenizer, PROMPTS[rollout.prompt_indices[row]])
        expected = unpadded_completion_logits(base, prompt_ids, rollout.sequences[row, -length:], 0.5)
        torch.testing.assert_close(teacher[row], expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        user_only = completion_logits(base, rollout.sequences, rollout.attention_mask, length, 0.5)
    assert not torch.allclose(teacher[rollout.steer_mask], user_only[rollout.steer_mask], atol=1e-3)


def test_steering_labels_pick_each_rows_teacher(make_tiny_model: ModelFactory, tiny_tokenizer, direction,
                                                tmp_path) -> None:
    labels = [True, False, False, True]
    config = make_config(prompts_per_step=4, samples_per_prompt=2)
    distiller = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path, config,
                               steer_prompts=labels)
    rollout = distiller.sample(1)
    steer_mask = torch.tensor([labels[index] for index in rollout.prompt_indices])
    assert torch.equal(rollout.steer_mask, steer_mask)
    length = rollout.completion_mask.shape[1]
    teacher = distiller.teachers.logits(rollout, slice(None), length)
    reference = make_tiny_model("llama")
    with torch.no_grad():
        base = completion_logits(reference, rollout.sequences, rollout.attention_mask, length)
        with direction.steer(reference):
            steered = completion_logits(reference, rollout.sequences, rollout.attention_mask, length)
    torch.testing.assert_close(teacher[steer_mask], steered[steer_mask], atol=1e-6, rtol=0)
    torch.testing.assert_close(teacher[~steer_mask], base[~steer_mask], atol=1e-6, rtol=0)
    assert not torch.allclose(steered, base, atol=1e-3)
    # A micro-batch slice gets its own rows' teachers (and its own, narrower, padding).
    torch.testing.assert_close(distiller.teachers.logits(rollout, slice(3, 6), length), teacher[3:6],
                               atol=1e-5, rtol=1e-5)
    assert distiller.backward(rollout)["steered_rows"] == 0.5


def test_conditional_teacher_steers_the_prompts_the_gate_flags(make_tiny_model: ModelFactory,
                                                               tiny_tokenizer, direction,
                                                               tmp_path) -> None:
    model = make_tiny_model("llama")
    gate_vector = torch.randn(32, generator=torch.Generator().manual_seed(2))
    scores = []
    for prompt in PROMPTS:
        with torch.no_grad():
            hidden = model(torch.tensor([chat_ids(tiny_tokenizer, prompt)]), output_hidden_states=True)
        scores.append(float(hidden.hidden_states[1][0, -1] @ gate_vector))  # block 1's input
    threshold = sum(sorted(scores)[1:3]) / 2
    gated = Direction(direction.vector, direction.layer, direction.coefficient, direction.metadata,
                      Gate(gate_vector, 1, threshold))
    config = make_config(conditional_teacher=True, prompts_per_step=4, samples_per_prompt=2)
    distiller = make_distiller(model, tiny_tokenizer, gated, tmp_path, config,
                               steer_prompts=[False] * len(PROMPTS))  # the gate overrides the labels
    rollout = distiller.sample(1)
    flagged = [scores[index] > threshold for index in rollout.prompt_indices]
    assert torch.equal(rollout.steer_mask, torch.tensor(flagged))
    assert 0 < rollout.steer_mask.sum() < len(rollout.steer_mask)
    assert distiller.backward(rollout)["steered_rows"] == rollout.steer_mask.double().mean().item()
    with pytest.raises(SafesteerError, match="no harmfulness gate"):
        make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path / "gateless", config)


def test_the_gate_read_leaves_the_students_sampling_alone(make_tiny_model: ModelFactory, tiny_tokenizer,
                                                         direction, tmp_path) -> None:
    """--conditional-teacher reads the gate (a cut-short forward) right before sampling: the student
    must then draw the same completions, still decoding one token per forward (KV cache)."""
    gated = Direction(direction.vector, direction.layer, direction.coefficient, direction.metadata,
                      Gate(torch.randn(32, generator=torch.Generator().manual_seed(2)), 1, 0.0))
    rollouts: list[Rollout] = []
    lengths: list[tuple[int, int]] = []  # (batch, positions) of each forward of the student's block 0

    def record(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        lengths.append(tuple((args or (kwargs["hidden_states"],))[0].shape[:2]))

    for conditional in (False, True):
        model = make_tiny_model("llama")
        distiller = make_distiller(model, tiny_tokenizer, gated, tmp_path / str(conditional),
                                   make_config(conditional_teacher=conditional, prompts_per_step=4))
        lengths.clear()
        handle = decoder_layers(model)[0].register_forward_pre_hook(record, with_kwargs=True)
        rollouts.append(distiller.sample(1))
        handle.remove()
    prompts = rollouts[1].prompt_length
    # The gate read, then the prompts read once for their 2 samples each, up to their last token.
    assert lengths[:2] == [(4, prompts), (4, prompts - 1)]
    assert set(lengths[2:]) == {(8, 1)}
    torch.testing.assert_close(rollouts[1].sequences, rollouts[0].sequences, rtol=0, atol=0)


# ------------------------------------------------------------------------- checkpoints and outputs


def test_resume_after_interruption_matches_an_uninterrupted_run(make_tiny_model: ModelFactory,
                                                                tiny_tokenizer, direction,
                                                                tmp_path) -> None:
    config = make_config(num_epochs=2, lora_dropout=0.1, prompts_per_step=3)  # 2 steps per epoch
    straight = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path / "a", config)
    straight.train()

    interrupted = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path / "b", config)
    stopped = interrupted.train(max_steps=3)
    assert not stopped.completed and stopped.student_dir is None
    checkpoints = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2", "step-3"]
    # A crash while writing step 4 leaves only a hidden staging directory, which is ignored.
    (checkpoints / ".step-4.tmp").mkdir()
    with (tmp_path / "b" / "train_log.jsonl").open("a") as log:
        log.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")

    resumed = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path / "b", config,
                             resume=True)
    assert resumed.step == 3
    result = resumed.train()
    assert result.completed and result.step == 4
    expected = load_file(tmp_path / "a" / "student" / "adapter_model.safetensors")
    actual = load_file(tmp_path / "b" / "student" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=0)
    log = (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in log]
    assert steps == [1, 2, 3, 4]
    assert not (checkpoints / ".step-4.tmp").exists()


def test_resume_with_another_config_is_refused(make_tiny_model: ModelFactory, tiny_tokenizer,
                                               direction, tmp_path) -> None:
    make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path).train(max_steps=1)
    with pytest.raises(SafesteerError, match=r"learning_rate.*max_new_tokens"):
        make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path,
                       make_config(learning_rate=2e-2, max_new_tokens=5), resume=True)
    with pytest.raises(SafesteerError, match="safety_token_ids"):
        Distiller(make_tiny_model("llama"), tiny_tokenizer, direction, PROMPTS, make_config(), tmp_path,
                  safety_token_ids=SAFETY_IDS[:-1], resume=True).setup()
    with pytest.raises(SafesteerError, match="--overwrite"):
        make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path)
    assert (tmp_path / "train_log.jsonl").is_file() and any((tmp_path / "checkpoints").iterdir())
    make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path, overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["distill_config.json", "distill_inputs.json"]


def test_resume_from_a_damaged_checkpoint_names_the_file_and_the_older_one(
        make_tiny_model: ModelFactory, tiny_tokenizer, direction, tmp_path) -> None:
    make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path).train(max_steps=2)
    checkpoints = tmp_path / "checkpoints"
    damaged = checkpoints / "step-2" / "adapter_model.safetensors"
    damaged.write_bytes(b"\0" * 8)
    with pytest.raises(SafesteerError, match=re.escape(
            f"{damaged}: damaged checkpoint (") + ".*" + re.escape(
            f"); delete {checkpoints / 'step-2'} and --resume continues from {checkpoints / 'step-1'}")):
        make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path, resume=True)
    shutil.rmtree(checkpoints / "step-2")
    resumed = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path, resume=True)
    assert resumed.step == 1


def test_resume_with_other_steering_labels_is_refused(make_tiny_model: ModelFactory, tiny_tokenizer,
                                                      direction, tmp_path) -> None:
    labels = [True, False, True, False]
    first = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path,
                           steer_prompts=labels)
    first.train(max_steps=1)
    (record,) = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    step_labels = [labels[index] for index in first.step_prompt_indices(1)]
    assert record["steered_rows"] == sum(step_labels) / len(step_labels)
    with pytest.raises(SafesteerError, match="steer_prompts"):
        make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path,
                       steer_prompts=[True, True, True, False], resume=True)
    resumed = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path,
                             steer_prompts=labels, resume=True)
    assert resumed.step == 1


def test_saved_student_loads_with_peft_and_merges(make_tiny_model: ModelFactory, tiny_tokenizer,
                                                  direction, tmp_path) -> None:
    distiller = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path)
    result = distiller.train()
    assert result.student_dir == tmp_path / "student"
    trained = logits(distiller.model, tiny_tokenizer)
    reloaded = PeftModel.from_pretrained(make_tiny_model("llama"), result.student_dir)
    torch.testing.assert_close(logits(reloaded, tiny_tokenizer), trained, atol=1e-6, rtol=0)
    assert not torch.allclose(logits(make_tiny_model("llama"), tiny_tokenizer), trained, atol=1e-4)

    merged_dir = merge_student(make_tiny_model("llama"), result.student_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    torch.testing.assert_close(logits(merged, tiny_tokenizer), trained, atol=1e-5, rtol=1e-5)
    assert (merged_dir / "tokenizer_config.json").is_file()
    assert json.loads((merged_dir / "safesteer.json").read_text())["kind"] == "export"


def test_merge_replaces_an_earlier_export_only(make_tiny_model: ModelFactory, tiny_tokenizer, direction,
                                               tmp_path) -> None:
    run = tmp_path / "run"
    student = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, run,
                             make_config(num_epochs=1, prompts_per_step=4)).train().student_dir
    merged = merge_student(make_tiny_model("llama"), student, tmp_path / "merged")
    (merged / "stale.txt").write_text("from the first export")
    assert merge_student(make_tiny_model("llama"), student, merged) == merged
    assert not (merged / "stale.txt").exists() and (merged / "config.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged", "run"]  # nothing staged left

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    before = sorted(path.name for path in run.rglob("*"))
    for target, message in ((run, "contains the adapter directory"), (mine, "not a safesteer export"),
                            (student, "is the adapter directory")):
        with pytest.raises(SafesteerError, match=message):
            merge_student(make_tiny_model("llama"), student, target)
    assert sorted(path.name for path in run.rglob("*")) == before
    assert [path.name for path in mine.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------- bad input


def test_bad_inputs_are_refused(make_tiny_model: ModelFactory, tiny_tokenizer, direction, tmp_path) -> None:
    model = make_tiny_model("llama")
    with pytest.raises(SafesteerError, match="empty"):
        Distiller(model, tiny_tokenizer, direction, [], make_config(), tmp_path,
                  safety_token_ids=SAFETY_IDS).setup()
    with pytest.raises(SafesteerError, match="--mode subset"):
        Distiller(model, tiny_tokenizer, direction, PROMPTS, make_config(), tmp_path,
                  safety_token_ids=[]).setup()
    with pytest.raises(SafesteerError, match="distinct"):
        Distiller(model, tiny_tokenizer, direction, PROMPTS, make_config(), tmp_path,
                  safety_token_ids=[3, 3]).setup()
    with pytest.raises(SafesteerError, match="steer_prompts has 3 labels for 4"):
        Distiller(model, tiny_tokenizer, direction, PROMPTS, make_config(), tmp_path,
                  safety_token_ids=SAFETY_IDS, steer_prompts=[True] * 3).setup()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(make_tiny_model: ModelFactory,
                                                                   tiny_tokenizer, direction,
                                                                   tmp_path) -> None:
    distiller = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path)
    distiller.train(max_steps=1)
    adapter = {n: p.detach().clone() for n, p in distiller.model.named_parameters() if p.requires_grad}
    direction.vector.fill_(float("nan"))
    with pytest.raises(SafesteerError, match=r"step 2.*step-1"):
        distiller.train()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-1"]
    assert not (tmp_path / "student").exists()
    for name, parameter in distiller.model.named_parameters():
        if parameter.requires_grad:
            assert torch.equal(parameter, adapter[name])


def test_out_of_memory_while_sampling_names_the_flags(make_tiny_model: ModelFactory, tiny_tokenizer,
                                                      direction, tmp_path, monkeypatch) -> None:
    distiller = make_distiller(make_tiny_model("llama"), tiny_tokenizer, direction, tmp_path)

    def out_of_memory(**_kwargs: object) -> None:
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(distiller.model, "generate", out_of_memory)
    with pytest.raises(SafesteerError, match=r"--samples-per-prompt.*--max-new-tokens"):
        distiller.train()
