"""Scene-aware sparsity: frames grouped into scenes, attention allowed along a scene graph.

A query in scene ``a`` may attend a key in scene ``b`` iff ``adjacency[a][b]`` (a scene
always sees itself). Scenes are contiguous runs of frames, so the scene id is monotone in
the token position and a tile's scenes are a contiguous range on each side: the tile is
empty / full when the adjacency sub-rectangle of those ranges is all-false / all-true,
which a 2-D prefix sum over the adjacency answers in O(1) per tile.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import tiles as T
from .._checks import check_choice, check_int
from ..layout import VideoLayout
from ..mask import Mask

TEXT_MODES = ("global", "none")
FRAME_UNITS = ("latent", "pixel")


def scenes(
    layout: VideoLayout,
    boundaries: Sequence[int],
    adjacency: Any,
    text: str = "global",
    frame_units: str = "latent",
) -> Mask:
    """Scene-graph attention over a video layout.

    Args:
        layout: the ``VideoLayout``.
        boundaries: start frame of every scene: ``[0, b1, b2, ...]``, strictly increasing;
            frames from the last start to the end belong to the last scene. ``S`` scenes.
        adjacency: who sees whom, ``[S, S]``: a square boolean matrix (nested lists, numpy
            array or tensor; nonzero = True; row = query scene, column = key scene), or a
            ``networkx.Graph`` (undirected: ``a - b`` lets each see the other) or
            ``networkx.DiGraph`` (``a -> b``: queries of ``a`` see keys of ``b``) whose
            nodes are scene ids ``0..S-1``. The diagonal is always True.
        text: ``"global"``: text tokens see everything and are seen by everything;
            ``"none"``: text and video do not see each other (text tokens see only text).
        frame_units: ``"latent"`` (default) or ``"pixel"``: boundaries in pixel frames,
            converted with ``layout.latent_frame`` (causal VAE: pixel frame ``p`` is in
            latent frame ``ceil(p / temporal_compression)``).

    Returns:
        A ``Mask`` bound to ``layout.length`` tokens with an exact tile rule. Compose it
        with ``radial(...) & scenes(...)``.
    """
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a flexsparse.VideoLayout, got {type(layout).__name__}")
    check_choice("text", text, TEXT_MODES)
    check_choice("frame_units", frame_units, FRAME_UNITS)
    starts = scene_starts(layout, boundaries, frame_units)
    adj = adjacency_matrix(adjacency, len(starts))
    scene_of_frame = torch.bucketize(
        torch.arange(layout.frames), torch.tensor(starts), right=True
    ) - 1
    return _scene_mask(layout, scene_of_frame, adj, text)


def scene_starts(layout: VideoLayout, boundaries: Sequence[int], frame_units: str) -> list[int]:
    """Validated scene start frames in latent units."""
    if isinstance(boundaries, (str, bytes)) or not hasattr(boundaries, "__iter__"):
        raise TypeError(f"boundaries must be a list of scene start frames, got {boundaries!r}")
    if isinstance(boundaries, (Tensor, np.ndarray)):
        boundaries = boundaries.tolist()
    vals = [check_int(f"boundaries[{i}]", b, minimum=0) for i, b in enumerate(boundaries)]
    if not vals:
        raise ValueError("boundaries must hold at least one scene start (0), got []")
    if vals[0] != 0:
        raise ValueError(f"boundaries must start at frame 0, got {vals}")
    if any(b <= a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"boundaries must be strictly increasing, got {vals}")
    if frame_units == "pixel":
        last_pixel = (layout.frames - 1) * layout.temporal_compression
        if vals[-1] > last_pixel:
            raise ValueError(
                f"boundaries[{len(vals) - 1}] = {vals[-1]} is past the last pixel frame "
                f"{last_pixel} of a {layout.frames}-latent-frame video"
            )
        latent = [layout.latent_frame(b) for b in vals]
        if any(b <= a for a, b in zip(latent, latent[1:])):
            raise ValueError(
                f"boundaries {vals} (pixel frames) map to latent frames {latent}: two scenes "
                f"start in one latent frame (temporal compression "
                f"{layout.temporal_compression})"
            )
        return latent
    if vals[-1] >= layout.frames:
        raise ValueError(
            f"boundaries[{len(vals) - 1}] = {vals[-1]} is past the last latent frame "
            f"{layout.frames - 1}"
        )
    return vals


ADJACENCY_FORMS = (
    "a square 0/1 matrix (nested lists, numpy array or tensor; bool or numbers 0/1), a "
    "networkx Graph/DiGraph on nodes 0..S-1, text with one row of digits per scene "
    "('110,111,011') or rows split by ';' and entries by ',' ('1,1;1,1'), or a path to a "
    ".json / .npy / .txt file holding one of these"
)
_FILE_SUFFIXES = (".json", ".npy", ".txt")


def parse_adjacency(spec: Any, num_scenes: int | None = None) -> Tensor:
    """Parse a scene adjacency from any form the library or the command line accepts.

    Args:
        spec: nested lists / numpy array / tensor of 0/1 (or bool), a ``networkx`` graph
            whose nodes are ``0..S-1`` (undirected edges go both ways), the text forms
            ``"110,111,011"`` (a row of digits per scene, rows split by ``,``) or
            ``"1,1;1,1"`` (rows split by ``;`` or newlines, entries by ``,`` or spaces),
            or a ``.json`` / ``.npy`` / ``.txt`` path holding one of those.
        num_scenes: the expected ``S``; ``None`` takes it from ``spec``.

    Returns:
        bool ``[S, S]`` on the CPU, ``[a, b]`` = queries of scene ``a`` see keys of scene
        ``b``, exactly as given (the diagonal is not forced here; ``scenes`` forces it).

    Raises:
        ValueError: malformed text, a missing file, a non-square or wrongly sized matrix,
            entries other than 0/1 (NaN and complex included), bad graph nodes.
        TypeError: ``spec`` is none of the accepted kinds (e.g. ``None`` or a dict).
    """
    if num_scenes is not None:
        num_scenes = check_int("num_scenes", num_scenes, minimum=1)
    if _is_graph(spec):
        adj = _graph_matrix(spec, num_scenes)
    else:
        data = _load(spec) if isinstance(spec, (str, os.PathLike)) else spec
        adj = _matrix(data, spec, num_scenes)
    return adj


def adjacency_matrix(adjacency: Any, num_scenes: int) -> Tensor:
    """bool ``[S, S]`` from any form ``parse_adjacency`` takes, diagonal set."""
    return parse_adjacency(adjacency, num_scenes) | torch.eye(num_scenes, dtype=torch.bool)


def _show(spec: Any) -> str:
    text = repr(spec)
    return text if len(text) <= 200 else text[:197] + "..."


def _bad(spec: Any, why: str) -> ValueError:
    return ValueError(f"adjacency {why}; got {_show(spec)}. Accepted: {ADJACENCY_FORMS}")


def _is_path(spec: str | os.PathLike) -> bool:
    if isinstance(spec, os.PathLike):
        return True
    if "\n" in spec or ";" in spec:
        return False
    return spec.lower().endswith(_FILE_SUFFIXES) or os.path.isfile(spec)


def _load(spec: str | os.PathLike) -> Any:
    """Nested rows (or an array) from adjacency text or a file path."""
    if not _is_path(spec):
        return _parse_text(spec, spec)
    path = Path(spec)
    if not path.is_file():
        raise _bad(spec, f"file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        content = path.read_text()
        if suffix == ".json":
            data = json.loads(content)
            return _parse_text(data, spec) if isinstance(data, str) else data
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise _bad(spec, f"file {str(path)!r} could not be read ({err})") from None
    return _parse_text(content, spec)


def _parse_text(text: str, spec: Any) -> list[list[float]]:
    # Rows split by ';' or newlines take ',' or spaces between entries; without them the
    # CLI's '110,111,011' form splits rows at ','. A row that is one run of digits is a
    # row of one-digit entries in both forms.
    if ";" in text or "\n" in text.strip():
        rows = [r.replace(",", " ").split() for r in re.split(r"[;\n]", text)]
    else:
        rows = [r.split() for r in text.split(",")]
    rows = [r for r in rows if r]
    if not rows:
        raise _bad(spec, "is empty")
    out = []
    for row in rows:
        if len(row) == 1 and row[0].isdigit():
            row = list(row[0])
        try:
            out.append([float(x) for x in row])
        except ValueError:
            raise _bad(spec, f"row {' '.join(row)!r} is not a row of 0/1 entries") from None
    return out


def _matrix(data: Any, spec: Any, num_scenes: int | None) -> Tensor:
    if isinstance(data, Tensor):
        data = data.detach().cpu()
        if data.dtype == torch.bfloat16:
            data = data.float()
        data = data.numpy()
    if not isinstance(data, (list, tuple, np.ndarray)):
        raise TypeError(f"adjacency must be one of: {ADJACENCY_FORMS}; got {_show(spec)} "
                        f"({type(spec).__name__})")
    try:
        arr = np.asarray(data)
    except (TypeError, ValueError):
        raise _bad(spec, "must be a square matrix (rows of equal length)") from None
    if num_scenes is not None and arr.shape != (num_scenes, num_scenes):
        raise ValueError(
            f"adjacency must be {num_scenes} x {num_scenes} (one row and column per scene), "
            f"got shape {arr.shape} from {_show(spec)}"
        )
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.size == 0:
        raise _bad(spec, f"must be a non-empty square matrix (found shape {arr.shape})")
    if arr.dtype == bool:
        return torch.from_numpy(arr.copy())
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise _bad(spec, f"entries must be 0/1 or booleans (found dtype {arr.dtype})")
    if not np.isin(arr, (0, 1)).all():
        bad = arr[~np.isin(arr, (0, 1))].ravel()[:3].tolist()
        raise _bad(spec, f"entries must be 0 or 1 (found {bad})")
    return torch.from_numpy(arr != 0)


def _graph_matrix(graph: Any, num_scenes: int | None) -> Tensor:
    s = len(graph.nodes) if num_scenes is None else num_scenes
    bad = [n for n in graph.nodes if not _scene_id(n, s)]
    if bad or s == 0:
        raise ValueError(
            f"adjacency graph nodes must be scene ids 0..{s - 1}, got {bad[:5] or 'no nodes'}"
        )
    adj = torch.zeros(s, s, dtype=torch.bool)
    for u, v in graph.edges():
        adj[int(u), int(v)] = True
        if not graph.is_directed():
            adj[int(v), int(u)] = True
    return adj


def _is_graph(obj: Any) -> bool:
    # Checked by module so that networkx is imported only by those who pass a graph.
    return type(obj).__module__.startswith("networkx") and hasattr(obj, "edges")


def _scene_id(node: Any, s: int) -> bool:
    return isinstance(node, (int, np.integer)) and not isinstance(node, bool) and 0 <= node < s


def _scene_mask(layout: VideoLayout, scene_of_frame: Tensor, adj: Tensor, text: str) -> Mask:
    n_tok, frames = layout.length, layout.frames
    last = n_tok - 1
    num = adj.shape[0]
    # 2-D prefix sums: count of True in adj[a0:a1, b0:b1] in four lookups.
    sat = torch.nn.functional.pad(adj.to(torch.int32).cumsum(0).cumsum(1), (1, 0, 1, 0))

    def on_device(device):
        lk = layout.lookups(device)
        is_text = lk["is_text"]
        sof = scene_of_frame.to(device)
        scene = sof[torch.clamp(lk["frame"], min=0)]  # text rows: any id, overridden
        adj_d, sat_d = adj.to(device), sat.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            qi, ki = torch.clamp(q_idx, 0, last), torch.clamp(kv_idx, 0, last)
            tq, tk = is_text[qi], is_text[ki]
            video = adj_d[scene[qi], scene[ki]]
            if text == "global":
                return tq | tk | video
            return (tq & tk) | (~tq & ~tk & video)

        def rule(grid: T.TileGrid) -> Tensor:
            q = layout.tile_frames(grid.q_lo, grid.q_hi)
            k = layout.tile_frames(grid.kv_lo, grid.kv_hi)

            def scene_range(info):
                lo = sof[torch.clamp(info["first_frame"], 0, frames - 1)]
                hi = sof[torch.clamp(info["last_frame"], 0, frames - 1)]
                return lo, hi + 1

            qa, qz = (x[:, None] for x in scene_range(q))
            ka, kz = (x[None, :] for x in scene_range(k))
            count = sat_d[qz, kz] - sat_d[qa, kz] - sat_d[qz, ka] + sat_d[qa, ka]
            vv = q["has_video"][:, None] & k["has_video"][None, :]
            tq, tk = q["has_text"][:, None], k["has_text"][None, :]
            video_all = ~vv | (count == (qz - qa) * (kz - ka))
            video_any = vv & (count > 0)
            if text == "global":
                return T.from_bounds(video_all, tq | tk | video_any)
            mixed = (tq & k["has_video"][None, :]) | (q["has_video"][:, None] & tk)
            return T.from_bounds(video_all & ~mixed, (tq & tk) | video_any)

        return mask_mod, rule

    return Mask(
        on_device=on_device, has_tile_rule=True, name=f"scenes({num}, text={text})",
        length=n_tok,
    )
