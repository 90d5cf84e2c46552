"""Data: JSONL/rows/HF loaders with every reward-spec form, error messages, the prompt sampler,
and load-time reward validation through `build_rewards` (the trainer's path)."""

import json
from collections import Counter

import pytest

from grpo_ar.errors import DataError
from grpo_ar.io.data import (
    PromptSampler,
    entry_from_row,
    load_entries,
    load_hf,
    load_jsonl,
    load_rows,
)
from grpo_ar.rewards import REWARDS, RewardSpecError, UnknownRewardError, build_rewards
from grpo_ar.types import Entry, RewardSpec


def write_jsonl(path, rows) -> str:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# -- JSONL and reward-spec forms ------------------------------------------------------------


def test_load_jsonl_every_reward_spec_form(tmp_path):
    rows = [
        {"prompt": "p0", "rewards": "contains"},
        {
            "prompt": "p1",
            "rewards": {"name": "numeric_answer", "weight": 0.5, "args": {"answer": 3}},
        },
        {"prompt": "p2", "rewards": {"numeric_answer": {"answer": 4, "weight": 2}}},
        {"prompt": "p3", "rewards": {"contains": None, "exact_answer": {"answer": "x"}}},
        {
            "prompt": "p4",
            "rewards": [
                "contains",
                {"name": "exact_answer", "args": {"answer": "y"}},
                {"numeric_answer": {"answer": 5, "weight": -1}},
            ],
        },
        {"prompt": [{"role": "user", "content": "hi"}], "rewards": "contains", "id": 7},
    ]
    entries = load_jsonl(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [e.prompt for e in entries[:5]] == ["p0", "p1", "p2", "p3", "p4"]
    assert entries[0].rewards == (RewardSpec("contains", 1.0, {}),)
    assert entries[1].rewards == (RewardSpec("numeric_answer", 0.5, {"answer": 3}),)
    # in the {name: args} form the weight is taken out of the args
    assert entries[2].rewards == (RewardSpec("numeric_answer", 2.0, {"answer": 4}),)
    assert entries[3].rewards == (
        RewardSpec("contains", 1.0, {}),
        RewardSpec("exact_answer", 1.0, {"answer": "x"}),
    )
    assert entries[4].rewards == (
        RewardSpec("contains", 1.0, {}),
        RewardSpec("exact_answer", 1.0, {"answer": "y"}),
        RewardSpec("numeric_answer", -1.0, {"answer": 5}),
    )
    assert all(isinstance(s.weight, float) for e in entries for s in e.rewards)
    # chat prompts pass through; other fields become metadata
    assert entries[5].prompt == [{"role": "user", "content": "hi"}]
    assert entries[5].metadata == {"id": 7}
    assert entries[0].metadata == {}


def test_blank_lines_are_skipped_and_line_numbers_count_them(tmp_path):
    p = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "a", "rewards": "contains"}, "", "   ", "{bad json"]
    )
    with pytest.raises(DataError, match=rf"^{p}:4: not valid JSON"):
        load_jsonl(p)


def test_malformed_json_names_file_and_line(tmp_path):
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "a", "rewards": "contains"}, '{"prompt": "b", "rewards": }'],
    )
    with pytest.raises(DataError) as e:
        load_jsonl(p)
    assert str(e.value).startswith(f"{p}:2: not valid JSON")
    assert "column" in str(e.value)


def test_missing_prompt_field_names_field_and_line(tmp_path):
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "a", "rewards": "contains"}, {"question": "b", "rewards": "contains"}],
    )
    with pytest.raises(DataError, match=rf"^{p}:2: missing field 'prompt' \(the prompt\)"):
        load_jsonl(p)


def test_custom_prompt_field(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "prompt": "x", "rewards": "contains"}])
    (e,) = load_jsonl(p, prompt_field="question")
    assert e.prompt == "q"
    assert e.metadata == {"prompt": "x"}  # the other field is kept as metadata
    with pytest.raises(DataError, match=r":1: missing field 'query'"):
        load_jsonl(p, prompt_field="query")


def test_row_without_rewards_and_no_defaults(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}])
    with pytest.raises(DataError) as e:
        load_jsonl(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:1: no reward")
    assert "'rewards' field" in msg and "data.rewards" in msg


def test_rewards_null_counts_as_absent(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "rewards": None}])
    with pytest.raises(DataError, match=r":1: no reward"):
        load_jsonl(p)
    (e,) = load_jsonl(p, default_rewards=[{"name": "contains", "args": {"text": "z"}}])
    assert e.rewards == (RewardSpec("contains", 1.0, {"text": "z"}),)


