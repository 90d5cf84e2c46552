"""The ADAPTERS registry, the config's adapter section, how a registering module is imported,
idempotent re-registration, the sampling contract and the samples.jsonl summary hook."""

import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from grpo_ar import ConfigError, SamplingParams, load_config, per_sample
from grpo_ar.adapters import ADAPTERS, Adapter, register_adapter
from grpo_ar.config import config_to_dict
from grpo_ar.rewards import RewardRegistry

MODULE = '''
from dataclasses import dataclass

from grpo_ar.adapters import register_adapter


@dataclass(frozen=True)
class {cls}:
    """[{name}]"""

    width: int = 3
    """A made-up setting."""


@register_adapter("{name}", {cls})
def build(config, section, device, dtype):
    """Never called here."""
    raise AssertionError("not built in these tests")
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module registering adapter `name` in tmp_path; sys.path and sys.modules restored."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    written = []

    def write(module: str, name: str) -> str:
        (tmp_path / f"{module}.py").write_text(MODULE.format(cls="SketchConfig", name=name))
        written.append(module)
        return str(tmp_path)

    yield write
    for module in written:
        sys.modules.pop(module, None)
    for name in [n for n in ADAPTERS if n.startswith("sketch")]:
        ADAPTERS._fns.pop(name)  # the registry is global: leave it as it was


def test_builtin_adapters_are_registered_with_their_sections():
    assert {"text", "image", "video"} <= set(ADAPTERS)
    assert ADAPTERS["text"].config_cls is None
    assert ADAPTERS["image"].config_cls.__name__ == "ImageConfig"
    assert ADAPTERS["video"].config_cls.__name__ == "VideoConfig"
    with pytest.raises(KeyError, match="unknown adapter 'audio'; valid names: .*image, .*text"):
        ADAPTERS["audio"]


def test_a_module_registers_an_adapter_and_its_section_is_parsed(user_module, tmp_path):
    folder = user_module("sketch_mod", "sketch")
    cfg = load_config(
        None,
        [
            "model.adapter=sketch",
            "model.adapter_module=sketch_mod",
            f"model.adapter_path={folder}",
            "sketch.width=5",
        ],
    )
    assert cfg.adapter_config.width == 5 and cfg.adapter_section is cfg.adapter_config
    d = config_to_dict(cfg)
    assert d["sketch"] == {"width": 5} and "adapter_config" not in d
    with pytest.raises(ConfigError, match="unknown key sketch.height; valid keys of sketch: width"):
        load_config(None, ["model.adapter=sketch", "model.adapter_module=sketch_mod",
                           f"model.adapter_path={folder}", "sketch.height=1"])  # fmt: skip
    # another adapter's table, or one nobody registered, is refused naming the valid tables
    with pytest.raises(ConfigError, match=r"unknown key sketch \(\[sketch\] configures adapter"):
        load_config(None, ["sketch.width=5"])
    with pytest.raises(ConfigError, match="unknown key sketchy; valid keys: algorithm, data"):
        load_config(None, ["sketchy.width=5"])


def test_the_working_directory_is_searched_only_when_named(user_module, tmp_path, monkeypatch):
    user_module("sketch_cwd", "sketch_cwd")
    monkeypatch.chdir(tmp_path)
    sys.path.insert(0, "")  # as under `python -m`: the working directory on sys.path
    over = ["model.adapter=sketch_cwd", "model.adapter_module=sketch_cwd"]
    with pytest.raises(ConfigError, match="working directory is not searched unless named"):
        load_config(None, over)
    assert "" in sys.path  # restored after the import
    cfg = load_config(None, [*over, "model.adapter_path=."])
    assert cfg.model.adapter == "sketch_cwd" and cfg.adapter_config.width == 3


def test_an_unregistered_adapter_name_says_how_to_register_it(user_module):
    folder = user_module("sketch_other", "sketch_other")
    with pytest.raises(ConfigError, match="needs model.adapter_module"):
        load_config(None, ["model.adapter=sketch_other"])
    with pytest.raises(ConfigError, match=r"model.adapter_module='sketch_other' registered no 'x'"):
        load_config(None, ["model.adapter=x", "model.adapter_module=sketch_other",
                           f"model.adapter_path={folder}"])  # fmt: skip


def test_registering_the_same_builder_twice_is_idempotent_another_is_refused():
    @dataclass(frozen=True)
    class SketchTwiceConfig:
        width: int = 3

    def make():
        def build_sketch(config, section, device, dtype):
            return None, None

        return build_sketch

    try:
        register_adapter("sketch_twice", SketchTwiceConfig)(make())
        register_adapter("sketch_twice", SketchTwiceConfig)(make())  # a re-run: same code
        assert ADAPTERS["sketch_twice"].config_cls is SketchTwiceConfig

        def build_other(config, section, device, dtype):
            return None, None

        with pytest.raises(ValueError, match="'sketch_twice' is already registered"):
            register_adapter("sketch_twice", SketchTwiceConfig)(build_other)
    finally:
        ADAPTERS._fns.pop("sketch_twice", None)


def test_reward_registration_is_idempotent_for_the_same_function_only():
    reg = RewardRegistry()
    source = textwrap.dedent(
        """
        @per_sample
        def near(x, *, target: float, scale: float = 1.0) -> float:
            return -abs(x - target) / scale
        """
    )
    first, second = {"per_sample": per_sample}, {"per_sample": per_sample}
    exec(compile(source, "cell.py", "exec"), first)  # a notebook cell run twice
    exec(compile(source, "cell.py", "exec"), second)
    assert first["near"] is not second["near"]
    reg.register("near")(first["near"])
    reg.register("near")(second["near"])
    assert reg["near"].obj is second["near"] and reg["near"].required == ("target",)

    @per_sample
    def near(x, *, target: float, scale: float = 2.0) -> float:  # same name, other defaults
        return -abs(x - target) / scale

    with pytest.raises(ValueError, match="reward 'near' is already registered"):
        reg.register("near")(near)

    @per_sample
    def other(x, *, target: float) -> float:
        return 0.0

    with pytest.raises(ValueError, match="reward 'near' is already registered"):
        reg.register("near")(other)


class Waves(Adapter):
    def encode(self, entries):
        raise NotImplementedError

    def decode(self, rollout):
        raise NotImplementedError


def test_summarize_is_short_json():
    ad = Waves(SamplingParams())
    assert ad.summarize("12 + 3 = 15") == "12 + 3 = 15"
    assert ad.summarize(np.zeros(940)) == {"shape": [940], "dtype": "float64"}
    assert ad.summarize(torch.zeros(2, 3, dtype=torch.uint8)) == {"shape": [2, 3], "dtype": "uint8"}
    assert ad.summarize(torch.tensor(0.5)) == 0.5
    assert ad.summarize({"wave": np.zeros(3), "ok": True}) == {
        "wave": {"shape": [3], "dtype": "float64"},
        "ok": True,
    }
    assert ad.summarize(list(range(100))) == {"list": 100}
    assert ad.summarize(float("nan")) is None
    assert len(ad.summarize(object())) <= 80


def test_image_adapter_summarize_gives_the_image_size():
    from PIL import Image

    from grpo_ar.adapters import ImageAdapter

    pil = Image.new("RGB", (12, 8))
    # unbound: summarize reads only the output
    assert ImageAdapter.summarize(None, pil) == {"image": [8, 12]}
    assert ImageAdapter.summarize(None, torch.zeros(8, 12, 3, dtype=torch.uint8)) == {
        "image": [8, 12]
    }
    assert ImageAdapter.summarize(None, torch.zeros(3, 8, 12)) == {"image": [8, 12]}


def test_impose_refuses_only_keys_the_user_set_otherwise():
    fixed = {"max_new_tokens": (256, "the image grid 16x16 = 256 tokens")}
    assert SamplingParams().impose(fixed).max_new_tokens == 256  # default: derived
    assert SamplingParams(max_new_tokens=256).impose(fixed).max_new_tokens == 256  # agrees
    kept = SamplingParams(temperature=0.7).impose(fixed)
    assert kept.temperature == 0.7  # what the adapter does not fix stays the user's
    with pytest.raises(
        ConfigError,
        match=r"^sampling.max_new_tokens=5 conflicts with the image grid 16x16 = 256 tokens; "
        "remove it",
    ):
        SamplingParams(max_new_tokens=5).impose(fixed)
    ranges = {"allowed_ranges": (((8, 24),), "the codebook range [8, 24)")}
    assert SamplingParams(allowed_ranges=((8, 24),)).impose(ranges).allowed_ranges == ((8, 24),)
    with pytest.raises(ConfigError, match=r"allowed_ranges=\[\[0, 24\]\] conflicts"):
        SamplingParams(allowed_ranges=((0, 24),)).impose(ranges)


def test_an_installed_entry_point_registers_its_adapter(user_module, tmp_path):
    folder = user_module("sketch_ep_pkg", "sketch_ep")
    info = tmp_path / "sketch_ep-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sketch-ep\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[grpo_ar.adapters]\nsketch_ep = sketch_ep_pkg\n")
    sys.path.insert(0, folder)  # as if installed: on sys.path with its metadata
    assert "sketch_ep" not in ADAPTERS._fns
    cfg = load_config(None, ["model.adapter=sketch_ep", "sketch_ep.width=7"])
    assert cfg.adapter_config.width == 7 and ADAPTERS["sketch_ep"].config_cls.__name__ == (
        "SketchConfig"
    )


class SixDigits(Adapter):
    """Fixes six digits of output; everything else of `sampling` is the user's."""

    def __init__(self, sampling):
        fixed = {
            "max_new_tokens": (6, "six digits"),
            "allowed_ranges": (((0, 10),), "the digits [0, 10)"),
        }
        super().__init__(sampling.impose(fixed))

    def encode(self, entries):
        raise NotImplementedError

    def decode(self, rollout):
        raise NotImplementedError


def test_the_trainer_uses_the_adapters_sampling_and_refuses_an_ignored_key(tmp_path):
    from grpo_ar import Trainer, load_rows, register_reward
    from tiny import tiny_llama

    @register_reward("sketch_zero")
    @per_sample
    def sketch_zero(digits) -> float:
        return 0.0

    rows = load_rows([{"prompt": 1, "rewards": {"sketch_zero": {}}}])
    over = [f"log.run_dir={tmp_path}", "sampling.temperature=0.7", "trainer.batch_size=1"]
    cfg = load_config(None, over)
    model = tiny_llama(vocab_size=12)
    tr = Trainer(cfg, model, SixDigits(cfg.sampling), rows)
    # what config.yaml will record: the user's temperature and the adapter's fixed keys
    assert tr.cfg.sampling == SamplingParams(
        temperature=0.7, max_new_tokens=6, allowed_ranges=((0, 10),)
    )
    with pytest.raises(
        ConfigError, match="sampling.temperature=0.7 but the adapter samples with 1.0"
    ):
        Trainer(cfg, model, SixDigits(SamplingParams()), rows)  # built without the config's
