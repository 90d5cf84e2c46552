import importlib.util
import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("GRPO_AR_TEST_THREADS", "1")))

# tests/vllm_engine/ need the vLLM engine, which lives in .venv-vllm (`make test` runs them there)
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm_engine"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # the marker, not `"gpu" in item.keywords`: keywords hold every parent's name too, so
        # a checkout in a folder named gpu would skip every test
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
