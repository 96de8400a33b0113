"""Demo sections of the video models: tiny random HunyuanVideo and Wan transformers, the
radial patch against the stock processor given the same mask (within 1e-5 in fp32)."""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("diffusers")

from flexsparse.commands import demo_video_models  # noqa: E402
from flexsparse.commands.demo import DemoContext  # noqa: E402


@pytest.mark.parametrize("section", [demo_video_models.hunyuan_video_section,
                                     demo_video_models.wan_section], ids=lambda f: f.__name__)
def test_section_agrees_with_masked_stock(tmp_path, section):
    ctx = DemoContext(out=tmp_path, quick=True, device=torch.device("cpu"),
                      dtype=torch.float32, repeats=1, log=lambda _: None)
    t0 = time.perf_counter()
    res = section(ctx)
    assert time.perf_counter() - t0 < 30  # a few seconds on a small CPU
    assert [row[0] for row in res.rows] == ["flex", "sdpa"]
    for row in res.rows:
        err, diff, density = float(row[3]), float(row[4]), float(row[2])
        assert err <= 1e-5 and diff > 1e-3 and 0 < density < 1, row
