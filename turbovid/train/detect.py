"""Read colour, shape, size, motion direction and speed back from a video of one moving shape.

Deterministic, no learned parts, so it can grade generated videos against their prompts:

1. Background = per-channel median over all pixels of all frames (the object covers < 10% of them).
2. Distance to the background (RGB, [0, 1] scale), averaged over 3x3 pixels. Object pixels are those
   farther than `FG_DISTANCE`; the object colour is the per-channel median of the most distant ones
   (robust to anti-aliased or blurred edges) -> nearest palette colour.
3. Soft coverage alpha = (distance to background - NOISE_FLOOR) / (object-background distance -
   NOISE_FLOOR), clipped to [0, 1]; the floor keeps background gradients out of the centroids.
   Per frame: only a window around the median position of alpha > 0.5 (snapped to the nearest such pixel) is kept (stray blobs of a
   generated video elsewhere are ignored); alpha-weighted centroid. Shape and size use the same alpha
   computed from the unsmoothed distance (smoothing would round off small shapes).
4. Motion = least-squares line through the centroids; its total displacement gives the direction
   (8 sectors of 45 degrees) and the speed (path length against the midpoint of the two speeds).
5. Shape = the frame's (unsmoothed) alpha inside its bounding box of alpha > 0.5, resampled to 32 x 32 and compared by soft IoU
   with the five shapes, each also with rounded corners (a morphological opening, radius up to 15% of the box side, then
   a closing, up to 20%: what an 8x VAE does to a 38-pixel shape, which a person still reads as the same shape), every
   variant cropped to its own bounding box and resampled into the same 32 x 32. Scores are summed over frames per
   (shape, rounding); the best pair names the shape, so one rounding is chosen for the whole clip. Without the rounded
   variants the VAE's own round trips of small crosses read as diamonds and small diamonds as circles.
   Size = mean bounding-box side -> nearest size class.

A clip with no object pixels gets "none" for everything (always counted wrong).

Beside the attributes, `hue_drift`: the object's core colour (as in 2) on frame 0 and over the last quarter of the
frames, their hue difference in degrees. The truth holds one colour; the 4-step students turn some colours round
the hue circle from frame to frame (blue to purple), which the colour attribute, read over the whole clip, counts
only once the drift passes a palette boundary.
"""
from __future__ import annotations

import colorsys
import functools
import math

import torch
import torch.nn.functional as F

from turbovid.train.data import COLORS, SHAPES, SIZES, SPEEDS, shape_sdf

FG_DISTANCE = 0.3       # backgrounds and objects are >= 0.5 apart (data.MIN_CONTRAST)
NOISE_FLOOR = 0.12      # background gradients move pixels up to ~0.09 away from the median
MIN_PIXELS = 4          # fewer object pixels than this in the whole clip: no object
WINDOW = 0.2           # half-side (frame widths) of the box kept around the object; largest radius ~0.15
STILL = 0.06            # displacement below this (frame widths) is no motion
TEMPLATE = 32           # shape templates are TEMPLATE x TEMPLATE
OPENINGS = (0.0, 0.05, 0.1, 0.15)   # corner-rounding radii (fractions of the box side) of the template variants;
CLOSINGS = (0.0, 0.1, 0.2)         # 0.15 keeps the cross's arms (half-width 0.167), 0.2 fills its inner corners
SECTORS = ("right", "down-right", "down", "down-left", "left", "up-left", "up", "up-right")  # angle/45deg, y down
ATTRIBUTES = ("color", "shape", "direction", "speed", "size")
VERSION = 2             # 1: sharp templates only (results before 2026-11-23 session 11); 2: rounded variants too


def _morph(mask: torch.Tensor, radius: int, dilate: bool) -> torch.Tensor:
    """Binary dilation (or erosion) of mask [H, W] by a disc of `radius` pixels: the count of mask pixels under the
    disc, by FFT convolution (the discs are up to 51 pixels wide; a direct convolution takes minutes on one core).
    The mask must have `radius` pixels of margin: the FFT wraps around."""
    h, w = mask.shape
    c = torch.arange(-radius, radius + 1, dtype=torch.float64)
    disc = torch.zeros(h, w, dtype=torch.float64)
    d = ((c.view(-1, 1) ** 2 + c.view(1, -1) ** 2) <= radius * radius).double()
    disc[:2 * radius + 1, :2 * radius + 1] = d
    disc = disc.roll((-radius, -radius), dims=(0, 1))                  # centred on pixel (0, 0)
    src = mask.double() if dilate else 1 - mask.double()
    count = torch.fft.irfft2(torch.fft.rfft2(src) * torch.fft.rfft2(disc), s=(h, w))
    hit = (count > 0.5).float()
    return hit if dilate else 1 - hit


