"""One in-process vLLM engine per test session (start-up ~30-60 s on 2 CPU cores), on a tiny
random Llama saved to disk; never a second one in this process (vLLM's parallel state is
process-global): other engines run as `grpo-ar vllm-serve` servers. vLLM's CPU attention needs
head_dim >= 32: hidden 64, 2 heads."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import vllm  # noqa: F401  (fails collection without the engine: these tests never skip)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def tiny_vllm_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked distributions, so that top-k / top-p cut something
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from tiny import char_tokenizer

    d = tmp_path_factory.mktemp("tiny_vllm")
    tiny_vllm_llama(len(char_tokenizer())).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def engine(tiny_dir):
    from grpo_ar.generation.vllm_engine import Engine, EngineSpec

    eng = Engine(EngineSpec(tiny_dir, dtype="float32", max_model_len=256, kv_cache_gb=1))
    yield eng
    eng.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
