"""FinetuneConfig validation, target resolution, LyCORIS preset isolation, missing extras."""

import sys

import pytest
import torch

from grpo_ar.config import ConfigError
from grpo_ar.finetune import FinetuneConfig, build_finetune, resolve_targets
from tiny import tiny_llama, tiny_qwen2


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(method="qlora"), "use full, peft or lycoris"),
        (dict(method="peft", algo="loha"), "use one of lora, dora"),
        (dict(method="lycoris", algo="boft"), "use one of lora, dora, loha"),
        (dict(method="peft", rank=0), "finetune.rank=0"),
        (dict(method="peft", alpha=0.0), "finetune.alpha"),
        (dict(method="lycoris", dropout=1.0), "finetune.dropout"),
        (dict(method="lycoris", refresh="merge"), "finetune.refresh='merge': use copy"),
        (dict(method="peft", target_modules=()), "no targets"),
        (dict(method="peft", target_regex="("), "finetune.target_regex"),
        (dict(method="lycoris", algo="full", bypass=True), "bypass=true with lycoris algo=full"),
        (dict(method="lycoris", algo="dora", bypass=True), r"\(DoRA\).*ignores DoRA"),
        (dict(method="lycoris", bypass=True, algo_args={"dora_wd": True}), "ignores DoRA"),
        (dict(method="peft", algo_args={"bias": "all"}), "algo_args.bias"),
        (dict(method="peft", algo_args={"r": 4}), r"set \['r'\] through the finetune fields"),
        (dict(method="lycoris", algo_args={"bypass_mode": True}), "bypass_mode"),
    ],
)
def test_bad_config_says_what_to_change(kw, match):
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(**kw)


def test_full_ignores_adapter_fields_and_bypass_defaults():
    FinetuneConfig(method="full", algo="anything", rank=0)
    assert FinetuneConfig(method="lycoris", algo="lora").use_bypass
    assert FinetuneConfig(method="lycoris", algo="ia3").use_bypass
    assert not FinetuneConfig(method="lycoris", algo="full").use_bypass
    assert not FinetuneConfig(method="lycoris", algo="diag-oft").use_bypass
    assert not FinetuneConfig(method="lycoris", algo="dora").use_bypass
    assert not FinetuneConfig(method="lycoris", algo="lora", bypass=False).use_bypass


def test_targets_by_name_regex_and_class_never_embeddings():
    model = tiny_llama()
    default = resolve_targets(model, FinetuneConfig(method="peft"))
    assert len(default) == 2 * 7 and "model.layers.0.self_attn.q_proj" in default
    assert resolve_targets(model, FinetuneConfig(method="peft", target_modules=("v_proj",))) == [
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    by_regex = FinetuneConfig(method="lycoris", target_modules=(), target_regex=r".*\.1\..*proj")
    assert all(".1." in n for n in resolve_targets(model, by_regex))
    assert len(resolve_targets(model, by_regex)) == 7
    by_class = FinetuneConfig(method="lycoris", target_modules=(), target_classes=("LlamaMLP",))
    assert sorted(n.split(".")[-1] for n in resolve_targets(model, by_class)) == [
        "down_proj",
        "down_proj",
        "gate_proj",
        "gate_proj",
        "up_proj",
        "up_proj",
    ]
    everything = FinetuneConfig(method="lycoris", target_regex=".*", exclude_regex=".*mlp.*")
    names = resolve_targets(model, everything)
    assert "lm_head" not in names and not any("mlp" in n for n in names) and len(names) == 8


def test_no_match_lists_the_linear_names():
    cfg = FinetuneConfig(method="peft", target_modules=("c_attn",))
    with pytest.raises(ConfigError, match="its Linear names are .*q_proj"):
        resolve_targets(tiny_llama(), cfg)


def test_lycoris_wraps_exactly_the_targets_and_leaves_no_class_state():
    LycorisNetwork = pytest.importorskip("lycoris").LycorisNetwork

    keys = ("TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "TARGET_EXCLUDE_NAME")
    keys += ("MODULE_ALGO_MAP", "NAME_ALGO_MAP", "ENABLE_CONV", "LORA_PREFIX", "USE_FNMATCH")
    before = {k: getattr(LycorisNetwork, k) for k in keys}
    a = build_finetune(
        tiny_llama(), FinetuneConfig(method="lycoris", target_modules=("q_proj",)), False
    )
    b = build_finetune(
        tiny_llama(),
        FinetuneConfig(method="lycoris", target_modules=(), target_classes=("LlamaMLP",)),
        False,
    )
    assert {k: getattr(LycorisNetwork, k) for k in keys} == before
    assert len(a.network.loras) == 2 and len(b.network.loras) == 6
    assert all("mlp" in lora.lora_name for lora in b.network.loras)


def test_qwen2_biases_full_algo_export(tmp_path):
    """Biased projections (Qwen2 q/k/v): LyCORIS full trains the bias; export keeps it."""
    pytest.importorskip("lycoris")
    from transformers import AutoModelForCausalLM

    ft = build_finetune(tiny_qwen2(), FinetuneConfig(method="lycoris", algo="full"), False)
    with torch.no_grad():
        for p in ft.model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    ft.export(tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.randint(3, 60, (2, 9))
    with torch.no_grad():
        want, got = ft.model(input_ids=x).logits, merged(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("extra", ["peft", "lycoris"])
def test_missing_extra_names_it(monkeypatch, extra):
    monkeypatch.setitem(sys.modules, extra, None)  # import now raises ImportError
    with pytest.raises(ImportError, match=rf"pip install 'grpo-ar\[{extra}\]'"):
        build_finetune(tiny_llama(), FinetuneConfig(method=extra), False)


def test_mix_refusal_is_raised_up_front():
    pytest.importorskip("peft")
    pytest.importorskip("lycoris")
    ft = build_finetune(tiny_llama(), FinetuneConfig(method="peft"), need_reference=True)
    with pytest.raises(ValueError, match="peft lora: the adapted weight is a product"):
        ft.reference.check_mix(0.6)
    ft.reference.check_mix(1.0)
    lyc = build_finetune(tiny_llama(), FinetuneConfig(method="lycoris", algo="ia3"), True)
    lyc.reference.check_mix(0.6)
    assert build_finetune(tiny_llama(), FinetuneConfig(method="peft"), False).reference is None


def test_save_tensors_aliases_tied_names_and_copies_other_views(tmp_path):
    from grpo_ar.io.checkpoint import load_tensors, save_tensors

    w = torch.randn(6, 4)
    sd = {"emb": w, "head": w, "top": w[:3], "bottom": w[3:], "other": torch.ones(2)}
    save_tensors(sd, tmp_path / "t.safetensors")
    back = load_tensors(tmp_path / "t.safetensors")
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert back["head"] is back["emb"]  # stored once, restored as one tensor
