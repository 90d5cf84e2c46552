"""`[rollout] backend = "vllm"` with the adapters a vLLM engine cannot sample (Janus' image call,
the forced per-position layouts of Chameleon and Emu3): one ConfigError naming the option and
the fix, raised from the config before any model loads, from the built adapter before any
engine starts, and never after importing vllm (these tests fail on any `import vllm`)."""

from __future__ import annotations

import sys
from dataclasses import replace
from importlib.abc import MetaPathFinder

import pytest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))

from test_janus import PROMPTS, janus_tokenizer, tiny_janus  # noqa: E402
from vocab_models import emu3_tokenizer, tiny_emu3  # noqa: E402

from grpo_ar.adapters.emu3 import Emu3ImageAdapter  # noqa: E402
from grpo_ar.adapters.janus import JanusT2IAdapter  # noqa: E402
from grpo_ar.adapters.vq import Emu3VQ  # noqa: E402
from grpo_ar.cli import main  # noqa: E402
from grpo_ar.config import ConfigError, load_config  # noqa: E402
from grpo_ar.io.data import load_rows  # noqa: E402
from grpo_ar.train.trainer import Trainer  # noqa: E402

FIX = 'use rollout.backend = "builtin"'
LAYOUT = "forces tokens at fixed positions (sampling.position_ranges)"
WHY = {
    "janus_t2i": 'model call "janus_image"',
    "chameleon": LAYOUT,
    "emu3": LAYOUT,
}
SECTION = {"chameleon": ["chameleon.decoder_path=/nowhere/decoder.safetensors"]}


class NoVllm(MetaPathFinder):
    """Fails the test on any attempt to import vllm (installed or not)."""

    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise AssertionError(f"{name} imported before the refusal")
        return None


@pytest.fixture(autouse=True)
def no_vllm(monkeypatch):
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [NoVllm(), *sys.meta_path])


@pytest.mark.parametrize("mode", ["colocate", "server"])
@pytest.mark.parametrize("adapter", list(WHY))
def test_config_with_an_image_adapter_is_refused_before_loading(adapter, mode):
    """Refused by load_config (the model is only read after it), with CFG on as these runs
    use it: one error, about the adapter, which no sampling change would fix."""
    sets = [f"model.adapter={adapter}", "rollout.backend=vllm", f"rollout.vllm_mode={mode}"]
    sets += ["sampling.cfg_scale=3.0", *SECTION.get(adapter, [])]
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    msg = str(err.value)
    assert msg.startswith(f'rollout.backend = "vllm" cannot sample model.adapter = "{adapter}"')
    assert WHY[adapter] in msg and msg.endswith(FIX)
    assert "cfg_scale" not in msg
    load_config(None, [s.replace("=vllm", "=builtin") for s in sets])  # the fix it names


def test_cli_train_exits_2_with_the_refusal_and_loads_nothing(tmp_path, capsys):
    """`grpo-ar train` with janus_t2i and vllm: exit 2 and the message, although model.path
    and data.train do not exist (they would be the first things read after the config)."""
    config = tmp_path / "janus_vllm.toml"
    config.write_text(
        f'[model]\nadapter = "janus_t2i"\npath = "{tmp_path / "absent"}"\n'
        f'[rollout]\nbackend = "vllm"\n[data]\ntrain = "{tmp_path / "absent.jsonl"}"\n'
        f'[log]\nrun_dir = "{tmp_path / "run"}"\n'
    )
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grpo-ar: error: ") and 'model call "janus_image"' in err
    assert not (tmp_path / "run" / "config.yaml").exists()


def _trainer_with(tmp_path, model, adapter, mode="server"):
    """A Trainer built from Python with the vLLM backend (model.adapter left at its default:
    the config cannot know the adapter; the backend's own check must)."""
    cfg = load_config(
        None,
        [
            "rollout.backend=vllm", f"rollout.vllm_mode={mode}", "rollout.port=9",
            "trainer.batch_size=2", "algorithm.group_size=2", f"log.run_dir={tmp_path}",
            "log.progress=false",
        ],
    )  # fmt: skip
    adapter.sampling = replace(adapter.sampling, **{"cfg_scale": 1.0})
    rows = load_rows([{"prompt": p, "rewards": "aesthetic_proxy"} for p in PROMPTS])
    return Trainer(cfg, model, adapter, rows)


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_trainer_api_janus_refused_by_the_backends_check(tmp_path, mode):
    """Janus without CFG passes every sampling check; its model call is what vLLM cannot run.
    Refused before the engine starts or the server is reached (port 9 would refuse)."""
    model = tiny_janus()
    ad = JanusT2IAdapter(model, janus_tokenizer(), load_config(None, []).sampling)
    with pytest.raises(ConfigError) as err:
        _trainer_with(tmp_path, model, ad, mode)
    msg = str(err.value)
    assert msg.startswith('rollout.backend = "vllm" cannot sample with JanusT2IAdapter')
    assert 'model call "janus_image"' in msg and msg.endswith(FIX)


def test_trainer_api_emu3_refused_for_its_forced_layout(tmp_path):
    """Emu3 runs the causal-LM call, but its adapter forces layout tokens per position."""
    tok = emu3_tokenizer()
    model = tiny_emu3(tok)
    sampling = load_config(None, []).sampling
    ad = Emu3ImageAdapter(
        model.config.vocabulary_map, tok, Emu3VQ(model.model.vqmodel), sampling, (2, 3)
    )
    assert ad.sampling.position_ranges  # the layout, set by the adapter, not by the config
    with pytest.raises(ConfigError, match=r"sampling\.position_ranges .*rollout\.backend"):
        _trainer_with(tmp_path, model, ad)
