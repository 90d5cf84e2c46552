"""Video rewards on synthetic clips with known motion (a disc on a plain background), hand
values of the consistency terms, per-frame pooling against the image reward itself, and the CLIP
video score on the tiny random CLIPModel of test_image."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_image import clip_dir  # noqa: F401 - the tiny CLIP fixture

from grpo_ar.rewards import REWARDS, RewardContext, RewardSpecError, build_rewards
from grpo_ar.rewards import image as im
from grpo_ar.rewards import video as vr
from grpo_ar.types import Entry, RewardSpec

SIZE, FRAMES = 32, 8


def ball_clip(vx=0.0, vy=0.0, frames=FRAMES, size=SIZE, radius=4.0, start=None, jitter=False):
    """(F, H, W, 3) uint8: an orange anti-aliased disc moving (vx, vy) px/frame (y down) on a
    blue-grey background; `jitter` moves it back and forth by (vx, vy) instead."""
    cy0, cx0 = (
        start if start is not None else (size / 2 - 0.5 * vy * frames, size / 2 - 0.5 * vx * frames)
    )
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    bg, fg = torch.tensor([60.0, 80.0, 110.0]), torch.tensor([240.0, 150.0, 40.0])
    out = []
    for t in range(frames):
        k = (t % 2) if jitter else t
        cx, cy = cx0 + vx * k, cy0 + vy * k
        a = (radius + 0.5 - torch.hypot(xx - cx, yy - cy)).clamp(0, 1)[..., None]
        out.append(bg * (1 - a) + fg * a)
    return torch.stack(out).round().to(torch.uint8)


def ctx(n, name="motion"):
    entries = [Entry(f"clip {i}", (RewardSpec(name),)) for i in range(n)]
    return RewardContext(entries, list(range(n)), 1, 0)


def motion_rewards(clips, **args):
    return vr.motion(clips, [dict(args)] * len(clips), ctx(len(clips))).tolist()


# ---------------------------------------------------------------- clip conversion


def test_clip_to_tensor_accepts_every_format():
    clip = ball_clip(1.0)
    want = clip.permute(0, 3, 1, 2).float() / 255
    frames_pil = [Image.fromarray(f.numpy()) for f in clip]
    for c in (clip, clip.numpy(), want, frames_pil, list(clip.numpy())):
        torch.testing.assert_close(vr.clip_to_tensor(c), want, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\) uint8 or \(F, 3, H, W\) float"):
        vr.clip_to_tensor(torch.zeros(2, 4, 4, 3))
    with pytest.raises(ValueError, match="all of one size"):
        vr.clip_to_tensor([torch.zeros(3, 4, 4), torch.zeros(3, 4, 5)])
    with pytest.raises(TypeError, match="expected a clip"):
        vr.clip_to_tensor("clip.gif")


# ---------------------------------------------------------------- motion


def test_motion_estimate_recovers_velocity_and_direction():
    speeds = [(-2.0, 0.0), (1.0, 0.0), (0.0, -1.5), (1.5, 1.5), (0.0, 0.0), (-3.0, 2.0)]
    x = torch.stack([vr.clip_to_tensor(ball_clip(vx, vy)) for vx, vy in speeds])
    v, moved = vr.estimate_motion(x)
    want = torch.tensor(speeds) / SIZE  # frame sizes per frame
    torch.testing.assert_close(v, want, atol=0.1 / SIZE, rtol=0.05)  # within 0.1 px/frame
    assert moved[:4].min() == 1.0 and moved[4] == 0.0
    assert vr.motion_label(v) == ["left", "right", "up", "down_right", "none", "down_left"]


def test_motion_reward_orders_clips_by_how_well_they_follow_the_direction():
    clips = [
        ball_clip(-2.0),  # left, as asked
        ball_clip(-1.0, -1.0),  # up-left: 45 degrees off
        ball_clip(0.0, 2.0),  # down: perpendicular
        ball_clip(),  # still
        ball_clip(2.0),  # right: the opposite way
    ]
    r = motion_rewards(clips, direction="left")
    assert r[0] == pytest.approx(1.0, abs=1e-3)
    assert r[1] == pytest.approx(math.cos(math.pi / 4), abs=0.02)
    assert abs(r[2]) < 0.02 and r[3] == 0.0
    assert r[4] == pytest.approx(-1.0, abs=1e-3)
    # an angle in degrees is the same target (180 = left; 90 = up, y pointing down)
    assert motion_rewards(clips, direction=180) == pytest.approx(r, abs=1e-6)
    up = motion_rewards([ball_clip(0.0, -2.0), ball_clip(0.0, 2.0)], direction=90)
    assert up == pytest.approx([1.0, -1.0], abs=1e-3)


def test_motion_reward_with_a_target_speed_prefers_the_right_speed():
    s = 2.0 / SIZE  # 2 px/frame
    clips = [ball_clip(-2.0), ball_clip(-1.0), ball_clip(-3.0), ball_clip(), ball_clip(2.0)]
    r = motion_rewards(clips, direction="left", speed=s)
    # hand values: 1 − |v − s·u| / s for v = −2, −1, −3, 0, +2 px/frame
    assert r == pytest.approx([1.0, 0.5, 0.5, 0.0, -1.0], abs=0.02)
    still = motion_rewards([ball_clip(), ball_clip(-0.25), ball_clip(-2.0)], direction="none")
    assert still[0] == 1.0 and 0.5 < still[1] < 0.7 and still[2] == -1.0


def test_motion_survives_frame_noise_like_a_vq_decoder_makes():
    g = torch.Generator().manual_seed(0)
    clips = [ball_clip(-2.0), ball_clip(2.0), ball_clip(0.0, -2.0)]
    noisy = [
        (vr.clip_to_tensor(c) + 0.04 * torch.randn(c.shape[0], 3, SIZE, SIZE, generator=g)).clamp(
            0, 1
        )
        for c in clips
    ]
    r = motion_rewards(noisy, direction="left")
    assert r[0] > 0.9 and r[1] < -0.9 and abs(r[2]) < 0.2
    pure_noise = torch.rand(FRAMES, 3, SIZE, SIZE, generator=g)
    assert abs(motion_rewards([pure_noise], direction="left")[0]) < 0.5


def test_motion_spec_checked_when_data_loads():
    ok = Entry("a ball moves left", (RewardSpec("motion", 1.0, {"direction": "up-left"}),))
    build_rewards(entries=[ok])
    for args, match in [
        ({}, "needs argument 'direction'"),
        ({"direction": "sideways"}, "direction='sideways'"),
        ({"direction": "left", "speed": 0}, "speed=0 must be a finite number > 0"),
        ({"direction": "left", "sped": 1}, "takes no argument 'sped'"),
    ]:
        with pytest.raises(RewardSpecError, match=match):
            build_rewards(entries=[Entry("x", (RewardSpec("motion", 1.0, args),))])


# ---------------------------------------------------------------- temporal_consistency


def test_consistency_terms_hand_values():
    a = torch.zeros(1, 3, 3, 2, 2)
    a[0, 1] = 0.2  # up by 0.2, then back down: similarity 0.8, flicker sqrt(0.2 · 0.2) = 0.2
    sim, flicker = vr.consistency_terms(a)
    assert sim.item() == pytest.approx(0.8, abs=1e-7) and flicker.item() == pytest.approx(0.2)
    b = a.clone()
    b[0, 2] = 0.4  # up twice: the same similarity, no reversal
    sim, flicker = vr.consistency_terms(b)
    assert sim.item() == pytest.approx(0.8, abs=1e-7) and flicker.item() == 0.0
    r = vr.temporal_consistency([a[0], b[0]], [{}, {"flicker_weight": 2.0}], ctx(2))
    assert r.tolist() == pytest.approx([0.6, 0.8], abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 frames"):
        vr.consistency_terms(a[:, :1])


def test_temporal_consistency_penalises_flicker_more_than_motion():
    g = torch.Generator().manual_seed(1)
    smooth = ball_clip(2.0)
    jitter = ball_clip(2.0, jitter=True)  # the same step size, back and forth
    flash = vr.clip_to_tensor(ball_clip(2.0))
    flash[1::2] = (flash[1::2] + 0.15).clamp(0, 1)  # brightness flicker on every other frame
    noise = torch.rand(FRAMES, 3, SIZE, SIZE, generator=g)
    clips = [ball_clip(), smooth, jitter, flash, noise]
    r = vr.temporal_consistency(clips, [{}] * 5, ctx(5, "temporal_consistency")).tolist()
    assert r[0] == 1.0
    assert r == sorted(r, reverse=True), r
    sim, flicker = vr.consistency_terms(torch.stack([vr.clip_to_tensor(c) for c in clips[1:3]]))
    assert sim[0] == pytest.approx(sim[1].item(), abs=1e-6)  # same amount of change ...
    # ... only the jitter reverses it (measured 0.0008, anti-aliased edges, vs 0.013)
    assert flicker[0] < 1e-3 and flicker[1] > 10 * flicker[0]


# ---------------------------------------------------------------- per_frame


def test_per_frame_pools_the_image_reward_over_frames():
    flash = vr.clip_to_tensor(ball_clip(1.0, 1.0, frames=5, radius=6))
    flash[1::2] = (flash[1::2] + 0.2).clamp(0, 1)  # frames of two brightness levels
    clips = [ball_clip(-2.0), flash]
    args = [{}, {"contrast": 0.0}]
    frame_scores = [
        im.aesthetic_proxy(list(vr.clip_to_tensor(c)), [a] * c.shape[0], ctx(c.shape[0]))
        for c, a in zip(clips, args)
    ]
    mean = vr.per_frame(im.aesthetic_proxy)(clips, args, ctx(2))
    worst = vr.per_frame(im.aesthetic_proxy, "min")(clips, args, ctx(2))
    torch.testing.assert_close(mean, torch.stack([s.mean() for s in frame_scores]))
    torch.testing.assert_close(worst, torch.stack([s.min() for s in frame_scores]))
    assert (frame_scores[1].max() - frame_scores[1].min()) > 1e-4  # frames really differ


def test_per_frame_passes_groups_and_fails_a_clip_with_a_failed_frame():
    seen = {}

    def frame_reward(outputs, args, c):
        seen.update(n=len(outputs), groups=c.group_ids, size=c.group_size, kind=type(outputs[0]))
        return [None if a.get("bad") and i % 3 == 0 else 1.0 for i, a in enumerate(args)]

    clips = [ball_clip(frames=3)] * 4
    c = RewardContext([Entry(i, ()) for i in range(4)], [0, 0, 1, 1], 2, 0)
    r = vr.per_frame(frame_reward, frames="pil")(clips, [{}, {}, {"bad": 1}, {}], c)
    assert seen == dict(n=12, groups=[0] * 6 + [1] * 6, size=6, kind=Image.Image)
    assert r[:2].tolist() == [1.0, 1.0] and math.isnan(r[2]) and r[3] == 1.0


def test_per_frame_registered_through_the_reward_computer():
    entries = [
        Entry(0, (RewardSpec("per_frame", 1.0, {"contrast": 0.0}),)),
        Entry(1, (RewardSpec("per_frame"),)),
    ]
    comp = build_rewards({"per_frame": {"reward": "aesthetic_proxy", "pool": "min"}}, entries)
    clips = [ball_clip(-1.0), ball_clip(0.0, 1.0)]
    got = comp(clips, RewardContext(entries, [0, 1], 1, 0)).total
    want = vr.per_frame(im.aesthetic_proxy, "min")(clips, [{"contrast": 0.0}, {}], ctx(2))
    torch.testing.assert_close(got, want)
    bad = [Entry(0, (RewardSpec("per_frame", 1.0, {"colour": 1.0}),))]
    with pytest.raises(RewardSpecError, match="takes no argument 'colour'"):
        build_rewards({"per_frame": {"reward": "aesthetic_proxy"}}, bad)
    with pytest.raises(ValueError, match="is not an image reward"):
        REWARDS["per_frame"].obj(reward="no_such_reward")


# ---------------------------------------------------------------- clip_video_score


def test_clip_video_score_is_clip_score_of_the_mean_frame_embedding(clip_dir):  # noqa: F811
    setup = {"clip_path": str(clip_dir), "device": "cpu", "batch_size": 3}
    video = REWARDS["clip_video_score"].obj(**setup)
    image = REWARDS["clip_score"].obj(**setup)
    clips = [ball_clip(-2.0, size=30), ball_clip(1.0, 2.0, frames=5, size=30)]
    texts = ["a ball moves left", "an orange ball"]
    entries = [Entry(t, (RewardSpec("clip_video_score"),)) for t in texts]
    got = video(clips, [{}, {}], RewardContext(entries, [0, 1], 1, 0))
    for clip, text, score in zip(clips, texts, got):
        x = vr.clip_to_tensor(clip)
        emb = torch.nn.functional.normalize(image.embed_images(x).mean(0), dim=-1)
        cos = float(emb @ image.embed_texts([text])[0])
        assert score == pytest.approx(100 * max(cos, 0.0), abs=1e-4)
    # a still clip scores as its frame does under clip_score
    still = [ball_clip(size=30, frames=4)]
    one = video(still, [{"text": "x"}], RewardContext(entries[:1], [0], 1, 0))
    frame = image([Image.fromarray(still[0][0].numpy())], [{"text": "x"}], ctx(1, "clip_score"))
    assert one[0] == pytest.approx(frame[0], abs=1e-4)
    assert np.isfinite(got).all()
