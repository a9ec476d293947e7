"""An embedded image world where class names carry nothing and class descriptions carry the attributes: the data of
`make demo`, `make compare` and `training.demo_new_class`, written to disk as a user's data would be.

    python -m training.world --output_dir world                       # the defaults the demos use
    python -m training.world --output_dir world_s3 --seed 3 --num_classes 40 --imbalance 50 --visual_fraction 0.3

One object per image, drawn with numpy: a shape (8), a colour (8) and a surface pattern (4), with nuisances
(position, size, a small rotation, brightness, a noisy background with gratings and stray lines).

- The "web": a captioned pool of images over attribute combinations; each caption names the attributes in one of
  several phrasings and synonyms, never a class name. The target classes' exact combinations never appear in it.
- The task: `--num_classes` classes, each one combination, named by made-up pronounceable words; at least a third
  of them have a near twin among the classes (one attribute differs). A long-tailed training split (exponential
  profile from `--max_per_class` down to `--max_per_class / --imbalance`), a balanced selection split and a
  balanced test split, all disjoint from the pool.
- The descriptions: per class an encyclopedia-style entry (`--sentences_per_class`), of which `--visual_fraction`
  name one or two of the class's attributes (a few all three) and the rest are history, range, naming and trivia
  that name none. `visual_sentences.json` records which are which, for measurement only: no method reads it.

Files written under `--output_dir`: `images/{pool,train,val,test}/*.png`, `train.txt`, `val.txt` (selection),
`test.txt` (split files: `relative/path label`), `pool_captions.json` (a list of `{"image", "caption"}`),
`classes.txt`, `corpus.json` (class name -> sentences), `visual_sentences.json` and `world.json` (the arguments, each
class's attributes and twins, the training counts).
"""

import argparse
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from transformers.utils import logging
from transformers.utils.logging import tqdm

from .cli import UsageError, run_main
from .io_utils import atomic_write_json, atomic_write_text
from .standin_clip import pretrain_on_captions

logger = logging.get_logger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# The attributes and their words
# ----------------------------------------------------------------------------------------------------------------------

# Each attribute value: nouns (for "a red <noun>") and adjectives ("a <adj> object"), the synonyms captions and
# descriptions draw from.
SHAPES = {
    "circle": (["circle", "disc"], ["round", "circular", "disc-shaped"]),
    "square": (["square", "box"], ["square", "boxy", "four-sided"]),
    "triangle": (["triangle", "wedge"], ["triangular", "three-cornered"]),
    "diamond": (["diamond", "rhombus"], ["diamond-shaped", "rhomboid"]),
    "star": (["star"], ["star-shaped", "five-pointed"]),
    "cross": (["cross", "plus sign"], ["cross-shaped", "plus-shaped"]),
    "ring": (["ring", "hoop", "donut"], ["ring-shaped", "hollow", "annular"]),
    "crescent": (["crescent", "half moon"], ["crescent-shaped", "moon-shaped", "sickle-shaped"]),
}
COLOURS = {
    "red": (["red", "scarlet", "crimson"], (0.86, 0.12, 0.12)),
    "orange": (["orange", "amber", "tangerine"], (0.95, 0.52, 0.06)),
    "yellow": (["yellow", "golden", "lemon"], (0.92, 0.88, 0.10)),
    "green": (["green", "emerald", "grass-green"], (0.15, 0.70, 0.15)),
    "cyan": (["cyan", "turquoise", "teal"], (0.10, 0.80, 0.80)),
    "blue": (["blue", "azure", "cobalt"], (0.12, 0.25, 0.90)),
    "purple": (["purple", "violet", "plum"], (0.55, 0.15, 0.75)),
    "pink": (["pink", "rose", "magenta"], (0.96, 0.42, 0.72)),
}
PATTERNS = {
    "plain": (["plain", "solid", "unmarked"], ["with no markings", "in a single flat tone"]),
    "striped": (["striped", "banded"], ["with stripes", "with bands across it"]),
    "spotted": (["spotted", "dotted", "speckled"], ["with spots", "with dots all over"]),
    "checkered": (["checkered", "chequered", "tiled"], ["with a checkerboard pattern", "with small squares"]),
}
ATTRIBUTES = ("shape", "colour", "pattern")


