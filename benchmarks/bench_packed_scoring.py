"""A proposed change to `grpo_ar/scoring.py` (not used by grpo_ar yet), measured: score the G
completions of a prompt packed into one row after the prompt's shared KV cache, instead of G
rows padded to the longest completion.

grpo_ar's path (`scoring.completion_outputs(share=True)`) runs each prompt once, gathers its
KV cache to the G samples and runs (N, T_max) completion rows: padding to the longest completion
costs N·T_max tokens where Σ lengths are real (SmolLM2 in bench_step: ~880 computed for ~360).
The packed layout runs (P, Σ_g lengths) rows: completion i attends to its prompt's keys and to
its own earlier tokens (block-diagonal causal 4D mask), positions restart after the prompt.

Both go through the fused head; policy forward + backward, interleaved. `time_ratio` = packed /
padded (lower is better), `max_abs_err` the largest |Δ log-prob|, `grad_rel_err` max |Δ grad| /
max |grad| over all parameters. The completions are sampled by grpo_ar from the bench prompts.
"""

from __future__ import annotations

import torch
from common import header, interleaved, load, median, parse_args, result, setup

from grpo_ar.adapters.text import TextAdapter
from grpo_ar.core.logprobs import fused_head_logprobs
from grpo_ar.data import Entry
from grpo_ar.sampling import SamplingParams, _forward, _positions
from grpo_ar.scoring import completion_outputs, head_split


def packed_outputs(net, ids, mask, idx, comp, comp_mask):
    """(P, L) prompts, (n,) prompt of each sample, (n, T) completions -> (n, T, H) hidden
    states predicting each completion token (0 where comp_mask is 0), completions packed."""
    from transformers import DynamicCache

    p_rows, width_p = ids.shape
    lens = comp_mask.long().sum(1).tolist()
    cache = DynamicCache()
    first = _forward(net, ids, mask, _positions(mask), cache, keep=0).last_hidden_state[:, -1]
    plen = mask.long().sum(1).tolist()
    rows = [[i for i in range(len(lens)) if int(idx[i]) == p] for p in range(p_rows)]
    width = max(1, max(sum(max(lens[i] - 1, 0) for i in r) for r in rows))
    tok = torch.zeros(p_rows, width, dtype=torch.long)
    pos = torch.zeros(p_rows, width, dtype=torch.long)
    seg = torch.full((p_rows, width), -1)
    n, t = comp.shape
    src = torch.zeros(n, t, dtype=torch.long)  # row of cat([first, packed outputs]) per token
    for p, r in enumerate(rows):
        at = 0
        for i in r:
            k = max(lens[i] - 1, 0)
            tok[p, at : at + k] = comp[i, :k]
            pos[p, at : at + k] = plen[p] + torch.arange(k)
            seg[p, at : at + k] = i
            src[i, 0] = p
            src[i, 1 : k + 1] = p_rows + p * width + at + torch.arange(k)
            at += k
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0) & causal
    pad_self = torch.eye(width, dtype=torch.bool) & (seg[:, :, None] < 0)  # no empty rows
    prompt_part = mask.bool()[:, None, :].expand(p_rows, width, width_p)
    mask4 = torch.cat([prompt_part, same | pad_self], 2)[:, None]
    out = net(input_ids=tok, attention_mask=mask4, position_ids=pos, cache=cache, use_cache=True)
    flat = torch.cat([first, out.last_hidden_state.reshape(-1, first.shape[-1])])
    return flat[src.flatten()].view(n, t, -1) * comp_mask[..., None].to(flat.dtype)


def main() -> None:
    def extra(p):
        p.add_argument("--config", default="smol", choices=["tiny", "smol"])

    args = parse_args(__doc__, repeats=5, quick_repeats=3, extra=extra)
    header("bench_packed_scoring", args)
    model, tok, prompts, g, max_new = setup(args.config, 4 if args.config == "tiny" else 2)
    adapter = TextAdapter(tok, SamplingParams(max_new_tokens=max_new))
    pb = adapter.encode([Entry(p, ()) for p in prompts])
    rollout = adapter.sample(model, pb, g, generator=torch.Generator().manual_seed(0))
    body, head = head_split(model)
    ids, mask, idx = pb.input_ids, pb.attention_mask, rollout.prompt_index
    comp, cmask = rollout.completion_ids, rollout.completion_mask
    lens = cmask.sum(1).long()
    w = torch.randn(comp.shape, generator=torch.Generator().manual_seed(1))
    model.train()

    def run(packed: bool):
        model.zero_grad(set_to_none=True)
        if packed:
            h = packed_outputs(body, ids, mask, idx, comp, cmask)
        else:
            h = completion_outputs(body, ids, mask, idx, comp, cmask, True, True)
        logp, _ = fused_head_logprobs(h, head.weight, comp, head.bias, 1.0, False)
        logp = logp.masked_fill(cmask == 0, 0.0)
        (logp * w).sum().backward()
        return logp.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (lp_a, g_a), (lp_b, g_b) = run(False), run(True)
    err = float((lp_a - lp_b).abs().max())
    g_err = max(float((a - b).abs().max() / a.abs().max().clamp(min=1e-30)) for a, b in
                zip(g_a, g_b))  # fmt: skip
    prompt_tok = int(mask.sum())
    padded = prompt_tok + len(comp) * int(lens.max())
    packed = prompt_tok + int(lens.sum())
    print(
        f"# {args.config}: {len(prompts)} prompts x {g}, completion lengths {lens.tolist()}; "
        f"tokens run: padded {padded}, packed {packed}; load {load()}"
    )
    print(f"  max |Δ log-prob| {err:.2e}, max relative |Δ grad| {g_err:.2e}")
    cpu: dict = {}
    times = interleaved({"padded": lambda: run(False), "packed": lambda: run(True)},
                        args.repeats, cpu)  # fmt: skip
    for k, ts in times.items():
        print(
            f"  {k:7s} fwd+bwd median {median(ts):7.3f} s ({', '.join(f'{t:.2f}' for t in ts)});"
            f" CPU {median(cpu[k]):.3f} s"
        )
    result(
        time_ratio=median(times["packed"]) / median(times["padded"]),
        cpu_ratio=median(cpu["packed"]) / median(cpu["padded"]),
        max_abs_err=err,
        grad_rel_err=g_err,
        tokens_padded=padded,
        tokens_packed=packed,
        load=load(),
        threads=args.threads,
        repeats=args.repeats,
    )


if __name__ == "__main__":
    main()