@pytest.mark.parametrize("line, kind", [("[1, 2]", "list"), ('"text"', "str"), ("3", "int")])
def test_non_object_row(tmp_path, line, kind):
    p = write_jsonl(tmp_path / "d.jsonl", [line])
    with pytest.raises(DataError, match=rf"^{p}:1: a row must be a JSON object, got {kind}"):
        load_jsonl(p)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=r"no rows"):
        load_jsonl(p)


@pytest.mark.parametrize(
    "rewards, fragment",
    [
        (5, "field 'rewards' must be a name, a mapping or a list, got int"),
        ({"name": "contains", "wieght": 2}, "unknown key(s) ['wieght']; use name, weight, args"),
        ({"name": "contains", "args": [1]}, "reward 'args' must be a mapping, got list"),
        ({"name": "contains", "weight": "heavy"}, "reward 'weight' must be a number, got 'heavy'"),
        ({"contains": 3}, "arguments of reward 'contains' must be a mapping"),
        (["contains", 7], "got int"),
    ],
)
def test_bad_reward_specs_name_file_and_line(tmp_path, rewards, fragment):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "rewards": rewards}])
    with pytest.raises(DataError) as e:
        load_jsonl(p)
    assert str(e.value).startswith(f"{p}:1: ")
    assert fragment in str(e.value)


def test_bad_weight_in_name_args_form_names_file_and_line(tmp_path):
    p = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "a", "rewards": {"contains": {"weight": "x"}}}]
    )
    with pytest.raises(DataError, match=rf"^{p}:1: .*weight"):
        load_jsonl(p)


# -- default rewards from the config --------------------------------------------------------


def test_default_rewards_resolve_dollar_fields_per_row(tmp_path):
    rows = [
        {"prompt": "1+1=", "solution": 2, "tag": "add"},
        {"prompt": "2*3=", "solution": 6, "tag": "mul"},
        {"prompt": "own", "rewards": "contains"},  # a row's own rewards win
    ]
    defaults = [
        {"name": "numeric_answer", "weight": 2.0, "args": {"answer": "$solution", "mode": "last"}},
        {"contains": {"text": "$tag", "weight": 0.5}},
        "regex_format",
    ]
    entries = load_jsonl(write_jsonl(tmp_path / "d.jsonl", rows), default_rewards=defaults)
    assert entries[0].rewards == (
        RewardSpec("numeric_answer", 2.0, {"answer": 2, "mode": "last"}),
        RewardSpec("contains", 0.5, {"text": "add"}),
        RewardSpec("regex_format", 1.0, {}),
    )
    assert entries[1].rewards[0].args == {"answer": 6, "mode": "last"}
    assert entries[1].rewards[1].args == {"text": "mul"}
    assert entries[2].rewards == (RewardSpec("contains", 1.0, {}),)
    # the referenced fields stay in the metadata
    assert entries[0].metadata == {"solution": 2, "tag": "add"}
    # the config's defaults are not mutated by resolution
    assert defaults[0]["args"] == {"answer": "$solution", "mode": "last"}
    assert defaults[1] == {"contains": {"text": "$tag", "weight": 0.5}}


def test_default_reward_missing_field_names_file_line_and_field(tmp_path):
    rows = [{"prompt": "a", "solution": 1}, {"prompt": "b", "answer": 2}]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    defaults = [{"numeric_answer": {"answer": "$solution"}}]
    with pytest.raises(DataError) as e:
        load_jsonl(p, default_rewards=defaults)
    msg = str(e.value)
    assert msg.startswith(f"{p}:2: ")
    assert "'solution'" in msg and "the row lacks" in msg


def test_double_dollar_is_not_a_field_reference():
    # "$$x" is left alone (no field "$x" or "x" is looked up, so no missing-field error)
    e = entry_from_row({"prompt": "a"}, "r", default_rewards=[{"contains": {"text": "$$x"}}])
    assert e.rewards[0].args["text"] in ("$x", "$$x")
    # a value that merely contains "$" is not a reference either
    e = entry_from_row({"prompt": "a"}, "r", default_rewards=[{"contains": {"text": "5$"}}])
    assert e.rewards[0].args["text"] == "5$"


# -- rows, entries, files -------------------------------------------------------------------


def test_load_rows_on_dicts_and_entries():
    ready = Entry("ready", (RewardSpec("contains", 1.0, {"text": "r"}),), {"k": 1})
    rows = [{"prompt": "a", "answer": 3}, ready, {"prompt": "b", "answer": 4}]
    out = load_rows(rows, default_rewards=[{"numeric_answer": {"answer": "$answer"}}])
    assert out[1] is ready  # Entry objects pass through untouched
    assert out[0] == Entry("a", (RewardSpec("numeric_answer", 1.0, {"answer": 3}),), {"answer": 3})
    assert out[2].rewards[0].args == {"answer": 4}


