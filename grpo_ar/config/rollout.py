"""The `[rollout]` section: which engine samples the rollouts, and its budgets."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import need

VLLM_MODES = ("colocate", "server")
ENGINE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RolloutConfig:
    """The rollout backend (grpo_ar/generation/backends.py); every value is checked here,
    before a model or an engine loads."""

    backend: str = "builtin"
    """builtin (grpo_ar's KV-cached sampler) or vllm (needs the .venv-vllm environment:
    `make vllm`)."""
    vllm_mode: str = "colocate"
    """colocate: the engine in the trainer's process (run from .venv-vllm); server: an engine
    started by `grpo-ar vllm-serve MODEL` in its own process, reached at host:port."""
    host: str = "127.0.0.1"
    """vllm server address (server mode)."""
    port: int = 8765
    """vllm server port (server mode)."""
    timeout_s: float = 300.0
    """Seconds to wait for the server's answer to one request before failing the run."""
    dtype: str = "auto"
    """Engine dtype: auto (the trainer's compute dtype: model.dtype, or bfloat16 under
    bf16-mixed), float32, bfloat16, float16. An engine dtype other than the trainer's compute
    dtype turns algorithm.is_correction on (token_truncate) unless set."""
    model_dir: str = ""
    """Folder the engine loads its config and first weights from (empty: model.path, or the
    trainer's model written once under run_dir/vllm_model)."""
    kv_cache_gb: float = 2.0
    """CPU engine: KV-cache space in GiB (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = 0.3
    """GPU engine: fraction of GPU memory it may take (colocated with training)."""
    max_num_seqs: int = 256
    """Sequences the engine runs at once."""
    max_model_len: int = 0
    """Prompt + completion tokens per sequence (0: the model's limit)."""
    compile: bool | None = None
    """The engine's torch.compile / CUDA-graph path (vLLM `enforce_eager=False`): true, false,
    or unset (on with CUDA, off on CPU). On the 2-core CPU it samples SmolLM2 8-10 % faster but
    starts in ~55 s instead of ~8 s (benchmarks/README.md): worth it only for long runs.
    Colocate mode; a server takes `grpo-ar vllm-serve MODEL --compile on`."""
    async_steps: int = 0
    """0: every rollout comes from the current policy (as today); 1: step k+1's rollout is
    sampled while step k trains (one step stale, IS-corrected; vllm backend, one process)."""

    def engine_dtype(self, model_dtype: str) -> str:
        """The engine's dtype name: `dtype`, or the trainer's `model_dtype` with auto."""
        return model_dtype if self.dtype == "auto" else self.dtype

    def __post_init__(self) -> None:
        need(
            self.backend in ("builtin", "vllm"),
            f"rollout.backend={self.backend!r}: use builtin or vllm",
        )
        need(
            self.vllm_mode in VLLM_MODES,
            f"rollout.vllm_mode={self.vllm_mode!r}: use {' or '.join(VLLM_MODES)}",
        )
        need(self.dtype in ENGINE_DTYPES, f"rollout.dtype={self.dtype!r}: use {ENGINE_DTYPES}")
        need(1 <= self.port <= 65535, f"rollout.port={self.port}: need 1..65535")
        need(self.timeout_s > 0, f"rollout.timeout_s={self.timeout_s}: need > 0")
        need(self.kv_cache_gb > 0, f"rollout.kv_cache_gb={self.kv_cache_gb}: need > 0")
        need(
            0 < self.gpu_memory_utilization <= 1,
            f"rollout.gpu_memory_utilization={self.gpu_memory_utilization}: need (0, 1]",
        )
        need(self.max_num_seqs >= 1, f"rollout.max_num_seqs={self.max_num_seqs}: need >= 1")
        need(
            self.compile is None or isinstance(self.compile, bool),
            f"rollout.compile={self.compile!r}: use true or false (unset: on with CUDA only)",
        )
        need(self.max_model_len >= 0, f"rollout.max_model_len={self.max_model_len}: need >= 0")
        need(
            self.async_steps in (0, 1),
            f"rollout.async_steps={self.async_steps}: use 0 (on-policy) or 1 (one step ahead)",
        )
        need(
            self.async_steps == 0 or self.backend == "vllm",
            'rollout.async_steps = 1 needs rollout.backend = "vllm": the built-in sampler '
            "samples with the module being trained",
        )