def attribute_words() -> set[str]:
    """Every word any attribute phrase uses (lower case, split on spaces and hyphens): what non-visual sentences and
    class names must never contain."""
    phrases = [p for nouns, adjs in SHAPES.values() for p in nouns + adjs]
    phrases += [p for words, _ in COLOURS.values() for p in words]
    phrases += [p for adjs, phrases_ in PATTERNS.values() for p in adjs + phrases_]
    generic = {"with", "no", "a", "in", "all", "over", "across", "it", "small", "single"}
    return {w for p in phrases for w in re.split(r"[\s-]+", p.lower()) if w} - generic


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class WorldArguments:
    """The world's knobs; every one has a default and `python -m training.world --help` lists them."""

    output_dir: str = "world"
    seed: int = 0
    num_classes: int = 60
    imbalance: float = 100.0
    max_per_class: int = 200
    test_per_class: int = 30
    selection_per_class: int = 10
    pool_size: int = 20000
    sentences_per_class: int = 12
    visual_fraction: float = 0.5
    twin_fraction: float = 0.4
    image_size: int = 32
    noise: float = 0.08

    def check(self) -> None:
        """One line per bad flag, naming it, before anything is written."""
        combos = len(SHAPES) * len(COLOURS) * len(PATTERNS)
        if not 2 <= self.num_classes <= combos // 2:
            raise UsageError(
                f"--num_classes must be between 2 and {combos // 2} (half the {len(SHAPES)} shapes × {len(COLOURS)} "
                f"colours × {len(PATTERNS)} patterns = {combos} combinations, the rest being the pool's), got "
                f"{self.num_classes}."
            )
        if self.imbalance < 1:
            raise UsageError(f"--imbalance must be >= 1 (head / tail training images), got {self.imbalance:g}.")
        if self.max_per_class < 1 or self.max_per_class / self.imbalance < 1:
            raise UsageError(
                f"--max_per_class {self.max_per_class} / --imbalance {self.imbalance:g} leaves the rarest class "
                "fewer than 1 training image; raise --max_per_class or lower --imbalance."
            )
        for name in ("test_per_class", "selection_per_class", "sentences_per_class", "pool_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if not 0 <= self.visual_fraction <= 1:
            raise UsageError(f"--visual_fraction must be in [0, 1], got {self.visual_fraction:g}.")
        if not 0 <= self.twin_fraction <= 1:
            raise UsageError(f"--twin_fraction must be in [0, 1], got {self.twin_fraction:g}.")
        if self.image_size < 16:
            raise UsageError(f"--image_size must be >= 16 pixels, got {self.image_size}.")
        if self.noise < 0:
            raise UsageError(f"--noise must be >= 0, got {self.noise:g}.")


# ----------------------------------------------------------------------------------------------------------------------
# Rendering (numpy, a batch at a time)
# ----------------------------------------------------------------------------------------------------------------------


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-mask of a shape of radius 1 in object coordinates (u right, v down), all arrays (B, S, S)."""
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    if shape == "circle":
        return r < 0.9
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.78
    if shape == "triangle":  # apex up, base down
        return (v < 0.65) & (v > -0.95 + 1.9 * np.abs(u) / 1.1)
    if shape == "diamond":
        return np.abs(u) / 0.8 + np.abs(v) < 1.0
    if shape == "star":  # five points, radius between 0.42 and 1
        k = np.cos(5 * (theta + np.pi / 2)) * 0.5 + 0.5
        return r < 0.42 + 0.58 * k**2
    if shape == "cross":
        return ((np.abs(u) < 0.3) & (np.abs(v) < 0.95)) | ((np.abs(v) < 0.3) & (np.abs(u) < 0.95))
    if shape == "ring":
        return (r < 0.95) & (r > 0.55)
    if shape == "crescent":
        return (r < 0.92) & (np.hypot(u - 0.45, v) > 0.7)
    raise ValueError(shape)


def _pattern_mask(pattern: str, x: np.ndarray, y: np.ndarray, phase: np.ndarray, angle: np.ndarray, scale: float):
    """Where the pattern darkens the object, in pixel coordinates (B, S, S); `scale` = image_size / 32."""
    if pattern == "plain":
        return np.zeros(x.shape, dtype=bool)
    if pattern == "striped":  # period 4 px at 32 px, random orientation
        t = x * np.cos(angle) + y * np.sin(angle)
        return np.sin(2 * np.pi * t / (4.0 * scale) + phase) > 0
    if pattern == "spotted":  # dots every 5 px
        p = 5.0 * scale
        dx = np.mod(x + phase * p, p) - p / 2
        dy = np.mod(y + phase * p, p) - p / 2
        return dx**2 + dy**2 < (0.32 * p) ** 2
    if pattern == "checkered":  # 3 px squares
        p = 3.0 * scale
        return (np.floor((x + phase * p) / p) + np.floor(y / p)).astype(int) % 2 == 0
    raise ValueError(pattern)


def render(combos: np.ndarray, rng: np.random.Generator, image_size: int = 32, noise: float = 0.08) -> np.ndarray:
    """Images of the objects `combos` (B, 3) = (shape, colour, pattern) indices: uint8 array (B, S, S, 3). Every
    nuisance is drawn from `rng`."""
    b, s = len(combos), image_size
    scale = s / 32.0
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)  # (S, S)
    x, y = np.broadcast_to(x, (b, s, s)), np.broadcast_to(y, (b, s, s))

    def per_image(low, high):
        return rng.uniform(low, high, size=(b, 1, 1)).astype(np.float32)

    # background: a grey level, two faint gratings, pixel noise and two stray grey lines (clutter)
    background = per_image(0.25, 0.6) + 0.0 * x
    for _ in range(2):
        a, f, ph = per_image(0, np.pi), per_image(0.05, 0.25), per_image(0, 2 * np.pi)
        background = background + per_image(0.02, 0.08) * np.sin(f * (x * np.cos(a) + y * np.sin(a)) + ph)
    for _ in range(2):
        a, c = per_image(0, np.pi), per_image(0, s)
        distance = np.abs((x - s / 2) * np.sin(a) - (y - s / 2) * np.cos(a) - (c - s / 2))
        background = np.where(distance < 0.6 * scale, per_image(0.1, 0.9) + 0.0 * x, background)
    image = np.repeat(background[..., None], 3, axis=-1)  # (B, S, S, 3)

    # the object: position, size and a small rotation
    radius = per_image(0.3, 0.42) * s
    cx, cy = per_image(0.4, 0.6) * s, per_image(0.4, 0.6) * s
    rot = per_image(-0.25, 0.25)
    dx, dy = (x - cx) / radius, (y - cy) / radius
    u, v = dx * np.cos(rot) + dy * np.sin(rot), -dx * np.sin(rot) + dy * np.cos(rot)
    inside = np.zeros((b, s, s), dtype=bool)
    dark = np.zeros((b, s, s), dtype=bool)
    phase, angle = per_image(0, 2 * np.pi), per_image(0, np.pi)
    for i, shape in enumerate(SHAPES):
        rows = combos[:, 0] == i
        if rows.any():
            inside[rows] = _shape_mask(shape, u[rows], v[rows])
    for i, pattern in enumerate(PATTERNS):
        rows = combos[:, 2] == i
        if rows.any():
            dark[rows] = _pattern_mask(pattern, x[rows], y[rows], phase[rows] / (2 * np.pi), angle[rows], scale)
    rgb = np.array([c for _, c in COLOURS.values()], dtype=np.float32)[combos[:, 1]]  # (B, 3)
    brightness = per_image(0.75, 1.1)[..., None]  # (B, 1, 1, 1)
    colour = rgb[:, None, None, :] * brightness * np.where(dark, 0.35, 1.0)[..., None]  # (B, S, S, 3)
    image = np.where(inside[..., None], colour, image)
    image = image + noise * rng.standard_normal(image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# Names, captions and descriptions
# ----------------------------------------------------------------------------------------------------------------------

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kl", "tr", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m"]


def class_names(num: int, rng: np.random.Generator) -> list[str]:
    """`num` distinct made-up words of two or three consonant-vowel syllables, none containing an attribute word."""
    banned = attribute_words()
    names: list[str] = []
    while len(names) < num:
        syllables = int(rng.integers(2, 4))
        word = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                       for _ in range(syllables)) + _CODAS[rng.integers(len(_CODAS))]  # fmt: skip
        if word not in names and not any(b in word for b in banned if len(b) >= 3):
            names.append(word)
    return names


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _words(combo, rng) -> dict[str, str]:
    """One phrasing of each attribute of `combo` (shape, colour, pattern indices)."""
    shape, colour, pattern = (list(table)[i] for table, i in zip((SHAPES, COLOURS, PATTERNS), combo))
    return {
        "shape": _pick(rng, SHAPES[shape][0]),
        "shape_adj": _pick(rng, SHAPES[shape][1]),
        "colour": _pick(rng, COLOURS[colour][0]),
        "pattern": _pick(rng, PATTERNS[pattern][0]),
        "pattern_phrase": _pick(rng, PATTERNS[pattern][1]),
    }


CAPTIONS = [
    "a {pattern} {colour} {shape}.",
    "a {colour} {shape} {pattern_phrase}.",
    "a picture of a {shape} in {colour}, {pattern}.",
    "a {shape_adj} object, {colour} and {pattern}.",
    "a small {pattern} {shape_adj} thing coloured {colour}.",
    "{colour}, {pattern}, {shape_adj}.",
    "a {colour} {shape}.",  # a caption that leaves an attribute out, as web captions do
    "a {pattern} {shape}.",
    "something {colour} and {shape_adj}.",
]


def _articles(text: str) -> str:
    """The article "a" before a consonant, "an" before a vowel."""
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def caption(combo, rng: np.random.Generator) -> str:
    return _articles(_pick(rng, CAPTIONS).format(**_words(combo, rng)))


# Visual sentences by the attributes they name; each names only those (any other word is neutral).
VISUAL = {
    ("colour",): ["Most {Name}s are {colour}.", "The colour of the {name} is a deep {colour}.",
                  "Seen up close, the {name} looks {colour}."],
    ("shape",): ["The {name} has a {shape_adj} body.", "In silhouette the {name} resembles a {shape}.",
                 "Its outline is {shape_adj}."],
    ("pattern",): ["Its surface is {pattern}.", "The {name} is {pattern} all over.",
                   "Its skin is marked {pattern_phrase}."],
    ("colour", "shape"): ["The {name} is a {colour} {shape}.", "Its {shape_adj} body is {colour}."],
    ("colour", "pattern"): ["Its {colour} skin is {pattern}.", "The {name} is {colour}, {pattern_phrase}."],
    ("pattern", "shape"): ["The {name} has a {pattern}, {shape_adj} form.", "Its body is a {pattern} {shape}."],
    ("colour", "pattern", "shape"): ["A typical {name} is a {pattern} {colour} {shape}.",
                                     "In short, the {name} is {shape_adj}, {colour} and {pattern}."],
}  # fmt: skip
NON_VISUAL = [
    "The {name} was first recorded in {year} by a travelling naturalist.",
    "It is found mainly in the {region}.",
    "Its name comes from an old word meaning '{meaning}'.",
    "Local stories say the {name} brings {luck} to those who find it.",
    "The {name} is protected by law in {count} countries.",
    "Collectors have traded the {name} since the {century} century.",
    "It was chosen as a regional emblem in {year}.",
    "Few museums hold more than {count} specimens of the {name}.",
    "The {name} appears in a folk song from the {region}.",
    "It is most often seen in {season}.",
    "Its numbers have {trend} over the last decade.",
    "A festival in its honour is held every {month}.",
    "The first scientific account of the {name} ran to {count} pages.",
    "Children in the {region} learn its name at school.",
]
_FILL = {
    "year": [str(y) for y in range(1790, 1990, 7)],
    "region": ["northern valleys", "eastern marshes", "southern coast", "high plateaus", "western islands",
               "river delta", "mountain passes", "inland lakes"],
    "meaning": ["quiet traveller", "river stone", "night visitor", "little wanderer", "keeper of wells",
                "early riser"],
    "luck": ["good fortune", "rain", "a safe journey", "a good harvest"],
    "count": [str(n) for n in range(3, 40)],
    "century": ["eighteenth", "nineteenth", "twentieth"],
    "season": ["spring", "late summer", "autumn", "winter"],
    "trend": ["grown", "fallen", "held steady", "doubled"],
    "month": ["March", "June", "September", "November"],
}  # fmt: skip


def description(name: str, combo, n: int, visual_fraction: float, rng: np.random.Generator):
    """An entry of `n` sentences for the class `name` with attributes `combo`: `round(visual_fraction · n)` visual
    ones (about a sixth of them naming all three attributes, the others one or two, cycling over the attributes),
    the rest non-visual. Returns the sentences in a shuffled order and whether each is visual."""
    n_visual = round(visual_fraction * n)
    n_triple = max(1, round(n_visual / 6)) if n_visual >= 3 else 0
    kinds = [("colour", "pattern", "shape")] * n_triple
    singles = [("colour",), ("shape",), ("pattern",)]
    pairs = [("colour", "shape"), ("colour", "pattern"), ("pattern", "shape")]
    order_s, order_p = rng.permutation(3), rng.permutation(3)
    for k in range(n_visual - n_triple):  # alternate single / pair, each cycling over the attributes
        kinds.append(singles[order_s[(k // 2) % 3]] if k % 2 == 0 else pairs[order_p[(k // 2) % 3]])
    sentences = []
    for kind in kinds:
        words = _words(combo, rng)
        text = _pick(rng, VISUAL[kind]).format(name=name, Name=name.capitalize(), **words)
        sentences.append((_articles(text), True))
    fillers = rng.permutation(len(NON_VISUAL))
    for k in range(n - n_visual):
        template = NON_VISUAL[fillers[k % len(NON_VISUAL)]]
        fill = {key: _pick(rng, values) for key, values in _FILL.items()}
        sentences.append((template.format(name=name, **fill), False))
    sentences = [sentences[i] for i in rng.permutation(len(sentences))]
    # capitalise the first letter (a template may start with the name)
    return [t[0].upper() + t[1:] for t, _ in sentences], [v for _, v in sentences]


# ----------------------------------------------------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------------------------------------------------


def _all_combos() -> np.ndarray:
    grid = np.stack(np.meshgrid(*(np.arange(len(t)) for t in (SHAPES, COLOURS, PATTERNS)), indexing="ij"), -1)
    return grid.reshape(-1, 3)  # (K, 3)


def choose_classes(num: int, twin_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """`num` distinct combinations (num, 3): first ceil(twin_fraction · num / 2) twin pairs (a combination and one
    that differs from it in one attribute), then combinations drawn at random from the rest."""
    combos = [tuple(c) for c in _all_combos()[rng.permutation(len(_all_combos()))]]
    sizes = (len(SHAPES), len(COLOURS), len(PATTERNS))
    chosen: list[tuple] = []
    pairs = min(num // 2, math.ceil(twin_fraction * num / 2))
    for base in combos:
        if len(chosen) >= 2 * pairs:
            break
        if base in chosen:
            continue
        attribute = int(rng.integers(3))
        twin = list(base)
        twin[attribute] = (base[attribute] + 1 + int(rng.integers(sizes[attribute] - 1))) % sizes[attribute]
        if tuple(twin) not in chosen:
            chosen += [base, tuple(twin)]
    chosen += [c for c in combos if c not in chosen][: num - len(chosen)]
    order = rng.permutation(num)  # twins not always neighbours in the class list
    return np.array([chosen[i] for i in order], dtype=np.int64)


def twins_of(combos: np.ndarray) -> list[list[int]]:
    """For each class, the classes whose combination differs from it in exactly one attribute."""
    differ = (combos[:, None, :] != combos[None, :, :]).sum(-1)  # (C, C)
    return [np.flatnonzero(row == 1).tolist() for row in differ]


def train_counts(num: int, max_per_class: int, imbalance: float) -> list[int]:
    """The exponential profile n_r = max · imbalance^(−r / (C − 1)) over ranks r, rounded, at least 1."""
    return [max(1, round(max_per_class * imbalance ** (-r / max(1, num - 1)))) for r in range(num)]


def _write_images(root: Path, folder: str, combos: np.ndarray, rng, args: WorldArguments, bar) -> list[str]:
    (root / "images" / folder).mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(combos), 1024):
        pixels = render(combos[start : start + 1024], rng, args.image_size, args.noise)
        for k, image in enumerate(pixels):
            rel = f"images/{folder}/{start + k:05d}.png"
            Image.fromarray(image, mode="RGB").save(root / rel, compress_level=1)
            paths.append(rel)
        bar.update(len(pixels))
    return paths


def build_world(args: WorldArguments) -> dict:
    """Writes the world under `args.output_dir` and returns its file paths (the keys `root`, `train`, `val`, `test`,
    `pool_captions`, `classes`, `corpus`, `visual_sentences`, `world`) with `train_counts` and `class_names`."""
    args.check()
    root = Path(args.output_dir)
    rng = np.random.default_rng(args.seed)
    classes = choose_classes(args.num_classes, args.twin_fraction, rng)
    names = class_names(args.num_classes, rng)
    target = {tuple(c) for c in classes.tolist()}
    pool_combos = np.array([c for c in _all_combos().tolist() if tuple(c) not in target])
    pool = pool_combos[rng.integers(len(pool_combos), size=args.pool_size)]
    ranks = rng.permutation(args.num_classes)  # class c has the ranks[c]-th largest training split
    profile = train_counts(args.num_classes, args.max_per_class, args.imbalance)
    counts = [profile[r] for r in ranks]
    per_split = {
        "train": counts,
        "val": [args.selection_per_class] * args.num_classes,
        "test": [args.test_per_class] * args.num_classes,
    }
    total = args.pool_size + sum(sum(v) for v in per_split.values())
    paths: dict = {"root": str(root)}
    with tqdm(total=total, desc="Rendering the world", unit="image") as bar:
        pool_files = _write_images(root, "pool", pool, rng, args, bar)
        for split, sizes in per_split.items():
            labels = np.repeat(np.arange(args.num_classes), sizes)
            files = _write_images(root, split, classes[labels], rng, args, bar)
            paths[split] = str(root / f"{split}.txt")
            atomic_write_text(paths[split], "".join(f"{f} {y}\n" for f, y in zip(files, labels.tolist())))
    paths["pool_captions"] = str(root / "pool_captions.json")
    atomic_write_json(
        paths["pool_captions"], [{"image": f, "caption": caption(c, rng)} for f, c in zip(pool_files, pool)]
    )
    paths["classes"] = str(root / "classes.txt")
    atomic_write_text(paths["classes"], "\n".join(names) + "\n")
    corpus, visual = {}, {}
    for name, combo in zip(names, classes):
        corpus[name], visual[name] = description(name, combo, args.sentences_per_class, args.visual_fraction, rng)
    paths["corpus"] = str(root / "corpus.json")
    atomic_write_json(paths["corpus"], corpus)
    paths["visual_sentences"] = str(root / "visual_sentences.json")
    atomic_write_json(paths["visual_sentences"], visual)
    twins = twins_of(classes)
    tables = [list(SHAPES), list(COLOURS), list(PATTERNS)]
    paths["world"] = str(root / "world.json")
    atomic_write_json(paths["world"], {
        "arguments": asdict(args),
        "classes": [{"name": n, **{a: tables[k][combo[k]] for k, a in enumerate(ATTRIBUTES)}, "train_count": count,
                     "twins": [names[t] for t in tw]}
                    for n, combo, count, tw in zip(names, classes.tolist(), counts, twins)],
        "pool_combinations": len(pool_combos),
        "classes_with_a_twin": sum(bool(t) for t in twins),
    })  # fmt: skip
    paths["train_counts"], paths["class_names"] = counts, names
    return paths


def pretrain_world_clip(data: dict, out: str | Path, seed: int, steps: int = 800) -> str:
    """The world's stand-in for a pretrained CLIP: `standin_clip.pretrain_on_captions` on the captioned pool alone
    (no class name, no target combination), about 3 minutes on 2 CPU cores at the default 800 steps of 128 pairs."""
    images, captions = read_pool_captions(data["pool_captions"], data["root"])
    return pretrain_on_captions(images, captions, out, seed, steps=steps)


def read_pool_captions(path: str | Path, root: str | Path) -> tuple[list[str], list[str]]:
    """The pool's image paths (joined to `root`) and captions from `pool_captions.json`."""
    rows = json.loads(Path(path).read_text())
    return [str(Path(root) / r["image"]) for r in rows], [r["caption"] for r in rows]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m training.world", description=__doc__.split("\n\n")[0])
    for f in WorldArguments.__dataclass_fields__.values():
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    args = WorldArguments(**vars(parser.parse_args(argv)))
    start = time.time()
    paths = build_world(args)
    world = json.loads(Path(paths["world"]).read_text())
    print(f"Wrote {args.num_classes} classes ({world['classes_with_a_twin']} with a near twin; training images "
          f"{max(paths['train_counts'])} down to {min(paths['train_counts'])}), {args.pool_size} captioned pool "
          f"images over {world['pool_combinations']} other combinations, and the corpus under {args.output_dir} in "
          f"{time.time() - start:.0f} s.")  # fmt: skip
    return paths


if __name__ == "__main__":
    run_main(main, "training.world")
