"""`grpo-ar report`: curves, sample grids, completion tables and configs in a self-contained
report.html, checked in Debian's headless Chromium (no console errors, every image loaded and
not blank)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os

import browser
import pytest
from tiny_runs import make, write_media_run

from grpo_ar.cli import main
from grpo_ar.errors import DataError
from grpo_ar.io.report import read_rows, write_report
from grpo_ar.io.report_plots import frames_of, pick_steps, rolling

IMAGES_OK = """(async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  return imgs.map(img => {
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    let distinct = 0, inked = 0;
    if (c.width) {
      const g = c.getContext('2d');
      g.drawImage(img, 0, 0);
      const d = g.getImageData(0, 0, c.width, c.height).data;
      const seen = new Set();
      for (let k = 0; k < d.length; k += 4) {
        seen.add((d[k] << 16) | (d[k + 1] << 8) | d[k + 2]);
        if (d[k] + d[k + 1] + d[k + 2] < 600) inked++;
      }
      distinct = seen.size;
    }
    return {cls: img.className, alt: img.alt, w: img.naturalWidth, distinct, inked,
            pixels: c.width * c.height};
  });
})()"""


def blank(img: dict) -> bool:
    """Nothing drawn: one or two colours, or (almost) no pixel darker than near-white."""
    return img["w"] == 0 or img["distinct"] < 3 or img["inked"] < 0.002 * img["pixels"]


def test_rolling_and_pick_steps_by_hand():
    assert rolling([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert rolling([2.0, 4.0, 9.0], 5) == [2.0, 3.0, 5.0]
    assert pick_steps([1, 2, 3], 6) == [1, 2, 3]
    assert pick_steps(list(range(1, 11)), 4) == [1, 4, 7, 10]


def test_read_rows_skips_only_a_cut_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "rew')
    assert read_rows(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(DataError, match="m.jsonl:2: not valid JSON"):
        read_rows(path)


# CI (.ci/run sets GRPO_AR_REQUIRE_BROWSER=1) must run the browser tests, so a missing chromium
# fails there; elsewhere it is a skip that says how to get one
NEEDS_BROWSER = pytest.mark.skipif(
    not browser.available() and not os.environ.get("GRPO_AR_REQUIRE_BROWSER"),
    reason=f"{browser.CHROMIUM} not installed; `make test` installs Debian's chromium as root",
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """`grpo-ar report TEXT PNG GIF --out OUT`: a real 3-step text run overlaid with an image
    and a video run; (out folder, (stdout, stderr), run folders)."""
    root = tmp_path_factory.mktemp("report")
    runs = [root / "text", write_media_run(root, "png"), write_media_run(root, "gif")]
    make(runs[0]).train()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["report", *map(str, runs), "--out", str(root / "out")]) == 0
    return root / "out", (out.getvalue(), err.getvalue()), runs


def test_cli_report_writes_curves_tables_and_configs(report):
    out, (stdout, stderr), (text, png, gif) = report
    assert stdout.splitlines()[0].split()[0] == "step"  # the first run's text table
    assert f"wrote {out / 'report.html'}" in stderr
    pngs = {p.name for p in out.glob("*.png")}
    curves = pngs - {"samples_png.png", "samples_gif.png"}
    assert {"reward.png", "rewards.png", "kl.png", "entropy.png", "length.png"} <= curves
    assert {"eval.png", "truncation.png", "clip.png", "time.png", "throughput.png"} <= curves
    assert {"samples_png.png", "samples_gif.png"} < pngs
    page = (out / "report.html").read_text()
    assert page.count('class="curve"') == len(curves)
    assert page.count('class="grid"') == 2
    assert page.count('class="clip"') == 4  # the GIF run's first and last step, animated
    # self-contained: every PNG is embedded, equal to the file written beside it
    for p in out.glob("*.png"):
        assert base64.b64encode(p.read_bytes()).decode() in page
    # the text run's completion table: one column per reward, samples.jsonl's values
    assert "<th>trk_sevens</th><th>trk_short</th><th>reward</th><th>advantage</th>" in page
    sample = json.loads((text / "samples.jsonl").read_text().splitlines()[0])
    assert f"{sample['advantage']:.4g}" in page
    assert "beta: 0.05" in page and "&lt;resolved&gt;" in page  # configs, escaped
    # the GIF run's grid shows each clip as its 3 frames side by side
    assert frames_of(gif / "samples" / "step_000001" / "sample_000.gif").shape == (8, 24, 3)


def test_a_panel_no_run_has_is_left_out(tmp_path):
    run = write_media_run(tmp_path, "png", steps=2)
    write_report([run], tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").glob("*.png")}
    assert names == {"reward.png", "kl.png", "entropy.png", "time.png", "throughput.png",
                     "samples_png.png"}  # fmt: skip


@NEEDS_BROWSER
def test_the_browser_check_catches_broken_pages(tmp_path):
    """The harness itself: a console error, a missing image and a white image are all caught."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 20), "white").save(buf, format="PNG")
    white = base64.b64encode(buf.getvalue()).decode()
    (tmp_path / "bad.html").write_text(
        f'<img alt="white" src="data:image/png;base64,{white}"><img alt="missing" src="nope.png">'
        '<script>console.error("boom")</script>'
    )
    errors, imgs = browser.open_page((tmp_path / "bad.html").as_uri(), IMAGES_OK)
    assert any("boom" in e for e in errors)
    assert any("nope.png" in e for e in errors)  # the failed load
    assert [blank(i) for i in imgs] == [True, True]


@NEEDS_BROWSER
def test_report_opens_in_chromium_without_errors_and_with_every_image(report):
    out, _, _ = report
    errors, imgs = browser.open_page((out / "report.html").as_uri(), IMAGES_OK)
    assert errors == []
    kinds = [i["cls"] for i in imgs]
    assert kinds.count("curve") == len(list(out.glob("*.png"))) - 2  # all but the 2 grids
    assert kinds.count("grid") == 2 and kinds.count("clip") == 4
    shown = [(i["alt"], blank(i)) for i in imgs]
    assert not any(b for _, b in shown), shown
