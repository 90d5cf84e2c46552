"""Tool calling (grpo_ar/train/tools.py, adapters/multiturn.py): Hermes parsing, a raising, a
hanging, an unknown and a badly called tool become observations, chat-template rendering of
tools and tool results, and a tiny model that learned one tool-using trajectory replays it
through the real calculator."""

import json
import threading
import time

import pytest
import torch

from grpo_ar.adapters.multiturn import ChatRenderer, MultiTurnAdapter
from grpo_ar.adapters.text import TextAdapter
from grpo_ar.generation.params import SamplingParams
from grpo_ar.train.environments import rollout_metrics
from grpo_ar.train.tools import HERMES_PROMPT, ToolCall, ToolEnvironment, as_tool, parse_hermes
from grpo_ar.types import Entry

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# a template that renders `tools=` itself (as Qwen's and SmolLM3's do)
WITH_TOOLS = (
    "{% if tools %}{{ '<|im_start|>system\nTOOLS ' + (tools | tojson) + '<|im_end|>\n' }}"
    "{% endif %}" + CHATML
)

# names only: keeps the char-level prompt short where a test trains on it
NAMES = (
    "{% if tools %}{{ '<|im_start|>system\ntools:' }}{% for t in tools %}"
    "{{ ' ' + t['function']['name'] }}{% endfor %}{{ '<|im_end|>\n' }}{% endif %}" + CHATML
)


def chat_tokenizer(template=CHATML):
    """Char-level tokenizer over printable ASCII with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_end|>", "<|im_start|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for c in "\n" + "".join(chr(i) for i in range(32, 127)):
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )  # fmt: skip
    tok.chat_template = template
    return tok


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: digits and + - * / ( ), e.g. "123 * 456"
    """
    if not set(expression) <= set("0123456789+-*/() ."):
        raise ValueError(f"not arithmetic: {expression!r}")
    return str(eval(expression))  # noqa: S307 (checked above: arithmetic only)


def broken(x: int) -> int:
    """Always fails.

    Args:
        x: anything
    """
    raise RuntimeError("the tool is broken")


RELEASE = threading.Event()


def hang(x: int) -> int:
    """Never returns in time.

    Args:
        x: anything
    """
    RELEASE.wait(30)
    return x


def call(name, **args):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"


def test_parse_hermes():
    assert parse_hermes("no call") == []
    text = "a" + call("calculator", expression="1+2") + "b" + call("f", x=1)
    assert parse_hermes(text) == [
        ToolCall("calculator", {"expression": "1+2"}),
        ToolCall("f", {"x": 1}),
    ]
    # arguments written as a JSON string are read too
    assert parse_hermes('<tool_call>{"name": "f", "arguments": "{\\"x\\": 2}"}</tool_call>') == [
        ToolCall("f", {"x": 2})
    ]
    errors = [
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>["f"]</tool_call>',
        '<tool_call>{"name": "f", "arguments": 3}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {}}',
    ]
    for text in errors:
        (c,) = parse_hermes(text)
        assert c.error, text


def test_failures_become_observations_and_are_counted():
    RELEASE.clear()
    env = ToolEnvironment([calculator, broken, as_tool(hang, timeout_s=0.3)], timeout_s=5.0)
    states = [env.reset(Entry("q", ())) for _ in range(6)]
    turns = [
        call("calculator", expression="123 * 456"),
        call("broken", x=1),
        call("hang", x=1) + call("calculator", expression="2+2"),
        call("nope", x=1) + "<tool_call>{bad</tool_call>",
        call("calculator", expr="1") + call("calculator", expression="import os"),
        "The answer is 56088.",
    ]
    start = time.monotonic()
    obs = env.step_batch(states, turns, [[] for _ in turns])
    took = time.monotonic() - start
    RELEASE.set()
    assert took < 2.0  # the hanging call is abandoned after its 0.3 s timeout
    content = [[m["content"] for m in o.messages] for o in obs]
    assert content[0] == ["56088"]
    assert content[1] == ["error: RuntimeError: the tool is broken"]
    assert content[2] == ["error: timed out after 0.3 s", "4"]
    assert content[3][0].startswith("error: no tool named 'nope'")
    assert content[3][1].startswith("error: the tool call is not valid JSON")
    assert content[4][0] == "error: calculator: missing ['expression'] arguments"
    assert content[4][1] == "error: ValueError: not arithmetic: 'import os'"
    assert obs[5].done and not obs[5].messages
    assert all(o.messages[0]["role"] == "tool" for o in obs[:5])
    stats = [env.stats(s) for s in states]
    assert [s["tool_calls"] for s in stats] == [1, 1, 2, 2, 2, 0]
    assert [s["tool_failures"] for s in stats] == [0, 1, 1, 2, 2, 0]


