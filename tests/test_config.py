"""Config: TOML/YAML files, `--set` overrides, unknown keys, validation messages, round trip."""

import dataclasses

import pytest

from grpo_ar.config import (
    AlgorithmConfig,
    Config,
    ConfigError,
    DataConfig,
    LogConfig,
    ModelConfig,
    TrainerConfig,
    apply_overrides,
    config_to_dict,
    load_config,
    save_config,
)
from grpo_ar.core import ADVANTAGES, AGGREGATIONS, KL, LOSSES
from grpo_ar.generation.params import SamplingParams

TOML = """
[model]
path = "some/model"
dtype = "bfloat16"
chat_template = true

[sampling]
max_new_tokens = 16
temperature = 0.7
top_p = 0.9
allowed_ranges = [[0, 5], [10, 20]]

[algorithm]
group_size = 4
loss = "clip"
loss_args = { eps_low = 0.2, eps_high = 0.28 }
beta = 0.0

[trainer]
batch_size = 6
grad_accum = 3
steps = 10
iterations = 2
lr = 3e-3

[data]
train = "train.jsonl"
rewards = [{ name = "numeric_answer", args = { answer = "$solution" } }]

[log]
run_dir = "runs/x"
progress = false
"""

YAML = """
model:
  path: some/model
  dtype: bfloat16
  chat_template: true
sampling:
  max_new_tokens: 16
  temperature: 0.7
  top_p: 0.9
  allowed_ranges: [[0, 5], [10, 20]]
algorithm:
  group_size: 4
  loss: clip
  loss_args: {eps_low: 0.2, eps_high: 0.28}
  beta: 0
trainer:
  batch_size: 6
  grad_accum: 3
  steps: 10
  iterations: 2
  lr: 3e-3
data:
  train: train.jsonl
  rewards:
    - name: numeric_answer
      args: {answer: $solution}
log:
  run_dir: runs/x
  progress: false
"""


def _check_example(cfg: Config) -> None:
    assert cfg.model == ModelConfig(path="some/model", dtype="bfloat16", chat_template=True)
    assert cfg.sampling.max_new_tokens == 16
    assert cfg.sampling.temperature == 0.7 and cfg.sampling.top_p == 0.9
    assert cfg.sampling.allowed_ranges == ((0, 5), (10, 20))
    assert cfg.algorithm.group_size == 4
    assert cfg.algorithm.loss_args == {"eps_low": 0.2, "eps_high": 0.28}
    assert cfg.algorithm.beta == 0.0 and isinstance(cfg.algorithm.beta, float)
    t = cfg.trainer
    assert (t.batch_size, t.grad_accum, t.steps, t.iterations) == (6, 3, 10, 2)
    assert t.steps_per_iteration == 5
    assert t.lr == 3e-3 and isinstance(t.lr, float)
    assert cfg.data.train == "train.jsonl"
    assert cfg.data.rewards == [{"name": "numeric_answer", "args": {"answer": "$solution"}}]
    assert cfg.log == LogConfig(run_dir="runs/x", progress=False)


def test_load_toml(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text(TOML)
    _check_example(load_config(p))


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_load_yaml(tmp_path, suffix):
    p = tmp_path / f"run{suffix}"
    p.write_text(YAML)
    _check_example(load_config(p))


def test_toml_and_yaml_give_the_same_config(tmp_path):
    (tmp_path / "a.toml").write_text(TOML)
    (tmp_path / "a.yaml").write_text(YAML)
    assert load_config(tmp_path / "a.toml") == load_config(tmp_path / "a.yaml")


def test_empty_yaml_and_no_file_give_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_config(p) == Config()
    assert load_config() == Config()


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "nope.toml")
    p = tmp_path / "run.json"
    p.write_text("{}")
    with pytest.raises(ConfigError, match=r"use \.toml, \.yaml or \.yml"):
        load_config(p)


# -- overrides ------------------------------------------------------------------------------


def test_overrides_parse_scalars_lists_and_dicts():
    cfg = load_config(
        overrides=[
            "trainer.batch_size=4",
            "trainer.lr=3e-3",
            "trainer.weight_decay=0.1",
            "trainer.max_grad_norm=2",  # an int where a float is expected becomes a float
            "log.progress=false",
            "model.disable_dropout=true",
            "model.path=org/name",
            "sampling.allowed_ranges=[[0,5]]",
            "sampling.eos_token_ids=[2, 7]",
            "algorithm.loss_args={eps_high: 0.28}",
            "algorithm.advantage_args={eps: 0.001}",
        ]
    )
    assert cfg.trainer.batch_size == 4 and type(cfg.trainer.batch_size) is int
    assert cfg.trainer.lr == pytest.approx(3e-3, rel=0, abs=1e-15)
    assert type(cfg.trainer.lr) is float
    assert cfg.trainer.weight_decay == 0.1
    assert cfg.trainer.max_grad_norm == 2.0 and type(cfg.trainer.max_grad_norm) is float
    assert cfg.log.progress is False
    assert cfg.model.disable_dropout is True
    assert cfg.model.path == "org/name"
    assert cfg.sampling.allowed_ranges == ((0, 5),)
    assert cfg.sampling.eos_token_ids == (2, 7)
    assert cfg.algorithm.loss_args == {"eps_high": 0.28}
    assert cfg.algorithm.advantage_args == {"eps": 0.001}


