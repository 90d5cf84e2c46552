"""janus_reason_t2i from configs and in training: settings it refuses, two Trainer steps that
move only the named parts, `grpo-ar train` of a TOML with [[sampling.spans]], the example
config (examples/janus_t2i/reason.toml). Tiny random-init Janus as in test_janus_reason."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_janus import K, janus_tokenizer
from test_janus_reason import PROMPTS, TEMPLATE, V, reason_janus, spans

from grpo_ar.adapters.janus import janus_trainable
from grpo_ar.adapters.janus_reason import JanusReasonConfig, JanusReasonT2IAdapter
from grpo_ar.config import load_config
from grpo_ar.errors import ConfigError
from grpo_ar.generation.params import SamplingParams
from grpo_ar.io.data import load_rows
from grpo_ar.rewards import RewardComputer
from grpo_ar.rewards.base import register_reward
from grpo_ar.rewards.proxy import aesthetic_proxy_score
from grpo_ar.testing import run_records
from grpo_ar.train.trainer import Trainer


@pytest.fixture(scope="module")
def tok():
    return janus_tokenizer()


@pytest.fixture(scope="module")
def model():
    return reason_janus()


def test_bad_settings_refused(model, tok):
    boi = tok.convert_tokens_to_ids("<begin_of_image>")
    with pytest.raises(ConfigError, match="sampling.cfg_scale=3.0"):
        JanusReasonT2IAdapter(model, tok, SamplingParams(max_new_tokens=40, cfg_scale=3.0))
    with pytest.raises(ConfigError, match=rf"inside the image codes \[{V}, {V + K}\)"):
        bad = spans(boi)
        bad[1]["allowed_ranges"] = [[0, K]]  # the codes' own ids, not shifted
        JanusReasonT2IAdapter(model, tok, SamplingParams(max_new_tokens=40, spans=bad))
    with pytest.raises(ConfigError, match="lm_head alone"):
        bad = spans(boi)
        bad[0]["allowed_ranges"] = [[0, V + K]]
        JanusReasonT2IAdapter(model, tok, SamplingParams(max_new_tokens=40, spans=bad))
    with pytest.raises(ConfigError, match="close it with close_token"):
        JanusReasonT2IAdapter(
            model, tok, SamplingParams(max_new_tokens=40, spans=spans(boi, 3)[::2])
        )
    with pytest.raises(ConfigError, match="max_new_tokens=16 cannot hold"):
        JanusReasonT2IAdapter(model, tok, SamplingParams(max_new_tokens=16, spans=spans(boi)))
    with pytest.raises(ConfigError, match="plan_close_token"):
        JanusReasonT2IAdapter(model, tok, SamplingParams(max_new_tokens=40), plan_close_token="<x>")
    with pytest.raises(ConfigError, match="reward_input"):
        JanusReasonConfig(reward_input="text")
    # the keys both Janus sections share are refused under this section's name
    with pytest.raises(ConfigError, match=r"janus_reason_t2i.train=\['vq'\]: name one or more"):
        JanusReasonConfig(train=["vq"])
    with pytest.raises(ConfigError, match=r"janus_reason_t2i.prompt_template needs \{prompt\}"):
        JanusReasonConfig(prompt_template="no slot")
    with pytest.raises(ConfigError, match="janus_reason_t2i.decode_batch_size must be >= 0"):
        JanusReasonConfig(decode_batch_size=-1)
    # no spans given: the plan over the whole text vocabulary, closed by boi (or by EOS + boi)
    ad = JanusReasonT2IAdapter(model, tok, SamplingParams(max_new_tokens=40), template=TEMPLATE)
    assert [(s.name, s.close_token, s.allowed_ranges) for s in ad.sampling.spans] == [
        ("plan", boi, ((0, V),)), ("image", None, ((V, V + K),))
    ]  # fmt: skip
    ad = JanusReasonT2IAdapter(
        model, tok, SamplingParams(max_new_tokens=40), template=TEMPLATE, plan_close_token="<eos>"
    )  # fmt: skip
    assert [s.name for s in ad.sampling.spans] == ["plan", "boi", "image"]


@register_reward("plan_then_proxy", defaults={})
def plan_then_proxy(outputs, args, ctx):
    """aesthetic_proxy of the image + 0.1 per plan character, capped at 1 (a test reward that
    reads both parts of a {"plan", "image"} output)."""
    x = torch.stack([o["image"] for o in outputs]).float()
    plan = torch.tensor([min(len(o["plan"]), 10) / 10 for o in outputs])
    return aesthetic_proxy_score(x, torch.ones(5)) + plan


def test_trainer_moves_only_the_named_parts(tmp_path, tok):
    """Two GRPO steps with a plan + image reward: the text head and the generation head both
    move (T2I-R1's parts plus "generation"); the vision tower and VQ stay bitwise."""
    model = reason_janus(seed=5)
    names = janus_trainable(model, ["generation", "lm_head", "text_embeddings"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    boi = tok.convert_tokens_to_ids("<begin_of_image>")
    cfg = load_config(None, [
        "trainer.steps=2", "trainer.batch_size=2", "trainer.lr=1e-2", "algorithm.group_size=4",
        f"log.run_dir={tmp_path}", "log.progress=false", "algorithm.beta=0.04",
        "sampling.max_new_tokens=40",
    ])  # fmt: skip
    sampling = replace(cfg.sampling, spans=spans(boi))
    ad = JanusReasonT2IAdapter(model, tok, sampling, template=TEMPLATE, output="float")
    rows = load_rows([{"prompt": p, "rewards": "plan_then_proxy"} for p in PROMPTS])
    history = Trainer(
        cfg, model, ad, rows, rewards=RewardComputer(names=["plan_then_proxy"])
    ).train()
    assert len(history) == 2 and all(np.isfinite(m["loss"]) for m in history)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed <= set(names)
    assert "lm_head.weight" in changed or "model.language_model.embed_tokens.weight" in changed
    assert any(n.startswith("model.generation_head.") for n in changed)


def test_cli_trains_janus_reason_from_a_config_file(tmp_path, tok):
    """`grpo-ar train` of a TOML naming janus_reason_t2i with [[sampling.spans]]: two steps,
    images written as sample files, each plan in a text file beside its image."""
    from grpo_ar.cli import main

    path, data = tmp_path / "janus", tmp_path / "train.jsonl"
    reason_janus(seed=6).save_pretrained(path)
    tok.save_pretrained(path)
    data.write_text(
        "\n".join(json.dumps({"prompt": p, "rewards": "plan_then_proxy"}) for p in PROMPTS)
    )
    boi = tok.convert_tokens_to_ids("<begin_of_image>")
    toml = [
        '[model]\nadapter = "janus_reason_t2i"', f'path = "{path}"',
        "[janus_reason_t2i]", f"prompt_template = {json.dumps(TEMPLATE)}", 'output = "float"',
        'train = ["generation", "lm_head"]',
        "[sampling]\nmax_new_tokens = 40",
    ]  # fmt: skip
    for s in spans(boi):
        toml.append("[[sampling.spans]]")
        toml += [f"{k} = {json.dumps(v)}" for k, v in s.items()]
    cfg = tmp_path / "reason.toml"
    cfg.write_text("\n".join(toml) + "\n")
    sets = [
        f"data.train={data}", "algorithm.group_size=2", "trainer.batch_size=2", "trainer.steps=2",
        "trainer.lr=1e-3", f"log.run_dir={tmp_path / 'run'}", "log.progress=false",
    ]  # fmt: skip
    assert main(["train", str(cfg), *(x for kv in sets for x in ("--set", kv))]) == 0
    metrics, samples = run_records(tmp_path / "run")
    assert [m["step"] for m in metrics][-1] == 2
    assert samples and all((tmp_path / "run" / s["output"]).is_file() for s in samples)
    plans = [(tmp_path / "run" / s["output"]).with_suffix(".txt").read_text() for s in samples]
    assert all(set(p.strip()) <= set("0123456789+-") for p in plans)  # the plan span's ids


def test_example_config_loads():
    """examples/janus_t2i/reason.toml: Janus-Pro-1B settings, EOS-closed plan, the budget for
    a 256-token plan + <begin_of_image> + 576 codes, no CFG."""
    cfg = load_config(Path(__file__).parents[1] / "examples/janus_t2i/reason.toml")
    sec = cfg.adapter_section
    assert isinstance(sec, JanusReasonConfig) and sec.plan_close_token == "<｜end▁of▁sentence｜>"
    assert sec.train == ["language_model", "text_embeddings", "lm_head"]
    assert cfg.sampling.max_new_tokens == 256 + 1 + 24 * 24 and not cfg.sampling.uses_cfg
