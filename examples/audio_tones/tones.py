"""A fourth modality on the public API only: 8-bit mu-law audio (WaveNet's tokenisation) with a
reward from the FFT peak's distance to the prompted pitch. Token ids: 0..255 mu-law codes, 256 BOS,
257.. one token per pitch. A prompt is a pitch index; a completion is N_SAMPLES codes.
Registered as adapter "tones" for `grpo-ar train` (model.adapter_module = "tones")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from grpo_ar import ConfigError, PromptBatch, Rollout, SamplingParams, per_sample, register_reward
from grpo_ar.adapters import Adapter, register_adapter

MU, RATE, N_SAMPLES = 255, 8000, 64
BOS, PITCH0 = 256, 257
PITCHES = [2, 3, 4, 5, 6, 7, 8, 9]  # FFT bins of N_SAMPLES at RATE: 250 ... 1125 Hz
VOCAB = PITCH0 + len(PITCHES)


def mu_law_encode(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> 0..255 codes."""
    y = np.sign(x) * np.log1p(MU * np.abs(x)) / np.log1p(MU)
    return np.clip(np.floor((y + 1) / 2 * MU + 0.5), 0, MU).astype(np.int64)


def mu_law_decode(codes: np.ndarray) -> np.ndarray:
    """0..255 codes -> [-1, 1] floats (the inverse up to quantisation)."""
    y = 2 * codes.astype(np.float64) / MU - 1
    return np.sign(y) * ((1 + MU) ** np.abs(y) - 1) / MU


class ToneAdapter(Adapter):
    """Prompt = [BOS, pitch token]; sampling restricted to the 256 codes, fixed length, no EOS.
    The rest of `sampling` (temperature, top-p, ...) is the user's; a key that contradicts the
    three fixed ones is refused."""

    def __init__(self, sampling: SamplingParams | None = None, samples: int = N_SAMPLES) -> None:
        fixed = {
            "max_new_tokens": (samples, f"a tone of {samples} mu-law samples (tones.samples)"),
            "allowed_ranges": (((0, MU + 1),), f"the mu-law codes [0, {MU + 1})"),
            "eos_token_ids": ((), "fixed-length tones (no EOS)"),
        }
        super().__init__((sampling or SamplingParams()).impose(fixed))

    def encode(self, entries):
        for e in entries:
            if not (isinstance(e.prompt, int) and 0 <= e.prompt < len(PITCHES)):
                raise ValueError(f"prompt {e.prompt!r}: give a pitch index 0..{len(PITCHES) - 1}")
        ids = torch.tensor([[BOS, PITCH0 + e.prompt] for e in entries])
        return PromptBatch(ids, torch.ones_like(ids), list(entries))

    def decode(self, rollout: Rollout) -> list[np.ndarray]:
        return [mu_law_decode(row) for row in rollout.completion_ids.cpu().numpy()]


@dataclass(frozen=True)
class ToneConfig:
    """The [tones] table of a config (model.adapter = "tones")."""

    samples: int = N_SAMPLES
    """mu-law samples per tone (completion tokens); a pitch is cycles per tone."""

    def __post_init__(self) -> None:
        if self.samples < 2 * max(PITCHES) + 2:
            raise ConfigError(f"tones.samples={self.samples}: need >= {2 * max(PITCHES) + 2}")


@register_adapter("tones", ToneConfig)
def build_tones(config, section: ToneConfig, device: str, dtype: torch.dtype):
    """`grpo-ar train` with model.adapter = "tones": a causal LM over the tone vocabulary from
    model.path, the adapter from [sampling] and [tones]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=dtype).to(device)
    return model, ToneAdapter(config.sampling, section.samples)


@register_reward("tone_pitch")
@per_sample
def tone_pitch(wave: np.ndarray, *, pitch: int, tolerance: int = 4) -> float:
    """1 at the prompted FFT bin, falling linearly to 0 at `tolerance` bins away (DC ignored)."""
    spectrum = np.abs(np.fft.rfft(wave - wave.mean()))
    peak = int(spectrum[1:].argmax()) + 1
    return max(0.0, 1.0 - abs(peak - PITCHES[pitch]) / tolerance)


def tone_rows(n: int, seed: int = 0, pitches: tuple[int, ...] | None = None) -> list[dict]:
    """Dataset rows: a pitch prompt (drawn from `pitches`, default all) and the reward that
    checks it."""
    rng = np.random.default_rng(seed)
    pool = np.arange(len(PITCHES)) if pitches is None else np.asarray(pitches)
    picks = pool[rng.integers(0, len(pool), n)].tolist()
    return [{"prompt": p, "rewards": {"tone_pitch": {"pitch": p}}} for p in picks]


def sine_codes(pitch: int, phase: float = 0.0, amp: float = 0.8) -> np.ndarray:
    """The codes of a clean tone at a pitch index (supervised warm-up data)."""
    t = np.arange(N_SAMPLES)
    return mu_law_encode(amp * np.sin(2 * np.pi * PITCHES[pitch] * t / N_SAMPLES + phase))