def test_load_rows_errors_name_source_and_index():
    with pytest.raises(DataError, match=r"^mine\[1\]: missing field 'prompt'"):
        load_rows([{"prompt": "a", "rewards": "contains"}, {"q": "b"}], source="mine")
    with pytest.raises(DataError, match=r"^rows: no rows"):
        load_rows([])
    with pytest.raises(DataError, match=r"^rows\[0\]: a row must be a JSON object, got str"):
        load_rows(["prompt"])


def test_load_rows_accepts_a_generator():
    out = load_rows({"prompt": str(i), "rewards": "contains"} for i in range(3))
    assert [e.prompt for e in out] == ["0", "1", "2"]


def test_load_entries_jsonl_and_missing_file(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "rewards": "contains"}])
    assert [e.prompt for e in load_entries(p)] == ["a"]
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"^{missing}: no such file"):
        load_entries(missing)


# -- Hugging Face datasets ------------------------------------------------------------------

ROWS = [{"prompt": f"{i}+{i}=", "answer": 2 * i} for i in range(5)]
DEFAULTS = [{"numeric_answer": {"answer": "$answer"}}]


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    return datasets


@pytest.fixture()
def hf_folder(tmp_path):
    """A local dataset folder of data files, one per split (what `load_dataset(path)` reads)."""
    d = tmp_path / "ds"
    d.mkdir()
    write_jsonl(d / "train.jsonl", ROWS)
    write_jsonl(d / "test.jsonl", ROWS[:2])
    return d


def test_load_hf_local_folder_splits(hf_cache, hf_folder):
    train = load_hf(str(hf_folder), default_rewards=DEFAULTS)
    assert [e.prompt for e in train] == [r["prompt"] for r in ROWS]
    assert [e.rewards[0].args["answer"] for e in train] == [0, 2, 4, 6, 8]
    test = load_hf(str(hf_folder), split="test", default_rewards=DEFAULTS)
    assert len(test) == 2
    # the hf: prefix of load_entries, with and without a split
    assert len(load_entries(f"hf:{hf_folder}", default_rewards=DEFAULTS)) == 5
    assert load_entries(f"hf:{hf_folder}:test", default_rewards=DEFAULTS) == test


def test_load_hf_errors_name_the_dataset_and_row(hf_cache, hf_folder):
    with pytest.raises(DataError, match=r"\[train\]\[0\]: no reward"):
        load_hf(str(hf_folder))


def test_load_rows_on_an_in_memory_hf_dataset(hf_cache):
    ds = hf_cache.Dataset.from_list(ROWS)
    out = load_rows(ds, default_rewards=DEFAULTS)
    assert [e.rewards[0].args["answer"] for e in out] == [0, 2, 4, 6, 8]


def test_load_hf_save_to_disk_folder(hf_cache, tmp_path):
    hf_cache.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    out = load_hf(str(tmp_path / "saved"), default_rewards=DEFAULTS)
    assert [e.prompt for e in out] == [r["prompt"] for r in ROWS]


def test_hf_split_with_slice_syntax(hf_cache, hf_folder):
    assert len(load_entries(f"hf:{hf_folder}:train[:2]", default_rewards=DEFAULTS)) == 2


@pytest.mark.parametrize(
    "rewards",
    [
        [{"numeric_answer": {"answer": 1}}, {"contains": {"text": "x"}}],
        [
            [{"name": "numeric_answer", "args": {"answer": 1}}],
            [{"name": "contains", "args": {"text": "x"}}],
        ],
    ],
)
def test_hf_dataset_rows_with_different_rewards(hf_cache, rewards):
    ds = hf_cache.Dataset.from_list(
        [{"prompt": str(i), "rewards": r} for i, r in enumerate(rewards)]
    )
    out = load_rows(ds)
    assert out[0].rewards == (RewardSpec("numeric_answer", 1.0, {"answer": 1}),)
    assert out[1].rewards == (RewardSpec("contains", 1.0, {"text": "x"}),)


# -- prompt sampler -------------------------------------------------------------------------


def _entries(n: int) -> list[Entry]:
    return [Entry(str(i), (RewardSpec("contains"),)) for i in range(n)]


def _ids(batch) -> list[int]:
    return [int(e.prompt) for e in batch]


