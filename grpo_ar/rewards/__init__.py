"""Rewards: the registry, the batch computer, rule-based text rewards, the LLM judge, image
rewards (CLIP aesthetic / CLIP score / an offline aesthetic proxy; learned: PickScore, HPSv2,
ImageReward, a VLM judge) and video rewards (temporal consistency, motion, per-frame image
rewards, CLIP video score) and group-level rewards (group entropy, distinct-n, pairwise
distance; `group_reward` for your own).

Importing this package registers every reward here; none of them imports transformers,
diffusers or image libraries until a judge or CLIP model is loaded.
"""

from . import group, hps, image, imagereward, judge, pickscore, text, video, vlm_judge
from .base import (
    REWARDS,
    RewardComputer,
    RewardContext,
    RewardDef,
    RewardFn,
    RewardRegistry,
    RewardResult,
    RewardSpecError,
    UnknownRewardError,
    build_rewards,
    metrics,
    per_sample,
    register_reward,
    reward_metrics,
    validate_specs,
)
from .group import group_reward
from .hps import HPSv2
from .imagereward import ImageRewardScore
from .judge import LLMJudge
from .learned import RewardSetupError
from .pickscore import PickScore
from .pixels import images_to_tensor
from .text import (
    extract_answer,
    extract_number,
    find_numbers,
    overlong_penalty,
    parse_answer_number,
    tagged_answer,
)
from .vlm_judge import VLMJudge

__all__ = [
    "REWARDS",
    "HPSv2",
    "ImageRewardScore",
    "LLMJudge",
    "PickScore",
    "RewardComputer",
    "RewardContext",
    "RewardDef",
    "RewardFn",
    "RewardRegistry",
    "RewardResult",
    "RewardSetupError",
    "RewardSpecError",
    "UnknownRewardError",
    "VLMJudge",
    "build_rewards",
    "extract_answer",
    "extract_number",
    "find_numbers",
    "group",
    "group_reward",
    "hps",
    "image",
    "imagereward",
    "images_to_tensor",
    "judge",
    "metrics",
    "overlong_penalty",
    "parse_answer_number",
    "per_sample",
    "pickscore",
    "register_reward",
    "reward_metrics",
    "tagged_answer",
    "text",
    "validate_specs",
    "video",
    "vlm_judge",
]
