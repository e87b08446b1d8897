"""Procedural dataset, detector and tokenizer of the embedded model (turbovid/train/data.py, detect.py, tokenizer.py)."""
import dataclasses
import itertools
import math
import random

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

from turbovid.config import WAN_NEGATIVE_PROMPT
from turbovid.train.data import (BACKGROUNDS, COLORS, DIRECTIONS, MIN_CONTRAST, PATH_JITTER, SHAPES, ProceduralVideos,
                                 is_heldout, latent_object_estimate, latent_object_mask, object_weights, parse_caption,
                                 render, sample_clip)
from turbovid.train import detect as detect_module
from turbovid.train.detect import ATTRIBUTES, adherence, detect, hue_drift
from turbovid.train.recipe import MINI_TEXT
from turbovid.train.tokenizer import ASSET, CORPUS_CAPTIONS, train_spiece


@pytest.fixture(autouse=True)
def _one_thread():
    # The CPU is shared; small ops are faster without intra-op threads.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- data ----------------------------------------------------------------------------------------

def test_clips_are_deterministic_per_seed_split_index():
    a, b = sample_clip(3, "train", 17), sample_clip(3, "train", 17)
    assert a == b
    assert torch.equal(render(a, 32, 5), render(b, 32, 5))
    others = [sample_clip(4, "train", 17), sample_clip(3, "train", 18), sample_clip(3, "heldout", 17)]
    assert all(o != a for o in others)


