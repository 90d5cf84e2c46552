"""llm_judge on a tiny random-init Llama wired to echo its last input token.

Embeddings are one-hot, attention and MLP outputs are zeroed (the residual stream carries the
embedding through), and lm_head is the identity: greedy decoding repeats the prompt's last
character. The judge's reply is therefore set by the text the template produced, and with
right padding every shorter row would echo the pad token instead.
"""

import logging
import string

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from grpo_ar.rewards import LLMJudge, RewardContext, RewardSpecError, build_rewards
from grpo_ar.testing import tiny_llama
from grpo_ar.types import Entry, RewardSpec


@pytest.fixture(scope="module")
def echo_lm():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in string.digits + string.ascii_letters + string.punctuation + " \n":
        vocab[c] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: chars
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    v = len(vocab)
    # one layer whose attention and MLP are zeroed below; no BOS: the template's text leads
    model = tiny_llama(v, seed=0, hidden=128, layers=1, logit_scale=1.0, heads=2, kv_heads=2,
                       mlp=32, max_positions=2048, eos_token_id=1, bos_token_id=None,
                       tie_word_embeddings=False)  # fmt: skip
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(v, 128))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(torch.eye(v, 128))
    return model, tok


@pytest.fixture
def spy(echo_lm, monkeypatch):
    """Records the decoded text of every prompt the judge feeds to generate."""
    model, tok = echo_lm
    seen = []
    real = model.generate

    def generate(**kw):
        seen.extend(tok.batch_decode(kw["input_ids"], skip_special_tokens=True))
        return real(**kw)

    monkeypatch.setattr(model, "generate", generate)
    return seen


def test_template_filled_score_parsed_and_scaled(echo_lm, spy, caplog):
    template = "Q: {prompt}\nRef: {answer}\nA: {output}"
    setup = {
        "llm_judge": {"model": echo_lm, "template": template, "scale": 10, "max_new_tokens": 2}
    }
    e1 = Entry("2+2?", (RewardSpec("llm_judge", 1.0, {"answer": "4"}),))
    e2 = Entry(
        [{"role": "user", "content": "hi"}], (RewardSpec("llm_judge", 2.0, {"answer": "x"}),)
    )
    rc = build_rewards(setup, [e1, e2])
    ctx = RewardContext([e1, e1, e2, e2], [0, 0, 1, 1], 2, 0)
    outputs = ["a long answer: 7", "no", "it is 3", "0.5 then 9"]
    with caplog.at_level(logging.WARNING, logger="grpo_ar.rewards"):
        res = rc(outputs, ctx)
    assert spy == [
        "Q: 2+2?\nRef: 4\nA: a long answer: 7",
        "Q: 2+2?\nRef: 4\nA: no",
        "Q: user: hi\nRef: x\nA: it is 3",
        "Q: user: hi\nRef: x\nA: 0.5 then 9",
    ]
    judge = rc.fns["llm_judge"]
    assert judge.last_replies == ["77", "oo", "33", "99"]
    # "77" / 10 = 7.7; "oo" has no number: a failure, counted and logged
    torch.testing.assert_close(
        res.components[:, 0],
        torch.tensor([7.7, float("nan"), 3.3, 9.9]),
        equal_nan=True,
        atol=1e-6,
        rtol=0,
    )
    torch.testing.assert_close(
        res.total, torch.tensor([7.7, float("nan"), 6.6, 19.8]), equal_nan=True, atol=1e-5, rtol=0
    )
    assert res.failures == {"llm_judge": 1}
    assert sum("'llm_judge' gave 1 of 4 samples" in r.getMessage() for r in caplog.records) == 1


def test_entry_args_override_and_batching(echo_lm, spy):
    judge = LLMJudge(echo_lm, "{prompt}|{output}", max_new_tokens=1, batch_size=2)
    entry = Entry("p", (RewardSpec("llm_judge"),))
    ctx = RewardContext([entry] * 3, [0, 0, 0], 3, 0)
    args = [{}, {"output": "override 5"}, {"prompt": "P"}]
    assert judge(["x 1", "x 2", "abcdefgh 3"], args, ctx) == [1.0, 5.0, 3.0]
    assert spy == ["p|x 1", "p|override 5", "P|abcdefgh 3"]


def test_custom_score_pattern_and_chat_template(echo_lm, spy):
    model, tok = echo_lm
    tok.chat_template = "{% for m in messages %}[{{ m['content'] }}{% endfor %}"
    try:
        judge = LLMJudge(
            echo_lm, "{output}", score_pattern=r"^(\d)\d{3}$", max_new_tokens=4, chat=True
        )
        entry = Entry("p", (RewardSpec("llm_judge"),))
        ctx = RewardContext([entry] * 3, [0, 0, 0], 3, 0)
        assert judge(["answer 4", "z", "4 then z"], [{}] * 3, ctx) == [4.0, None, None]
        assert spy == ["[answer 4", "[z", "[4 then z"]
        assert judge.last_replies == ["4444", "zzzz", "zzzz"]
    finally:
        tok.chat_template = None
    with pytest.raises(ValueError, match="exactly one group"):
        LLMJudge(echo_lm, "{output}", score_pattern=r"\d+")


def test_missing_template_variable_caught_at_load(echo_lm):
    setup = {"llm_judge": {"model": echo_lm, "template": "{output} vs {reference}"}}
    bad = Entry("p", (RewardSpec("llm_judge", 1.0, {"answer": 1}),))
    with pytest.raises(
        RewardSpecError, match="entry 0: reward 'llm_judge': the judge template needs reference"
    ):
        build_rewards(setup, [bad])
    with pytest.raises(RewardSpecError, match="reward setup of 'llm_judge'.*template"):
        build_rewards({"llm_judge": {"model": echo_lm}}, [bad])


def test_judge_loads_from_a_local_path(echo_lm, tmp_path):
    model, tok = echo_lm
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    judge = LLMJudge(str(tmp_path), "{output}", max_new_tokens=1, device="cpu", dtype="float32")
    assert judge.model is not model and judge.model.dtype == torch.float32
    ctx = RewardContext([Entry("p", (RewardSpec("llm_judge"),))] * 2, [0, 0], 2, 0)
    assert judge(["a 6", "bb 2"], [{}, {}], ctx) == [6.0, 2.0]
