"""vlm_judge on a tiny random-init LlavaForConditionalGeneration (CLIP vision tower, Llama text
model) with a LlavaProcessor built offline: a char tokenizer, CLIPImageProcessorPil and a small
chat template. Scores are checked against the model run one sample at a time, and on an
"echo" Llava (one-hot embeddings, zeroed attention and MLP outputs, identity head) whose answer
is the prompt's last character, so expected values and parsed replies are computed by hand.
"""

import logging
import math

import pytest
import torch
from learned_tiny import entries, pil_images
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from grpo_ar.errors import ConfigError
from grpo_ar.rewards import VLMJudge
from grpo_ar.testing import CHARS, lm_config, word_level_tokenizer

CHAT = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %} A:{% endif %}"
)
TEMPLATE = "rate {prompt} from 0 to 9"
PROMPTS = ["a cat", "two dogs on the sea", "x", "blue sky"]


def tiny_llava(hidden=32, seed=0):
    tok = word_level_tokenizer(CHARS, chars=True)
    tok.add_tokens(["<image>"], special_tokens=True)
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}
        ),
        tokenizer=tok, patch_size=10, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT,
    )  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                              num_attention_heads=2, image_size=30, patch_size=10)  # fmt: skip
    text = lm_config(len(tok), hidden=hidden, layers=1, heads=2, kv_heads=2)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                         image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default")  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaked distributions: the score tokens' weights matter
    return model, proc


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


@pytest.fixture(scope="module")
def echo():
    model, proc = tiny_llava(hidden=128)
    v = model.lm_head.weight.shape[0]
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.copy_(torch.eye(v, 128))
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(torch.eye(v, 128))
    return model, proc


def images():
    return pil_images(2, (30, 30)) + pil_images(2, (36, 44), seed=1)


def naive_expected(model, proc, judge, imgs, prompts):
    """Σ s·p(s) / Σ p(s) at the last position, one unpadded sample at a time."""
    ids = [proc.tokenizer.convert_tokens_to_ids(str(s)) for s in range(10)]
    out = []
    for img, p in zip(imgs, prompts):
        enc = proc(text=[judge.render(p)], images=[img], return_tensors="pt")
        with torch.no_grad():
            probs = model(**enc).logits[0, -1, ids].softmax(-1)
        out.append((probs * torch.arange(10.0)).sum().item())
    return torch.tensor(out)


def test_expected_score_equals_one_sample_at_a_time(llava):
    judge = VLMJudge(llava, template=TEMPLATE, device="cpu", batch_size=3)
    got = torch.tensor(judge(images(), [{}] * 4, entries(PROMPTS, "vlm_judge")))
    want = naive_expected(*llava, judge, images(), PROMPTS)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert want.std() > 1e-2 and ((want >= 0) & (want <= 9)).all()


def test_generated_replies_equal_one_sample_at_a_time(llava):
    model, proc = llava
    judge = VLMJudge(llava, template=TEMPLATE, mode="generate", max_new_tokens=4, device="cpu",
                     batch_size=4)  # fmt: skip
    judge(images(), [{}] * 4, entries(PROMPTS, "vlm_judge"))
    for img, p, reply in zip(images(), PROMPTS, judge.last_replies):
        enc = proc(text=[judge.render(p)], images=[img], return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
        assert reply == proc.tokenizer.decode(
            out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )


@pytest.mark.parametrize("last", list("0379"))
def test_echo_judge_scores_by_hand(echo, last):
    """The echo model's logits at the answer: a = 1/sqrt(1/128 + eps) on the last token, 0 else."""
    ctx = entries(PROMPTS[:2], "vlm_judge")
    judge = VLMJudge(echo, template=TEMPLATE, answer_prefix=last, device="cpu")
    a = 1 / math.sqrt(1 / 128 + 1e-6)
    s = int(last)
    want = (s * math.exp(a) + (45 - s)) / (math.exp(a) + 9)
    assert judge(pil_images(2, (30, 30)), [{}] * 2, ctx) == pytest.approx([want] * 2, abs=1e-5)
    gen = VLMJudge(echo, template=TEMPLATE, answer_prefix=last, mode="generate", max_new_tokens=1,
                   scale=3.0, norm_mean=1.0, device="cpu")  # fmt: skip
    assert gen(pil_images(2, (30, 30)), [{}] * 2, ctx) == [s / 3 - 1] * 2


def test_unparsable_reply_is_a_logged_default(echo, caplog):
    ctx = entries(PROMPTS[:3], "vlm_judge")
    judge = VLMJudge(echo, template=TEMPLATE, answer_prefix="x", mode="generate", default=-1.0,
                     device="cpu")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="grpo_ar.rewards"):
        assert judge(pil_images(3, (30, 30)), [{}] * 3, ctx) == [-1.0] * 3
    assert len([r for r in caplog.records if "no score in the reply 'xxxxxxxx'" in r.message]) == 1
    clamped = VLMJudge(echo, template=TEMPLATE, answer_prefix="5", mode="generate",
                       max_new_tokens=2, device="cpu")  # fmt: skip
    assert clamped(pil_images(1, (30, 30)), [{}], entries(["a"], "vlm_judge")) == [9.0]  # "55"
    failed = VLMJudge(echo, template=TEMPLATE, answer_prefix="x", mode="generate", device="cpu")
    assert failed(pil_images(1, (30, 30)), [{}], entries(["a"], "vlm_judge")) == [None]


def test_bf16_judge_with_fp32_images(llava):
    model, proc = tiny_llava()
    judge = VLMJudge((model, proc), template=TEMPLATE, dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    got = torch.tensor(judge(images(), [{}] * 4, entries(PROMPTS, "vlm_judge")))
    fp32 = VLMJudge(llava, template=TEMPLATE, device="cpu")(
        images(), [{}] * 4, entries(PROMPTS, "vlm_judge")
    )
    torch.testing.assert_close(got, torch.tensor(fp32), atol=0.3, rtol=0)


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"mode": "sample"}, "mode"),
        ({"template": "no placeholder"}, "template"),
        ({"scores": ["1", "10"]}, "scores"),  # "10" is two char tokens
        ({"scores": ["a", "b"]}, "scores"),
        ({"score_pattern": r"\d+"}, "score_pattern"),
        ({"dtype": "float8"}, "dtype"),
        ({"batch_size": 0}, "batch_size"),
        ({"norm_std": 0.0}, "norm_std"),
        ({"model": "./no/such/judge"}, "model"),
    ],
)
def test_setup_errors_name_the_key(llava, kw, key):
    kw = {"model": llava, "template": TEMPLATE, "device": "cpu", **kw}
    with pytest.raises(ConfigError, match=rf"data\.reward_setup\.vlm_judge\.{key} "):
        VLMJudge(**kw)
