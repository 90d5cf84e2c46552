"""Tree sampling ([sampling.tree], generation/tree.py): the shape of the trees, forked KV rows
that reproduce teacher-forced log-probs, the recorded parents, early ends, the compute saved."""

from dataclasses import replace

import pytest
import torch

from grpo_ar.config import load_config
from grpo_ar.errors import ConfigError
from grpo_ar.generation.params import SamplingParams, TreeParams
from grpo_ar.generation.sampler import sample
from grpo_ar.generation.scoring import token_logprobs
from grpo_ar.generation.tree import tree_sample
from grpo_ar.rewards import REWARDS, per_sample, register_reward
from grpo_ar.types import Entry, PromptBatch
from tiny import tiny_llama

V = 40


def prompts(p=2):
    ids = torch.tensor([[0, 1, 5, 6, 7], [1, 9, 8, 7, 6], [0, 0, 1, 4, 4]])[:p]
    return PromptBatch(ids, (ids != 0).long(), [Entry(f"p{i}", ()) for i in range(p)])


def params(**tree):
    base = dict(max_new_tokens=8, eos_token_ids=(), temperature=1.5)
    return SamplingParams(**base, tree=TreeParams(**tree))


@pytest.fixture(scope="module")
def model():
    return tiny_llama(V, seed=3)


