"""Multi-turn tool trajectories on the vLLM engine with a real model (a check, not a speed
race): SmolLM2-135M-Instruct (fp32 engine, in this process) with examples/tool_calculator's
calculator and prompts, 4 prompts x 4 trajectories, <= 2 turns of <= 40 tokens. Reports the
engine's log-probs against grpo_ar's teacher-forced ones on the model's tokens (they should
agree to ~1e-4), that environment tokens carry log-prob 0, the tool use, and seconds per
rollout. Run it with the engine's environment:

    .venv-vllm/bin/python benchmarks/bench_vllm_multiturn.py --threads 1

RESULT `max_abs_dlogp` (≤ 1e-4), `env_logp_zero` (1), `rollout_s` (the median warm rollout).
"""

from __future__ import annotations

import importlib.util
import json
import time

import torch
from common import ROOT, header, median, need_smollm2, parse_args, run_result


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_ar.adapters.multiturn import MultiTurnAdapter
    from grpo_ar.adapters.text import TextAdapter
    from grpo_ar.generation.params import SamplingParams
    from grpo_ar.generation.vllm_backend import VllmBackend
    from grpo_ar.generation.vllm_engine import Engine, EngineSpec
    from grpo_ar.train.environments import rollout_metrics
    from grpo_ar.train.tools import ToolEnvironment
    from grpo_ar.types import Entry

    args = parse_args(__doc__.split("\n\n")[0], repeats=3, quick_repeats=2)
    header("bench_vllm_multiturn", args)
    smollm2 = need_smollm2()
    path = ROOT / "examples" / "tool_calculator" / "run.py"
    spec = importlib.util.spec_from_file_location("tool_calculator", path)
    assert spec is not None and spec.loader is not None
    tc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tc)
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    env = ToolEnvironment([tc.calculator], max_turns=2, max_tokens=120, timeout_s=2.0)
    adapter = MultiTurnAdapter(TextAdapter(tok, SamplingParams(max_new_tokens=40)), env)
    questions = ["312 * 471", "845 + 267", "903 - 458", "126 * 359"]
    prompts = adapter.encode([Entry(tc.chat_prompt(f"Calculate {q}."), ()) for q in questions])
    start = time.perf_counter()
    engine = Engine(EngineSpec(str(smollm2), dtype="float32", max_model_len=2048))
    out: dict = {"engine_start_s": round(time.perf_counter() - start, 1)}
    backend = VllmBackend(engine, adapter.sampling, adapter=adapter)
    seconds = []
    for rep in range(1 + args.repeats):  # the first call warms the engine up (not counted)
        start = time.perf_counter()
        r = backend.generate(model, prompts, 4, generator=torch.Generator().manual_seed(rep))
        seconds.append(time.perf_counter() - start)
    out["rollout_s"] = [round(x, 2) for x in seconds]
    own = r.model_mask.bool()
    with torch.no_grad():
        logp, _ = adapter.token_logprobs(model, r)
    diff = (logp - r.sampling_logp).abs()[own]
    out.update(
        max_abs_dlogp=float(diff.max()),
        mean_abs_dlogp=float(diff.mean()),
        model_tokens=int(own.sum()),
        env_tokens=int((r.completion_mask.bool() & ~own).sum()),
        env_logp_all_zero=bool((r.sampling_logp[~own] == 0).all()),
        **rollout_metrics(r),
    )
    print(json.dumps(out, indent=1))
    run_result(
        args, max_abs_dlogp=out["max_abs_dlogp"], env_logp_zero=int(out["env_logp_all_zero"]),
        rollout_s=median(seconds[1:]), engine_start_s=out["engine_start_s"],
    )  # fmt: skip


if __name__ == "__main__":  # vLLM's engine needs the guard
    main()
