"""Server mode against a real `grpo-ar vllm-serve` process: weights pushed through shared
memory take effect, and a wrong model, a missing or a dead server fail with one clear error."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from conftest import free_port, tiny_vllm_llama

from grpo_ar.adapters.text import TextAdapter
from grpo_ar.config import ConfigError
from grpo_ar.generation.params import SamplingParams
from grpo_ar.generation.scoring import token_logprobs
from grpo_ar.generation.vllm_backend import VllmBackend, model_signature
from grpo_ar.generation.vllm_server import ServerClient
from grpo_ar.io.data import load_rows
from tiny import char_tokenizer


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    port = free_port()
    cmd = [sys.executable, "-m", "grpo_ar.cli", "vllm-serve", tiny_dir, "--port", str(port)]
    cmd += ["--kv-cache-gb", "1", "--max-model-len", "256"]
    log = tmp_path_factory.mktemp("server") / "log.txt"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    start = time.perf_counter()
    while "ready on" not in log.read_text():  # the server prints it once it listens
        assert proc.poll() is None, f"vllm-serve exited before it was ready:\n{log.read_text()}"
        assert time.perf_counter() - start < 300, "vllm-serve not ready after 300 s"
        time.sleep(0.5)
    print(f"vllm-serve start-up: {time.perf_counter() - start:.1f} s")
    yield proc, port
    proc.kill()
    proc.wait()


def test_server_rollouts_follow_pushed_weights(server):
    _, port = server
    tok = char_tokenizer()
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=30)
    adapter = TextAdapter(tok, params)
    client = ServerClient("127.0.0.1", port, timeout_s=60)
    new = tiny_vllm_llama(len(tok), seed=3)
    client.check_model(model_signature(new), "float32")
    backend = VllmBackend(client, adapter.sampling)
    start = time.perf_counter()
    backend.sync(new, 1)
    print(f"weight push (shared memory): {1e3 * (time.perf_counter() - start):.1f} ms")
    assert client.call("health")["version"] == 1
    prompts = adapter.encode(load_rows([{"prompt": p, "rewards": "x"} for p in ("1+2=", "xy")]))
    rollout = backend.generate(new, prompts, 4, generator=torch.Generator().manual_seed(0))
    mask = rollout.completion_mask.bool()
    with torch.no_grad():
        logp, _ = token_logprobs(new, rollout, adapter.sampling)
        old, _ = token_logprobs(tiny_vllm_llama(len(tok)), rollout, adapter.sampling)
    assert float((logp - rollout.sampling_logp).abs()[mask].max()) <= 1e-4
    assert float((old - rollout.sampling_logp).abs()[mask].mean()) > 0.5
    client.close()


def test_server_refuses_another_model_and_dtype(server):
    _, port = server
    client = ServerClient("127.0.0.1", port, timeout_s=60)
    other = tiny_vllm_llama(len(char_tokenizer()) + 5)
    with pytest.raises(ConfigError, match="serves another model.*vocab_size"):
        client.check_model(model_signature(other), "float32")
    same = tiny_vllm_llama(len(char_tokenizer()))
    with pytest.raises(ConfigError, match="--dtype bfloat16"):
        client.check_model(model_signature(same), "bfloat16")
    client.close()


def test_missing_then_dead_server_fail_clearly(server):
    with pytest.raises(ConfigError, match="no vllm server at 127.0.0.1:.*vllm-serve"):
        ServerClient("127.0.0.1", free_port(), timeout_s=5)
    proc, port = server
    client = ServerClient("127.0.0.1", port, timeout_s=60)
    proc.kill()
    proc.wait()
    with pytest.raises(RuntimeError, match="is gone"):
        client.call("health")
