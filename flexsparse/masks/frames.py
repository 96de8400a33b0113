"""Frame-local attention: a simple frame-structured baseline pattern."""

from __future__ import annotations

import torch

from .. import tiles as T
from .._checks import check_choice, check_int
from ..layout import VideoLayout
from ..mask import Mask


def frame_window(layout: VideoLayout, radius: int, *, text: str = "global") -> Mask:
    """Video tokens see the video tokens of frames at most ``radius`` frames away.

    ``text="global"``: text tokens see everything and are seen by everything;
    ``"none"``: text tokens see only text. Bound to ``layout.length`` tokens.
    """
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a VideoLayout, got {type(layout).__name__}")
    r = check_int("radius", radius, minimum=0)
    check_choice("text", text, ("global", "none"))
    n = layout.length
    global_text = text == "global"

    def on_device(device):
        lk = layout.lookups(device)
        frame, is_text = lk["frame"], lk["is_text"]

        def mask_mod(b, h, q_idx, kv_idx):
            qi = torch.clamp(q_idx, 0, n - 1)
            ki = torch.clamp(kv_idx, 0, n - 1)
            q_text, k_text = is_text[qi], is_text[ki]
            near = (frame[qi] - frame[ki]).abs() <= r
            video = near & ~q_text & ~k_text
            if global_text:
                return video | q_text | k_text
            return video | (q_text & k_text)

        def rule(grid: T.TileGrid):
            q = layout.tile_frames(grid.q_lo, grid.q_hi)
            k = layout.tile_frames(grid.kv_lo, grid.kv_hi)
            qa, qb = q["first_frame"][:, None], q["last_frame"][:, None]
            ka, kb = k["first_frame"][None, :], k["last_frame"][None, :]
            q_vid, k_vid = q["has_video"][:, None], k["has_video"][None, :]
            q_txt, k_txt = q["has_text"][:, None], k["has_text"][None, :]
            gap = torch.clamp(torch.maximum(ka - qb, qa - kb), min=0)
            spread = torch.maximum(kb - qa, qb - ka)
            video_any = q_vid & k_vid & (gap <= r)
            video_all = spread <= r
            if global_text:
                any_true = video_any | q_txt | k_txt
                # only a (video, video) pair that is far apart can be dropped
                all_true = ~q_vid | ~k_vid | video_all
            else:
                any_true = video_any | (q_txt & k_txt)
                all_true = ((~q_vid & ~k_vid) & q_txt & k_txt) | (
                    video_all & ~q_txt & ~k_txt & q_vid & k_vid
                )
            return T.from_bounds(all_true, any_true)

        return mask_mod, rule

    return Mask(
        on_device=on_device, has_tile_rule=True, name=f"frame_window({r})", length=n
    )