def test_frames_shape_range_and_content():
    ds = ProceduralVideos("train", size=48, frames=9, seed=0)
    item = ds[5]
    video, clip = item["video"], ds.clip(5)
    assert video.shape == (3, 9, 48, 48) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    # The pixel under the object's centre at frame 0 has the object colour; a far corner pixel of the
    # background has (almost) the background colour (the gradient moves it by < 0.05).
    cx, cy = clip.start
    px = video[:, 0, int(cy * 48), int(cx * 48)]
    assert torch.allclose(px, torch.tensor(clip.rgb) * 2 - 1, atol=1e-5)
    corner = (0, 0) if math.dist((cx, cy), (0, 0)) > 0.5 else (47, 47)
    bg = video[:, 0, corner[0], corner[1]]
    assert torch.allclose((bg + 1) / 2, torch.tensor(clip.bg_rgb), atol=0.06)
    # The object moves: the last frame differs from the first.
    assert not torch.equal(video[:, 0], video[:, -1])
    videos, clips = ds.batch([5, 6])
    assert torch.equal(videos[0], video) and clips[0] == clip
    with pytest.raises(ValueError, match="4k\\+1"):
        ProceduralVideos("train", 48, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        ProceduralVideos("train", 40, 9)
    with pytest.raises(ValueError, match="split"):
        ProceduralVideos("val", 48, 9)


def test_paths_stay_in_frame_and_are_centred():
    # Every clip keeps its whole object (plus the 0.02 margin) inside the frame at both ends of its path,
    # and the path's midpoint is the frame centre up to PATH_JITTER, so the caption fixes the trajectory.
    for i in range(300):
        c = sample_clip(0, "train", i)
        end = (c.start[0] + c.displacement[0], c.start[1] + c.displacement[1])
        for p in (c.start, end):
            assert all(c.radius + 0.02 - 1e-9 <= v <= 1 - c.radius - 0.02 + 1e-9 for v in p), (i, c)
        mid = [s + d / 2 for s, d in zip(c.start, c.displacement)]
        assert all(abs(m - 0.5) <= PATH_JITTER + 1e-9 for m in mid), (i, c)


def test_captions_name_the_attributes():
    for split in ("train", "heldout"):
        for i in range(300):
            clip = sample_clip(1, split, i)
            parsed, truth = parse_caption(clip.caption), clip.attributes()
            if parsed["background"] in ("dark", "light"):   # the caption named the tone, not the colour
                truth["background"] = clip.tone
            assert parsed == truth, clip.caption
            assert math.dist(clip.rgb, clip.bg_rgb) >= MIN_CONTRAST - 0.15   # jitter keeps contrast
    captions = {sample_clip(1, "train", i).caption for i in range(300)}
    assert len(captions) > 250   # templates and synonyms give variety


def test_heldout_split_is_disjoint_and_compositional():
    triples = list(itertools.product(COLORS, SHAPES, DIRECTIONS))
    held = [t for t in triples if is_heldout(*t)]
    assert len(held) == len(triples) // 10
    # At most one held-out direction per (colour, shape): every pair is still seen in training.
    for c, s in itertools.product(COLORS, SHAPES):
        assert sum(is_heldout(c, s, d) for d in DIRECTIONS) <= 1
    train = [sample_clip(0, "train", i) for i in range(400)]
    heldout = [sample_clip(0, "heldout", i) for i in range(400)]
    assert not any(is_heldout(c.color, c.shape, c.direction) for c in train)
    assert all(is_heldout(c.color, c.shape, c.direction) for c in heldout)
    assert not {c.caption for c in train} & {c.caption for c in heldout}
    for attr, values in (("color", COLORS), ("shape", SHAPES), ("direction", DIRECTIONS), ("background", BACKGROUNDS)):
        assert {getattr(c, attr) for c in train} == set(values)


# ---- detector ------------------------------------------------------------------------------------

def _clips(split: str, n: int, size: int = 64, frames: int = 9):
    clips = [sample_clip(2, split, i) for i in range(n)]
    return [render(c, size, frames) for c in clips], [c.attributes() for c in clips]


def test_detector_reads_clean_clips():
    videos, truth = _clips("train", 60)
    more_videos, more_truth = _clips("heldout", 40, size=80, frames=13)
    scores = adherence(videos + more_videos, truth + more_truth)
    for key in ATTRIBUTES + ("all",):
        assert scores[key] >= 0.95, (key, scores[key])


def test_detector_fails_shuffled_attribute_control():
    videos, truth = _clips("train", 60)
    shuffled = truth[:]
    random.Random(0).shuffle(shuffled)
    scores = adherence(videos, shuffled)
    assert scores["all"] < 0.2 and scores["color"] < 0.4 and scores["direction"] < 0.4


def test_detector_on_two_blobs_far_from_their_median():
    # Generated clips may hold two blobs in opposite corners: the per-axis medians of their pixels then pair
    # the top blob's row with the left blob's column, an empty corner, so the window around them holds nothing.
    # The detector must answer, not divide by zero.
    video = -torch.ones(3, 5, 96, 96)
    video[0, :, 4:20, 76:92] = 1.0    # top right
    video[0, :, 76:92, 4:20] = 1.0    # bottom left
    found = detect(video)
    assert set(found) == set(ATTRIBUTES) and found["direction"] == "none"


def _rounded(clip, size: int, frames: int, sigma: float) -> torch.Tensor:
    """The clip with its object's corners rounded as an 8x VAE rounds a small shape: the coverage blurred (Gaussian,
    `sigma` pixels) and thresholded again at 0.5 with a 2-pixel ramp, so convex corners round off and a cross's inner
    corners fill in, while the edges stay sharp."""
    video, flat = render(clip, size, frames), render(dataclasses.replace(clip, rgb=clip.bg_rgb), size, frames)
    d = torch.tensor(clip.rgb).view(3, 1, 1, 1) * 2 - 1 - flat
    alpha = ((video - flat) * d).sum(0) / (d * d).sum(0)                              # [F, H, W] coverage
    r = int(3 * sigma)
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-x * x / (2 * sigma * sigma))
    k = k / k.sum()
    b = F.conv2d(F.pad(alpha[:, None], (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    b = F.conv2d(F.pad(b, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))[:, 0]
    return flat + d * ((b - 0.5) * 2 + 0.5).clamp(0, 1)


def test_detector_reads_small_shapes_with_rounded_corners(monkeypatch):
    # Rounded small crosses and diamonds (what the VAE's own round trips look like) must keep their names: with the
    # sharp templates alone (detector version 1) they read as diamonds and circles.
    clips = [c for c in (sample_clip(3, "train", i) for i in range(100)) if c.size == "small"]
    videos = [_rounded(c, 240, 9, sigma=4.0) for c in clips]
    assert {c.shape for c in clips} == set(SHAPES) and len(clips) >= 30

    def right() -> int:
        return sum(detect(v)["shape"] == c.shape for v, c in zip(videos, clips))
    assert right() >= 0.95 * len(clips)
    monkeypatch.setattr(detect_module, "OPENINGS", (0.0,))
    monkeypatch.setattr(detect_module, "CLOSINGS", (0.0,))
    detect_module._template_bank.cache_clear()
    try:
        assert right() <= 0.8 * len(clips)
    finally:
        monkeypatch.undo()
        detect_module._template_bank.cache_clear()


def test_detector_on_empty_and_static_videos():
    blank = torch.zeros(3, 5, 32, 32)
    assert detect(blank) == {k: "none" for k in ATTRIBUTES}
    clip = sample_clip(0, "train", 0)
    still = render(clip, 128, 1).expand(3, 5, 128, 128)   # one frame repeated: no motion
    found = detect(still)
    assert found["direction"] == "none" and found["color"] == clip.color and found["shape"] == clip.shape
    with pytest.raises(ValueError):
        adherence([blank], [])


def test_hue_drift_reads_a_colour_that_turns_and_nothing_on_clean_clips():
    import colorsys
    hue = lambda rgb: colorsys.rgb_to_hsv(*rgb)[0] * 360  # noqa: E731
    videos, truth = _clips("heldout", 12, size=96, frames=17)
    scores = adherence(videos, truth)
    assert scores["hue_drift"] < 1.0 and all(abs(d["hue_drift"]) < 2 for d in scores["detections"])
    blue = next(c for c in (sample_clip(0, "heldout", i) for i in range(200)) if c.color == "blue")
    purple = dataclasses.replace(blue, rgb=COLORS["purple"])
    a, b = render(blue, 96, 17), render(purple, 96, 17)
    turning = torch.cat([a[:, :9], b[:, 9:]], dim=1)            # the same motion, blue then purple
    want = hue(COLORS["purple"]) - hue(blue.rgb)                 # about +54 degrees
    assert want > 30 and abs(hue_drift(turning) - want) < 3
    assert abs(hue_drift(torch.cat([b[:, :9], a[:, 9:]], dim=1)) + want) < 3   # purple then blue: negative
    red = dataclasses.replace(blue, rgb=COLORS["red"], bg_rgb=(0.1, 0.1, 0.3))
    pink = dataclasses.replace(red, rgb=COLORS["pink"])
    wraps = torch.cat([render(red, 96, 17)[:, :9], render(pink, 96, 17)[:, 9:]], 1)
    assert -60 < hue_drift(wraps) < -20                           # red (~0) -> pink (~330) crosses 0: -30, not +330
    assert hue_drift(torch.zeros(3, 5, 32, 32)) is None          # no object
    grey = dataclasses.replace(blue, rgb=(0.9, 0.9, 0.9))
    assert hue_drift(render(grey, 96, 17)) is None               # no hue to drift


# ---- tokenizer -----------------------------------------------------------------------------------

def test_tokenizer_asset_rebuilds_byte_for_byte_and_keeps_umt5_ids():
    from turbovid.train.data import all_captions
    assert train_spiece(all_captions(0, "train", CORPUS_CAPTIONS)) == ASSET.read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(ASSET))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert sp.get_piece_size() <= MINI_TEXT.vocab_size
    assert ASSET.stat().st_size < 64 * 1024
    for clip in (sample_clip(9, split, i) for split in ("train", "heldout") for i in range(200)):
        ids = sp.encode(clip.caption)
        assert sp.unk_id() not in ids and sp.decode(ids) == clip.caption
        assert len(ids) < MINI_TEXT.text_len          # + EOS fits
    ids = sp.encode(WAN_NEGATIVE_PROMPT)                 # Chinese: byte fallback, no <unk>
    assert sp.unk_id() not in ids and sp.decode(ids) == WAN_NEGATIVE_PROMPT


def test_latent_object_mask_covers_the_rendered_object_and_little_else():
    clips = [sample_clip(0, "train", i) for i in range(12)]
    size, frames, grid = 240, 33, (9, 30, 30)
    mask = latent_object_mask(clips, frames, grid)
    assert mask.shape == (12, 9, 30, 30) and set(mask.unique().tolist()) <= {0.0, 1.0}
    for clip, m in zip(clips, mask):
        video = render(clip, size, frames)
        bg = torch.tensor(clip.bg_rgb).view(3, 1, 1, 1) * 2 - 1
        obj = ((video - bg).abs().amax(0) > 0.3).float()                        # [F, H, W], the object's pixels
        groups = torch.cat([obj[:1], obj[1:].reshape(8, 4, size, size).amax(1)])  # per latent frame
        cells = torch.nn.functional.max_pool2d(groups[:, None], 8)[:, 0]          # [9, 30, 30]
        assert (m[cells > 0] == 1).all()                                          # every object cell is weighted
        # and the disc stays near the object: at most ~2.2x its cells (+ a margin ring)
        assert m.sum() <= 2.2 * cells.sum() + 4 * 9 * 30 * 0.02 * 30
    small = [i for i, c in enumerate(clips) if c.size == "small"]
    assert small and mask[small].mean() < 0.08
    with pytest.raises(ValueError, match="latent frames"):
        latent_object_mask(clips, 32, grid)


def test_latent_object_estimate_finds_the_object_without_its_clip():
    # Latent stand-ins: the rendered clips averaged over each latent cell (8 x 8 pixels, the VAE's frame groups),
    # plus an offset on the two-cell edge ring on every channel (the VAE's padding does that to real latents).
    clips = [sample_clip(0, "train", i) for i in range(12)]
    size, frames, grid = 240, 33, (9, 30, 30)
    z, cells = [], []
    for clip in clips:
        video = render(clip, size, frames)                                         # [3, F, H, W]
        groups = torch.cat([video[:, :1], video[:, 1:].reshape(3, 8, 4, size, size).mean(2)], dim=1)
        z.append(torch.nn.functional.avg_pool2d(groups, 8))                        # [3, 9, 30, 30]
        bg = torch.tensor(clip.bg_rgb).view(3, 1, 1, 1) * 2 - 1
        obj = ((video - bg).abs().amax(0) > 0.3).float()                           # the object's pixels
        obj = torch.cat([obj[:1], obj[1:].reshape(8, 4, size, size).amax(1)])
        cells.append(torch.nn.functional.max_pool2d(obj[:, None], 8)[:, 0])        # the cells they touch
    z, cells = torch.stack(z), torch.stack(cells)
    ring = torch.ones(30, 30)
    ring[2:-2, 2:-2] = 0
    z = z + 0.3 * ring + 0.01 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    found = latent_object_estimate(z)
    assert found.shape == (12, *grid) and set(found.unique().tolist()) <= {0.0, 1.0}
    disc = latent_object_mask(clips, frames, grid)
    assert ((found * cells).flatten(1).sum(1) / cells.flatten(1).sum(1)).min() > 0.95  # the object is covered
    assert found.mean() < disc.mean()                          # and not much else: the ring is read as background
    assert (found * (1 - disc)).mean() < 0.01
    blank = torch.zeros(2, 4, 3, 16, 16) + torch.linspace(0, 1, 16)                  # a plane: no object at all
    assert latent_object_estimate(blank + 0.01 * torch.randn(blank.shape)).mean() < 0.1
    with pytest.raises(ValueError, match="latents"):
        latent_object_estimate(z[0])
    small = torch.zeros(1, 4, 2, 4, 4)                       # too small for the edge ring: every cell is inner
    small[..., 1, 2] = 1
    near = torch.zeros(4, 4)
    near[0:3, 1:4] = 1                                           # the cell and its 3 x 3 neighbourhood
    assert torch.equal(latent_object_estimate(small)[0], near.expand(2, 4, 4))


def test_object_weights_give_the_object_its_share_whatever_its_size():
    clips = [sample_clip(0, "train", i) for i in range(40)]
    mask = latent_object_mask(clips, 33, (9, 30, 30))
    sizes = [c.size for c in clips]
    assert "small" in sizes and "large" in sizes
    plain = object_weights(mask, fg_weight=4)
    assert torch.equal(plain, 1 + 4 * mask)
    shared = object_weights(mask, fg_share=0.5)
    assert torch.allclose(shared.flatten(1).mean(1), torch.ones(40), atol=1e-5)        # mean 1 per sample
    share = (shared * mask).flatten(1).sum(1) / shared.flatten(1).sum(1)
    assert torch.allclose(share, torch.full((40,), 0.5), atol=1e-5)                   # small and large alike
    plain_share = (plain * mask).flatten(1).sum(1) / plain.flatten(1).sum(1)
    small = [i for i, s in enumerate(sizes) if s == "small"]
    assert (plain_share[small] < 0.35).all()                                           # what fg_share corrects
    # an empty mask (object outside the frame) weighs every cell alike; a full one too
    assert torch.allclose(object_weights(torch.zeros(1, 2, 3, 3), fg_share=0.3), torch.ones(1, 2, 3, 3))
    assert torch.allclose(object_weights(torch.ones(1, 2, 3, 3), fg_share=0.3), torch.ones(1, 2, 3, 3), atol=1e-4)
    for bad in ({"fg_weight": 4, "fg_share": 0.5}, {"fg_share": 1.0}, {"fg_share": -0.1}, {"fg_weight": -1}):
        with pytest.raises(ValueError, match="not both"):
            object_weights(mask, **bad)