def test_tools_need_schemas():
    def undocumented(x):
        return x

    with pytest.raises(ValueError, match="docstring"):
        ToolEnvironment([undocumented])
    with pytest.raises(ValueError, match="share a name"):
        ToolEnvironment([calculator, calculator])


def test_rendering_tools_and_results_with_the_chat_template():
    sampling = SamplingParams(max_new_tokens=8)
    env = ToolEnvironment([calculator])
    # a template that renders `tools=`: the schema comes from apply_chat_template
    tok = chat_tokenizer(WITH_TOOLS)
    r = ChatRenderer(TextAdapter(tok, sampling), env.tools(), env.tool_prompt())
    text, templated = r.prompt("What is 2+3?")
    assert templated and text.startswith("<|im_start|>system\nTOOLS [")
    assert '"name": "calculator"' in text and text.endswith("<|im_start|>assistant\n")
    # a template that ignores it: the Hermes description goes into the system message
    tok = chat_tokenizer(CHATML)
    r = ChatRenderer(
        TextAdapter(tok, sampling, system_prompt="Be brief."), env.tools(), env.tool_prompt()
    )
    text, _ = r.prompt("What is 2+3?")
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou may call one or more functions")
    assert json.dumps(env.tools()[0]) in text
    # a tool result between the model's <|im_end|> and the next assistant turn
    between = r.between([{"role": "tool", "content": "5"}], "<|im_end|>")
    assert between == "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"
    assert HERMES_PROMPT.count("{tools}") == 1


def test_a_tiny_model_replays_a_tool_using_trajectory():
    """Fit a tiny Llama to one trajectory (a call, the calculator's result, the answer), then
    sample it greedily: the real calculator answers the call, its result is rendered by the chat
    template as environment tokens, and the model's answer follows it."""
    from tiny import tiny_llama

    tok = chat_tokenizer(NAMES)
    env = ToolEnvironment([calculator], max_turns=3, max_tokens=200)
    sampling = SamplingParams(max_new_tokens=100, eos_token_ids=(tok.eos_token_id,))
    adapter = MultiTurnAdapter(TextAdapter(tok, sampling), env)
    entry = Entry([{"role": "user", "content": "12*34?"}], ())
    prompt = adapter.encode([entry])
    turn1 = '<tool_call>{"name": "calculator", "arguments": {"expression": "12*34"}}</tool_call>'
    result = adapter.renderer.between([{"role": "tool", "content": "408"}], "<|im_end|>")
    script = turn1 + "<|im_end|>" + result + "408<|im_end|>"
    target = tok(script, add_special_tokens=False)["input_ids"]
    seq = torch.cat([prompt.input_ids[0], torch.tensor(target)])[None]
    model = tiny_llama(vocab_size=len(tok), hidden=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(300):  # until every next token of the trajectory is the argmax (~70 steps)
        logits = model(seq).logits[0, :-1]
        if (logits.argmax(-1) == seq[0, 1:])[-len(target) :].all():
            break
        loss = torch.nn.functional.cross_entropy(logits, seq[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    r = adapter.sample(model, prompt, 1, greedy=True)
    t = int(r.completion_mask[0].sum())
    assert r.completion_ids[0, :t].tolist() == target
    own = r.model_mask[0, :t].bool()
    n1 = len(tok(turn1 + "<|im_end|>", add_special_tokens=False)["input_ids"])
    n_env = len(tok(result, add_special_tokens=False)["input_ids"])
    assert own.tolist() == [True] * n1 + [False] * n_env + [True] * (t - n1 - n_env)
    (out,) = adapter.decode(r)
    assert str(out) == "408" and out.turns[0] == turn1 and out.stats["tool_calls"] == 1
    m = rollout_metrics(r)
    assert m["tools/call_frequency"] == 1.0 and m["tools/failure_frequency"] == 0.0
    assert m["turns/mean"] == 2.0
