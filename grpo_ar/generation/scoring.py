"""Teacher-forced log-probs of a rollout under the sampling transform, for the policy (with
gradients), the reference and the old policy.

Three savings over `model(prompt + completion).logits -> log_softmax`:
- the prompt is scored once per group: the P prompts run once, their KV cache is gathered to the
  N samples (differentiably: gradients of all G completions flow back into the shared prompt),
  and the completions continue from it;
- no padding to the longest completion where the model takes a custom 4D mask: a prompt's
  completions run packed back to back after its cache (`generation.packing`, checked once per
  model); under a flash kernel (no custom masks) full sequences run packed in one row with
  restarting position ids instead (`packing.position_packed`, the cu_seqlens layout);
- the (N, T, V) logits never exist: where the model call ends in a linear head
  (`ModelCall.head_split`: HF `model.model` and `lm_head`, checked once per model; Janus'
  generation head), its input features at the real completion tokens (not the padding) go
  through `fused_head_logprobs`, which projects row chunks and recomputes them in backward.
Models of any other structure take the logits path (chunked log-softmax, same results).
Every model call goes through `generation.model_call` (prompt tokens embedded as prompt,
completion tokens as generated ones).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.logprobs import fused_head_logprobs, logprobs_and_entropy
from ..errors import ConfigError
from ..types import Rollout
from .model_call import CausalLMCall, ModelCall, as_call, head_split, positions, stack_cfg
from .packing import gather_rest, packed_rest, packing_mode, packing_ok, position_packed
from .params import SamplingParams, allowed_mask, cfg_combine, mask_logits, position_masks
from .tree_scoring import tree_rest

__all__ = ["completion_outputs", "can_share_prefix", "head_split", "token_logprobs"]


def can_share_prefix(model: Any) -> bool:
    """A KV cache survives this forward (HF drops it under gradient checkpointing in training)."""
    call = as_call(model)
    module = call.module
    checkpointing = getattr(module, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers < 5 names it this way
        checkpointing = getattr(module, "is_gradient_checkpointing", False)
    return call.takes_cache() and not (module.training and checkpointing)


def completion_outputs(
    net: Any,
    ids: Tensor,
    mask: Tensor,
    idx: Tensor,
    comp: Tensor,
    comp_mask: Tensor,
    share: bool,
    hidden: bool,
    pack: bool | str = False,
    tree: Tensor | None = None,
) -> Tensor:
    """(P, L) prompts, (n,) prompt row per sample, (n, T) completions -> (n, T, X) outputs at
    the positions predicting each completion token, of `net`: a ModelCall (its `forward`'s
    outputs), or a module (hidden states (X = H) of a body when `hidden`, else logits (X = V)
    of the whole model). Prompt tokens are embedded as prompt, completions as generated. With `share` and `pack` the completions
    run packed after the prompt cache (`generation.packing`; outputs past a completion's end are
    then 0 instead of the padded pass's values there). `tree` (n, T): the segment of each token
    of a tree rollout; packed, each shared token then runs once (`generation.tree_scoring`).
    `pack="position_ids"`: full sequences packed in one row (`packing.position_packed`),
    whatever `share` says."""
    call = net if isinstance(net, ModelCall) else CausalLMCall(net, hidden)
    t = comp.shape[1]
    if pack == "position_ids":
        return position_packed(call, ids, mask, idx, comp, comp_mask)
    if not share:  # one pass over full sequences, the prompt repeated per sample
        p = ids.shape[1]
        full_mask = torch.cat([mask[idx].long(), comp_mask.long()], 1)  # (n, L + T)
        if p == 0 or isinstance(call, CausalLMCall):  # one vocabulary: one call (as before)
            full = torch.cat([ids[idx], comp], 1)  # (n, L + T)
            out = call.forward(full, full_mask, positions(full_mask), None, t + 1)
            return out[:, -(t + 1) : -1]
        embeds = torch.cat([call.embed(ids[idx], False), call.embed(comp, True)], 1)
        hidden_states = call.run(embeds, full_mask, positions(full_mask), None)  # (n, L + T, H)
        return call.logits(hidden_states[:, p - 1 : -1])
    from transformers import DynamicCache

    cache = DynamicCache()
    first = call.forward(ids, mask, positions(mask), cache, 1)[:, -1:]  # (P, 1, X)
    if t == 1:
        return first[idx]
    if pack:

        def run(tok: Tensor, mask4: Tensor, pos: Tensor, kv: Any) -> Tensor:
            return call.forward(tok, mask4, pos, kv, 0, generated=True)  # (B, C, X)

        net_ = call.attn_module
        packed = (
            packed_rest(net_, cache, mask, idx, comp, comp_mask, run)
            if tree is None
            else tree_rest(net_, cache, mask, idx, comp, comp_mask, tree, run)
        )
        if packed is not None:
            return gather_rest(first[idx], *packed)
    cache.batch_select_indices(idx)  # differentiable gather of the prompts' keys and values
    rest_mask = torch.cat([mask[idx].long(), comp_mask[:, :-1].long()], 1)  # (n, L + T - 1)
    pos = mask.long().sum(1)[idx, None] + torch.arange(t - 1, device=comp.device)  # (n, T - 1)
    out = call.forward(comp[:, :-1], rest_mask, pos, cache, 0, generated=True)  # (n, T - 1, X)
    return torch.cat([first[idx], out], 1)


def token_logprobs(
    model: Any,
    rollout: Rollout,
    params: SamplingParams,
    with_entropy: bool = False,
    detach_uncond: bool = False,
    share_prefix: bool | None = None,
    fused: bool | None = None,
    pack: bool | str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Teacher-forced (n, T) log-probs (and entropies) of the rollout's tokens under the
    sampling transform; 0 under mask == 0. Differentiable.

    `share_prefix` / `fused` / `pack`: None = wherever the model allows (the default; packing
    as `packing.set_packing` chose for the model); False forces the plain full-sequence pass /
    the logits path / padded completion rows (the references the fast paths are tested
    against). `pack=True` forces the 4D-mask layout (it needs `share_prefix`),
    `pack="position_ids"` the one-row layout with restarting position ids.
    """
    prompts, idx = rollout.prompts, rollout.prompt_index
    comp, comp_mask = rollout.completion_ids, rollout.completion_mask
    # a detached uncond branch must cut the head's gradient through W·u as well, which CFG on
    # hidden states cannot express: that case takes the logits path
    detached_cfg = params.uses_cfg and detach_uncond
    call = as_call(model)
    split = call.head_split() if fused is not False and not detached_cfg else None
    if fused and split is None:
        why = "detach_uncond under CFG" if detached_cfg else "no plain `model.model` + `lm_head`"
        raise ValueError(f"fused=True is not possible for {type(call.module).__name__}: {why}")
    share = can_share_prefix(call) and len(idx) > len(prompts)
    share = share if share_prefix is None else share_prefix
    net = split[0] if split is not None else call
    ids, mask, idx2 = _prompt_rows(prompts, idx, params.uses_cfg)
    comp2 = torch.cat([comp, comp]) if params.uses_cfg else comp
    cmask2 = torch.cat([comp_mask, comp_mask]) if params.uses_cfg else comp_mask
    hidden = split is not None
    if pack is None:
        pack = _packing(net, hidden, share)
    tree = None if params.uses_cfg else rollout.data.get("tree_segments")  # tree sampling's
    out = completion_outputs(net, ids, mask, idx2, comp2, cmask2, share, hidden, pack, tree)
    # (2n or n, T, X): X = the head's input features (fused) or V
    if params.uses_cfg:  # linear head: CFG on its input features equals CFG on logits
        out = cfg_combine(out[: len(comp)], out[len(comp) :], params.cfg_scale, detach_uncond)
    m = comp_mask.bool()
    if split is not None:  # the head runs on the real completion tokens only, not the padding
        head, n, t = split[1], comp.shape[0], comp.shape[1]
        rows = m.flatten().nonzero().squeeze(-1)
        mask_fn = _mask_fn(params, head.out_features, comp, rows % t)
        lp, en = fused_head_logprobs(
            out.reshape(n * t, -1)[rows], head.weight, comp.flatten()[rows], head.bias,
            params.temperature, with_entropy, mask_fn,
        )  # fmt: skip
        put = lambda x: x.new_zeros(n * t).index_put((rows,), x).view(n, t)  # noqa: E731
        return put(lp), None if en is None else put(en)
    mask_fn = _mask_fn(params, out.shape[-1], comp)
    if mask_fn is None:
        logp, ent = logprobs_and_entropy(out, comp, params.temperature, with_entropy)
    else:
        scaled = lambda z, start: mask_fn(z / params.temperature, start)  # noqa: E731
        logp, ent = logprobs_and_entropy(out, comp, 1.0, with_entropy, transform=scaled)
    logp = logp.masked_fill(~m, 0.0)
    return logp, None if ent is None else ent.masked_fill(~m, 0.0)


def _prompt_rows(prompts: Any, idx: Tensor, cfg: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Prompt rows and the row of each sample; with CFG the uncond prompts follow the cond ones
    (one padded width) and the samples are doubled: (2P, L), (2n,)."""
    if not cfg:
        return prompts.input_ids, prompts.attention_mask, idx
    if prompts.uncond_input_ids is None or prompts.uncond_attention_mask is None:
        raise ValueError("cfg_scale != 1 needs unconditional prompts in the rollout")
    ids, mask = stack_cfg(prompts)
    return ids, mask, torch.cat([idx, idx + len(prompts)])


def _mask_fn(
    params: SamplingParams, vocab: int, comp: Tensor, row_pos: Tensor | None = None
) -> Any:
    """The sampler's masking for flattened (R, V) rows (row r is completion position
    `row_pos[r]`, by default r % T of all n·T rows, with that position's allowed set, and EOS
    banned before `min_new_tokens`), or None when nothing is masked."""
    allowed = allowed_mask(params, vocab, comp.device)
    per_pos = position_masks(params, vocab, comp.device)
    filters = params.train_filters and params.filters_on()
    forbid_upto = params.min_new_tokens if params.eos_token_ids else 0
    if allowed is None and per_pos is None and not filters and forbid_upto == 0:
        return None
    width = comp.shape[1]
    kinds, kind_allowed = None, None
    if per_pos is not None:
        kinds = torch.tensor(per_pos[1][:width], dtype=torch.long, device=comp.device)
        kind_allowed = per_pos[0]

    def fn(z: Tensor, start: int) -> Tensor:
        forbid: bool | Tensor = False
        at = allowed
        if forbid_upto or kinds is not None:
            pos = torch.arange(start, start + z.shape[0], device=z.device)
            pos = pos % width if row_pos is None else row_pos[pos]
            forbid = pos < forbid_upto if forbid_upto else False
            at = allowed if kinds is None or kind_allowed is None else kind_allowed[kinds[pos]]
        return mask_logits(z, params, at, filters, forbid)

    return fn


def _packing(net: ModelCall, hidden: bool, share: bool) -> bool | str:
    """The packing `net`'s configured layout allows: the 4D mask after a shared prompt, the
    position-id row, or none; a layout set explicitly that fails its check is refused."""
    module = net.attn_module
    layout, asked = packing_mode(module)
    if layout == "off" or (layout == "mask" and not share):
        return False
    check = lambda m: _packing_matches(net, hidden, layout if layout != "mask" else True)  # noqa: E731
    if packing_ok(module, check, layout):
        return layout if layout == "position_ids" else True
    if asked:
        impl = getattr(module.config, "_attn_implementation", None)
        raise ConfigError(
            f"trainer.packing={layout}: packed scoring of {type(module).__name__} under "
            f"attn_implementation={impl} differs from padded scoring (or fails) on a small "
            "input: set trainer.packing = auto or off"
        )
    return False


@torch.no_grad()
def _packing_matches(net: Any, hidden: bool = False, pack: bool | str = True) -> bool:
    """Packed (`pack`: True the 4D-mask layout, "position_ids" the one-row layout) equals
    padded outputs on a small input (2 prompts, 4 samples of unequal lengths, one bin holding
    two completions), in eval mode. `net`: a ModelCall, or a module called as
    `completion_outputs` calls one (`hidden`: a body's hidden states)."""
    call = net if isinstance(net, ModelCall) else CausalLMCall(net, hidden)
    module = call.module
    was_training = module.training
    module.eval()
    try:
        device = next(module.parameters()).device
        vocab = min(int(getattr(call.config, "vocab_size", 16)), call.out_features)
        ids = torch.tensor([[0, 3, 4, 5], [6, 7, 8, 9]], device=device) % vocab
        mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], device=device)
        idx = torch.tensor([0, 0, 0, 1], device=device)
        comp = torch.tensor([[5, 6, 7, 8], [9, 4, 0, 0], [3, 0, 0, 0], [2, 3, 4, 0]], device=device)
        comp = comp % vocab
        cmask = torch.arange(4, device=device) < torch.tensor([[4], [2], [1], [3]], device=device)
        cmask = cmask.long()
        got = completion_outputs(call, ids, mask, idx, comp, cmask, True, hidden, pack)
        want = completion_outputs(call, ids, mask, idx, comp, cmask, True, hidden, False)
        m = cmask.bool()
        got, want = got[m].float(), want[m].float()
        tol = (1e-4 if next(module.parameters()).dtype == torch.float32 else 3e-2) * (
            float(want.abs().max()) + 1.0
        )
        return got.shape == want.shape and bool(((got - want).abs() <= tol).all())
    finally:
        module.train(was_training)
