import pytest
import torch

from grpo_ar.adapters.text import TextAdapter
from grpo_ar.generation.params import SamplingParams
from grpo_ar.types import Entry
from tiny import char_tokenizer, tiny_llama, tiny_qwen2

CHATML = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}/{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture()
def tok():
    return char_tokenizer()


def test_plain_prompts_left_padded_with_bos(tok):
    ad = TextAdapter(tok, SamplingParams(max_new_tokens=4))
    pb = ad.encode([Entry("1+2=", ()), Entry("10+20=", ())])
    assert pb.input_ids.shape == (2, 7)
    assert pb.attention_mask[0].tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert (
        tok.decode(pb.input_ids[0][pb.attention_mask[0].bool()], skip_special_tokens=True) == "1+2="
    )
    assert (
        ad.sampling.eos_token_ids == (tok.eos_token_id,)
        and ad.sampling.pad_token_id == tok.pad_token_id
    )


def test_chat_messages_use_template_with_generation_prompt(tok):
    tok.chat_template = CHATML
    ad = TextAdapter(tok, SamplingParams(), system_prompt="be brief")
    msgs = [{"role": "user", "content": "hi"}]
    assert ad.prompt_text(msgs) == "<system>be brief/<user>hi/<assistant>"
    assert ad.prompt_text("plain") == "plain"  # strings stay plain unless chat_template=True
    assert (
        TextAdapter(tok, SamplingParams(), chat_template=True).prompt_text("x")
        == "<user>x/<assistant>"
    )
    pb = ad.encode([Entry(msgs, ())])
    # the template's text, no extra BOS in front
    assert tok.decode(pb.input_ids[0]) == "<system>be brief/<user>hi/<assistant>"


def test_errors_are_clear(tok):
    with pytest.raises(ValueError, match="no chat template"):
        TextAdapter(tok, SamplingParams()).encode([Entry([{"role": "user", "content": "x"}], ())])
    with pytest.raises(ValueError, match="max_prompt_tokens=3"):
        TextAdapter(tok, SamplingParams(), max_prompt_tokens=3).encode([Entry("12345", ())])


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2])
def test_sample_decode_and_logprobs_on_real_classes(tok, make_model):
    model = make_model(vocab_size=len(tok))
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9)
    ad = TextAdapter(tok, params)
    pb = ad.encode([Entry("12+3=", ()), Entry("7-1=", ())])
    r = ad.sample(model, pb, 3, generator=torch.Generator().manual_seed(0))
    texts = ad.decode(r)
    assert len(texts) == 6 and all(isinstance(t, str) for t in texts)
    for t, ids, n in zip(texts, r.completion_ids, r.lengths):
        kept = [
            i
            for i in ids[:n].tolist()
            if i not in (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)
        ]
        assert t == tok.decode(kept)  # cut at EOS, specials stripped
    logp, _ = ad.token_logprobs(model, r)
    torch.testing.assert_close(logp, r.sampling_logp, atol=1e-4, rtol=0)


def test_decode_stops_at_eos(tok):
    ad = TextAdapter(tok, SamplingParams(max_new_tokens=6))
    pb = ad.encode([Entry("1", ())])
    from grpo_ar.types import Rollout

    ids = tok("42")["input_ids"][1:] + [tok.eos_token_id] + tok("99")["input_ids"][1:]
    ids = torch.tensor([ids])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    r = Rollout(
        pb,
        1,
        ids,
        mask,
        torch.zeros(1, 5),
        torch.tensor([False]),
        torch.tensor([0]),
        torch.tensor([0]),
    )
    assert ad.decode(r) == ["42"]
