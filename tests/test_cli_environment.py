"""Environments from the config (`[environment]`, grpo_ar/config/environment.py and
grpo_ar/train/env_registry.py): `grpo-ar train config.toml` runs a multi-turn tool run with no
Python glue (a tool module named "module:function", a tiny Llama that learned to call it), and
every bad value is refused when the config is read, naming its key, before a model loads."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from test_multiturn_tools import NAMES, chat_tokenizer

from grpo_ar.adapters.multiturn import MultiTurnAdapter
from grpo_ar.adapters.text import TextAdapter
from grpo_ar.cli import main
from grpo_ar.config import ConfigError, load_config
from grpo_ar.generation.params import SamplingParams
from grpo_ar.train.env_registry import ENVIRONMENTS
from grpo_ar.train.tools import ToolEnvironment
from grpo_ar.types import Entry
from tiny import tiny_llama

TOOLS_PY = '''
from grpo_ar.train.environments import Environment, Observation

def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: digits and + - *, e.g. "12*34"
    """
    if not set(expression) <= set("0123456789+-*"):
        raise ValueError(f"not arithmetic: {expression!r}")
    return str(eval(expression))


def undocumented(x):
    return x


NOT_CALLABLE = 3


class Echo(Environment):
    """Answers every turn with "ok"; done after `rounds` turns."""

    def __init__(self, rounds: int = 2, **kw):
        super().__init__(**kw)
        self.rounds = rounds

    def reset(self, entry):
        return [0]

    def step(self, state, text, tokens):
        state[0] += 1
        return Observation(text="ok", done=state[0] >= self.rounds)


def not_an_environment(**kw):
    return "no"
