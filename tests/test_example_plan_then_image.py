"""The plan-then-image example (examples/plan_then_image/): its adapter decodes only the image
span; one GRPO step on a tiny plan + image model moves the weights by exactly the span-weighted
objective (a naive per-token reference); the held-out protocol; a 2-step smoke run."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from grpo_ar.generation.params import allowed_mask, transform_logits
from grpo_ar.testing import causal_lm, lm_config, vq_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # the example's modules import each other as plan_then_image.*
from plan_then_image import plans  # noqa: E402
from plan_then_image.plan_image import PlanImageAdapter, plan_image_scores  # noqa: E402
from plan_then_image.pretrain import build_tokenizer  # noqa: E402

CODES = 32  # tiny codebook: LM ids [32, 64)
CONFIG = f"""
[model]
adapter = "plan_image"
[plan_image]
grid = [8, 8]
code_offset = {plans.CODE_OFFSET}
condition = "text"
output = "float"
[sampling]
max_new_tokens = 66
[[sampling.spans]]
name = "plan"
length = 2
allowed_ranges = [[3, 14]]
temperature = 1.3
loss_weight = PLAN_WEIGHT
kl_weight = 0.5
[[sampling.spans]]
name = "image"
length = 64
allowed_ranges = [[32, 64]]
temperature = 0.9
top_k = 8
[algorithm]
group_size = 4
beta = 0.0
aggregation = "token_mean"
[trainer]
batch_size = 2
steps = 1
lr = 1.0
optimizer = "torch.optim.SGD"
weight_decay = 0.0
max_grad_norm = 0.0
warmup_steps = 0
threads = 1
[log]
progress = false
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny prior (vocab 64), VQ (16x16 -> 8x8, 32 codes), word tokenizer and a random
    reward classifier, saved as the example's run.py loads them."""
    from plan_then_image.plan_image import ShapeClassifier
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("plan_image")
    torch.manual_seed(0)
    vq_model(CODES, [8, 8], 16).eval().save_pretrained(d / "vq")
    torch.manual_seed(1)
    causal_lm(
        lm_config(plans.CODE_OFFSET + CODES, 32, 1, max_positions=80, tie_word_embeddings=False)
    ).save_pretrained(d / "prior")
    build_tokenizer().save_pretrained(d / "prior")
    torch.manual_seed(2)
    save_file(ShapeClassifier().state_dict(), d / "cls.safetensors")
    return d


def _config(saved, tmp_path, plan_weight: float = 1.0):
    from grpo_ar.config import load_config

    path = tmp_path / "config.toml"
    path.write_text(CONFIG.replace("PLAN_WEIGHT", str(plan_weight)))
    cfg = load_config(path, [f"model.path={saved / 'prior'}",
                             f"plan_image.decoder_path={saved / 'vq'}",
                             f"log.run_dir={tmp_path / 'run'}"])  # fmt: skip
    setup = {"plan_image": {"classifier_path": str(saved / "cls.safetensors")}}
    return replace(cfg, data=replace(cfg.data, reward_setup=setup))


def _entries(prompts):
    from grpo_ar.io.data import load_rows

    return load_rows([{"prompt": p} for p in prompts], default_rewards=[{"name": "plan_image"}])


def test_adapter_decodes_only_the_image_span_and_reads_the_plan(saved, tmp_path):
    from grpo_ar.cli import build_model_and_adapter

    model, adapter = build_model_and_adapter(_config(saved, tmp_path))
    assert isinstance(adapter, PlanImageAdapter)
    prompts = adapter.encode(_entries(["warm soft", "cold sharp"]))
    ro = adapter.sample(model, prompts, 3, generator=torch.Generator().manual_seed(0))
    ids = ro.completion_ids
    assert ids.shape == (6, 66) and bool((ro.span_ids[:, :2] == 0).all())
    assert bool(((ids[:, :2] >= 3) & (ids[:, :2] < 14)).all())  # plan words only
    assert bool(((ids[:, 2:] >= 32) & (ids[:, 2:] < 64)).all())  # codes only
    # the pixels are the VQ's decoding of the last 64 tokens, whatever the plan says
    want = adapter.image.decode_codes((ids[:, 2:] - plans.CODE_OFFSET).view(6, 8, 8))
    torch.testing.assert_close(adapter.decode_pixels(ro), want, atol=0, rtol=0)
    tok = build_tokenizer()
    words = [" ".join(tok.convert_ids_to_tokens(r[:2].tolist())) for r in ids]
    out = adapter.decode(ro)
    assert [o["plan"] for o in out] == words and out[0]["image"].shape == (3, 16, 16)
    other = replace(ro, completion_ids=ids.clone())
    other.completion_ids[:, :2] = torch.tensor([3, 9])  # every plan -> "red circle"
    torch.testing.assert_close(adapter.decode_pixels(other), want, atol=0, rtol=0)
    assert adapter.plans(other) == ["red circle"] * 6
    # a row whose image span was cut short is refused, not decoded from the wrong tokens
    cut = replace(ro, completion_mask=ro.completion_mask.clone())
    cut.completion_mask[1, -1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] hold fewer than 64 image tokens"):
        adapter.decode_pixels(cut)
    # teacher-forced log-probs (each span under its own transform) equal the sampler's
    logp, _ = adapter.token_logprobs(model, ro)
    torch.testing.assert_close(logp, ro.sampling_logp, atol=2e-5, rtol=0)