def test_binary_tree_of_depth_three_shares_prefixes_and_saves_compute(model):
    p = params(branching=2, depth=3, segment_tokens=2)
    gen = torch.Generator().manual_seed(0)
    r = tree_sample(model, prompts(), 8, p, generator=gen)
    ids = r.completion_ids.view(2, 8, 8)  # (P, G, T)
    # siblings share exactly the segments above their fork: leaves 2k, 2k+1 share tokens 0..5,
    # leaves 0..3 share 0..3, all share 0..1
    for shared, block in ((6, 2), (4, 4), (2, 8)):
        grouped = ids.view(2, 8 // block, block, 8)[..., :shared]
        assert torch.equal(grouped, grouped[:, :, :1].expand_as(grouped))
    assert not torch.equal(ids[:, 0, 6:], ids[:, 1, 6:])  # a 2-token leaf segment differs
    # decoded row-steps: 2 + 2·2 + 4·2 + 8·2 = 30 per prompt vs 8·8 = 64 flat
    assert r.extras["tree_stats"]["decoded_tokens"] == 2 * 30
    assert r.extras["tree_stats"]["segments"] == 2 * 15
    # records: every token's segment; the parent chain of a leaf's last segment
    seg, parent = r.data["tree_segments"], r.extras["tree_parent"]
    assert seg.shape == (16, 8) and bool((seg >= 0).all())
    for row in range(16):
        for t in range(2, 8, 2):
            assert int(parent[seg[row, t]]) == int(seg[row, t - 1])
    assert r.group_ids.tolist() == [0] * 8 + [1] * 8


def test_sampler_log_probs_equal_teacher_forced_scoring(model):
    # the forked cache rows must be the parent's exactly: scoring recomputes every prefix
    p = replace(params(branching=2, depth=2, segment_tokens=3), top_k=12, max_new_tokens=9)
    r = tree_sample(model, prompts(3), 8, p, generator=torch.Generator().manual_seed(1))
    logp, _ = token_logprobs(model, r, p)
    torch.testing.assert_close(logp, r.sampling_logp, atol=2e-5, rtol=0)


def test_early_eos_leaves_are_repeated_for_their_missing_forks(model):
    p = SamplingParams(
        max_new_tokens=6, eos_token_ids=(3,), temperature=3.0,
        tree=TreeParams(branching=2, depth=2, segment_tokens=1),
    )  # fmt: skip
    for seed in range(20):
        r = tree_sample(model, prompts(), 4, p, generator=torch.Generator().manual_seed(seed))
        assert r.completion_ids.shape[0] == 8
        first = r.completion_ids[:, 0].view(2, 4)
        ended_first = first == 3
        if bool(ended_first[:, 0].any()):  # EOS before any fork: all 4 leaves are that row
            row = int(ended_first[:, 0].nonzero()[0])
            assert bool((first[row] == 3).all()) and bool((r.lengths.view(2, 4)[row] == 1).all())
            return
    pytest.fail("no early EOS in 20 seeds; raise the temperature")


def test_separator_rule_forks_after_the_separator(model):
    sep = 7
    p = SamplingParams(
        max_new_tokens=8, eos_token_ids=(), temperature=5.0,
        tree=TreeParams(branching=2, depth=1, separator_ids=(sep,)),
    )  # fmt: skip
    r = tree_sample(model, prompts(), 2, p, generator=torch.Generator().manual_seed(0))
    for a, b in r.completion_ids.view(2, 2, 8):
        hits = (a == sep).nonzero()
        if hits.numel() and int(hits[0]) < 7:
            cut = int(hits[0]) + 1  # equal up to and including the first separator
            assert torch.equal(a[:cut], b[:cut])
        else:
            assert torch.equal(a, b)  # no separator: never forked, the leaf is repeated


def test_flat_tree_is_the_plain_sampler(model):
    # depth 0 (off): tree_sample's loop with every row a root equals sampler.sample
    p = params(branching=1, depth=0)
    a = tree_sample(model, prompts(), 4, p, generator=torch.Generator().manual_seed(5))
    b = sample(model, prompts(), 4, p, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.sampling_logp, b.sampling_logp, atol=1e-6, rtol=0)


def test_config_section_and_its_checks(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[algorithm]\ngroup_size = 8\n[sampling.tree]\nbranching = 2\ndepth = 3\n"
        "segment_tokens = 4\n"
    )
    c = load_config(cfg, [])
    assert c.sampling.tree == TreeParams(branching=2, depth=3, segment_tokens=4)
    with pytest.raises(ConfigError, match="does not divide group_size=6"):
        load_config(cfg, ["algorithm.group_size=6"])
    with pytest.raises((ConfigError, ValueError), match="need a fork rule"):
        load_config(cfg, ["sampling.tree.segment_tokens=0"])
    assert not TreeParams(branching=2, depth=3, segment_tokens=1).fills(4)


def test_tree_scoring_runs_each_shared_token_once_and_equals_the_padded_path():
    from grpo_ar.generation.tree_scoring import tree_layout

    net = tiny_llama(V, seed=4).train()  # dropout is 0: train mode, with gradients
    p = SamplingParams(
        max_new_tokens=8, eos_token_ids=(2,), temperature=1.3, top_k=20,
        tree=TreeParams(branching=2, depth=3, segment_tokens=2),
    )  # fmt: skip
    r = tree_sample(net, prompts(3), 8, p, generator=torch.Generator().manual_seed(2))
    rows, where = tree_layout(r.prompt_index, r.data["tree_segments"], r.completion_mask)
    leaf_inputs = int((r.lengths - 1).clamp(min=0).sum())
    assert sum(map(len, rows)) < 0.6 * leaf_inputs  # shared tokens run once
    grads = []
    for pack in (True, False):  # tree layout vs every leaf on its own (padded rows)
        net.zero_grad()
        logp, ent = token_logprobs(net, r, p, with_entropy=True, pack=pack)
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        grads.append((logp.detach(), ent.detach(), [q.grad.clone() for q in net.parameters()]))
    (lp_a, en_a, g_a), (lp_b, en_b, g_b) = grads
    torch.testing.assert_close(lp_a, lp_b, atol=2e-5, rtol=0)
    torch.testing.assert_close(en_a, en_b, atol=2e-5, rtol=0)
    torch.testing.assert_close(lp_a, r.sampling_logp, atol=2e-5, rtol=0)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_trainer_with_tree_sampling_and_treepo(tmp_path):
    from grpo_ar.adapters.text import TextAdapter
    from grpo_ar.core import compute_advantages
    from grpo_ar.io.data import load_rows
    from grpo_ar.train.step import StepStats
    from grpo_ar.train.trainer import Trainer
    from tiny import char_tokenizer

    tok = char_tokenizer()
    if "toy_len_tree" not in REWARDS:
        register_reward("toy_len_tree")(per_sample(lambda output: float(len(output))))
    rows = [{"prompt": f"{i}+{i}=", "rewards": "toy_len_tree"} for i in range(4)]
    weights = []
    for accum in (1, 2):  # micro-batches score parts of trees: the update must not change
        sets = [
            "sampling.max_new_tokens=8", "trainer.steps=1", "trainer.batch_size=2",
            "algorithm.group_size=8", "algorithm.advantage=treepo", "sampling.temperature=2.0",
            "sampling.tree.branching=2", "sampling.tree.depth=3", "sampling.tree.segment_tokens=2",
            f"trainer.grad_accum={accum}", "trainer.optimizer=torch.optim.SGD", "trainer.lr=1.0",
            "trainer.max_grad_norm=0", f"log.run_dir={tmp_path / str(accum)}", "log.progress=false",
        ]  # fmt: skip
        cfg = load_config(None, sets)
        net = tiny_llama(vocab_size=len(tok), seed=0)
        entries = load_rows(rows)
        tr = Trainer(cfg, net, TextAdapter(tok, cfg.sampling), entries)
        if accum == 1:
            r = tr.generate(entries[:2], StepStats())
            sub = r.data["tree_subgroups"]
            assert sub.shape == (16, 3) and "tree_parent" in r.extras
            total = r.extras["reward"].total
            want, _ = compute_advantages("treepo", total, 8, subgroups=sub)
            torch.testing.assert_close(r.data["adv"].cpu(), want, atol=1e-6, rtol=0)
        history = tr.train()
        assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
        weights.append([q.detach().clone() for q in net.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_entropy_rule_forks_before_the_uncertain_token(model):
    p = params(branching=2, depth=3, fork_entropy=1e-6)  # every token is uncertain enough
    r = tree_sample(model, prompts(), 8, p, generator=torch.Generator().manual_seed(0))
    ids = r.completion_ids.view(2, 8, 8)
    # forks before tokens 0, 1, 2: halves share nothing, quarters token 0, pairs tokens 0..1
    for shared, block in ((1, 4), (2, 2)):
        grouped = ids.view(2, 8 // block, block, 8)[..., :shared]
        assert torch.equal(grouped, grouped[:, :, :1].expand_as(grouped))
    assert r.extras["tree_stats"]["decoded_tokens"] == 2 * (1 + 2 + 4 + 8 * 5)
    logp, _ = token_logprobs(model, r, p)
    torch.testing.assert_close(logp, r.sampling_logp, atol=2e-5, rtol=0)
    never = params(branching=2, depth=3, fork_entropy=1e3)  # no token is that uncertain
    r = tree_sample(model, prompts(), 8, never, generator=torch.Generator().manual_seed(0))
    ids = r.completion_ids.view(2, 8, 8)
    assert torch.equal(ids, ids[:, :1].expand_as(ids))  # one unforked row stands for 8 leaves


def test_tree_scoring_with_a_prompt_whose_leaves_are_one_token(model):
    from dataclasses import replace as dc_replace

    p = SamplingParams(
        max_new_tokens=6,
        eos_token_ids=(2,),
        tree=TreeParams(branching=2, depth=2, segment_tokens=1),
    )
    r = tree_sample(model, prompts(2), 4, p, generator=torch.Generator().manual_seed(0))
    mask = r.completion_mask.clone()
    mask[4:] = 0
    mask[4:, 0] = 1  # prompt 1: every leaf ends with its first token
    ids = r.completion_ids.masked_fill(mask == 0, 0)
    ids[4:, 0] = 2
    r = dc_replace(r, completion_ids=ids, completion_mask=mask)
    a, _ = token_logprobs(model, r, p, pack=True)
    b, _ = token_logprobs(model, r, p, pack=False)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
