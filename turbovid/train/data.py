"""Procedural text-to-video data: one coloured shape moving across a plain background.

Nothing is read from disk: clip `index` of split `split` under `seed` is a pure function of those three
numbers. A clip is described by a `Clip` (ground-truth attributes kept for evaluation, the continuous
rendering parameters, and a caption drawn from templates), then rendered on any device:

    attributes  colour (8) x shape (5) x direction (8) x speed (2) x size (3) x background (9)
    caption     "a small blue square slides upward across a white background", ...
    frames      [3, F, H, W] in [-1, 1], F = 4k + 1, H = W = size; anti-aliased signed-distance shapes

Held-out prompts. A fixed 10% of the (colour, shape, direction) triples never occur in the "train" split
and are the only triples of the "heldout" split, so every caption of one split differs from every caption
of the other, while each colour, shape and direction (and each colour-shape pair) is still seen in
training: held-out accuracy measures compositional generalisation, not new words.

Target size for the embedded model: 240 x 240 x 33 frames -> VAE latent 9 x 30 x 30 -> 9 * 15 * 15 =
2025 DiT tokens (>= 2000, so SLA's block sparsity has room to act). Any size divisible by 16 works.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# ---- vocabulary ----------------------------------------------------------------------------------

COLORS: dict[str, tuple[float, float, float]] = {      # RGB in [0, 1], saturated, pairwise >= 0.34 apart
    "red": (0.90, 0.12, 0.12),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.15, 0.75, 0.20),
    "cyan": (0.10, 0.80, 0.90),
    "blue": (0.15, 0.30, 0.95),
    "purple": (0.60, 0.20, 0.85),
    "pink": (1.00, 0.45, 0.75),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Image coordinates: x to the right, y downwards, so "up" is -y.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
    "up-left": (-1, -1), "up-right": (1, -1), "down-left": (-1, 1), "down-right": (1, 1),
}
SPEEDS = {"slow": 0.25, "fast": 0.5}                   # path length over the clip, in frame widths
SIZES = {"small": 0.16, "medium": 0.22, "large": 0.30}  # bounding-box side, in frame widths
PATH_JITTER = 0.1    # the path's midpoint is the frame centre +- this (frame widths), per axis
BACKGROUNDS: dict[str, tuple[str, tuple[float, float, float]]] = {   # name -> (tone, RGB)
    "black": ("dark", (0.04, 0.04, 0.05)),
    "dark gray": ("dark", (0.22, 0.22, 0.24)),
    "white": ("light", (0.96, 0.96, 0.96)),
    "light gray": ("light", (0.78, 0.78, 0.80)),
    "navy": ("colour", (0.06, 0.08, 0.28)),
    "olive": ("colour", (0.33, 0.33, 0.10)),
    "maroon": ("colour", (0.35, 0.05, 0.08)),
    "beige": ("colour", (0.93, 0.87, 0.72)),
    "lavender": ("colour", (0.85, 0.82, 0.95)),
}   # no background name contains a colour or tone word of the object vocabulary
MIN_CONTRAST = 0.5   # RGB distance object <-> background; closer pairs are never drawn (detectability)
SPLITS = ("train", "heldout")

# ---- caption templates ---------------------------------------------------------------------------
# Every phrase names exactly one attribute value; `parse_caption` inverts a caption by longest match.

DIRECTION_PHRASES = {
    "left": ("to the left", "leftward", "left"),
    "right": ("to the right", "rightward", "right"),
    "up": ("upward", "up", "toward the top"),
    "down": ("downward", "down", "toward the bottom"),
    "up-left": ("toward the upper left", "up and to the left", "diagonally up and left"),
    "up-right": ("toward the upper right", "up and to the right", "diagonally up and right"),
    "down-left": ("toward the lower left", "down and to the left", "diagonally down and left"),
    "down-right": ("toward the lower right", "down and to the right", "diagonally down and right"),
}
# (3rd person, -ing form) pairs; each verb phrase states the speed.
VERBS = {
    "slow": (("moves slowly", "moving slowly"), ("drifts", "drifting"), ("glides slowly", "gliding slowly"),
             ("slides slowly", "sliding slowly"), ("creeps", "creeping")),
    "fast": (("moves quickly", "moving quickly"), ("zooms", "zooming"), ("races", "racing"),
             ("slides quickly", "sliding quickly"), ("rushes", "rushing")),
}
SIZE_WORDS = {"small": ("small", "tiny"), "medium": ("medium-sized", "mid-sized"), "large": ("large", "big")}
TONE_WORDS = {"dark": ("dark",), "light": ("light", "bright")}
TEMPLATES = (
    "a {size} {color} {shape} {verb} {direction} on a {bg} background",
    "a {size} {color} {shape} {verb} {direction} across a {bg} background",
    "on a {bg} background, a {size} {color} {shape} {verb} {direction}",
    "a {bg} background with a {size} {color} {shape} {verb_ing} {direction}",
    "{size} {color} {shape} {verb_ing} {direction} over a {bg} background",
)


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


# ---- clips ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clip:
    caption: str
    color: str
    shape: str
    direction: str
    speed: str
    size: str
    background: str
    # rendering parameters, all in frame-width units (positions in [0, 1]^2)
    rgb: tuple[float, float, float]
    bg_rgb: tuple[float, float, float]
    gradient: tuple[float, float]     # background brightness slope along (x, y)
    radius: float                     # half the bounding-box side
    start: tuple[float, float]        # centre at the first frame
    displacement: tuple[float, float]  # centre(last frame) - centre(first frame)

    @property
    def tone(self) -> str:
        return BACKGROUNDS[self.background][0]

    def attributes(self) -> dict[str, str]:
        """The ground truth evaluation compares against."""
        return {"color": self.color, "shape": self.shape, "direction": self.direction, "speed": self.speed,
                "size": self.size, "background": self.background}


def is_heldout(color: str, shape: str, direction: str) -> bool:
    """True for the held-out 10% of (colour, shape, direction) triples. For a fixed colour and shape the
    values 3*d mod 10 are distinct over the 8 directions, so at most one direction of each pair is held out."""
    c, s, d = list(COLORS).index(color), SHAPES.index(shape), list(DIRECTIONS).index(direction)
    return (c + 2 * s + 3 * d) % 10 == 3


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if index < 0:
        raise ValueError(f"clip index must be >= 0, got {index}")
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def make_caption(rng: np.random.Generator, color: str, shape: str, direction: str, speed: str, size: str,
                 background: str) -> str:
    verb, verb_ing = _pick(rng, VERBS[speed])
    tone = BACKGROUNDS[background][0]
    bg = _pick(rng, (background,) + TONE_WORDS.get(tone, ()))   # "dark"/"light" only for grey tones
    size_word = _pick(rng, SIZE_WORDS[size])
    template = _pick(rng, TEMPLATES)
    text = template.format(size=size_word, color=color, shape=shape, verb=verb, verb_ing=verb_ing,
                           direction=_pick(rng, DIRECTION_PHRASES[direction]), bg=bg)
    # "a orange ..." -> "an orange ...": articles follow the next word.
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "an"):
            words[i] = _article(words[i + 1])
    return " ".join(words)


def path_start(rng: np.random.Generator, radius: float, displacement: tuple[float, float]) -> tuple[float, float]:
    """Centre of the object at the first frame: the path is centred on the frame up to +-PATH_JITTER per axis,
    kept inside it (object plus a 0.02 margin) for the whole clip. Centred paths make the caption nearly
    determine the trajectory: with starts drawn anywhere in the frame, the first mini teacher (3.5M parameters,
    480k samples) learnt colour but ignored the direction words entirely (held-out and training prompts both
    at chance), since the noisy frames themselves reveal the motion wherever the text would have helped."""
    margin, start = 0.02, []
    for d in displacement:
        low, high = radius + margin - min(0.0, d), 1 - radius - margin - max(0.0, d)
        centred = 0.5 - d / 2 + float(rng.uniform(-PATH_JITTER, PATH_JITTER))
        start.append(min(max(centred, low), high))
    return start[0], start[1]


def sample_clip(seed: int, split: str, index: int) -> Clip:
    """Clip `index` of `split`: attributes, continuous parameters and caption, a pure function of the inputs."""
    rng = clip_rng(seed, split, index)
    while True:   # rejection sampling of the (colour, shape, direction) triple by split
        color, shape, direction = _pick(rng, list(COLORS)), _pick(rng, SHAPES), _pick(rng, list(DIRECTIONS))
        if is_heldout(color, shape, direction) == (split == "heldout"):
            break
    speed, size = _pick(rng, list(SPEEDS)), _pick(rng, list(SIZES))
    while True:
        background = _pick(rng, list(BACKGROUNDS))
        if math.dist(COLORS[color], BACKGROUNDS[background][1]) >= MIN_CONTRAST:
            break
    # Small per-clip jitter of colours, size and background slope: variety without changing the words.
    rgb = tuple(float(np.clip(c + rng.uniform(-0.04, 0.04), 0, 1)) for c in COLORS[color])
    bg_rgb = tuple(float(np.clip(c + rng.uniform(-0.03, 0.03), 0, 1)) for c in BACKGROUNDS[background][1])
    gradient = (float(rng.uniform(-0.05, 0.05)), float(rng.uniform(-0.05, 0.05)))
    radius = SIZES[size] / 2 * float(rng.uniform(0.92, 1.08))
    dx, dy = DIRECTIONS[direction]
    norm = math.hypot(dx, dy)
    length = SPEEDS[speed] * float(rng.uniform(0.9, 1.1))
    disp = (length * dx / norm, length * dy / norm)
    start = path_start(rng, radius, disp)
    caption = make_caption(rng, color, shape, direction, speed, size, background)
    return Clip(caption, color, shape, direction, speed, size, background, rgb, bg_rgb, gradient, radius, start, disp)


def parse_caption(caption: str) -> dict[str, str]:
    """Attributes named by a caption (longest phrase wins, so "up and to the left" is not "up"). The
    background comes back as its name, or as its tone ("dark"/"light") when the caption used one."""
    def find(text: str, table: dict[str, tuple[str, ...]]) -> tuple[str, str]:
        hits = [(len(p), key, p) for key, phrases in table.items() for p in phrases if f" {p} " in f" {text} "]
        if not hits:
            raise ValueError(f"caption {caption!r} names none of {list(table)}")
        _, key, phrase = max(hits)
        return key, phrase
    backgrounds = {name: (f"{name} background",) for name in BACKGROUNDS}
    backgrounds.update({tone: tuple(f"{w} background" for w in words) for tone, words in TONE_WORDS.items()})
    words = " ".join(caption.replace(",", " ").split())
    background, phrase = find(words, backgrounds)
    rest = f" {words} ".replace(f" {phrase} ", " ")   # the background words are not the object's
    verbs = {speed: tuple(v for pair in pairs for v in pair) for speed, pairs in VERBS.items()}
    return {"color": find(rest, {c: (c,) for c in COLORS})[0], "shape": find(rest, {s: (s,) for s in SHAPES})[0],
            "direction": find(rest, DIRECTION_PHRASES)[0], "speed": find(rest, verbs)[0],
            "size": find(rest, SIZE_WORDS)[0], "background": background}


# ---- rendering -----------------------------------------------------------------------------------

def shape_sdf(shape: str, px: torch.Tensor, py: torch.Tensor, r: float) -> torch.Tensor:
    """Signed distance (negative inside) to `shape` of bounding box [-r, r]^2 centred at 0. Exact near
    edges (what anti-aliasing needs), approximate near corners."""
    if shape == "circle":
        return torch.sqrt(px * px + py * py) - r
    if shape == "square":
        return torch.maximum(px.abs(), py.abs()) - r
    if shape == "diamond":
        return (px.abs() + py.abs() - r) / math.sqrt(2.0)
    if shape == "triangle":   # apex (0, -r) at the top, base from (-r, r) to (r, r); edge normals (+-2, -1)/sqrt5
        slanted = (2 * px.abs() - (py + r)) / math.sqrt(5.0)
        return torch.maximum(py - r, slanted)
    if shape == "cross":      # a plus sign: two bars of half-width r/3
        w = r / 3
        return torch.minimum(torch.maximum(px.abs() - r, py.abs() - w), torch.maximum(px.abs() - w, py.abs() - r))
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def render(clip: Clip, size: int, frames: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[3, frames, size, size] fp32 in [-1, 1]."""
    if size < 8 or frames < 1:
        raise ValueError(f"render needs size >= 8 and frames >= 1, got size={size}, frames={frames}")
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size   # pixel centres
    yy, xx = coords.view(1, size, 1), coords.view(1, 1, size)
    f = torch.linspace(0.0, 1.0, frames, device=device).view(frames, 1, 1) if frames > 1 else \
        torch.zeros(1, 1, 1, device=device)
    cx = clip.start[0] + clip.displacement[0] * f                                       # [F, 1, 1]
    cy = clip.start[1] + clip.displacement[1] * f
    sdf = shape_sdf(clip.shape, xx - cx, yy - cy, clip.radius)                          # [F, H, W]
    alpha = (0.5 - sdf * size).clamp(0.0, 1.0)   # coverage of a 1-pixel-wide edge ramp
    rgb = torch.tensor(clip.rgb, device=device).view(3, 1, 1, 1)
    bg = torch.tensor(clip.bg_rgb, device=device).view(3, 1, 1, 1) \
        + clip.gradient[0] * (xx - 0.5) + clip.gradient[1] * (yy - 0.5)                # [3, 1, H, W]
    video = bg * (1 - alpha) + rgb * alpha                                             # [3, F, H, W]
    return (video.clamp(0.0, 1.0) * 2 - 1).float()