def _naive_span_logp(model, adapter, ro):
    """(N, T) log-probs: each row's prompt + completion through the model, each token under its
    span's transform, one token at a time (the obvious computation)."""
    out = torch.zeros(ro.completion_ids.shape)
    rows = []
    for i in range(len(ro)):
        p = ro.prompts.attention_mask[ro.prompt_index[i]].bool()
        prompt = ro.prompts.input_ids[ro.prompt_index[i]][p]
        seq = torch.cat([prompt, ro.completion_ids[i]])[None]
        logits = model(seq).logits[0, len(prompt) - 1 : -1]  # (T, V)
        for t in range(ro.completion_ids.shape[1]):
            sp = adapter.sampling.spans[int(ro.span_ids[i, t])].params(adapter.sampling)
            z = transform_logits(logits[t : t + 1], sp, allowed_mask(sp, logits.shape[-1], "cpu"))
            rows.append((i, t, F.log_softmax(z, -1)[0, ro.completion_ids[i, t]]))
    for i, t, v in rows:
        out = out.index_put((torch.tensor([i]), torch.tensor([t])), v[None])
    return out


@pytest.mark.parametrize("plan_weight", [0.0, 2.0])
def test_one_grpo_step_updates_by_exactly_the_span_weighted_objective(saved, tmp_path,
                                                                      plan_weight):  # fmt: skip
    """SGD with lr 1 and no clipping: the update is minus the gradient of the trainer's loss; on
    policy (ratio 1, β = 0) that is -Σ_i A_i Σ_t w_span(t) ∇log π(token_t) / (token count).
    Plan weight 0: the image-only objective; 2: the plan tokens count twice."""
    from grpo_ar.cli import build_model_and_adapter
    from grpo_ar.train.step import StepStats
    from grpo_ar.train.trainer import Trainer

    cfg = _config(saved, tmp_path, plan_weight)
    model, adapter = build_model_and_adapter(cfg)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(cfg, model, adapter, _entries(plans.prompt_split()[0]))
    ro = trainer.generate(_entries(["warm sharp", "sea soft"]), StepStats())
    adv = ro.data["adv"]
    assert adv.dim() == 1 and float(adv.abs().sum()) > 0  # a real learning signal
    # the naive reference, on an untouched copy of the start model
    ref, ref_adapter = build_model_and_adapter(cfg)
    logp = _naive_span_logp(ref, ref_adapter, ro)
    w = torch.where(ro.span_ids == 0, plan_weight, 1.0) * ro.completion_mask
    loss = -(adv[:, None] * w * logp).sum() / ro.completion_mask.sum()
    loss.backward()
    trainer.update(ro, StepStats())
    names = dict(ref.named_parameters())
    worst = 0.0
    for k, p in model.named_parameters():
        want = start[k] - names[k].grad
        torch.testing.assert_close(p.detach(), want, atol=2e-6, rtol=1e-4)
        worst = max(worst, float((p.detach() - start[k]).abs().max()))
    assert worst > 1e-4  # the step moved the weights (the comparison is not vacuous)
    # the head rows of the plan words get gradient only from the plan span (the image span's
    # transform masks them out): with the plan's weight 0 they stay exactly where they were
    head = model.get_output_embeddings().weight.detach()
    moved = (head[3:14] - start["lm_head.weight"][3:14]).abs().max()
    assert (float(moved) == 0.0) == (plan_weight == 0.0)


