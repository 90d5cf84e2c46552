"""One in-process vLLM engine per test session (start-up ~30-60 s on 2 CPU cores), on a tiny
random Llama saved to disk; never a second one in this process (vLLM's parallel state is
process-global): other engines run as `grpo-ar vllm-serve` servers. vLLM's CPU attention needs
head_dim >= 32: hidden 64, 2 heads."""

from __future__ import annotations

import os
import socket

import pytest
import vllm  # noqa: F401  (fails collection without the engine: these tests never skip)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def tiny_vllm_llama(vocab_size: int, seed: int = 0):
    """`tiny_llama` (peaked head: top-k / top-p cut something) at head_dim 32."""
    from tiny import tiny_llama

    return tiny_llama(vocab_size, seed, hidden=64, heads=2, mlp=128)


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
