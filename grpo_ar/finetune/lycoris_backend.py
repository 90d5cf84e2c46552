"""LyCORIS networks as grpo_ar fine-tunes (the choices: grpo_ar/finetune/base.py): policy at
multiplier 1, base at multiplier 0 (`restore()` for DoRA), bypass mode where it works, export
of the effective weights read off each adapted layer's own forward."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .base import (
    AFFINE_ALGOS,
    LYCORIS_RENAME,
    AdapterFinetune,
    FinetuneConfig,
    require_extra,
    resolve_targets,
    wrap_adapted,
)


@contextlib.contextmanager
def _lycoris_preset(preset: dict[str, Any]) -> Iterator[Any]:
    """LycorisNetwork with `preset` applied; its class-level preset state restored after."""
    import logging

    from lycoris import LycorisNetwork

    log = logging.getLogger("LyCORIS")
    level = log.level
    log.setLevel(max(level, logging.WARNING))  # its INFO lines on every build are noise
    keys: tuple[str, ...] = (
        "ENABLE_CONV",
        "TARGET_REPLACE_MODULE",
        "TARGET_REPLACE_NAME",
        "MODULE_ALGO_MAP",
    )
    keys += ("NAME_ALGO_MAP", "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    saved = {k: LycorisNetwork.__dict__[k] for k in keys if k in LycorisNetwork.__dict__}
    try:
        LycorisNetwork.apply_preset(preset)
        yield LycorisNetwork
    finally:
        log.setLevel(level)
        for k in keys:
            if k in saved:
                setattr(LycorisNetwork, k, saved[k])
            elif k in LycorisNetwork.__dict__:
                delattr(LycorisNetwork, k)


class LycorisLinear(nn.Linear):
    """An nn.Linear whose forward LyCORIS replaced, so its `.weight` alone is not the layer: a
    distinct type keeps fast paths that fuse plain Linears' weights (the sampler's Llama decode
    step checks `type(m) is nn.Linear`) from skipping the adapter."""


class LycorisFinetune(AdapterFinetune):
    """A LyCORIS network: policy at multiplier 1, base at multiplier 0 (restore() for DoRA)."""

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, need_reference: bool) -> None:
        require_extra("lycoris", "lycoris")
        targets = resolve_targets(model, cfg)
        pattern = "(?:" + "|".join(re.escape(t) for t in targets) + ")$"
        preset = dict(enable_conv=False, target_module=[], target_name=[pattern], exclude_name=[])
        preset.update(
            module_algo_map={}, name_algo_map={}, lora_prefix="lycoris", use_fnmatch=False
        )
        args = {LYCORIS_RENAME.get(k, k): v for k, v in cfg.algo_args.items()}
        if cfg.algo == "dora":
            args["weight_decompose"] = True
        with _lycoris_preset(preset) as network_cls:
            network = network_cls(
                model,
                multiplier=1.0,
                lora_dim=cfg.rank,
                alpha=cfg.alpha,
                dropout=cfg.dropout,
                network_module="lora" if cfg.algo == "dora" else cfg.algo,
                bypass_mode=cfg.use_bypass,
                warn_on_unmatched=False,
                **args,
            )
        if len(network.loras) != len(targets):
            raise RuntimeError(f"lycoris wrapped {len(network.loras)} of {len(targets)} targets")
        model.requires_grad_(False)
        network.apply_to()
        for lora in network.loras:  # mark the patched Linears (see LycorisLinear)
            if type(lora.org_module[0]) is nn.Linear:
                lora.org_module[0].__class__ = LycorisLinear
        network.to(next(model.parameters()).device).requires_grad_(True)
        self.network = network
        super().__init__(wrap_adapted(model, model, network), cfg, need_reference)

    @contextlib.contextmanager
    def adapter_off(self) -> Iterator[None]:
        net, dora = self.network, self.cfg.dora
        # DoRA's multiplier 0 is not the base: unpatch the Linears instead
        net.restore() if dora else net.set_multiplier(0.0)
        try:
            yield
        finally:
            if dora:
                for lora in net.loras:
                    lora.apply_to()
            else:
                net.set_multiplier(1.0)

    def mix_refusal(self) -> str | None:
        return (
            None if self.cfg.algo in AFFINE_ALGOS and not self.cfg.dora else super().mix_refusal()
        )

    def identity(self) -> dict[str, Tensor]:
        """Adapter tensors of the base: the original weights (full), zero scales (ia3)."""
        out = {}
        for lora in self.network.loras:
            prefix = f"network.{lora.lora_name}."
            if self.cfg.algo == "full":
                out[prefix + "weight"] = lora.org_weight
                if lora.org_bias is not None:
                    out[prefix + "bias"] = lora.org_bias[0]
            else:
                out[prefix + "weight"] = torch.zeros_like(lora.weight)
        return out

    @torch.no_grad()
    def export(self, out_dir: str | Path) -> None:
        """Each adapted Linear's effective weight, read off its own forward (LyCORIS 4.1.3's
        get_merged_weight scales LoHa's ΔW twice), into the base's layout."""
        hf = self.model.hf
        paths = {id(m): n for n, m in hf.named_modules()}
        sd = dict(hf.state_dict())
        was_training = self.model.training
        self.model.eval()
        try:
            for lora in self.network.loras:
                path = paths[id(lora.org_module[0])]
                had_bias = f"{path}.bias" in sd or getattr(lora, "org_bias", None) is not None
                layer, dtype = lora.org_module[0], lora.org_weight.dtype
                weight, bias = _effective_linear(layer, lora.shape[1], dtype, lora.device)
                sd[f"{path}.weight"] = weight
                if had_bias:
                    sd[f"{path}.bias"] = bias
        finally:
            self.model.train(was_training)
        hf.save_pretrained(out_dir, state_dict=sd)


@torch.no_grad()
def _effective_linear(
    layer: nn.Module, n_in: int, dtype: torch.dtype, dev: torch.device, chunk: int = 1024
) -> tuple[Tensor, Tensor]:
    """(out, in) weight and (out,) bias that a (patched) linear layer applies: its forward on
    the zero vector and on the identity, `chunk` rows at a time."""
    bias = layer(torch.zeros(1, n_in, dtype=dtype, device=dev))[0]
    cols = []
    for i in range(0, n_in, chunk):
        eye = torch.zeros(min(chunk, n_in - i), n_in, dtype=dtype, device=dev)
        eye[:, i : i + chunk].fill_diagonal_(1)
        cols.append(layer(eye) - bias)
    return torch.cat(cols).T.contiguous(), bias.clone()
