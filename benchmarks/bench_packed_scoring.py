"""grpo_ar's packed scoring (`grpo_ar/generation/packing.py`) vs padded completion rows, policy forward +
backward through `token_logprobs`.

Padded (`pack=False`): each prompt runs once, its KV cache is gathered to the G samples and N rows
of the longest completion run (SmolLM2 in bench_step: ~880 tokens computed for ~360 real).
Packed (the default where the model allows): a prompt's completions run back to back in bins no
wider than the longest one, after the prompt's cache, under a 4D mask (each token sees its
prompt and its own completion). `time_ratio` = packed / padded (lower is better),
`max_abs_err` the largest |Δ log-prob|, `grad_rel_err` max |Δ grad| / max |grad| over all
parameters (fp32; the fp64 equality is tested in tests/test_speed_paths.py). The completions are
sampled by grpo_ar from the bench prompts. `pos_*`: the position-id layout (`pack="position_ids"`:
full sequences in one row, positions restarting, no mask; flash-attention's cu_seqlens layout,
here run under sdpa, which builds a dense block-causal mask from the positions) against padded.
"""

from __future__ import annotations

import torch
from common import header, interleaved, load, median, parse_args, run_result, setup

from grpo_ar.adapters.text import TextAdapter
from grpo_ar.generation.packing import best_bins
from grpo_ar.generation.params import SamplingParams
from grpo_ar.generation.scoring import token_logprobs
from grpo_ar.types import Entry


def main() -> None:
    def extra(p):
        p.add_argument("--config", default="smol", choices=["tiny", "smol"])

    args = parse_args(__doc__, repeats=5, quick_repeats=3, extra=extra)
    header("bench_packed_scoring", args)
    model, tok, prompts, g, max_new = setup(args.config, 4 if args.config == "tiny" else 2)
    adapter = TextAdapter(tok, SamplingParams(max_new_tokens=max_new))
    pb = adapter.encode([Entry(p, ()) for p in prompts])
    rollout = adapter.sample(model, pb, g, generator=torch.Generator().manual_seed(0))
    params = adapter.sampling
    mask = pb.attention_mask
    cmask = rollout.completion_mask
    lens = cmask.sum(1).long()
    w = torch.randn(cmask.shape, generator=torch.Generator().manual_seed(1))
    model.train()

    def run(packed: bool | str):
        model.zero_grad(set_to_none=True)
        logp, _ = token_logprobs(model, rollout, params, pack=packed)
        (logp * w).sum().backward()
        return logp.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (lp_a, g_a), (lp_b, g_b), (lp_c, g_c) = run(False), run(True), run("position_ids")
    err, pos_err = float((lp_a - lp_b).abs().max()), float((lp_a - lp_c).abs().max())
    g_err = max(float((a - b).abs().max() / a.abs().max().clamp(min=1e-30)) for a, b in
                zip(g_a, g_b))  # fmt: skip
    pos_g_err = max(float((a - c).abs().max() / a.abs().max().clamp(min=1e-30)) for a, c in
                    zip(g_a, g_c))  # fmt: skip
    prompt_tok = int(mask.sum())
    need = (lens - 1).clamp(min=0).tolist()  # the first output of each comes from its prompt
    padded = prompt_tok + len(need) * max(need)
    chosen = best_bins(rollout.prompt_index.tolist(), need, mask.shape[1], model.config.hidden_size)
    filled = [sum(need[i] for i in b) for b in chosen]
    packed = prompt_tok + len(filled) * max(filled)  # bins run as rows of the fullest one
    print(
        f"# {args.config}: {len(prompts)} prompts x {g}, completion lengths {lens.tolist()}; "
        f"tokens run: padded {padded}, packed {packed}; load {load()}"
    )
    print(f"  max |Δ log-prob| {err:.2e}, max relative |Δ grad| {g_err:.2e}")
    print(f"  position ids: max |Δ log-prob| {pos_err:.2e}, max relative |Δ grad| {pos_g_err:.2e}")
    cpu: dict = {}
    fns = {"padded": lambda: run(False), "packed": lambda: run(True),
           "pos_ids": lambda: run("position_ids")}  # fmt: skip
    times = interleaved(fns, args.repeats, cpu)
    for k, ts in times.items():
        print(
            f"  {k:7s} fwd+bwd median {median(ts):7.3f} s ({', '.join(f'{t:.2f}' for t in ts)});"
            f" CPU {median(cpu[k]):.3f} s"
        )
    run_result(
        args,
        time_ratio=median(times["packed"]) / median(times["padded"]),
        cpu_ratio=median(cpu["packed"]) / median(cpu["padded"]),
        max_abs_err=err,
        grad_rel_err=g_err,
        tokens_padded=padded,
        tokens_packed=packed,
        pos_time_ratio=median(times["pos_ids"]) / median(times["padded"]),
        pos_cpu_ratio=median(cpu["pos_ids"]) / median(cpu["padded"]),
        pos_max_abs_err=pos_err,
        pos_grad_rel_err=pos_g_err,
        tokens_pos_ids=int(mask[rollout.prompt_index].sum()) + sum(need),
    )


if __name__ == "__main__":
    main()