def latent_object_mask(clips: list[Clip], frames: int, grid: tuple[int, int, int], temporal: int = 4,
                       margin: float = 0.75) -> torch.Tensor:
    """[B, T, h, w] fp32 in {0, 1}: the latent cells (grid = (T, h, w), cells tiling the frame) whose centre lies
    within the object's bounding disc (radius * sqrt(2): the corners of its box) plus `margin` cells (0.75 > half a
    cell's diagonal: every cell the disc touches), at any frame that latent frame encodes (the causal VAE: frame 0
    alone, then groups of `temporal`). Vectorised over the batch from the clips' parameters, nothing rendered; a
    weight mask, so a disc stands in for every shape (mini: 7% of the cells for a small object, 19% for a large one)."""
    T, h, w = grid
    if (frames - 1) % temporal or (frames - 1) // temporal + 1 != T:
        raise ValueError(f"{frames} frames do not make {T} latent frames of {temporal}")
    f = torch.linspace(0.0, 1.0, frames).view(1, frames, 1, 1) if frames > 1 else torch.zeros(1, 1, 1, 1)
    start = torch.tensor([c.start for c in clips], dtype=torch.float32)             # [B, 2] (x, y)
    disp = torch.tensor([c.displacement for c in clips], dtype=torch.float32)
    reach = torch.tensor([c.radius for c in clips], dtype=torch.float32) * math.sqrt(2)
    cx = start[:, 0].view(-1, 1, 1, 1) + disp[:, 0].view(-1, 1, 1, 1) * f            # [B, F, 1, 1]
    cy = start[:, 1].view(-1, 1, 1, 1) + disp[:, 1].view(-1, 1, 1, 1) * f
    ys = ((torch.arange(h, dtype=torch.float32) + 0.5) / h).view(1, 1, h, 1)
    xs = ((torch.arange(w, dtype=torch.float32) + 0.5) / w).view(1, 1, 1, w)
    inside = (xs - cx).pow(2) + (ys - cy).pow(2) < (reach.view(-1, 1, 1, 1) + margin / max(h, w)) ** 2
    B = len(clips)
    later = inside[:, 1:].reshape(B, T - 1, temporal, h, w).any(2)
    return torch.cat([inside[:, :1], later], dim=1).float()


