"""The synthetic multimodal task behind the embedded demo: app screenshots drawn with PIL.

Four screen kinds (calendar, claim form, login window, desktop), each with an accent colour.
The router learns the kind from the picture; each expert answers in its own format about the
accent colour, so an output says both which expert produced it and what it saw.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

KINDS = ("calendar", "claim", "login", "desktop")  # index = router label
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
CLAIM_STATUS = {"red": "DENIED", "green": "APPROVED", "blue": "PENDING", "yellow": "REVIEW"}

# Each expert's answer format (what a user of that expert checks).
EXPERT_FORMATS: dict[str, re.Pattern[str]] = {
    "calendar": re.compile(r"^calendar: tag=(red|green|blue|yellow)$"),
    "claim": re.compile(r"^CLAIM status=(DENIED|APPROVED|PENDING|REVIEW)$"),
    "login": re.compile(r"^login button (red|green|blue|yellow)$"),
    "desktop": re.compile(r"^desktop wallpaper=(red|green|blue|yellow)$"),
}

PROMPTS = (
    "What is on this screen?",
    "Read this screen.",
    "Describe the app.",
    "Extract the key field.",
)
SIZE = (128, 96)  # drawn screenshot size (w, h)


@dataclass(frozen=True)
class Sample:
    kind: str
    color: str
    image: Image.Image
    prompt: str

    @property
    def label(self) -> str:
        return str(KINDS.index(self.kind))


def expected_output(expert: str, color: str) -> str:
    """What ``expert`` answers for a screen whose accent colour is ``color``."""
    if expert == "calendar":
        return f"calendar: tag={color}"
    if expert == "claim":
        return f"CLAIM status={CLAIM_STATUS[color]}"
    if expert == "login":
        return f"login button {color}"
    if expert == "desktop":
        return f"desktop wallpaper={color}"
    raise KeyError(expert)


def draw_screen(kind: str, color: str, rng: random.Random, size: tuple[int, int] = SIZE) -> Image.Image:
    """One synthetic screenshot; layout depends on ``kind``, the accent on ``color``, jitter on ``rng``."""
    w, h = size
    accent = COLORS[color]
    shade = rng.randint(225, 250)
    img = Image.new("RGB", size, (shade, shade, shade))
    d = ImageDraw.Draw(img)
    jx, jy = rng.randint(-3, 3), rng.randint(-3, 3)
    if kind == "calendar":
        d.rectangle([0, 0, w, 14], fill=accent)
        for r in range(4):
            for c in range(7):
                x, y = 6 + c * 17 + jx, 20 + r * 18 + jy
                d.rectangle([x, y, x + 13, y + 13], outline=(90, 90, 90))
        r, c = rng.randint(0, 3), rng.randint(0, 6)
        x, y = 6 + c * 17 + jx, 20 + r * 18 + jy
        d.rectangle([x, y, x + 13, y + 13], fill=accent)
    elif kind == "claim":
        d.rectangle([10 + jx, 6, w - 10 + jx, h - 6], fill=(255, 255, 255), outline=(60, 60, 60))
        for i in range(5):
            y = 14 + i * 12 + jy
            d.line([18, y, w - 40, y], fill=(120, 120, 120), width=2)
        d.ellipse([w - 36 + jx, h - 36 + jy, w - 14 + jx, h - 14 + jy], fill=accent)
    elif kind == "login":
        d.rectangle([0, 0, w, h], fill=(40, 40, 48))
        d.rectangle([30 + jx, 16 + jy, w - 30 + jx, h - 16 + jy], fill=(250, 250, 250))
        d.rectangle([38 + jx, 26 + jy, w - 38 + jx, 34 + jy], outline=(80, 80, 80))
        d.rectangle([38 + jx, 40 + jy, w - 38 + jx, 48 + jy], outline=(80, 80, 80))
        d.rectangle([44 + jx, 56 + jy, w - 44 + jx, 68 + jy], fill=accent)
    elif kind == "desktop":
        d.rectangle([0, 0, w, h], fill=accent)
        for i in range(3):
            x = 6 + jx
            y = 6 + i * 20 + jy
            d.rectangle([x, y, x + 12, y + 12], fill=(245, 245, 245))
        d.rectangle([0, h - 10, w, h], fill=(30, 30, 30))
    else:
        raise KeyError(kind)
    return img


def make_samples(n: int, seed: int, kinds: tuple[str, ...] = KINDS) -> list[Sample]:
    """``n`` samples cycling through kinds and colours, with seeded layout jitter and prompts."""
    rng = random.Random(seed)
    colors = list(COLORS)
    samples = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        color = colors[(i // len(kinds) + rng.randint(0, 3)) % len(colors)]
        samples.append(Sample(kind, color, draw_screen(kind, color, rng), rng.choice(PROMPTS)))
    return samples
