"""LoRA / DoRA through peft as a grpo_ar fine-tune (the choices: grpo_ar/finetune/base.py)."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

from torch import nn

from .base import AdapterFinetune, FinetuneConfig, require_extra, resolve_targets, wrap_adapted


class PeftFinetune(AdapterFinetune):
    """LoRA / DoRA through `peft.get_peft_model`; reference under `disable_adapter()`."""

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, need_reference: bool) -> None:
        peft = require_extra("peft", "peft")
        args = dict(cfg.algo_args)
        lora = peft.LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=resolve_targets(model, cfg),
            use_dora=cfg.algo == "dora" or bool(args.pop("use_dora", False)),
            **args,
        )
        peft_model = peft.get_peft_model(model, lora)
        super().__init__(wrap_adapted(peft_model, model), cfg, need_reference)

    def adapter_off(self) -> contextlib.AbstractContextManager[None]:
        return self.model.lm.disable_adapter()

    def export(self, out_dir: str | Path) -> None:
        # merge into a copy: peft's unmerge would not give the base back bitwise
        merged = copy.deepcopy(self.model.lm).merge_and_unload()
        merged.save_pretrained(out_dir)