def test_override_beats_file_and_keeps_the_rest_of_the_section(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text(TOML)
    cfg = load_config(p, ["trainer.lr=0.5", "trainer.steps=20"])
    assert cfg.trainer.lr == 0.5 and cfg.trainer.steps == 20
    assert cfg.trainer.batch_size == 6 and cfg.trainer.iterations == 2  # from the file


def test_later_override_wins_and_value_may_hold_equals_sign():
    cfg = load_config(overrides=["trainer.seed=1", "trainer.seed=2", "model.system_prompt=a=b"])
    assert cfg.trainer.seed == 2
    assert cfg.model.system_prompt == "a=b"


def test_empty_override_value_is_empty_string():
    assert load_config(overrides=["model.path="]).model.path == ""


def test_base_is_merged_under_the_file_section_by_section(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text("[trainer]\nseed = 7\n")
    cfg = load_config(p, base={"trainer": {"seed": 3, "lr": 0.5}, "model": {"path": "m"}})
    assert cfg.trainer.seed == 7  # the file beats the base
    assert cfg.trainer.lr == 0.5  # the base fills the rest of the section
    assert cfg.model.path == "m"


def test_apply_overrides_builds_nested_dicts():
    raw = apply_overrides({"a": {"x": 1}}, ["a.b.c=3", "a.y=[1, 2]"])
    assert raw == {"a": {"x": 1, "b": {"c": 3}, "y": [1, 2]}}


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match=r"--set 'trainer\.lr': expected key\.path=value"):
        load_config(overrides=["trainer.lr"])


def test_override_through_a_non_table():
    with pytest.raises(ConfigError, match=r"trainer is not a table"):
        load_config(overrides=["trainer=5", "trainer.lr=0.1"])


def test_scientific_notation_inside_an_args_dict_is_a_float(tmp_path):
    cfg = load_config(overrides=["algorithm.loss_args={eps_high: 3e-3}"])
    assert cfg.algorithm.loss_args == {"eps_high": 0.003}
    p = tmp_path / "run.yaml"
    p.write_text("algorithm:\n  advantage_args: {eps: 1e-4}\n")
    assert load_config(p).algorithm.advantage_args == {"eps": 1e-4}


# -- unknown keys ---------------------------------------------------------------------------


def test_unknown_top_level_key_lists_the_sections():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["trainr.lr=0.1"])
    msg = str(e.value)
    assert "unknown key trainr" in msg
    assert (
        "valid keys: algorithm, data, environment, finetune, image, log, model, rollout, sampling, "
        "trainer, video" in msg
    )


@pytest.mark.parametrize(
    "section, cls",
    [
        ("trainer", TrainerConfig),
        ("model", ModelConfig),
        ("algorithm", AlgorithmConfig),
        ("data", DataConfig),
        ("log", LogConfig),
        ("sampling", SamplingParams),
    ],
)
def test_unknown_nested_key_lists_the_section_keys(section, cls):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[f"{section}.bogus_key=1"])
    msg = str(e.value)
    assert f"unknown key {section}.bogus_key" in msg
    names = sorted(f.name for f in dataclasses.fields(cls))
    assert f"valid keys of {section}: {', '.join(names)}" in msg


