"""Procedural, seeded video clips with text prompts: the reference model's training and evaluation data.

Each clip shows one saturated, coloured shape moving in a straight line across a grey, textured background:

    "a red square moving left on a striped background"

Attributes (all discrete ones appear in the prompt):

- colour: one of :data:`COLOURS` (six hues 60 degrees apart, full saturation, value 0.85-1.0);
- shape: one of :data:`SHAPES` (square, circle, upward triangle; half-extent 4.5-6 px at 32x32);
- direction: one of :data:`DIRECTIONS`; the shape travels 40-48% of the canvas side between the first and the last
  frame (14 px at 32 px), at constant speed, from a random start position that keeps it fully inside the frame;
- background: one of :data:`BACKGROUNDS` (grey textures, zero saturation, so foreground = saturated pixels).

Splits. The 72 (colour, shape, direction) triples are split into :data:`HELDOUT_TRIPLES` (12 triples, each colour
twice, each shape four times, each direction three times) and the 60 others. ``"train"`` draws only the 60 seen
triples; ``"heldout"`` draws only the 12 held-out triples; ``"seen"`` draws seen triples (for held-out *seeds*).
Seeds: training uses ``seed`` for its generator; evaluation code uses seeds from :data:`HELDOUT_SEED_BASE` upwards,
which training never uses.

Everything is generated on the requested device in batches from a ``torch.Generator`` (no dataset files).
Determinism: the same (seed, device type, batch sizes) gives the same clips; CPU and CUDA generators produce
different streams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

COLOURS: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "magenta")
#: hue of each colour in degrees (HSV)
COLOUR_HUES: tuple[float, ...] = (0.0, 60.0, 120.0, 180.0, 240.0, 300.0)
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
#: foreground area / bounding-box area of each shape (used by the detector)
SHAPE_FILL: tuple[float, ...] = (1.0, math.pi / 4.0, 0.5)
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
#: unit displacement (dx, dy) in image coordinates (y grows downwards)
DIRECTION_VECTORS: tuple[tuple[float, float], ...] = ((-1.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0))
BACKGROUNDS: tuple[str, ...] = ("striped", "checkered", "dotted")

#: (colour, shape, direction) index triples never shown in training
HELDOUT_TRIPLES: tuple[tuple[int, int, int], ...] = tuple((i % 6, i % 3, (i // 3) % 4) for i in range(12))
SEEN_TRIPLES: tuple[tuple[int, int, int], ...] = tuple(
    (c, s, d)
    for c in range(len(COLOURS))
    for s in range(len(SHAPES))
    for d in range(len(DIRECTIONS))
    if (c, s, d) not in HELDOUT_TRIPLES
)
SPLITS: tuple[str, ...] = ("train", "seen", "heldout")
#: evaluation seeds start here; training seeds must stay below it
HELDOUT_SEED_BASE = 1_000_000

#: default clip geometry (frames, height, width); the model's default size
DEFAULT_FRAMES, DEFAULT_HEIGHT, DEFAULT_WIDTH = 8, 32, 32
#: fraction of the canvas side travelled between first and last frame
TRAVEL_RANGE = (0.40, 0.48)
#: the words the prompts use (the tokenizer's vocabulary)
FIXED_WORDS: tuple[str, ...] = ("a", "moving", "on", "background")


def vocabulary() -> list[str]:
    """All words a prompt can contain, in a fixed order."""
    words = list(FIXED_WORDS) + list(COLOURS) + list(SHAPES) + list(DIRECTIONS) + list(BACKGROUNDS)
    assert len(set(words)) == len(words)
    return words


def prompt_for(colour: int, shape: int, direction: int, background: int) -> str:
    """The prompt of one clip, e.g. ``"a red square moving left on a striped background"``."""
    return (
        f"a {COLOURS[colour]} {SHAPES[shape]} moving {DIRECTIONS[direction]} "
        f"on a {BACKGROUNDS[background]} background"
    )


def all_prompts() -> list[str]:
    """Every prompt, indexed by :func:`prompt_index` (colour, shape, direction, background)."""
    return [
        prompt_for(c, s, d, b)
        for c in range(len(COLOURS))
        for s in range(len(SHAPES))
        for d in range(len(DIRECTIONS))
        for b in range(len(BACKGROUNDS))
    ]


def prompt_index(colour, shape, direction, background):
    """Index into :func:`all_prompts` (works on ints and on integer tensors)."""
    return ((colour * len(SHAPES) + shape) * len(DIRECTIONS) + direction) * len(BACKGROUNDS) + background


def parse_prompt(prompt: str) -> dict[str, int]:
    """Attribute indices named in a prompt of the generator's grammar.

    Raises:
        ValueError: the prompt does not name exactly one colour, shape, direction and background.
    """
    words = prompt.lower().split()
    found = {}
    for key, names in (
        ("colour", COLOURS),
        ("shape", SHAPES),
        ("direction", DIRECTIONS),
        ("background", BACKGROUNDS),
    ):
        hits = [names.index(w) for w in words if w in names]
        if len(hits) != 1:
            raise ValueError(f"prompt {prompt!r} must name exactly one {key} of {names}, found {len(hits)}")
        found[key] = hits[0]
    return found


@dataclass
class ClipBatch:
    """A batch of clips with their attributes.

    Attributes:
        video: float32 (B, 3, F, H, W) in [-1, 1] (the model's pixel space, Wan layout (B, C, F, H, W)).
        colour, shape, direction, background: int64 (B,) attribute indices.
        centres: float32 (B, F, 2) true shape centre (x, y) in pixels per frame.
        prompts: list of B prompt strings.
    """

    video: torch.Tensor
    colour: torch.Tensor
    shape: torch.Tensor
    direction: torch.Tensor
    background: torch.Tensor
    centres: torch.Tensor
    prompts: list[str]

    @property
    def prompt_ids(self) -> torch.Tensor:
        """Index of each clip's prompt in :func:`all_prompts` (int64 (B,))."""
        return prompt_index(self.colour, self.shape, self.direction, self.background)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HSV (hue in degrees) to RGB in [0, 1]; returns (..., 3)."""
    k = torch.stack([(5.0 + h / 60.0) % 6.0, (3.0 + h / 60.0) % 6.0, (1.0 + h / 60.0) % 6.0], dim=-1)
    f = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return v[..., None] - v[..., None] * s[..., None] * f


def sample_batch(
    n: int,
    generator: torch.Generator,
    split: str = "train",
    num_frames: int = DEFAULT_FRAMES,
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    device: torch.device | str | None = None,
    with_prompts: bool = True,
) -> ClipBatch:
    """Draw ``n`` clips of ``split`` from ``generator`` and render them on ``device``.

    Args:
        n: number of clips.
        generator: a ``torch.Generator`` on ``device`` (its state advances).
        split: ``"train"`` or ``"seen"`` (seen triples) or ``"heldout"`` (held-out triples).
        num_frames, height, width: clip geometry (num_frames >= 2; height, width >= 16).
        device: where to render (defaults to the generator's device).
        with_prompts: build the list of prompt strings (skip it in the training loop).

    Raises:
        ValueError: unknown split or too small a geometry.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if num_frames < 2 or height < 16 or width < 16:
        raise ValueError(f"clips need num_frames >= 2 and height, width >= 16; got {num_frames}x{height}x{width}")
    device = torch.device(device) if device is not None else generator.device
    g = generator

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, device=device)

    table = torch.tensor(HELDOUT_TRIPLES if split == "heldout" else SEEN_TRIPLES, device=device)
    triple = table[torch.randint(len(table), (n,), generator=g, device=device)]
    colour, shape, direction = triple[:, 0], triple[:, 1], triple[:, 2]
    background = torch.randint(len(BACKGROUNDS), (n,), generator=g, device=device)

    side = float(min(height, width))
    half = uniform(4.5, 6.0, n) * (side / 32.0)  # half-extent of the shape in px
    travel = uniform(*TRAVEL_RANGE, n) * side  # px between first and last frame
    vec = torch.tensor(DIRECTION_VECTORS, device=device)[direction]  # (n, 2)
    margin = half + 1.0
    # start so that the whole trajectory stays inside [margin, size - margin] on both axes
    sizes = torch.tensor([width, height], device=device, dtype=torch.float32)
    lo = margin[:, None] - torch.clamp(vec * travel[:, None], max=0.0)
    hi = sizes[None, :] - margin[:, None] - torch.clamp(vec * travel[:, None], min=0.0)
    start = lo + (hi - lo) * torch.rand(n, 2, generator=g, device=device)
    frac = torch.linspace(0.0, 1.0, num_frames, device=device)
    centres = start[:, None, :] + vec[:, None, :] * travel[:, None, None] * frac[None, :, None]  # (n, F, 2)

    hue = torch.tensor(COLOUR_HUES, device=device)[colour]
    value = uniform(0.85, 1.0, n)
    rgb = _hsv_to_rgb(hue, torch.ones_like(hue), value)  # (n, 3)

    # grey textured background (n, H, W) in [0, 1]
    ys = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    base = uniform(0.25, 0.55, n)[:, None, None]
    amp = uniform(0.06, 0.12, n)[:, None, None]
    period = uniform(4.0, 8.0, n)[:, None, None] * (side / 32.0)
    phase = uniform(0.0, 2.0 * math.pi, n)[:, None, None]
    angle = uniform(0.0, math.pi, n)[:, None, None]
    proj = xx * torch.cos(angle) + yy * torch.sin(angle)
    striped = torch.sign(torch.sin(2 * math.pi * proj / period + phase))
    checkered = torch.sign(
        torch.sin(2 * math.pi * xx / period + phase) * torch.sin(2 * math.pi * yy / period + phase)
    )
    gx = torch.remainder(xx + phase * period / (2 * math.pi), period) - period / 2
    gy = torch.remainder(yy + phase * period / (2 * math.pi), period) - period / 2
    dotted = torch.where(gx * gx + gy * gy < (0.3 * period) ** 2, 1.0, -1.0)
    pattern = torch.stack([striped, checkered, dotted], dim=1)  # (n, 3, H, W)
    pattern = pattern.gather(1, background[:, None, None, None].expand(n, 1, height, width))[:, 0]
    bg = (base + amp * pattern).clamp(0.0, 1.0)

    # shape masks (n, F, H, W) with one pixel of anti-aliasing
    dx = xx[None, None] - centres[..., 0, None, None]
    dy = yy[None, None] - centres[..., 1, None, None]
    r = half[:, None, None, None]
    d_square = torch.maximum(dx.abs(), dy.abs()) - r
    d_circle = torch.sqrt(dx * dx + dy * dy) - r
    t = (dy + r) / (2 * r)  # 0 at the apex (top), 1 at the base
    d_triangle = torch.maximum(torch.maximum(dy - r, -dy - r), dx.abs() - r * t)
    dist = torch.stack([d_square, d_circle, d_triangle], dim=1)
    dist = dist.gather(1, shape[:, None, None, None, None].expand(n, 1, *dist.shape[2:]))[:, 0]
    mask = (0.5 - dist).clamp(0.0, 1.0)  # (n, F, H, W)

    video = bg[:, None, None] * (1 - mask[:, None]) + rgb[:, :, None, None, None] * mask[:, None]
    video = video * 2.0 - 1.0  # (n, 3, F, H, W) in [-1, 1]
    prompts = (
        [prompt_for(*map(int, a)) for a in torch.stack([colour, shape, direction, background], 1).tolist()]
        if with_prompts
        else []
    )
    return ClipBatch(video.contiguous(), colour, shape, direction, background, centres, prompts)


def heldout_batch(
    n: int,
    split: str = "heldout",
    seed: int = 0,
    num_frames: int = DEFAULT_FRAMES,
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    device: torch.device | str = "cpu",
) -> ClipBatch:
    """An evaluation batch drawn with seed ``HELDOUT_SEED_BASE + seed`` (never used in training)."""
    g = torch.Generator(device=device).manual_seed(HELDOUT_SEED_BASE + seed)
    return sample_batch(n, g, split, num_frames, height, width, device=device)
