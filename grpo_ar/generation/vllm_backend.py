"""The vLLM rollout backend, in TRL's two modes.

- colocate: the engine in the trainer's process (run the trainer from .venv-vllm); weights
  reloaded in place before the first rollout after each optimizer step, prefix cache reset.
- server: the engine in `grpo-ar vllm-serve MODEL` (grpo_ar/generation/vllm_server.py), the
  trainer in any environment; weights pushed through shared memory before each step.

What it equals: the rollout the built-in sampler would draw from the same distribution
(`params.transform_logits`), with `sampling_logp` the engine's processed log-prob of each
token; tests/vllm_engine/ holds the two equal to 1e-4 against teacher-forced scoring.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..types import PromptBatch, Rollout
from .multiturn import Trajectories
from .params import SamplingParams
from .sampler import finish_rollout
from .vllm_engine import SIGNATURE_KEYS, Engine, EngineSpec, request_params
from .vllm_turns import engine_turns


def draw_seed(generator: torch.Generator | None) -> int:
    """The engine's request seed, one draw from the trainer's generator (seeded per step)."""
    device = None if generator is None else generator.device
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device))


# model.adapter -> why a vLLM engine cannot sample it as the built-in sampler does. Known from
# the name alone, so `load_config` refuses such a run before its model loads (`check_config`);
# `build_vllm_backend` checks any built adapter again, by its model call and sampling.
ADAPTER_LIMITS = {
    "janus_t2i": (
        'its model call "janus_image" draws image codes through Janus\' generation embeddings, '
        "aligner and head, which a vLLM engine does not run (it samples a causal LM's own head)"
    ),
    "chameleon": (
        "its image layout forces tokens at fixed positions (sampling.position_ranges), which "
        "needs a vLLM logits processor that grpo_ar does not ship, and vLLM's Chameleon sets "
        "every image token's logit to the minimum"
    ),
    "emu3": (
        "its image layout forces tokens at fixed positions (sampling.position_ranges), which "
        "needs a vLLM logits processor that grpo_ar does not ship"
    ),
}


def refusal(what: str, why: str) -> ConfigError:
    """The one start-up error for something the engine cannot sample, with the way out."""
    return ConfigError(
        f'rollout.backend = "vllm" cannot sample {what}: {why}; use rollout.backend = "builtin"'
    )


def check_config(cfg: Any) -> None:
    """Refuse a `[rollout] backend = "vllm"` run whose model.adapter the engine cannot sample
    (`ADAPTER_LIMITS`), from its config alone; the sampling is checked on the adapter's own
    parameters when the backend is built (`check_adapter`)."""
    why = ADAPTER_LIMITS.get(cfg.model.adapter)
    if why is not None:
        raise refusal(f'model.adapter = "{cfg.model.adapter}"', why)


def check_adapter(adapter: Any) -> None:
    """Refuse a built adapter whose model call is not the causal LM's own forward (the one
    call a vLLM engine runs), then its sampling (`check_sampling`)."""
    call = getattr(adapter, "call_name", "causal_lm")
    if call != "causal_lm":
        raise refusal(
            f"with {type(adapter).__name__}",
            f'its model call "{call}" is not a causal LM\'s own forward, the one call a vLLM '
            "engine runs",
        )
    check_sampling(adapter.sampling)


def check_sampling(params: SamplingParams) -> None:
    """Refuse, before anything loads, what vLLM cannot sample as grpo_ar defines it."""
    if params.uses_cfg:
        raise ConfigError(
            f"sampling.cfg_scale={params.cfg_scale}: classifier-free guidance pairs have no vLLM "
            'equivalent; use rollout.backend = "builtin" for CFG sampling'
        )
    if params.position_ranges:
        raise ConfigError(
            "sampling.position_ranges (per-position token ranges, e.g. the Emu3 layout) need a "
            'vLLM logits processor that grpo_ar does not ship yet; use rollout.backend = "builtin"'
        )
    if params.min_p > 0 and params.filters_on() and (params.top_k > 0 or params.top_p < 1):
        raise ConfigError(
            f"sampling.min_p={params.min_p} with top_k/top_p: vLLM applies min-p before top-k/"
            "top-p, grpo_ar after them, so the distributions differ; drop one of them or use "
            'rollout.backend = "builtin"'
        )


def model_signature(model: Any) -> dict[str, Any]:
    """What identifies a model's shape (compared with the server's to refuse another model)."""
    return {k: getattr(model.config, k, None) for k in SIGNATURE_KEYS}


def base_module(model: Any) -> Any:
    """The plain transformers model under grpo_ar's adapter wrapper (AdaptedLM), if any."""
    lm = getattr(model, "lm", model)
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def policy_weights(model: Any, finetune: Any) -> list[tuple[str, torch.Tensor]]:
    """The policy as HF-named full weights: the model's own, or an adapter merged into a
    copy of its base (peft's merge_and_unload, LyCORIS's export)."""
    if finetune is None or not hasattr(finetune, "trainable"):  # full fine-tuning
        return [(k, v.detach()) for k, v in model.state_dict().items()]
    lm = getattr(model, "lm", None)
    if lm is not None and hasattr(lm, "merge_and_unload"):  # peft: merge into a copy
        merged = copy.deepcopy(lm).merge_and_unload()
        return [(k, v.detach()) for k, v in merged.state_dict().items()]
    with tempfile.TemporaryDirectory() as tmp:  # LyCORIS: its export writes merged weights
        finetune.export(tmp)
        from safetensors.torch import load_file

        out: list[tuple[str, torch.Tensor]] = []
        for f in sorted(Path(tmp).glob("*.safetensors")):
            out.extend(load_file(str(f)).items())
        return out


