"""examples/audio_tones: the fourth modality, written only against the public API."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

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
    argv = ["--warmup-steps", "3", "--grpo-steps", "2", "--run-dir", str(tmp_path),
            "--seeds", "0", "--eval-seeds", "12345", "--eval-samples", "2"]  # fmt: skip
    out = run.main(argv)
    assert 0 <= out["after"][0][12345]["eval/greedy/reward"] <= 1
    lines = (tmp_path / "seed0" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 2 and (tmp_path / "seed0" / "checkpoints" / "latest").exists()
    assert json.loads((tmp_path / "results.json").read_text())["protocol"]["eval_seeds"] == [12345]


def tones_config(tmp_path, **extra_model):
    """A TOML config training the tones adapter (registered outside the package) from a saved
    tiny Llama: 2 steps of 2 prompts x 2 samples of 24-sample tones."""
    run.tiny_model(0).save_pretrained(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tones.tone_rows(8)))
    model = {"path": str(tmp_path / "model"), "adapter": "tones", **extra_model}
    table = lambda d: "".join(f"{k} = {json.dumps(v)}\n" for k, v in d.items())  # noqa: E731
    text = (
        f"[model]\n{table(model)}[tones]\nsamples = 24\n"
        "[trainer]\nsteps = 2\nbatch_size = 2\nlr = 1e-3\nthreads = 1\n"
        "[algorithm]\ngroup_size = 2\n"
        f"[data]\ntrain = {json.dumps(str(data))}\n"
        f"[log]\nrun_dir = {json.dumps(str(tmp_path / 'run'))}\nprogress = false\n"
    )
    path = tmp_path / "tones.toml"
    path.write_text(text)
    return path


def test_grpo_ar_train_runs_the_tones_adapter_registered_outside_the_package(tmp_path):
    cfg = tones_config(tmp_path, adapter_module="tones", adapter_path=str(EXAMPLE))
    cli = Path(sys.executable).parent / "grpo-ar"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [str(cli), "train", str(cfg)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    used = yaml.safe_load((run_dir / "config.yaml").read_text())
    # config.yaml records what the run sampled with: the adapter's fixed keys and the section
    assert used["tones"] == {"samples": 24}
    assert used["sampling"]["max_new_tokens"] == 24
    assert used["sampling"]["allowed_ranges"] == [[0, 256]]
    assert used["model"]["adapter_module"] == "tones"
    rows = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    # Adapter.summarize: a (24,) waveform is its shape, not a 24-float repr
    assert rows and all(r["output"] == {"shape": [24], "dtype": "float64"} for r in rows)


def test_a_sampling_key_the_tones_adapter_fixes_is_refused(tmp_path, capsys):
    from grpo_ar.cli import main

    cfg = tones_config(tmp_path, adapter_module="tones", adapter_path=str(EXAMPLE))
    assert main(["train", str(cfg), "--set", "sampling.max_new_tokens=5"]) == 2
    err = capsys.readouterr().err
    assert "sampling.max_new_tokens=5 conflicts with a tone of 24 mu-law samples" in err
    assert "remove it" in err
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before anything is written
