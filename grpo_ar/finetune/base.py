"""What is trained: the whole model, a peft adapter, or a LyCORIS network — one interface.

`grpo_ar.finetune.build_finetune(model, cfg, need_reference)` returns a `Finetune`: `.model` (what the trainer
samples from, trains and optimizes; frozen tensors have requires_grad=False), `.reference`
(see grpo_ar/train/reference.py), `state_dict()` / `load_state_dict()` (what a checkpoint stores for
the policy: the whole model for `full`, only the adapter tensors otherwise) and `export(dir)` (a
merged, plain transformers `save_pretrained` folder).

Choices, each tested in tests/test_finetune*.py:
- The adapter reference is the base with the adapter off until the first refresh, then a frozen
  copy of the adapter tensors (reasons in grpo_ar/train/reference.py). Memory holds one model plus
  the adapter twice; `algo=full` (LyCORIS) is the exception: its "adapter" is the weights.
- Targets resolve once to the `nn.Linear` modules of the model (module-name suffixes, a regex
  over module paths, module classes), never the output/input embeddings, so peft and LyCORIS
  adapt the same layers. LyCORIS receives them through a preset whose class-level state
  (`LycorisNetwork.apply_preset` writes class attributes) is restored right after.
- LyCORIS bypass mode (y = W·x + ΔW(x), no dense ΔW matmul) is on by default for lora, loha,
  lokr and ia3; `full` has none and diag-oft's fails on non-contiguous activations here. DoRA
  (`dora_wd`) is silently ignored by bypass mode in lycoris-lora 4.1.3, so DoRA runs without
  it, and its reference uses `restore()` (multiplier 0 is not the base under DoRA).
- Mixing (TR-DPO) is exact where the adapted weight is affine in the adapter tensors: full
  fine-tuning, LyCORIS full and ia3; LoRA-style products (lora, loha, lokr, DoRA, OFT) refuse.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, need
from ..io.checkpoint import load_tensors, load_tied_state_dict, load_weights
from ..train.reference import AdapterReference, FrozenCopy

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALGOS = {
    "full": ("full",),
    "peft": ("lora", "dora"),
    "lycoris": ("lora", "dora", "loha", "lokr", "ia3", "full", "diag-oft"),
}
_BYPASS = ("lora", "loha", "lokr", "ia3")  # LyCORIS algos whose bypass mode works here
AFFINE_ALGOS = ("full", "ia3")  # adapted weight affine in the adapter tensors
_OWN_ARGS = {  # set through FinetuneConfig fields, not algo_args
    "peft": {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules"},
    "lycoris": {"lora_dim", "linear_dim", "alpha", "linear_alpha", "dropout", "algo"}
    | {"network_module", "bypass_mode", "multiplier", "preset"},
}
LYCORIS_RENAME = {"dora_wd": "weight_decompose", "wd_on_output": "wd_on_out"}


@dataclass(frozen=True)
class FinetuneConfig:
    """What is trained: the whole model (full) or an adapter (peft, lycoris)."""

    method: str = "full"
    """full (a frozen copy is the reference), peft or lycoris (the reference is the same model)."""
    algo: str = "lora"
    """peft: lora, dora. lycoris: lora, dora, loha, lokr, ia3, full, diag-oft. Unused for full."""
    rank: int = 8
    """Adapter rank (lora_dim / r); diag-oft: block size."""
    alpha: float = 16.0
    """Adapter scale numerator: ΔW is scaled by alpha / rank."""
    dropout: float = 0.0
    """Adapter dropout (the trainer's model.disable_dropout sets it to 0 so log-probs match)."""
    target_modules: tuple[str, ...] = LLAMA_TARGETS
    """nn.Linear modules whose path ends with one of these names (Llama/Qwen projections)."""
    target_regex: str = ""
    """Also adapt nn.Linear modules whose full path matches this regex (re.fullmatch)."""
    target_classes: tuple[str, ...] = ()
    """Also adapt the nn.Linear modules inside modules of these classes (e.g. LlamaAttention)."""
    exclude_regex: str = ""
    """Never adapt modules whose path matches this regex (embeddings are never adapted)."""
    bypass: bool | None = None
    """LyCORIS bypass mode; None: on for lora, loha, lokr, ia3 (not DoRA), off otherwise."""
    refresh: str = "copy"
    """Adapter reference refresh: copy (frozen adapter copy; the base never changes)."""
    algo_args: dict[str, Any] = field(default_factory=dict)
    """Extra arguments: peft LoraConfig fields (use_rslora, ...) or LyCORIS create_lycoris
    arguments (factor, dora_wd, use_scalar, rs_lora, constraint, rescaled, ...)."""

    def __post_init__(self) -> None:
        need(self.method in ALGOS, f"finetune.method={self.method!r}: use full, peft or lycoris")
        if self.method == "full":
            return
        valid = ALGOS[self.method]
        need(
            self.algo in valid,
            f"finetune.algo={self.algo!r} with method={self.method}: use one of {', '.join(valid)}",
        )
        need(self.rank >= 1, f"finetune.rank={self.rank}: need >= 1")
        need(self.alpha > 0, f"finetune.alpha={self.alpha}: need > 0")
        need(0 <= self.dropout < 1, f"finetune.dropout={self.dropout}: need 0 <= dropout < 1")
        need(self.refresh == "copy", f"finetune.refresh={self.refresh!r}: use copy")
        need(
            bool(self.target_modules or self.target_regex or self.target_classes),
            "finetune: no targets; set target_modules, target_regex or target_classes",
        )
        for name in ("target_regex", "exclude_regex"):
            try:
                re.compile(getattr(self, name))
            except re.error as e:
                raise ConfigError(f"finetune.{name}={getattr(self, name)!r}: {e}") from None
        if self.method == "lycoris" and self.bypass:
            need(
                self.algo in _BYPASS and not self.dora,
                f"finetune.bypass=true with lycoris algo={self.algo}"
                f"{' (DoRA)' if self.dora else ''}: bypass mode works for lora, loha, lokr and "
                "ia3 without DoRA (lycoris-lora ignores DoRA in bypass); set bypass=false",
            )
        own = _OWN_ARGS[self.method] & set(self.algo_args)
        need(not own, f"finetune.algo_args: set {sorted(own)} through the finetune fields")
        if self.method == "peft":
            need(
                self.algo_args.get("bias", "none") == "none",
                "finetune.algo_args.bias: only 'none' (trained base biases would leak into "
                "the disabled-adapter reference)",
            )

    @property
    def dora(self) -> bool:
        """Whether the method decomposes weights (DoRA: algo "dora" or algo_args.dora_wd)."""
        return self.algo == "dora" or bool(self.algo_args.get("dora_wd", False))

    @property
    def use_bypass(self) -> bool:
        """Whether LyCORIS runs in bypass mode (`bypass`, or the algorithm's default)."""
        if self.bypass is not None:
            return self.bypass
        return self.algo in _BYPASS and not self.dora


def require_extra(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"finetune.method={extra} needs the optional extra: pip install 'grpo-ar[{extra}]'"
        ) from None


def resolve_targets(model: Any, cfg: FinetuneConfig) -> list[str]:
    """Full paths of the nn.Linear modules to adapt (embeddings never)."""
    skip = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    inside: set[int] = set()
    for _name, m in model.named_modules():
        if type(m).__name__ in cfg.target_classes:
            inside.update(id(sub) for sub in m.modules())
    linears = [
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in skip
    ]
    out = [
        n
        for n, m in linears
        if any(n == t or n.endswith("." + t) for t in cfg.target_modules)
        or (cfg.target_regex and re.fullmatch(cfg.target_regex, n))
        or id(m) in inside
    ]
    if cfg.exclude_regex:
        out = [n for n in out if not re.fullmatch(cfg.exclude_regex, n)]
    if not out:
        names = sorted({n.split(".")[-1] for n, _ in linears})
        raise ConfigError(
            f"finetune targets matched no nn.Linear of {type(model).__name__}; its Linear "
            f"names are {', '.join(names)}: set finetune.target_modules / target_regex / "
            "target_classes"
        )
    return out


class AdaptedLM(nn.Module):
    """One module holding a transformers causal LM and its adapter, so `parameters()` sees the
    adapter; calls and unknown attributes (config, generation_config, get_output_embeddings,
    generate, ...) go to the language model."""

    lm: Any  # the transformers model or its peft wrapper (its methods, not only Module's)
    hf: Any  # in __dict__: the plain transformers model

    def __init__(self, lm: nn.Module, hf: nn.Module, network: nn.Module | None = None) -> None:
        super().__init__()
        self.lm = lm  # what is called: the transformers model or its peft wrapper
        self.network = network  # the LyCORIS network (its modules patch lm's Linears)
        self.__dict__["hf"] = hf  # the plain transformers model (not registered twice)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.lm(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or "hf" not in self.__dict__:
                raise
            return getattr(self.__dict__["hf"], name)


@functools.lru_cache(maxsize=16)
def _adapted_class(cls: type) -> type:
    """An AdaptedLM whose forward shows the signature of `cls.forward`: the sampler and scorer
    read it (logits_to_keep, the cache argument) to pick their fast paths, as for the bare model."""

    def forward(self: AdaptedLM, *args: Any, **kwargs: Any) -> Any:
        return self.lm(*args, **kwargs)

    forward.__signature__ = inspect.signature(cls.forward)  # type: ignore[attr-defined]
    return type(f"Adapted{cls.__name__}", (AdaptedLM,), {"forward": forward})


def wrap_adapted(lm: nn.Module, hf: nn.Module, network: nn.Module | None = None) -> AdaptedLM:
    return _adapted_class(type(hf))(lm, hf, network)  # type: ignore[arg-type]  # classes hash


class Finetune:
    """Full fine-tuning: the model itself is trained; the reference is a frozen copy."""

    method = "full"

    def __init__(self, model: nn.Module, need_reference: bool) -> None:
        self.model = model
        self.reference: Any = FrozenCopy(model) if need_reference else None

    def state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        load_tied_state_dict(self.model, sd)

    def checkpoint_weights(self) -> nn.Module | dict[str, Tensor]:
        """What a checkpoint's model.safetensors holds (a module: tied weights stored once)."""
        return self.model

    def load_checkpoint_weights(self, path: str | Path) -> None:
        load_weights(self.model, path)

    def export(self, out_dir: str | Path) -> None:
        """A plain transformers folder (AutoModelForCausalLM.from_pretrained)."""
        self.model.save_pretrained(out_dir)  # type: ignore[operator]  # a transformers model


class AdapterFinetune(Finetune):
    """An adapter on a frozen base; the reference (an AdapterReference) is the same model."""

    model: AdaptedLM

    def __init__(self, model: AdaptedLM, cfg: FinetuneConfig, need_reference: bool) -> None:
        self.model, self.cfg, self.method = model, cfg, cfg.method
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self._names or not frozen:
            raise RuntimeError(f"{cfg.method}: the adapter has no trainable or no frozen tensors")
        self.reference = AdapterReference(self) if need_reference else None

    def adapter_off(self) -> contextlib.AbstractContextManager[None]:
        """Context in which `model` computes the base model exactly (per backend)."""
        raise NotImplementedError

    def trainable(self) -> dict[str, nn.Parameter]:
        """The adapter's tensors by name in `model`."""
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self._names}

    def state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.trainable().items()}

    def checkpoint_weights(self) -> dict[str, Tensor]:
        """Only the adapter tensors: the base is the model.path the config names."""
        return self.state_dict()

    def load_checkpoint_weights(self, path: str | Path) -> None:
        self.load_state_dict(load_tensors(path))

    @torch.no_grad()
    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        params = self.trainable()
        if set(sd) != set(params):
            extra, missing = sorted(set(sd) - set(params)), sorted(set(params) - set(sd))
            raise ValueError(
                f"adapter tensors do not fit this {self.method} adapter (check the finetune "
                f"config): missing {missing[:3]}, unexpected {extra[:3]}"
            )
        for n, p in params.items():
            p.copy_(sd[n])

    def mix_refusal(self) -> str | None:
        return f"{self.method} {self.cfg.algo}: the adapted weight is a product of its tensors"

    def identity(self) -> dict[str, Tensor]:
        raise NotImplementedError
