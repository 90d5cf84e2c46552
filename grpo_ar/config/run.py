"""Run configuration: frozen dataclasses per concern, loaded from TOML/YAML plus `--set a.b=c`.

Every field is validated where it is defined; unknown keys fail naming the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import ConfigError, need
from ..finetune.base import FinetuneConfig
from ..generation.params import SamplingParams
from .algorithm import AlgorithmConfig
from .environment import EnvironmentConfig
from .modality import ImageConfig, VideoConfig
from .rollout import RolloutConfig


class _Loader(yaml.SafeLoader):
    """YAML with "3e-3" read as a float (YAML 1.1 wants "3.0e-3")."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


_need = need


@dataclass(frozen=True)
class ModelConfig:
    """Which model, and how it is loaded."""

    path: str = ""
    """Local folder or hub id of a transformers model (empty when the script builds the model)."""
    adapter: str = "text"
    """Modality adapter, a name in grpo_ar.adapters.ADAPTERS: text, image, video, or one a
    module registers (model.adapter_module); its own section ([image], [video], ...) configures
    it."""
    adapter_module: str = ""
    """Module imported first that registers model.adapter (e.g. "audio_tones.tones"); a config
    is trusted like code. Found on sys.path, not in the working directory unless adapter_path
    names it."""
    adapter_path: str = ""
    """Folder put first on sys.path to import adapter_module from (e.g. "examples/audio_tones",
    or "." for the working directory); relative to the working directory."""
    precision: str = ""
    """fp32, bf16-mixed, fp16-mixed or bf16-true (Lightning's names). Mixed: fp32 master weights
    and optimizer state, autocast compute, log-probs and losses in fp32 (fp16-mixed adds a
    gradient scaler). bf16-true: bf16 weights updated directly (updates below bf16's resolution
    are lost). Empty: taken from model.dtype (float32 -> fp32, bfloat16 -> bf16-true)."""
    dtype: str = "float32"
    """Parameter (storage) dtype: float32 (default), bfloat16 or float16. The older key; set
    model.precision instead, which fixes it (mixed precisions keep float32 weights)."""
    attn_implementation: str = ""
    """Attention kernel passed to from_pretrained: sdpa, eager, flash_attention_2, flex_attention
    (empty: transformers' default, sdpa where the model supports it)."""
    device: str = "auto"
    """auto (cuda when present), cpu, cuda, cuda:N."""
    chat_template: bool | None = None
    """None: chat template for message prompts only; true: for every prompt; false: never."""
    system_prompt: str | None = None
    """System message prepended to chat prompts."""
    max_prompt_tokens: int | None = None
    """Refuse prompts longer than this (None = no limit)."""
    disable_dropout: bool = True
    """Set dropout to 0 so the log-probs of a training pass match the sampler's."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""

    def __post_init__(self) -> None:
        from ..adapters.registry import ADAPTERS, import_adapter_module  # it reads config.modality

        if self.adapter_module:
            import_adapter_module(self.adapter_module, self.adapter_path)
        _need(
            self.adapter in ADAPTERS,
            f"model.adapter={self.adapter!r}: use one of {', '.join(sorted(ADAPTERS))}"
            + (
                f" (model.adapter_module={self.adapter_module!r} registered no {self.adapter!r})"
                if self.adapter_module
                else "; an adapter registered outside grpo_ar needs model.adapter_module"
            ),
        )
        _need(
            self.dtype in ("float32", "bfloat16", "float16"),
            f"model.dtype={self.dtype!r}: use float32, bfloat16 or float16",
        )
        self._resolve_precision()
        _need(
            self.max_prompt_tokens is None or self.max_prompt_tokens >= 1,
            f"model.max_prompt_tokens={self.max_prompt_tokens}: need >= 1 (or leave it unset)",
        )

    @property
    def compute_dtype(self) -> str:
        """The dtype the forwards run in: the storage dtype, or the autocast one of a mixed
        precision (what a rollout engine with rollout.dtype = auto runs)."""
        mixed = {"bf16-mixed": "bfloat16", "fp16-mixed": "float16"}
        return mixed.get(self.precision, self.dtype)

    def _resolve_precision(self) -> None:
        """model.precision and model.dtype made consistent: precision fixes the storage dtype;
        an unset precision is read from the older model.dtype key."""
        from_dtype = {"float32": "fp32", "bfloat16": "bf16-true", "float16": "fp16-true"}
        if not self.precision:
            object.__setattr__(self, "precision", from_dtype[self.dtype])
            return
        storage = PRECISION_STORAGE.get(self.precision)
        _need(
            storage is not None and self.precision != "fp16-true",
            f"model.precision={self.precision!r}: use fp32, bf16-mixed, fp16-mixed or bf16-true",
        )
        _need(
            self.dtype in ("float32", storage),
            f"model.dtype={self.dtype} contradicts model.precision={self.precision} (whose "
            f"weights are {storage}): drop model.dtype, model.precision decides it",
        )
        object.__setattr__(self, "dtype", storage)


# model.precision -> the dtype the weights are stored (and updated) in; fp16-true is only what
# the older `model.dtype = "float16"` meant, kept so such configs and checkpoints still load
PRECISION_STORAGE = {
    "fp32": "float32",
    "bf16-mixed": "float32",
    "fp16-mixed": "float32",
    "bf16-true": "bfloat16",
    "fp16-true": "float16",
}


_ZERO_MEANS = {
    "threads": "torch's default",
    "save_every": "only at the end",
    "eval_every": "start and end",
}


@dataclass(frozen=True)
class TrainerConfig:
    """The seed's loop sizes (BS, Iters, Steps, grad accumulation) and the optimizer."""

    batch_size: int = 8
    """BS: entries (prompts) per GRPO step; each yields group_size samples."""
    iterations: int = 1
    """Iters: outer iterations; the reference is refreshed and reward hooks run after each."""
    steps: int = 100
    """Steps: total GRPO steps over all iterations (steps / iterations per iteration)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; batch_size must divide by it."""
    lr: float = 1e-6
    """Peak learning rate."""
    lr_schedule: str = "constant"
    """constant, linear (decay to 0) or cosine, after warmup."""
    warmup_steps: int = 0
    """Linear warmup, in optimizer steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 = off)."""
    optimizer: str = "torch.optim.AdamW"
    """Import path of a torch.optim-style optimizer class (e.g. a SOAP implementation)."""
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    """Extra constructor arguments of the optimizer (betas, eps, ...)."""
    seed: int = 0
    """Seeds data order, sampling and initialisation."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    eval_every: int = 0
    """Evaluate on held-out entries every N steps (0 = only at start and end when given)."""
    threads: int = 0
    """CPU threads for torch (0 = torch's default); 1 is often fastest on a loaded machine."""
    micro_batch_tokens: int = 0
    """Token budget per micro-batch (rows x trimmed prompt+completion width; whole groups,
    longest first); replaces grad_accum's equal split when > 0. The loss is unchanged."""
    packing: str = "auto"
    """Completion layout of the scoring passes: mask (completions back to back after the shared
    prompt's KV cache under a 4D mask: sdpa, eager), position_ids (full sequences in one row,
    position ids restarting, no mask: flash-attention's cu_seqlens path), off (padded rows), or
    auto (position_ids under a flash kernel, else mask). Checked against padding once per model."""
    strategy: str = "auto"
    """Data parallelism under torchrun: none, ddp, fsdp2 (fully_shard per decoder layer), or
    auto (ddp with several processes, else none). grad_accum splits each rank's share."""
    dist_timeout_s: float = 300.0
    """Under torchrun: seconds a collective waits for the other ranks before the job stops
    with an error (a stopped or hanging rank; gloo's own default is 30 minutes)."""

    def __post_init__(self) -> None:
        _need(self.batch_size >= 1, f"trainer.batch_size={self.batch_size}: need >= 1")
        _need(self.grad_accum >= 1, f"trainer.grad_accum={self.grad_accum}: need >= 1")
        _need(
            self.batch_size % self.grad_accum == 0,
            f"trainer.batch_size={self.batch_size} is not divisible by trainer.grad_accum={self.grad_accum}",
        )
        _need(
            self.micro_batch_tokens >= 0,
            f"trainer.micro_batch_tokens={self.micro_batch_tokens}: need >= 0 (0 = off)",
        )
        _need(self.iterations >= 1, f"trainer.iterations={self.iterations}: need >= 1")
        _need(
            self.steps >= self.iterations and self.steps % self.iterations == 0,
            f"trainer.steps={self.steps} must be a positive multiple of trainer.iterations="
            f"{self.iterations} (steps per iteration = steps / iterations)",
        )
        _need(math.isfinite(self.lr) and self.lr > 0, f"trainer.lr={self.lr}: need > 0 and finite")
        for key in ("weight_decay", "max_grad_norm", "dist_timeout_s"):
            v = getattr(self, key)
            _need(math.isfinite(v) and v >= 0, f"trainer.{key}={v}: need a finite >= 0")
        _need(self.dist_timeout_s > 0, "trainer.dist_timeout_s must be > 0")
        for key in _ZERO_MEANS:
            v = getattr(self, key)
            _need(v >= 0, f"trainer.{key}={v}: need >= 0 (0 = {_ZERO_MEANS[key]})")
        _need(
            self.packing in ("auto", "mask", "position_ids", "off"),
            f"trainer.packing={self.packing!r}: use auto, mask, position_ids or off",
        )
        _need(
            self.strategy in ("auto", "none", "ddp", "fsdp2"),
            f"trainer.strategy={self.strategy!r}: use auto, none, ddp, fsdp2",
        )
        _need(
            self.lr_schedule in ("constant", "linear", "cosine"),
            f"trainer.lr_schedule={self.lr_schedule!r}: use constant, linear or cosine",
        )
        _need(
            self.warmup_steps >= 0 and self.max_grad_norm >= 0,
            "trainer.warmup_steps and trainer.max_grad_norm must be >= 0",
        )

    @property
    def steps_per_iteration(self) -> int:
        return self.steps // self.iterations


@dataclass(frozen=True)
class DataConfig:
    """Where entries come from and which rewards score them."""

    train: str = ""
    """JSONL file, or hf:NAME[:SPLIT] (empty when the script passes entries)."""
    eval: str = ""
    """Held-out entries, same formats (optional)."""
    prompt_field: str = "prompt"
    """Row field holding the prompt."""
    rewards: list[dict[str, Any]] = field(default_factory=list)
    """Default reward specs for rows without a `rewards` field; args "$field" read the row."""
    reward_setup: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Run-level arguments of reward classes, by reward name (e.g. the judge model path)."""
    eval_size: int = 0
    """Evaluate on at most this many held-out entries (0 = all)."""
    eval_batch_size: int = 32
    """Prompts per batch during evaluation."""
    reward_max_failed_frac: float = 0.5
    """Stop the run when more than this fraction of a rank's samples in one step got no reward
    (the reward raised or returned no number); 1 = never stop, train on what scored."""

    def __post_init__(self) -> None:
        f = self.reward_max_failed_frac
        _need(0 <= f <= 1, f"data.reward_max_failed_frac={f}: need a fraction in [0, 1]")
        _need(self.eval_size >= 0, f"data.eval_size={self.eval_size}: need >= 0")
        _need(self.eval_batch_size >= 1, f"data.eval_batch_size={self.eval_batch_size}: need >= 1")


@dataclass(frozen=True)
class LogConfig:
    """Run directory and what is written there."""

    run_dir: str = "runs/grpo"
    """Output folder: config.yaml, metrics.jsonl, samples.jsonl, checkpoints/."""
    overwrite: bool = False
    """A new run into a run_dir that holds a run deletes that run's files (metrics, samples,
    checkpoints; nothing else of the folder) instead of refusing to start (CLI: --overwrite)."""
    samples_per_step: int = 4
    """Completions written to samples.jsonl per step."""
    progress: bool = True
    """Show a progress bar with the live reward."""
    keep_checkpoints: int = 2
    """Keep the newest N checkpoints (0 = all)."""
    report_to: tuple[str, ...] = ()
    """Experiment trackers fed besides the JSONL files: tensorboard, wandb, trackio, mlflow
    (each an optional extra, e.g. `pip install grpo-ar[tensorboard]`; grpo_ar/io/trackers.py)."""
    project: str = "grpo_ar"
    """Tracker project (wandb/trackio project, mlflow experiment)."""
    run_name: str = ""
    """Tracker run name ("" = the run directory's name)."""
    metric_names: str = "grpo_ar"
    """Metric names sent to trackers: grpo_ar, trl or verl (README table; JSONL keeps grpo_ar's)."""
    tracker_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Extra keyword arguments per tracker, e.g. {wandb = {mode = "offline", entity = "me"}}."""
    progress_every: int = 0
    """Without a terminal: one plain progress line every N steps (0 = about 20 lines a run)."""

    def __post_init__(self) -> None:
        if self.metric_names not in ("grpo_ar", "trl", "verl"):
            raise ConfigError(f"log.metric_names={self.metric_names!r}; use grpo_ar, trl or verl")
        if self.progress_every < 0:
            raise ConfigError(f"log.progress_every={self.progress_every} must be >= 0")


@dataclass(frozen=True)
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    environment: EnvironmentConfig = field(default_factory=EnvironmentConfig)
    adapter_config: Any = None
    """The section of a registered adapter that has no field here (e.g. [tones]), parsed by
    its config class; written to config.yaml under the adapter's name."""

    @property
    def adapter_section(self) -> Any:
        """The selected adapter's own section: [image] / [video] or `adapter_config`."""
        name = self.model.adapter
        return getattr(self, name) if name in _FIELDS else self.adapter_config

    def __post_init__(self) -> None:
        if self.sampling.tree.enabled:  # the trees must make exactly group_size leaves
            try:
                self.sampling.tree.roots(self.algorithm.group_size)
            except ValueError as e:
                raise ConfigError(f"{e} (algorithm.group_size)") from None
        if self.environment.enabled:
            self._check_multiturn()
        if self.rollout.backend == "vllm":  # before any model or engine loads
            from ..generation.vllm_backend import check_config

            check_config(self)

    def _check_multiturn(self) -> None:
        """[environment] runs multi-turn text rollouts: a text model, sampling they support."""
        from ..generation.multiturn import check_params

        name = self.environment.name
        if self.model.adapter != "text":
            raise ConfigError(
                f'environment.name={name!r} needs model.adapter = "text" (multi-turn rollouts '
                f"are text), got {self.model.adapter!r}"
            )
        # the tokenizer's EOS ends a turn when sampling.eos_token_ids is empty
        sampling = dataclasses.replace(
            self.sampling, eos_token_ids=self.sampling.eos_token_ids or (0,)
        )
        try:
            check_params(sampling)
        except ValueError as e:
            raise ConfigError(f"sampling: {e} (environment.name={name!r})") from None


_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "adapter_config")