def test_sampler_sees_every_entry_once_per_epoch():
    s = PromptSampler(_entries(12), batch_size=4, seed=3)
    epochs = []
    for _ in range(4):
        seen = [i for _ in range(3) for i in _ids(s.next_batch())]
        assert sorted(seen) == list(range(12))
        epochs.append(seen)
    assert len({tuple(e) for e in epochs}) == 4  # a fresh order every epoch
    assert epochs[0] != list(range(12))  # and actually shuffled


def test_sampler_drops_the_ragged_tail():
    s = PromptSampler(_entries(10), batch_size=4, seed=0)
    batches = [_ids(s.next_batch()) for _ in range(6)]  # 2 batches per epoch, 2 entries dropped
    assert all(len(b) == 4 for b in batches)
    for k in range(3):
        epoch = batches[2 * k] + batches[2 * k + 1]
        assert len(set(epoch)) == 8  # no repeats inside an epoch
    assert s.epoch == 2


def test_sampler_counts_over_many_epochs_are_uniform():
    s = PromptSampler(_entries(6), batch_size=3, seed=1)
    counts = Counter(i for _ in range(20) for i in _ids(s.next_batch()))
    assert counts == Counter(dict.fromkeys(range(6), 10))


def test_sampler_same_seed_same_order_other_seed_other_order():
    a = PromptSampler(_entries(16), 4, seed=5)
    b = PromptSampler(_entries(16), 4, seed=5)
    c = PromptSampler(_entries(16), 4, seed=6)
    seq_a = [_ids(a.next_batch()) for _ in range(12)]
    seq_b = [_ids(b.next_batch()) for _ in range(12)]
    seq_c = [_ids(c.next_batch()) for _ in range(12)]
    assert seq_a == seq_b
    assert seq_a != seq_c


@pytest.mark.parametrize("taken", [0, 1, 3, 4, 7])
def test_sampler_state_resumes_the_exact_sequence(taken):
    ref = PromptSampler(_entries(10), 3, seed=2)
    expected = [_ids(ref.next_batch()) for _ in range(12)]

    first = PromptSampler(_entries(10), 3, seed=2)
    for _ in range(taken):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = PromptSampler(_entries(10), 3, seed=99)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert [_ids(resumed.next_batch()) for _ in range(12 - taken)] == expected[taken:]


def test_sampler_iterates():
    s = PromptSampler(_entries(4), 2, seed=0)
    it = iter(s)
    got = [_ids(next(it)) for _ in range(2)]
    assert sorted(got[0] + got[1]) == [0, 1, 2, 3]


def test_sampler_batch_larger_than_dataset():
    with pytest.raises(ValueError, match=r"batch_size=5 exceeds the 4 entries"):
        PromptSampler(_entries(4), batch_size=5)
    assert len(PromptSampler(_entries(4), batch_size=4).next_batch()) == 4


# -- reward specs validated at load time (the trainer's path) -------------------------------


def test_build_rewards_unknown_name_lists_the_valid_names():
    entries = [
        Entry("a", (RewardSpec("contains", 1.0, {"text": "a"}),)),
        Entry("b", (RewardSpec("numeric_anwser", 1.0, {"answer": 1}),)),
    ]
    with pytest.raises(UnknownRewardError) as e:
        build_rewards({}, entries)
    msg = str(e.value)
    assert msg.startswith("entry 1: unknown reward 'numeric_anwser'")
    assert f"valid names: {', '.join(sorted(REWARDS))}" in msg
    assert isinstance(e.value, DataError)


def test_build_rewards_numeric_answer_without_answer():
    entries = [
        Entry("a", (RewardSpec("numeric_answer", 1.0, {"answer": 1}),)),
        Entry("b", (RewardSpec("numeric_answer", 1.0, {"tolerance": 0.1}),)),
    ]
    with pytest.raises(RewardSpecError) as e:
        build_rewards({}, entries)
    msg = str(e.value)
    assert msg.startswith("entry 1: reward 'numeric_answer' needs argument 'answer'")


def test_build_rewards_from_loaded_jsonl(tmp_path):
    rows = [{"prompt": "1+1=", "solution": 2}, {"prompt": "2+2=", "solution": 4}]
    entries = load_jsonl(
        write_jsonl(tmp_path / "d.jsonl", rows),
        default_rewards=[{"numeric_answer": {"answer": "$solution"}}],
    )
    computer = build_rewards({}, entries)
    assert computer.names == ["numeric_answer"]
    # a default spec that forgets the argument is caught before any step
    bad = load_jsonl(tmp_path / "d.jsonl", default_rewards=["numeric_answer"])
    with pytest.raises(RewardSpecError, match=r"needs argument 'answer'"):
        build_rewards({}, bad)
