"""examples/audio_tones: the fourth modality, written only against the public API."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "audio_tones"
sys.path.insert(0, str(EXAMPLE))

import run  # noqa: E402
import tones  # noqa: E402

from grpo_ar import Entry  # noqa: E402
from grpo_ar.rewards import REWARDS  # noqa: E402


def test_mu_law_round_trip_is_within_one_level():
    x = np.linspace(-1, 1, 1001)
    codes = tones.mu_law_encode(x)
    assert codes.min() == 0 and codes.max() == 255
    y = tones.mu_law_decode(codes)
    step = np.abs(np.diff(tones.mu_law_decode(np.arange(256)))).max()
    assert np.abs(x - y).max() <= step / 2 + 1e-12
    assert np.array_equal(tones.mu_law_encode(tones.mu_law_decode(np.arange(256))), np.arange(256))


def test_pitch_reward_orders_tones_by_distance():
    fn = REWARDS["tone_pitch"].obj.per_sample
    waves = [tones.mu_law_decode(tones.sine_codes(p)) for p in (3, 4, 5, 7)]
    scores = [fn(w, pitch=3) for w in waves]
    assert scores == [1.0, 0.75, 0.5, 0.0]


def test_samples_are_codes_and_teacher_forcing_matches_the_sampler():
    model = run.tiny_model(0)
    ad = tones.ToneAdapter()
    r = ad.sample(
        model,
        ad.encode([Entry(0, ()), Entry(5, ())]),
        3,
        generator=torch.Generator().manual_seed(0),
    )
    assert r.completion_ids.shape == (6, tones.N_SAMPLES) and int(r.completion_ids.max()) <= 255
    torch.testing.assert_close(ad.token_logprobs(model, r)[0], r.sampling_logp, atol=1e-5, rtol=0)
    assert all(w.shape == (tones.N_SAMPLES,) and np.abs(w).max() <= 1 for w in ad.decode(r))
    with pytest.raises(ValueError, match="pitch index 0..7"):
        ad.encode([Entry(8, ())])


def test_the_example_trains_a_few_steps(tmp_path):
    out = run.main(["--warmup-steps", "3", "--grpo-steps", "2", "--run-dir", str(tmp_path)])
    assert 0 <= out["eval/greedy/reward/after"] <= 1
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 2 and (tmp_path / "checkpoints" / "latest").exists()