@functools.lru_cache(maxsize=1)
def _template_bank() -> torch.Tensor:
    """[5, R, TEMPLATE, TEMPLATE] coverage of each shape, for each (opening, closing) rounding in OPENINGS x CLOSINGS,
    cropped to its own bounding box and resampled to fill TEMPLATE x TEMPLATE (area average of a 256-pixel raster)."""
    hi = 256
    c = (torch.arange(hi, dtype=torch.float32) + 0.5) / hi * 2 - 1
    py, px = c.view(-1, 1), c.view(1, -1)
    bank = []
    for shape in SHAPES:
        # Padded so that dilations near the box edge are not cut off before the closing's erosion.
        solid = F.pad((shape_sdf(shape, px, py, 1.0) < 0).float(), (hi // 4,) * 4)
        variants = []
        for opening in OPENINGS:
            for closing in CLOSINGS:
                m, ro, rc = solid, round(opening * hi), round(closing * hi)
                if ro:
                    m = _morph(_morph(m, ro, dilate=False), ro, dilate=True)
                if rc:
                    m = _morph(_morph(m, rc, dilate=True), rc, dilate=False)
                rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
                m = m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
                variants.append(F.interpolate(m[None, None], size=(TEMPLATE, TEMPLATE), mode="area")[0, 0])
        bank.append(torch.stack(variants))
    return torch.stack(bank)


def _nearest(value: float, table: dict[str, float]) -> str:
    return min(table, key=lambda k: abs(math.log(value / table[k])))


def _distances(video: torch.Tensor):
    """video [3, F, H, W] in [-1, 1] -> (x [3, F, H, W] in [0, 1], background [3], distance to it [F, H, W], and
    that distance averaged over 3x3 pixels, so that pixel noise of generated videos averages out): steps 1-2."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"detect expects one video [3, F, H, W], got {tuple(video.shape)}")
    x = ((video.float() + 1) / 2).clamp(0, 1)
    bg = x.flatten(1).median(dim=1).values                                   # [3]
    raw = (x - bg.view(3, 1, 1, 1)).norm(dim=0)                              # [F, H, W]
    dist = F.avg_pool2d(F.pad(raw[:, None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[:, 0]
    return x, bg, raw, dist


def _core_colour(x: torch.Tensor, dist: torch.Tensor) -> torch.Tensor | None:
    """The object's colour [3]: per-channel median of its core (the most distant pixels), not of edges blended
    with the background; None with fewer than MIN_PIXELS object pixels."""
    fg = dist > FG_DISTANCE
    if int(fg.sum()) < MIN_PIXELS:
        return None
    core = dist >= max(FG_DISTANCE, 0.75 * float(dist[fg].quantile(0.9)))
    return x[:, core].median(dim=1).values


@torch.no_grad()
def hue_drift(video: torch.Tensor) -> float | None:
    """How far the object's colour turns during the clip: the hue (degrees) of its core colour over the last quarter
    of the frames minus that on frame 0, wrapped to [-180, 180). The clips hold one colour, so a drawn video
    should read ~0; a student whose later frames turn blue into purple reads about +50. None where either part
    has no object, or no hue (a grey core)."""
    x, _, _, dist = _distances(video)
    return _hue_drift(x, dist)


def _hue_drift(x: torch.Tensor, dist: torch.Tensor) -> float | None:
    frames = x.shape[1]
    hues = []
    for part in (slice(0, 1), slice(frames - max(1, frames // 4), frames)):
        rgb = _core_colour(x[:, part], dist[part])
        if rgb is None:
            return None
        hue, saturation, _ = colorsys.rgb_to_hsv(*rgb.tolist())
        if saturation < 0.2:
            return None
        hues.append(hue * 360)
    return (hues[1] - hues[0] + 180) % 360 - 180


@torch.no_grad()
def detect(video: torch.Tensor) -> dict[str, str]:
    """video [3, F, H, W] in [-1, 1] -> {"color", "shape", "direction", "speed", "size"}."""
    return _detect(*_distances(video))


def _detect(x: torch.Tensor, bg: torch.Tensor, raw: torch.Tensor, dist: torch.Tensor) -> dict[str, str]:
    """Steps 2-5 on what `_distances` returns (left unchanged, so `_hue_drift` can read the same tensors)."""
    _, frames, height, width = x.shape
    obj = _core_colour(x, dist)
    if obj is None:
        return {k: "none" for k in ATTRIBUTES}
    color = min(COLORS, key=lambda c: float((obj - torch.tensor(COLORS[c], device=obj.device)).norm()))
    contrast = float((obj - bg).norm())
    alpha = ((dist - NOISE_FLOOR) / max(contrast - NOISE_FLOOR, 1e-3)).clamp(0, 1)   # [F, H, W] smoothed
    sharp = ((raw - NOISE_FLOOR) / max(contrast - NOISE_FLOOR, 1e-3)).clamp(0, 1)    # for shape and size

    # Per frame: keep alpha only within WINDOW of the median position of the solid pixels (stray blobs
    # elsewhere do not move the centroid or widen the box), then the centroid in frame fractions.
    ys = (torch.arange(height, device=x.device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=x.device, dtype=torch.float32) + 0.5) / width
    visible, centres = [], []
    for f in range(frames):
        solid = (alpha[f] > 0.5).nonzero()
        if len(solid) < MIN_PIXELS:
            alpha[f] = 0
            continue
        py, px = ys[solid[:, 0]], xs[solid[:, 1]]
        # Centre the window on the solid pixel nearest the per-axis medians: the medians alone may pair one
        # blob's row with another's column (an empty corner), the nearest solid pixel is always inside.
        near = int(((py - py.median()).abs() + (px - px.median()).abs()).argmin())
        my, mx = py[near], px[near]
        window = (((ys - my).abs() < WINDOW)[:, None] & ((xs - mx).abs() < WINDOW)[None, :]).float()
        alpha[f] *= window
        sharp[f] *= window
        mass = alpha[f].sum()
        visible.append(f)
        centres.append(torch.stack([(alpha[f].sum(0) * xs).sum() / mass, (alpha[f].sum(1) * ys).sum() / mass]))
    if not visible:
        return {k: "none" for k in ATTRIBUTES}
    cx, cy = torch.stack(centres).unbind(1)

    # Motion: slope of the least-squares line through the centroids, times the clip length.
    if len(visible) >= 2:
        tf = torch.tensor(visible, device=x.device, dtype=torch.float32)
        tf = tf - tf.mean()
        dx = float((tf * (cx - cx.mean())).sum() / (tf * tf).sum()) * (frames - 1)
        dy = float((tf * (cy - cy.mean())).sum() / (tf * tf).sum()) * (frames - 1)
    else:
        dx = dy = 0.0
    length = math.hypot(dx, dy)
    if length < STILL:
        direction, speed = "none", "none"
    else:
        direction = SECTORS[round(math.atan2(dy, dx) / (math.pi / 4)) % 8]
        speed = "slow" if length < (SPEEDS["slow"] + SPEEDS["fast"]) / 2 else "fast"

    # Shape and size from up to 8 evenly spaced visible frames.
    templates = _template_bank().to(x.device)                              # [5, R, T, T]
    scores, sides = torch.zeros(templates.shape[:2], device=x.device), []
    picked = [visible[round(i * (len(visible) - 1) / 7)] for i in range(8)] if len(visible) > 8 else visible
    for f in picked:
        solid = sharp[f] > 0.5 if bool((sharp[f] > 0.5).any()) else alpha[f] > 0.5
        rows, cols = solid.any(1).nonzero().flatten(), solid.any(0).nonzero().flatten()
        crop = sharp[f, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        sides.append(max(crop.shape[0] / height, crop.shape[1] / width))
        crop = F.interpolate(crop[None, None], size=(TEMPLATE, TEMPLATE), mode="bilinear", antialias=True,
                             align_corners=False)[0, 0]
        scores += torch.minimum(templates, crop).sum((2, 3)) / torch.maximum(templates, crop).sum((2, 3))
    shape = SHAPES[int(scores.amax(1).argmax())]
    size = _nearest(sum(sides) / len(sides), SIZES)
    return {"color": color, "shape": shape, "direction": direction, "speed": speed, "size": size}


def prompt_right(detection: dict[str, str], attributes: dict[str, str]) -> bool:
    """One clip's headline verdict: colour, shape and direction all detected as the prompt asked."""
    return all(detection[k] == attributes[k] for k in ("color", "shape", "direction"))


@torch.no_grad()
def adherence(videos: torch.Tensor | list[torch.Tensor], attributes: list[dict[str, str]]) -> dict:
    """Accuracy of each attribute over a batch of (video [3, F, H, W], ground-truth attributes), plus
    "all" = colour, shape and direction all right (the headline prompt-adherence score), "hue_drift" = the mean
    |hue_drift| in degrees over the clips that have one (None if none does), and the per-clip detections (each
    with its signed hue_drift)."""
    if len(videos) != len(attributes) or len(attributes) == 0:
        raise ValueError(f"adherence needs as many videos as attribute dicts (> 0), got {len(videos)} and "
                         f"{len(attributes)}")
    found = []
    for video in videos:   # one background / distance pass per clip serves the attributes and the drift
        x, bg, raw, dist = _distances(video)
        found.append({**_detect(x, bg, raw, dist), "hue_drift": _hue_drift(x, dist)})
    scores = {k: sum(d[k] == a[k] for d, a in zip(found, attributes)) / len(found) for k in ATTRIBUTES}
    drifts = [abs(d["hue_drift"]) for d in found if d["hue_drift"] is not None]
    scores["hue_drift"] = sum(drifts) / len(drifts) if drifts else None   # mean |degrees| (hue_drift)
    scores["all"] = sum(prompt_right(d, a) for d, a in zip(found, attributes)) / len(found)
    scores["detections"] = found
    return scores