def _build_config(raw: Any) -> Config:
    """[model] first (it may import the module registering its adapter), then the rest; the
    adapter's own table when Config has no field for it (its registered config class)."""
    from ..adapters.registry import ADAPTERS

    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a table/mapping, got {type(raw).__name__}")
    raw = dict(raw)
    model = _build(ModelConfig, raw.pop("model", {}), "model")
    spec = ADAPTERS[model.adapter]
    own = spec.name if spec.config_cls is not None and spec.name not in _FIELDS else None
    for key in sorted(set(raw) - set(_FIELDS) - {own}):
        other = (
            f" ([{key}] configures adapter {key!r}, not {model.adapter!r})"
            if key in ADAPTERS
            else ""
        )
        valid = ", ".join(sorted([*_FIELDS, *([own] if own else [])]))
        raise ConfigError(f"unknown key {key}{other}; valid keys: {valid}")
    section = _build(spec.config_cls, raw.pop(own, {}), own) if own else None
    return dataclasses.replace(_build(Config, raw, ""), model=model, adapter_config=section)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a table/mapping, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {where + '.' if where else ''}{unknown[0]}; valid keys"
            f"{' of ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    hints = get_type_hints(cls)
    kw = {}
    for name, value in raw.items():
        sub = hints[name]
        key = f"{where}.{name}" if where else name
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            kw[name] = _build(sub, value, key)
        else:
            kw[name] = _coerce(value, sub, key)
    try:
        return cls(**kw)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Type checks with light conversions: tuples from lists, floats from ints and numeric
    strings; Optional unwrapped; mappings and lists checked as such."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key) if len(inner) == 1 else value
    if value is None:
        raise ConfigError(f"{key} may not be empty")
    if hint is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table/mapping, got {value!r}")
        return value
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    base = {int: int, float: float, str: str, bool: bool}.get(hint)
    if base is not None and (
        not isinstance(value, base) or (base is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{key} must be {base.__name__}, got {value!r}")
    return value


def _parse_value(text: str, item: str) -> Any:
    try:
        return _yaml(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(
            f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)}); "
            "quote a string value, e.g. --set 'key=\"text: more\"'"
        ) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b=c` strings (values parsed as YAML scalars/lists) into a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        path, value = item.split("=", 1)
        node = raw
        keys = path.strip().split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k} is not a table")
        node[keys[-1]] = _parse_value(value, item)
    return raw


def read_raw(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    if p.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"config file {p}: use .toml, .yaml or .yml")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    if p.suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            line = re.search(r"at line (\d+)", str(e))
            raise ConfigError(f"{p}{':' + line[1] if line else ''}: not valid TOML: {e}") from None
    try:
        raw = _yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{at}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must map section names to tables")
    return raw


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Config from a file (TOML/YAML) and `key.path=value` overrides, validated."""
    raw = dict(base or {})
    for k, v in read_raw(path).items():
        raw[k] = (
            {**raw.get(k, {}), **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
        )
    return _build_config(apply_overrides(raw, list(overrides or [])))


def with_sampling(cfg: Config, sampling: SamplingParams) -> Config:
    """`cfg` with the sampling parameters a run actually uses (its adapter's); refuses a
    `[sampling]` key the user set that the adapter does not sample with (ignored silently,
    it would be recorded in config.yaml as used)."""
    for key, value in cfg.sampling.changed().items():
        if getattr(sampling, key) != value:
            raise ConfigError(
                f"sampling.{key}={value!r} but the adapter samples with {getattr(sampling, key)!r}; "
                "build the adapter from config.sampling, or remove the key"
            )
    return dataclasses.replace(cfg, sampling=sampling)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML."""

    def plain(x: Any) -> Any:
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    out = plain(dataclasses.asdict(cfg))
    if isinstance(cfg, Config):  # the adapter's own table under its name, as it was read
        section = out.pop("adapter_config")
        if section is not None:
            out[cfg.model.adapter] = section
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
