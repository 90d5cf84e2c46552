"""Rewards: the registry, the batch computer, rule-based text rewards and the LLM judge.

Importing this package registers every reward here; none of them imports transformers,
diffusers or image libraries until a judge model is loaded.
"""

from . import judge, text
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
from .judge import LLMJudge
from .text import (
    extract_answer,
    extract_number,
    find_numbers,
    overlong_penalty,
    parse_answer_number,
    tagged_answer,
)

__all__ = [
    "REWARDS",
    "LLMJudge",
    "RewardComputer",
    "RewardContext",
    "RewardDef",
    "RewardFn",
    "RewardRegistry",
    "RewardResult",
    "RewardSpecError",
    "UnknownRewardError",
    "build_rewards",
    "extract_answer",
    "extract_number",
    "find_numbers",
    "judge",
    "metrics",
    "overlong_penalty",
    "parse_answer_number",
    "per_sample",
    "register_reward",
    "reward_metrics",
    "tagged_answer",
    "text",
    "validate_specs",
]