'''
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "12*34"}}</tool_call>'


def fit(tok, prompt_ids, target, steps=300):
    """A tiny Llama whose greedy continuation of `prompt_ids` is `target`, by a clear margin."""
    seq = torch.cat([prompt_ids, torch.tensor(target)])[None]
    model = tiny_llama(vocab_size=len(tok), hidden=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        logits = model(seq).logits[0, :-1]
        top2 = logits[-len(target) :].topk(2, -1).values
        hit = (logits.argmax(-1) == seq[0, 1:])[-len(target) :].all()
        if hit and bool((top2[:, 0] - top2[:, 1] > 3.0).all()):
            break
        loss = torch.nn.functional.cross_entropy(logits, seq[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def env_keys(root, **more):
    keys = {
        "environment.name": "tools",
        "environment.path": str(root),
        "environment.tools": '["cli_env_tools:calculator"]',
        "environment.max_turns": 3,
        "environment.max_tokens": 200,
        "environment.tool_timeout_s": 2.0,
        **more,
    }
    return [f"{k}={v}" for k, v in keys.items() if v is not None]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_env")
    (root / "cli_env_tools.py").write_text(TOOLS_PY)
    return root


@pytest.mark.slow
def test_train_runs_a_tool_environment_from_the_config(root, tmp_path):
    """`grpo-ar train` with [environment] name = "tools": the trajectories call the tool module's
    calculator (through the config's import string) and answer with its result."""
    tok = chat_tokenizer(NAMES)
    sampling = SamplingParams(max_new_tokens=90, temperature=0.2)
    env = load_config(None, env_keys(root)).environment.build()
    adapter = MultiTurnAdapter(TextAdapter(tok, sampling), env)  # what the CLI will build
    prompt = adapter.encode([Entry("12*34?", ())]).input_ids[0]
    result = adapter.renderer.between([{"role": "tool", "content": "408"}], "<|im_end|>")
    target = tok(CALL + "<|im_end|>" + result + "408<|im_end|>", add_special_tokens=False)
    fit(tok, prompt, target["input_ids"]).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    row = {"prompt": "12*34?", "rewards": {"numeric_answer": {"answer": 408}}}
    (root / "train.jsonl").write_text(json.dumps(row) + "\n")
    (root / "run.toml").write_text(
        textwrap.dedent(
            f"""
            [model]
            path = "{root / "model"}"
            device = "cpu"
            [sampling]
            max_new_tokens = 90
            temperature = 0.2
            [algorithm]
            group_size = 2
            beta = 0.0
            [trainer]
            steps = 2
            batch_size = 1
            lr = 1e-5
            [data]
            train = "{root / "train.jsonl"}"
            [log]
            run_dir = "{tmp_path / "run"}"
            progress = false
            """
        )
        + textwrap.dedent(
            f"""
            [environment]
            name = "tools"
            path = "{root}"
            tools = ["cli_env_tools:calculator"]
            max_turns = 3
            max_tokens = 200
            tool_timeout_s = 2.0
            """
        )
    )
    assert main(["train", str(root / "run.toml")]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(x) for x in lines]
    assert len(metrics) == 2
    for m in metrics:
        assert m["tools/call_frequency"] == 1.0 and m["tools/failure_frequency"] == 0.0
        assert m["turns/mean"] == 2.0 and m["reward/mean"] == 1.0
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.environment.name == "tools"
    assert saved.environment.tools == ("cli_env_tools:calculator",)


def test_an_environment_class_by_import_string(root):
    env = load_config(
        None,
        env_keys(root, **{
            "environment.name": "cli_env_tools:Echo", "environment.tools": None,
            "environment.kwargs": "{rounds: 3}",
        }),
    ).environment.build()  # fmt: skip
    assert type(env).__name__ == "Echo" and env.rounds == 3
    assert (env.max_turns, env.max_tokens, env.credit) == (3, 200, "final")
    tools = load_config(None, env_keys(root, **{"environment.kwargs": "{parser: hermes}"}))
    built = tools.environment.build()
    assert isinstance(built, ToolEnvironment) and built.timeout_s == 2.0
    assert [t.name for t in built.tool_list] == ["calculator"] and "tools" in ENVIRONMENTS


BAD = [
    ({"environment.name": "nope"}, "environment.name='nope': use a registered environment"),
    ({"environment.name": "no_such_module_xyz:Env"}, "environment.name=.*no module"),
    ({"environment.name": "cli_env_tools:Missing"}, "has no attribute 'Missing'"),
    ({"environment.name": "cli_env_tools:NOT_CALLABLE"}, "not a class or function"),
    ({"environment.name": "cli_env_tools:not_an_environment"}, "built a str, not an Env"),
    ({"environment.tools": '["cli_env_tools:undocumented"]'}, r"environment.tools\[0\]=.*"),
    ({"environment.tools": '["calculator"]'}, r"environment.tools\[0\]='calculator': give"),
    ({"environment.tools": "[]"}, "environment.tools is empty"),
    ({"environment.kwargs": "{parser: nope}"}, "refused its arguments.*parser"),
    ({"environment.kwargs": "{max_turns: 2}"}, "set environment.max_turns instead"),
    ({"environment.max_turns": 0}, "environment.max_turns=0"),
    ({"environment.credit": "all"}, "environment.credit='all'"),
    ({"environment.tool_timeout_s": 0}, "environment.tool_timeout_s"),
    ({"environment.path": "/no/such/folder"}, "environment.path='/no/such/folder'"),
    ({"environment.name": "", "environment.path": None}, "environment.tools is set but"),
    ({"sampling.min_new_tokens": 1}, "min_new_tokens.*environment.name"),
    ({"model.adapter": "image"}, 'needs model.adapter = "text"'),
]


@pytest.mark.parametrize("keys,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_environment_settings_name_their_key(root, keys, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, env_keys(root, **keys))


def test_the_cli_refuses_a_bad_environment_before_loading_a_model(root, tmp_path, capsys):
    """Exit 2 with the key in the message; model.path does not even exist."""
    (tmp_path / "bad.toml").write_text('[model]\npath = "/no/model"\n[data]\ntrain = "/no.jsonl"\n')
    args = ["train", str(tmp_path / "bad.toml"), "--set", f"log.run_dir={tmp_path / 'run'}"]
    for item in env_keys(root, **{"environment.tools": '["cli_env_tools:nope"]'}):
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "environment.tools[0]='cli_env_tools:nope'" in err and "no attribute" in err
