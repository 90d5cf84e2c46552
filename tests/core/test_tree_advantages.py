"""TreePO's sub-group advantage: by hand, against a naive loop, flat = grpo, padding leaks,
group isolation, and on a real tree rollout's sub-groups."""

import math

import pytest
import torch

from grpo_ar.core import ADVANTAGES, compute_advantages
from grpo_ar.core.tree_advantages import treepo

NAN = math.nan


def close(a, b, atol=1e-6):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=0)


def test_hand_computed_binary_tree():
    # 4 leaves of one root, forked twice: sub-groups are the group and the two sibling pairs
    sub = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 2]])
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    adv = treepo(r, torch.ones(4, dtype=torch.bool), 4, subgroups=sub, eps=0.0)
    # group: mean .25, unbiased std .5 -> [1.5, -.5, -.5, -.5]; pair (1, 0): ±1/sqrt(.5);
    # pair (0, 0) has no spread: 0, still one of the leaf's two sub-groups
    s = 0.5 / math.sqrt(0.5)
    close(adv, [(1.5 + s) / 2, (-0.5 - s) / 2, -0.25, -0.25])
    adv = treepo(r, torch.ones(4, dtype=torch.bool), 4, subgroups=sub, scale="none")
    close(adv, [(0.75 + 0.5) / 2, (-0.25 - 0.5) / 2, -0.125, -0.125])


def naive(rewards, valid, subgroups, g, eps):
    out = []
    n, k = subgroups.shape
    for i in range(n):
        if not valid[i]:
            out.append(0.0)
            continue
        advs = []
        for c in range(k):
            if subgroups[i, c] < 0:
                continue
            mates = [
                float(rewards[j])
                for j in range(n)
                if j // g == i // g and subgroups[j, c] == subgroups[i, c] and valid[j]
            ]
            if len(mates) < 2:
                continue
            mean = sum(mates) / len(mates)
            std = math.sqrt(sum((x - mean) ** 2 for x in mates) / (len(mates) - 1))
            advs.append(
                0.0 if max(mates) == min(mates) else (float(rewards[i]) - mean) / (std + eps)
            )
        out.append(sum(advs) / len(advs) if advs else 0.0)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_equals_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    p, gs, k = 3, 8, 3
    sub = torch.randint(-1, 3, (p * gs, k), generator=g)
    sub[:, 0] = 0  # the prompt column; ids repeat across groups on purpose
    r = torch.randint(0, 3, (p * gs,), generator=g).double()
    valid = torch.rand(p * gs, generator=g) > 0.15
    got = treepo(r, valid, gs, subgroups=sub, eps=1e-4)
    close(got, naive(r, valid, sub, gs, 1e-4))


def test_without_a_tree_it_is_grpo_and_padding_does_not_leak():
    r = torch.tensor([1.0, 0.0, 2.0, 5.0, 3.0, 3.0, 1.0, NAN])
    a, _ = compute_advantages("treepo", r, 4)
    b, _ = compute_advantages("grpo", r, 4)
    close(a, b)
    sub = torch.tensor([[0, 5], [0, 5], [0, -1], [0, -1]] * 2)
    a, valid = compute_advantages("treepo", r, 4, subgroups=sub)
    for garbage in (0.0, -7.0, 1e6):  # an invalid sample's value reaches no statistic
        clean = torch.where(valid, r, torch.full_like(r, garbage))
        close(ADVANTAGES["treepo"](clean, valid, 4, subgroups=sub), a)
    assert ADVANTAGES.takes("treepo") == {"subgroups"}
    with pytest.raises(ValueError, match=r"subgroups.*shape \(3, 2\)"):
        compute_advantages("treepo", r, 4, subgroups=sub[:3])


def test_tree_rollout_subgroups_reach_the_estimator():
    from dataclasses import replace

    from grpo_ar.generation.params import SamplingParams, TreeParams
    from grpo_ar.generation.tree import tree_sample
    from grpo_ar.types import Entry, PromptBatch
    from tiny import tiny_llama

    ids = torch.tensor([[0, 1, 5, 6], [1, 9, 8, 7]])
    prompts = PromptBatch(ids, (ids != 0).long(), [Entry("a", ()), Entry("b", ())])
    p = replace(SamplingParams(max_new_tokens=6), tree=TreeParams(2, 3, segment_tokens=1))
    roll = tree_sample(tiny_llama(30), prompts, 8, p, generator=torch.Generator().manual_seed(0))
    sub = roll.data["tree_subgroups"]
    # one root per prompt: columns are the prompt, then the depth-1 and depth-2 ancestors
    assert sub.shape == (16, 3)
    for c, size in ((0, 8), (1, 4), (2, 2)):
        sizes = torch.unique(sub[:, c], return_counts=True)[1]
        assert sizes.tolist() == [size] * (16 // size)
    r = torch.zeros(16)
    r[0] = 1.0  # one good leaf: its sibling, then its cousins lose the most
    adv, _ = compute_advantages("treepo", r, 8, subgroups=sub)
    assert adv[0] > 0 and adv[1] < adv[2] < adv[4] < 0 and bool((adv[8:] == 0).all())
