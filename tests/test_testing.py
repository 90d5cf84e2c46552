"""grpo_ar.testing, the fixtures tests, benchmarks and examples share: tokenizers with the
documented ids, seeded builders that give the same weights, and a light import."""

import subprocess
import sys

import pytest
import torch

from grpo_ar.testing import (
    CHARS,
    char_tokenizer,
    lm_config,
    tiny_llama,
    tiny_qwen2,
    word_level_tokenizer,
)


def test_char_tokenizer_ids_bos_and_left_padding():
    tok = char_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == 3 + len(CHARS)
    ids = tok("1+a")["input_ids"]
    assert ids == [1, 3 + CHARS.index("1"), 3 + CHARS.index("+"), 3 + CHARS.index("a")]
    assert tok.decode(ids, skip_special_tokens=True) == "1+a"  # fused back, no spaces
    batch = tok(["1+a", "b"], padding=True)["input_ids"]
    assert batch[1] == [0, 0, 1, 3 + CHARS.index("b")]


def test_word_level_tokenizer_splits_on_whitespace():
    tok = word_level_tokenizer(["<pad>", "<bos>", "<eos>", "red", "ball"])
    assert tok("red ball")["input_ids"] == [1, 3, 4]
    assert tok("ball red red")["input_ids"] == [1, 4, 3, 3]
    assert tok("blue")["input_ids"] == [1, 0]  # unknown words are <pad>


def test_builders_are_seeded_and_scale_the_head():
    a, b, c = tiny_llama(seed=0), tiny_llama(seed=0), tiny_llama(seed=1)
    wa, wb, wc = (m.model.embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    plain = tiny_llama(seed=0, logit_scale=1.0)
    torch.testing.assert_close(a.lm_head.weight, 8.0 * plain.lm_head.weight, rtol=0, atol=0)
    q = tiny_qwen2(vocab_size=50)
    assert q.config.model_type == "qwen2" and q.lm_head.out_features == 50 and not q.training


def test_lm_config_fields_and_unknown_arch():
    cfg = lm_config(100, hidden=16, layers=1, kv_heads=4, mlp=48, eos_token_id=7)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (16, 48, 1)
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 7)
    assert lm_config(100, hidden=16).intermediate_size == 32  # 2 * hidden by default
    with pytest.raises(ValueError, match=r"arch='gpt2' is not one of \['llama', 'qwen2'\]"):
        lm_config(100, arch="gpt2")


def test_import_is_light():
    code = (
        "import sys, grpo_ar.testing; "
        "print(sorted(m for m in ('diffusers', 'transformers', 'tokenizers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