def test_held_out_prompts_are_disjoint_and_every_family_word_is_trained():
    train, held = plans.prompt_split()
    assert len(train) == 9 and len(held) == 3 and not set(train) & set(held)
    words = {w for p in train for w in p.split()}
    assert words == set(plans.COLOUR_FAMILIES) | set(plans.SHAPE_FAMILIES)
    # the data's plans always satisfy their prompt, with the skew the README states
    probs = plans.plan_probs("warm sharp")
    assert probs[("red", "square")] == pytest.approx(0.75 * 0.6)
    assert probs[("yellow", "cross")] == pytest.approx(0.25 * 0.1)
    assert sum(probs.values()) == pytest.approx(1.0)
    assert all(plans.satisfies("warm sharp", plans.COLOURS.index(c), plans.SHAPES.index(s))
               for c, s in probs)  # fmt: skip


def test_scores_read_the_plan_and_the_judged_image():
    class Fixed(torch.nn.Module):  # "red" (0) and "triangle" (2) for every image
        def forward(self, x):
            c, s = torch.zeros(len(x), 6), torch.zeros(len(x), 5)
            c[:, 0], s[:, 2] = 1, 1
            return c, s

    img = torch.full((3, 16, 16), 0.5)
    outs = [{"plan": "red triangle", "image": img}, {"plan": "yellow square", "image": img},
            {"plan": "red", "image": img}, {"plan": "red triangle", "image": img}]  # fmt: skip
    prompts = ["warm sharp", "warm sharp", "warm sharp", "cold sharp"]
    s = plan_image_scores(Fixed(), outs, prompts, weights=(1.0, 2.0, 0.0))
    assert s["constraint"].tolist() == [1, 1, 1, 0]  # red is not cold
    assert s["consistency"].tolist() == [1, 0, 0, 1]  # a malformed plan is never consistent
    assert s["plan_valid"].tolist() == [1, 1, 0, 0]
    assert s["reward"].tolist() == [3, 1, 1, 2]


TINY = [
    "data.n_train=96", "vq.steps=2", "vq.channels=[8, 8]", "cls.steps=2", "cls.batch_size=16",
    "cls.n_test=16", "rcls.steps=2", "rcls.batch_size=16", "rcls.n_train=64", "rcls.n_test=16",
    "prior.steps=2", "prior.batch_size=8", "prior.hidden=32", "prior.layers=1", "prior.n_train=64",
]  # fmt: skip


@pytest.mark.slow
def test_example_runs_two_steps_per_variant_on_training_prompts_only(tmp_path, capsys):
    from plan_then_image import run

    argv = [
        "--base",
        str(tmp_path / "base"),
        "--eval-samples",
        "2",
        "--ablation",
        "--seeds",
        "0",
        "--eval-seeds",
        "5",
    ]
    argv += [x for kv in TINY for x in ("--pretrain-set", kv)]
    sets = ["trainer.steps=2", "trainer.batch_size=2", "trainer.warmup_steps=0",
            "algorithm.group_size=2", f"log.run_dir={tmp_path / 'run'}",
            "log.samples_per_step=100"]  # fmt: skip
    res = run.main(argv + [x for kv in sets for x in ("--set", kv)])
    train, held = plans.prompt_split()
    assert res["heldout_prompts"] == held and set(res["summary"]) == {"full", "plan_weight0"}
    plan_w = run.load_config(run.CONFIG, []).sampling.spans[0].loss_weight  # config.toml's
    for name, weights in (("full", [plan_w, 1.0]), ("plan_weight0", [0.0, 1.0])):
        (r,) = res["runs"][name]
        assert r["steps"] == 2 and r["plan_loss_weight"] == weights
        after = r["after"][5]
        assert all(0.0 <= after[k] <= 1.0 for k in ("constraint", "consistency", "aesthetic"))
        rows = [json.loads(x) for x in
                (tmp_path / "run" / f"{name}_seed0" / "samples.jsonl").read_text().splitlines()]  # fmt: skip
        assert len(rows) == 2 * 2 * 2  # every training sample of both steps
        assert {row["prompt"] for row in rows} <= set(train)  # GRPO never sees a held-out prompt
        assert all(
            Path(tmp_path / "run" / f"{name}_seed0" / row["output"]).exists() for row in rows
        )
    assert res["before"]["5"]["kl/image"] == 0.0 and res["before"]["5"]["kl/plan"] == 0.0
    assert (tmp_path / "run" / "results.json").exists() and Path(res["grid"]).exists()
    assert "held-out before GRPO" in capsys.readouterr().out
