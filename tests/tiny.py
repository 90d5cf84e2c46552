"""The test suite's tiny models and tokenizers: a re-export of grpo_ar.testing, where benchmarks
and examples build the same ones."""

from grpo_ar.testing import (  # noqa: F401
    CHARS,
    VQ_CODES,
    char_tokenizer,
    lm_config,
    save_char_llama,
    structured_images,
    tiny_emu3_vq,
    tiny_janus_vq,
    tiny_llama,
    tiny_qwen2,
    tiny_vqmodel,
)