def engine_model_dir(rcfg: Any, cfg: Any, model: Any, finetune: Any) -> str:
    """The folder the engine starts from: rollout.model_dir, model.path, or the trainer's model
    written once under run_dir/vllm_model (weights are pushed before the first rollout)."""
    if rcfg.model_dir:
        return rcfg.model_dir
    if cfg.model.path and Path(cfg.model.path).is_dir():
        return cfg.model.path
    out = Path(cfg.log.run_dir) / "vllm_model"
    if not (out / "config.json").exists():
        if finetune is not None and hasattr(finetune, "trainable"):
            finetune.export(out)  # an adapter run: a plain folder with the adapter merged
        else:
            model.save_pretrained(out)
    return str(out)


class VllmBackend:
    """Rollouts from a vLLM engine (an in-process `Engine` or a `ServerClient`); with a
    multi-turn `adapter` (`multiturn.Trajectories`), trajectories turn by turn
    (`vllm_turns.engine_turns`) with the adapter's environment answering each turn."""

    name = "vllm"

    def __init__(
        self, engine: Any, params: SamplingParams, finetune: Any = None, adapter: Any = None
    ) -> None:
        self.engine, self.params, self.finetune = engine, params, finetune
        self.turns = adapter if isinstance(adapter, Trajectories) else None
        self.version = -1  # the policy version the engine holds; -1: its start-up weights

    def check(self, params: SamplingParams) -> None:
        check_sampling(params)

    def generate(
        self, model: Any, prompts: PromptBatch, group_size: int,
        generator: torch.Generator | None = None, greedy: bool = False,
    ) -> Rollout:  # fmt: skip
        return self.generate_seeded(prompts, group_size, draw_seed(generator), greedy)

    def generate_seeded(
        self, prompts: PromptBatch, group_size: int, seed: int, greedy: bool = False
    ) -> Rollout:
        """`generate` with the engine seed given (what a prefetch for a later step uses)."""
        p = self.params
        if self.turns is not None:
            return self.turns.trajectories(
                prompts,
                group_size,
                lambda respond, limits: engine_turns(
                    self.engine, prompts, group_size, p, respond, limits, seed, greedy
                ),
            )
        rows = [
            ids[m.bool()].tolist()
            for ids, m in zip(prompts.input_ids.cpu(), prompts.attention_mask.cpu())
        ]
        out = self.engine.generate(rows, group_size, request_params(p, greedy), seed)
        width = max(1, max(len(ids) for ids, _ in out))
        n = len(out)
        tokens = torch.full((n, width), p.pad_token_id, dtype=torch.long)
        logps = torch.zeros(n, width)
        for i, (ids, lps) in enumerate(out):
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            logps[i, : len(lps)] = torch.tensor(lps)
        device = prompts.input_ids.device
        eos = torch.tensor(p.eos_token_ids, dtype=torch.long, device=device)
        return finish_rollout(
            prompts, group_size, tokens.to(device), logps.to(device), eos, p.pad_token_id
        )

    def sync(self, model: Any, version: int) -> None:
        if version == self.version:
            return
        self.engine.load_weights(policy_weights(model, self.finetune), version)
        self.version = version

    def reset(self) -> None:
        self.engine.reset()

    def release(self) -> None:
        return None  # the engine keeps its own weights and KV memory

    def close(self) -> None:
        self.engine.close()


def build_vllm_backend(rcfg: Any, adapter: Any, model: Any, finetune: Any, cfg: Any) -> VllmBackend:
    """The backend of `[rollout]`: the adapter's model call and sampling checked first, then
    the engine started (colocate) or the server reached and checked to serve this model."""
    params = adapter.sampling
    check_adapter(adapter)
    dtype = rcfg.engine_dtype(cfg.model.compute_dtype)  # bf16-mixed: a bf16 engine
    if rcfg.vllm_mode == "server":
        from .vllm_server import ServerClient

        client = ServerClient(rcfg.host, rcfg.port, rcfg.timeout_s)
        client.check_model(model_signature(base_module(model)), dtype)
        return VllmBackend(client, params, finetune, adapter)
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ConfigError(
            'rollout.backend = "vllm" with vllm_mode = "colocate" needs vLLM in this process: '
            "run the trainer with .venv-vllm/bin/python (`make vllm`), or set rollout.vllm_mode = "
            '"server" and start `grpo-ar vllm-serve MODEL` from .venv-vllm'
        ) from None
    spec = EngineSpec(
        model_dir=engine_model_dir(rcfg, cfg, model, finetune),
        dtype=dtype,
        kv_cache_gb=rcfg.kv_cache_gb,
        gpu_memory_utilization=rcfg.gpu_memory_utilization,
        max_num_seqs=rcfg.max_num_seqs,
        max_model_len=rcfg.max_model_len,
        seed=cfg.trainer.seed,
        compile=rcfg.compile,
    )
    return VllmBackend(Engine(spec), params, finetune, adapter)