def latent_object_estimate(z: torch.Tensor, threshold: float = 6.0, ring: int = 2) -> torch.Tensor:
    """[B, T, h, w] fp32 in {0, 1}: the object's cells read off latents z [B, C, T, h, w] alone, for samples that
    have no Clip (a generator's output): a stand-in for latent_object_mask.

    A background is one colour with a linear brightness slope, so per sample and latent frame each channel is fitted
    by a plane a + b x + c y over the inner cells (those `ring` or more cells from the frame's edge), refitted twice
    on the cells that fit it (residual norm over the channels < threshold x its median); a cell is the object's when
    its residual exceeds threshold x the median residual (at least 1e-4: latents are normalised). The edge ring is
    scaled by its own median: the VAE's padding makes it stray from the plane on every clip (frames under 2 ring + 3
    cells wide have no ring). The mask is dilated by one cell (3 x 3), as latent_object_mask's margin. On 24 encoded
    mini training clips (VAE as shipped) it covers 99% (at least 93%) of the cells latent_object_mask marks with no
    margin, flagging 20% of the cells where latent_object_mask, margin included, flags 13%."""
    if z.dim() != 5:
        raise ValueError(f"latent_object_estimate takes latents [B, C, T, h, w], got shape {tuple(z.shape)}")
    B, C, T, h, w = z.shape
    ring = min(ring, max(0, (min(h, w) - 3) // 2))     # a frame too small for the ring (tiny's 4 x 4) has none
    dev = z.device
    ys = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h - 0.5
    xs = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w - 0.5
    plane = torch.stack([torch.ones(h, w, device=dev), xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)],
                        -1).view(h * w, 3)
    inner = torch.zeros(h, w, dtype=torch.bool, device=dev)
    inner[ring:h - ring, ring:w - ring] = True
    inner = inner.view(h * w)
    y = z.detach().float().permute(0, 2, 3, 4, 1).reshape(B, T, h * w, C)
    keep = inner.float().view(1, 1, -1, 1).expand(B, T, -1, 1)
    for _ in range(3):
        coef = torch.linalg.lstsq(plane * keep, y * keep).solution                 # [B, T, 3, C]
        res = (y - plane @ coef).norm(dim=-1)                                      # [B, T, hw]
        scale = torch.where(inner, res, float("nan")).nanmedian(-1, keepdim=True).values.clamp_min(1e-4)
        keep = ((res < threshold * scale) & inner).float().unsqueeze(-1)
    edge = torch.where(inner, float("nan"), res).nanmedian(-1, keepdim=True).values.clamp_min(1e-4)
    found = torch.where(inner, res > threshold * scale, res > threshold * edge).float().view(B * T, 1, h, w)
    return torch.nn.functional.max_pool2d(found, 3, 1, 1).view(B, T, h, w)


def check_object_weighting(fg_weight: float, fg_share: float) -> None:
    """The two ways to weigh the object's cells (object_weights, recipe.TeacherStage): one or neither."""
    if fg_weight < 0 or not 0 <= fg_share < 1 or (fg_weight > 0 and fg_share > 0):
        raise ValueError(f"object weighting: fg_weight >= 0 or fg_share in [0, 1), not both; got {fg_weight}, "
                         f"{fg_share}")


ATTRIBUTE_VALUES = (*COLORS, *SHAPES, *DIRECTIONS, *SPEEDS, *SIZES, *BACKGROUNDS)   # no value is of two attributes


def check_oversample(oversample: tuple[tuple[str, int], ...]) -> None:
    """Oversampling factors (inputs.LatentBatches): (attribute value, integer k >= 1) pairs, each value once."""
    values = [value for value, _ in oversample]
    for value, k in oversample:
        if value not in ATTRIBUTE_VALUES:
            raise ValueError(f"oversample: {value!r} is no attribute value; choose among "
                             f"{', '.join(ATTRIBUTE_VALUES)}")
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"oversample: the factor of {value!r} must be an integer >= 1, got {k!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"oversample names a value twice: {', '.join(values)}")


def object_weights(mask: torch.Tensor, fg_weight: float = 0.0, fg_share: float = 0.0) -> torch.Tensor:
    """Loss weights from an object mask [B, ...] in {0, 1} (latent_object_mask): 1 + fg_weight on the object's
    cells, or, with fg_share > 0, fg_share / f on them and (1 - fg_share) / (1 - f) elsewhere, f being the
    sample's fraction of object cells: the weights average 1 and the object carries fg_share of the sample's
    loss whatever its size. (fg_weight 4 gives a small object, 7% of the mini cells, 27% of its sample's loss and
    a large one, 19%, 54%; fg_share 0.5 gives both half.)"""
    check_object_weighting(fg_weight, fg_share)
    if fg_share == 0:
        return 1 + fg_weight * mask
    view = (-1, *[1] * (mask.dim() - 1))
    frac = mask.flatten(1).mean(1).clamp(1e-6, 1 - 1e-6).view(view)
    w = torch.where(mask > 0, fg_share / frac, (1 - fg_share) / (1 - frac))
    return w / w.flatten(1).mean(1).view(view)   # exactly mean 1, also with no object cell (or only object cells)


class ProceduralVideos(torch.utils.data.Dataset):
    """Map-style view: item i = {"video": [3, F, S, S] in [-1, 1], "caption": str, "attributes": dict}.
    `length` only bounds iteration; any index >= 0 is valid for `clip`."""

    def __init__(self, split: str = "train", size: int = 240, frames: int = 33, seed: int = 0, length: int = 10**9):
        if (frames - 1) % 4:
            raise ValueError(f"frames must be 4k+1 (the VAE's temporal stride), got {frames}")
        if size % 16:
            raise ValueError(f"size must be a multiple of 16 (VAE 8x and patch 2x), got {size}")
        clip_rng(seed, split, 0)   # validates the split name
        self.split, self.size, self.frames, self.seed, self.length = split, size, frames, seed, length

    def __len__(self) -> int:
        return self.length

    def clip(self, index: int) -> Clip:
        return sample_clip(self.seed, self.split, index)

    def __getitem__(self, index: int) -> dict:
        clip = self.clip(index)
        return {"video": render(clip, self.size, self.frames), "caption": clip.caption,
                "attributes": clip.attributes()}

    def batch(self, indices: list[int], device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[Clip]]:
        """Videos [B, 3, F, S, S] rendered directly on `device` (cheap on a GPU), and their clips."""
        clips = [self.clip(i) for i in indices]
        return torch.stack([render(c, self.size, self.frames, device) for c in clips]), clips


def all_captions(seed: int, split: str, count: int) -> list[str]:
    return [sample_clip(seed, split, i).caption for i in range(count)]