def test_unknown_key_in_a_file(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text("[trainer]\nbatchsize = 4\n")
    with pytest.raises(ConfigError, match=r"unknown key trainer\.batchsize; valid keys of trainer"):
        load_config(p)


def test_section_that_is_not_a_table(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text("trainer = 5\n")
    with pytest.raises(ConfigError, match=r"trainer must be a table/mapping, got int"):
        load_config(p)


# -- validation -----------------------------------------------------------------------------


def _names(reg) -> str:
    return ", ".join(sorted(reg))


VALIDATION = [
    (
        ["trainer.batch_size=6", "trainer.grad_accum=4"],
        ["trainer.batch_size=6 is not divisible by trainer.grad_accum=4"],
    ),
    (
        ["trainer.steps=10", "trainer.iterations=3"],
        ["trainer.steps=10 must be a positive multiple of trainer.iterations=3"],
    ),
    (
        ["trainer.steps=2", "trainer.iterations=4"],
        ["trainer.steps=2 must be a positive multiple of trainer.iterations=4"],
    ),
    (["trainer.batch_size=0"], ["trainer.batch_size=0: need >= 1"]),
    (["trainer.grad_accum=0"], ["trainer.grad_accum=0: need >= 1"]),
    (["trainer.iterations=0"], ["trainer.iterations=0: need >= 1"]),
    (["trainer.lr=0"], ["trainer.lr=0.0: need > 0"]),
    (["trainer.lr_schedule=step"], ["trainer.lr_schedule='step'", "constant, linear or cosine"]),
    (["trainer.warmup_steps=-1"], ["warmup_steps", "must be >= 0"]),
    (["algorithm.group_size=1"], ["algorithm.group_size=1: need >= 2"]),
    (["algorithm.grpo_iters=0"], ["algorithm.grpo_iters=0: need >= 1"]),
    (["algorithm.beta=-0.1"], ["algorithm.beta=-0.1: need >= 0"]),
    (
        ["algorithm.reference_refresh=always"],
        ["reference_refresh='always'", "iteration, never, soft"],
    ),
    (["algorithm.loss=ppo2"], ["algorithm.loss='ppo2' is unknown", f"valid: {_names(LOSSES)}"]),
    (
        ["algorithm.advantage=gae"],
        ["algorithm.advantage='gae' is unknown", f"valid: {_names(ADVANTAGES)}"],
    ),
    (["algorithm.kl=k9"], ["algorithm.kl='k9' is unknown", f"valid: {_names(KL)}"]),
    (
        ["algorithm.aggregation=median"],
        ["algorithm.aggregation='median' is unknown", f"valid: {_names(AGGREGATIONS)}"],
    ),
    (
        ["algorithm.loss_args={eps: 0.2}"],
        [
            "algorithm.loss_args",
            "'clip' takes no option 'eps'",
            f"valid options: {', '.join(sorted(LOSSES.options('clip')))}",
        ],
    ),
    (
        ["algorithm.kl_args={bogus: 1}"],
        ["algorithm.kl_args", "takes no option 'bogus'", "valid options:"],
    ),
    (["algorithm.loss_args={eps_low: 1.5}"], ["algorithm.loss='clip'", "need 0 <= eps_low < 1"]),
    (["algorithm.loss_args={eps_high: -0.1}"], ["eps_high >= 0, got 0.2, -0.1"]),
    # invalid combinations, caught by a dry run of the loss / estimator at config time
    (
        ["algorithm.loss=luspo", "algorithm.loss_args={ratio_level: token}"],
        ["algorithm.loss='luspo'", "needs ratio_level='sequence'"],
    ),
    (
        ["algorithm.advantage=rloo", "algorithm.multi_objective=normalize_then_sum"],
        ["algorithm.advantage='rloo'", "normalize_then_sum"],
    ),
    (["algorithm.multi_objective=mean"], ["sum_then_normalize or normalize_then_sum"]),
    (
        ["algorithm.is_correction=token_clip"],
        ["algorithm.is_correction='token_clip' is unknown", "valid: sequence_mask"],
    ),
    (["algorithm.is_correction_args={c_max: 2}"], ["is_correction_args given without"]),
    (["algorithm.beta=0", "algorithm.kl_bias_correction=true"], ["set beta > 0"]),
    (["algorithm.top_entropy_quantile=0"], ["need 0 < ρ <= 1"]),
    (["algorithm.loss_args={ratio_level: tok}"], ["ratio_level='tok': use 'token' or 'sequence'"]),
    (["model.dtype=fp16"], ["model.dtype='fp16': use float32, bfloat16 or float16"]),
    (["sampling.top_p=0"], ["sampling", "top_p must be in (0, 1], got 0.0"]),
    (["sampling.top_p=1.5"], ["top_p must be in (0, 1], got 1.5"]),
    (["sampling.temperature=0"], ["temperature must be > 0"]),
    (["sampling.max_new_tokens=0"], ["max_new_tokens must be >= 1, got 0"]),
    (["sampling.min_p=1"], ["min_p must be in [0, 1)"]),
    (["sampling.top_k=-1"], ["top_k must be >= 0"]),
    (["sampling.allowed_ranges=[[5,5]]"], ["allowed_ranges must be [lo, hi) pairs"]),
]


@pytest.mark.parametrize("overrides, fragments", VALIDATION, ids=lambda v: None)
def test_validation_messages(overrides, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    for frag in fragments:
        assert frag in str(e.value), (frag, str(e.value))


def test_validation_applies_to_direct_construction_too():
    with pytest.raises(ConfigError, match="is not divisible"):
        TrainerConfig(batch_size=5, grad_accum=2)
    with pytest.raises(ConfigError, match="need >= 2"):
        AlgorithmConfig(group_size=1)


def test_values_on_the_boundary_are_accepted():
    cfg = load_config(
        overrides=[
            "algorithm.group_size=2",
            "algorithm.grpo_iters=1",
            "algorithm.beta=0",
            "trainer.steps=3",
            "trainer.iterations=3",
            "trainer.batch_size=4",
            "trainer.grad_accum=4",
            "sampling.top_p=1",
            "algorithm.loss_args={eps_low: 0}",
        ]
    )
    assert cfg.algorithm.group_size == 2 and cfg.trainer.steps_per_iteration == 1


WRONG_TYPES = [
    ("trainer.batch_size=four", "trainer.batch_size must be int, got 'four'"),
    ("trainer.batch_size=4.0", "trainer.batch_size must be int, got 4.0"),
    ("trainer.batch_size=true", "trainer.batch_size must be int, got True"),
    ("trainer.lr=fast", "trainer.lr must be a number, got 'fast'"),
    ("trainer.lr=true", "trainer.lr must be float, got True"),
    ("log.progress=1", "log.progress must be bool, got 1"),
    ("model.path=[a]", "model.path must be str, got ['a']"),
    ("sampling.eos_token_ids=5", "sampling.eos_token_ids must be a list, got 5"),
]


@pytest.mark.parametrize("override, message", WRONG_TYPES)
def test_wrong_types(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert message in str(e.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.chat_template=maybe", "model.chat_template"),
        ("model.max_prompt_tokens=abc", "model.max_prompt_tokens"),
        ("data.rewards=5", "data.rewards"),
        ("algorithm.loss_args=5", "algorithm.loss_args must be"),
    ],
)
def test_wrong_types_of_optional_and_container_fields(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert key in str(e.value)


# -- round trip and defaults ----------------------------------------------------------------


def test_save_then_load_gives_an_equal_config(tmp_path):
    cfg = load_config(
        overrides=[
            "model.path=some/model",
            "model.dtype=bfloat16",
            "model.chat_template=false",
            "model.system_prompt=Be brief.",
            "model.max_prompt_tokens=128",
            "sampling.allowed_ranges=[[0,5],[7,9]]",
            "sampling.eos_token_ids=[2]",
            "sampling.top_k=5",
            "algorithm.loss=clip",
            "algorithm.loss_args={eps_low: 0.2, eps_high: 0.28}",
            "algorithm.beta=0.0",
            "trainer.lr=3e-3",
            "trainer.optimizer_args={betas: [0.9, 0.95]}",
            "data.rewards=[{numeric_answer: {answer: $solution, weight: 2}}]",
            "data.reward_setup={llm_judge: {model: m}}",
            "log.run_dir=" + str(tmp_path / "run"),
        ]
    )
    assert cfg != Config()
    p = tmp_path / "config.yaml"
    save_config(cfg, p)
    back = load_config(p)
    assert back == cfg
    assert back.sampling.allowed_ranges == ((0, 5), (7, 9))  # tuples, not lists
    # and again: the written file is a fixed point
    save_config(back, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == p.read_text()


def test_save_then_load_defaults(tmp_path):
    save_config(Config(), tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == Config()


def test_config_to_dict_is_plain():
    d = config_to_dict(load_config(overrides=["sampling.allowed_ranges=[[0,5]]"]))
    assert d["sampling"]["allowed_ranges"] == [[0, 5]]
    assert set(d) == {
        "model",
        "sampling",
        "algorithm",
        "trainer",
        "data",
        "log",
        "image",
        "finetune",
        "video",
        "rollout",
        "environment",
    }


def test_defaults_are_sane():
    cfg = Config()
    a, t = cfg.algorithm, cfg.trainer
    assert a.group_size >= 2 and a.grpo_iters == 1
    assert a.loss in LOSSES and a.advantage in ADVANTAGES
    assert a.kl in KL and a.aggregation in AGGREGATIONS
    assert a.beta >= 0
    assert t.batch_size % t.grad_accum == 0
    assert t.steps % t.iterations == 0 and t.steps_per_iteration == t.steps // t.iterations
    assert 0 < t.lr < 1e-3
    assert cfg.model.dtype == "float32" and cfg.model.adapter == "text"
    s = cfg.sampling
    assert s.temperature == 1.0 and s.top_p == 1.0 and s.top_k == 0 and s.min_p == 0.0
    assert not s.filters_on()
    assert cfg.data.prompt_field == "prompt" and cfg.data.rewards == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.trainer.lr = 1.0  # type: ignore[misc]


def test_default_mutable_fields_are_not_shared():
    a, b = AlgorithmConfig(), AlgorithmConfig()
    assert a.loss_args is not b.loss_args
    assert DataConfig().rewards is not DataConfig().rewards
