"""`lightlong demo --vl`: a tiny MiniMax-VL-01 (ViT -> MLP projector -> the `tiny` hybrid)
learns to answer questions about synthetic pictures, in minutes on a CPU.

The pictures are drawn with Pillow from a seed: one to three shapes (circle, square,
triangle), each of its own colour (red, green, blue, yellow), each in its own slot (top,
bottom, left, right) on a plain background. Every picture gets one question of one of four
types, answered by one word:

    count     "how many shapes?"            (1-3 shapes) -> one | two | three
    colour    "what colour is the shape?"   (1 shape)    -> red | green | blue | yellow
    shape     "what shape is it?"           (1 shape)    -> circle | square | triangle
    position  "where is the red shape?"     (1-3 shapes) -> top | bottom | left | right

The VL model reads `<image>` × n (the image's features), then "\\nQ: {question}\\nA:", and is
trained on " {answer}<eos>" only, its first steps on colour questions alone (without that
curriculum it stayed at the answers' priors in this budget). The text-only baseline is the
same text model trained on the same questions without the image: it can only learn the
answers' priors (and the questions carry none: each answer is uniform given its question).
Accuracy is exact match of the answer and eos on held-out pictures (another seed's, none
pixel-identical to a training one), per question type, from a teacher-forced argmax over the
answer tokens — exactly greedy decoding's exact match: greedy decoding follows the
teacher-forced path for as long as its argmaxes are right. The examples' shown answers are
decoded greedily.
Why this recipe and what it measured: docs/vl-demo.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from lightlong.model.hybrid import HybridLM
from lightlong.model.image import (
    ImageProcessor,
    encode_with_images,
    expand_image_tokens,
    image_digest,
)
from lightlong.model.vision import HybridVLM, VLConfig
from lightlong.tokenizer import ByteTokenizer
from lightlong.train.loop import lr_factor, param_groups

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
"""The shapes' colours (RGB)."""
KINDS = ("circle", "square", "triangle")
SLOTS = ("top", "bottom", "left", "right")
COUNT_WORDS = ("one", "two", "three")
QUESTION_TYPES = ("count", "colour", "shape", "position")
ANSWERS: dict[str, tuple[str, ...]] = {
    "count": COUNT_WORDS,
    "colour": tuple(COLOURS),
    "shape": KINDS,
    "position": SLOTS,
}
"""Every answer a question type can have (chance is one over their number)."""
BACKGROUND = (240, 240, 240)
IMAGE = "<image>"
PROMPT = "<image>\nQ: {question}\nA:"
"""The default prompt template (the answer follows as " {answer}<eos>")."""
SPLITS = ("train", "val", "test")
"""train: what the models learn from; val: for tuning the recipe; test: held out, reported."""


@dataclass
class VLDemoConfig:
    """What `lightlong demo --vl` draws, trains and measures."""

    image_size: int = 32
    """Side S of the pictures and of the ViT's tile (pixels): each picture is one S×S tile
    plus its thumbnail (the grid's only pinpoint is [S, S])."""
    patch_size: int = 8
    """ViT patch side P: (S/P)² features per tile."""
    vision_width: int = 64
    """ViT width (MLP 2×; 2 layers, 2 heads, as tiny-vl)."""
    train_size: int = 8000
    """Training pictures (one question each)."""
    val_size: int = 800
    """Validation pictures: the only ones a recipe may be tuned on."""
    test_size: int = 1200
    """Held-out pictures the report's accuracy is measured on."""
    steps: int = 1200
    """Optimizer steps of the VL model."""
    text_steps: int = 300
    """Optimizer steps of the text-only baseline: it can learn only the answers' priors
    (given its question, every answer is equally likely), and its loss is flat long before."""
    batch_size: int = 32
    """Samples per step."""
    lr: float = 3e-3
    """Peak learning rate (AdamW, 10 % warm-up, cosine to 10 %)."""
    weight_decay: float = 0.1
    """AdamW decay on matrices."""
    curriculum_steps: int = 300
    """The VL model's first steps draw colour questions only (one-shape pictures: learned
    alone in ~300 steps), the rest all types; 0: all types from the start. The baseline,
    which cannot see colours, draws all types from the start."""
    prompt: str = PROMPT
    """The prompt: one "<image>" (dropped for the text-only baseline) and {question}."""
    examples: int = 12
    """Held-out pictures shown in examples.png (spread over the question types)."""
    threads: int = 1
    """torch threads (0: torch's default). One: the tiny model gains little from a second
    thread, and with other processes on the cores more threads ran 5–20× slower."""
    seed: int = 0
    """Weights and data seed (each split draws from its own stream of it)."""
    out_dir: str = "runs/demo-vl"
    """report.json, examples.png and loss.png."""

    def validate(self) -> VLDemoConfig:
        """Raises ValueError naming the field; returns self."""
        for name in ("image_size", "patch_size", "vision_width", "train_size", "test_size",
                     "steps", "text_steps", "batch_size"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_size", "examples", "threads", "curriculum_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size ({self.patch_size}) must divide image_size ({self.image_size})"
            )
        if self.image_size < 24:
            raise ValueError(f"image_size must be >= 24 (four slots), got {self.image_size}")
        if self.vision_width % 2:
            raise ValueError(f"vision_width must be even (2 heads), got {self.vision_width}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.prompt.count(IMAGE) != 1 or self.prompt.count("{question}") != 1:
            raise ValueError(
                f'prompt must hold "<image>" and "{{question}}" once each, got {self.prompt!r}'
            )
        return self


# ------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Shape:
    """One drawn shape: centre (x, y) and half-size r in pixels."""

    kind: str
    colour: str
    slot: str
    x: int
    y: int
    r: int

    def box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), inclusive pixels."""
        return self.x - self.r, self.y - self.r, self.x + self.r, self.y + self.r


@dataclass(frozen=True)
class Sample:
    """A picture's shapes, its question and the answer."""

    shapes: tuple[Shape, ...]
    qtype: str
    question: str
    answer: str


def slot_centre(slot: str, size: int) -> tuple[int, int]:
    """(x, y) of a slot's centre: the middle of an edge, a fifth of the side in from it."""
    near, mid, far = size // 5, size // 2, size - 1 - size // 5
    return {"top": (mid, near), "bottom": (mid, far), "left": (near, mid), "right": (far, mid)}[
        slot
    ]


def draw(shapes: Sequence[Shape], size: int) -> Image.Image:
    """The picture: an RGB `size`×`size` image of the shapes on the background."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for s in shapes:
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            pen.ellipse(s.box(), fill=fill)
        elif s.kind == "square":
            pen.rectangle(s.box(), fill=fill)
        else:
            pen.polygon([(s.x, s.y - s.r), (s.x - s.r, s.y + s.r), (s.x + s.r, s.y + s.r)],
                        fill=fill)  # fmt: skip
    return image


def _overlap(a: Shape, b: Shape, gap: int = 1) -> bool:
    al, at, ar, ab = a.box()
    bl, bt, br, bb = b.box()
    return not (ar + gap < bl or br + gap < al or ab + gap < bt or bb + gap < at)


def random_shapes(rng: random.Random, size: int, n: int | None = None) -> tuple[Shape, ...]:
    """n shapes (None: 1–3, uniform) of distinct kinds, colours and slots; half-size ⌊S/8⌋ …
    ⌊S/6⌋, centres jittered ±⌊S/16⌋ around their slot's, with no two boxes touching."""
    n = rng.randint(1, 3) if n is None else n
    kinds = rng.sample(KINDS, n)
    colours = rng.sample(list(COLOURS), n)
    slots = rng.sample(SLOTS, n)
    jitter = size // 16
    while True:
        shapes = []
        for kind, colour, slot in zip(kinds, colours, slots, strict=True):
            cx, cy = slot_centre(slot, size)
            r = rng.randint(size // 8, size // 6)
            x = min(max(cx + rng.randint(-jitter, jitter), r), size - 1 - r)
            y = min(max(cy + rng.randint(-jitter, jitter), r), size - 1 - r)
            shapes.append(Shape(kind, colour, slot, x, y, r))
        if not any(_overlap(a, b) for i, a in enumerate(shapes) for b in shapes[i + 1 :]):
            return tuple(shapes)


SHAPES_ASKED: dict[str, int | None] = {"count": None, "colour": 1, "shape": 1, "position": None}
"""Shapes in the pictures of each question type (None: 1–3). Colour and shape are asked of
one-shape pictures: naming one shape of several by its kind ("the circle's colour") needs
shape recognition and binding, which the tiny model did not learn in the demo's budget
(docs/vl-demo.md); position binds by colour, which is read off single patches."""


def ask(shapes: Sequence[Shape], qtype: str, rng: random.Random) -> tuple[str, str]:
    """(question, answer) of type qtype about the shapes (the shape asked about is one of
    them, named by its colour; colour and shape questions need a one-shape picture)."""
    if qtype == "count":
        return "how many shapes?", COUNT_WORDS[len(shapes) - 1]
    if qtype in ("colour", "shape") and len(shapes) != 1:
        raise ValueError(f"{qtype} questions are asked of one-shape pictures, got {len(shapes)}")
    s = rng.choice(list(shapes))
    if qtype == "colour":
        return "what colour is the shape?", s.colour
    if qtype == "shape":
        return "what shape is it?", s.kind
    if qtype == "position":
        return f"where is the {s.colour} shape?", s.slot
    raise ValueError(f"unknown question type {qtype!r}; valid: {QUESTION_TYPES}")


def make_split(
    split: str, n: int, *, seed: int, size: int, exclude: set[bytes] = frozenset()
) -> tuple[list[Sample], list[Image.Image]]:
    """n samples of a split and their pictures, from the split's own seeded stream; question
    types cycle count, colour, shape, position. Pictures whose digest is in `exclude` (the
    training set's, for val and test) are redrawn with the same number of shapes, so no
    held-out picture is a training one and the answers' frequencies stay as drawn."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"lightlong-vl-demo/{seed}/{split}")
    samples, images = [], []
    for i in range(n):
        qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        count = SHAPES_ASKED[qtype] or rng.randint(1, 3)  # kept when a picture is redrawn
        while True:
            shapes = random_shapes(rng, size, count)
            image = draw(shapes, size)
            if image_digest(image) not in exclude:
                break
        question, answer = ask(shapes, qtype, rng)
        samples.append(Sample(shapes, qtype, question, answer))
        images.append(image)
    return samples, images


def vl_config(cfg: VLDemoConfig) -> VLConfig:
    """tiny-vl with the demo's geometry: one S×S tile of P-pixel patches, the given width."""
    base = VLConfig.from_preset("tiny-vl")
    w = cfg.vision_width
    vision = dataclasses.replace(base.vision, image_size=cfg.image_size,
                                 patch_size=cfg.patch_size, hidden_size=w,
                                 intermediate_size=2 * w)  # fmt: skip
    size = cfg.image_size
    return dataclasses.replace(base, vision=vision, image_grid_pinpoints=[[size, size]]).validate()


def prompt_text(template: str, question: str, image: bool) -> str:
    """The prompt: the template with its question filled in, and its "<image>" dropped for
    the text-only baseline (image False)."""
    text = template.format(question=question)
    return text if image else text.replace(IMAGE, "")


@dataclass
class Encoded:
    """A split as tensors: ids and labels [N, T] (right-padded with eos, labels -100 off the
    answer), answer positions, pixels [N, tiles, 3, S, S] (VL only), the question types."""

    ids: Tensor
    labels: Tensor
    pixels: Tensor | None
    image_size: tuple[int, int]
    qtypes: list[str]


def encode(
    samples: Sequence[Sample],
    images: Sequence[Image.Image] | None,
    config: VLConfig,
    template: str = PROMPT,
) -> Encoded:
    """Token ids for the VL model (images given: `<image>` × num_image_tokens, then the
    prompt) or the text-only baseline (images None: the prompt alone), and the answers
    " {answer}<eos>" with their labels; pixels from the model's `ImageProcessor`."""
    tok = ByteTokenizer()
    eos = tok.eos_token_id
    size = (0, 0)
    pixels = None
    image = config.image_token_id
    if images is not None:
        processor = ImageProcessor.for_config(config)
        done = [processor(im) for im in images]
        size = done[0].image_size
        pixels = torch.stack([d.pixel_values for d in done])
    rows = []
    for s in samples:
        if images is None:
            prompt = tok.encode(prompt_text(template, s.question, image=False))
        else:
            text = prompt_text(template, s.question, image=True)
            prompt = encode_with_images(tok, text, image)
            prompt = expand_image_tokens(prompt, image, [config.num_image_tokens(size)])
        rows.append((prompt, [*tok.encode(" " + s.answer), eos]))
    T = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), T), eos, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
    return Encoded(ids, labels, pixels, size, [s.qtype for s in samples])


# ----------------------------------------------------------------------------- the models


def _forward(model: nn.Module, data: Encoded, idx: Tensor, labels: bool = True):
    kw = {"labels": data.labels[idx]} if labels else {}
    if data.pixels is None:
        return model(data.ids[idx], **kw)
    pixels = data.pixels[idx].flatten(0, 1)
    return model(data.ids[idx], pixel_values=pixels, image_sizes=[data.image_size] * len(idx),
                 **kw)  # fmt: skip


def train(
    model: nn.Module, data: Encoded, cfg: VLDemoConfig, name: str, steps: int, curriculum: int = 0
) -> dict:
    """`steps` of AdamW (β 0.9/0.95, decay on matrices), 10 % warm-up then cosine to 10 % of lr,
    clipping at 1.0, batches drawn without replacement epoch by epoch from the seed (the
    first `curriculum` from the colour questions only). Returns the loss curve
    [(step, loss)], the final loss and the seconds taken."""
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, warm, steps, 0.1))
    gen = torch.Generator().manual_seed(cfg.seed)
    everything = torch.arange(data.ids.shape[0])
    first = torch.tensor([i for i, q in enumerate(data.qtypes) if q == "colour"])
    pool = first if curriculum and len(first) >= cfg.batch_size else everything
    order, at = pool[torch.randperm(len(pool), generator=gen)], 0
    curve, window = [], []
    log_every = max(1, steps // 50)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        if step == curriculum and pool is not everything:
            pool, at = everything, len(everything)  # the curriculum is over: draw from all
        if at + cfg.batch_size > len(pool):
            order, at = pool[torch.randperm(len(pool), generator=gen)], 0
        idx = order[at : at + cfg.batch_size]
        at += cfg.batch_size
        loss = _forward(model, data, idx).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append((step + 1, sum(window) / len(window)))
            window = []
            print(f"\r{name}: step {step + 1}/{steps} loss {curve[-1][1]:.3f}", end="",
                  flush=True)  # fmt: skip
    print(flush=True)
    return {"curve": curve, "final_loss": curve[-1][1], "train_seconds": time.perf_counter() - t0}


@torch.no_grad()
def answer_correct(model: nn.Module, data: Encoded, batch_size: int = 64) -> Tensor:
    """bool [N]: whether the argmax at every answer position (teacher-forced) is the answer's
    next token, eos included — greedy decoding's exact match."""
    model.eval()
    out = []
    for start in range(0, data.ids.shape[0], batch_size):
        idx = torch.arange(start, min(start + batch_size, data.ids.shape[0]))
        logits = _forward(model, data, idx, labels=False).logits
        target = data.labels[idx][:, 1:]
        hit = (logits[:, :-1].argmax(-1) == target) | (target == -100)
        out.append(hit.all(dim=1))
    model.train()
    return torch.cat(out)


def per_type(correct: Tensor, qtypes: Sequence[str]) -> dict[str, float]:
    """Accuracy per question type and over all ("all")."""
    acc = {}
    for q in QUESTION_TYPES:
        sel = [i for i, t in enumerate(qtypes) if t == q]
        if sel:
            acc[q] = float(correct[sel].float().mean())
    acc["all"] = float(correct.float().mean())
    return acc


@torch.no_grad()
def greedy_answer(model: nn.Module, data: Encoded, i: int, max_new: int = 10) -> str:
    """The answer greedy decoding gives for sample i (up to eos or max_new tokens)."""
    tok = ByteTokenizer()
    model.eval()
    start = int((data.labels[i] != -100).nonzero()[0])  # the answer's first token
    ids = data.ids[i, :start].tolist()
    new: list[int] = []
    for _ in range(max_new):
        x = torch.tensor([ids + new])
        if data.pixels is None:
            logits = model(x, logits_to_keep=1).logits
        else:
            logits = model(x, pixel_values=data.pixels[i], image_sizes=[data.image_size],
                           logits_to_keep=1).logits  # fmt: skip
        nxt = int(logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
    model.train()
    return tok.decode(new).strip()


# ---------------------------------------------------------------------------------- the run


def run_vl_demo(cfg: VLDemoConfig) -> dict:
    """Draws the splits, trains the VL model and the text-only baseline, measures held-out
    accuracy per question type, prints a table and writes report.json, examples.png and
    loss.png under cfg.out_dir. Returns the report."""
    cfg.validate()
    before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(before)


def _run(cfg: VLDemoConfig) -> dict:
    from lightlong.bench.machine import describe_machine

    wall0 = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = vl_config(cfg)
    S = cfg.image_size

    t0 = time.perf_counter()
    train_s, train_im = make_split("train", cfg.train_size, seed=cfg.seed, size=S)
    seen = {image_digest(im) for im in train_im}
    val_s, val_im = make_split("val", cfg.val_size, seed=cfg.seed, size=S, exclude=seen)
    test_s, test_im = make_split("test", cfg.test_size, seed=cfg.seed, size=S, exclude=seen)
    data = {
        "vl": [encode(s, im, config, cfg.prompt) for s, im in
               ((train_s, train_im), (val_s, val_im), (test_s, test_im))],
        "text-only": [encode(s, None, config, cfg.prompt) for s in (train_s, val_s, test_s)],
    }  # fmt: skip
    data_seconds = time.perf_counter() - t0
    print(f"drew and encoded {cfg.train_size} + {cfg.val_size} + {cfg.test_size} pictures "
          f"({S}×{S}, {config.num_image_tokens((S, S))} image tokens) in {data_seconds:.1f} s",
          flush=True)  # fmt: skip

    models: dict[str, nn.Module] = {}
    torch.manual_seed(cfg.seed)
    models["vl"] = HybridVLM(config)
    torch.manual_seed(cfg.seed)
    models["text-only"] = HybridLM(dataclasses.replace(config.text))
    results = {}
    for name, model in models.items():
        tr, va, te = data[name]
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params / 1e6:.2f}M params, {tr.ids.shape[1]} tokens a sample",
              flush=True)  # fmt: skip
        if name == "vl":
            fit = train(model, tr, cfg, name, cfg.steps, cfg.curriculum_steps)
        else:  # nothing in a colour-first start helps a model that cannot see the colours
            fit = train(model, tr, cfg, name, cfg.text_steps)
        test_correct = answer_correct(model, te)
        results[name] = {
            "params": params,
            "tokens_per_sample": tr.ids.shape[1],
            **fit,
            "val_accuracy": per_type(answer_correct(model, va), va.qtypes) if cfg.val_size else {},
            "accuracy": per_type(test_correct, te.qtypes),
            "train_accuracy": per_type(answer_correct(model, _head(tr, 1000)), tr.qtypes[:1000]),
        }

    examples = _pick_examples(test_s, cfg.examples)
    shown = []
    for i in examples:
        s = test_s[i]
        shown.append({
            "index": i, "question": s.question, "truth": s.answer, "qtype": s.qtype,
            "shapes": [dataclasses.asdict(x) for x in s.shapes],
            "vl": greedy_answer(models["vl"], data["vl"][2], i),
            "text-only": greedy_answer(models["text-only"], data["text-only"][2], i),
        })  # fmt: skip

    report = {
        "demo": dataclasses.asdict(cfg),
        "machine": describe_machine("cpu"),
        "model": {
            "text": "tiny",
            "image_tokens": config.num_image_tokens((S, S)),
            "vision": dataclasses.asdict(config.vision),
            "layers": "".join(t[0].upper() for t in config.text.layer_types),
        },
        "task": describe_task(cfg),
        "evaluation": "exact match of answer + eos, teacher-forced argmax (= greedy decoding)",
        "chance": {q: 1 / len(a) for q, a in ANSWERS.items()},
        "majority": majority(train_s, test_s),
        "results": results,
        "examples": shown,
        "data_seconds": data_seconds,
    }
    report["chance"]["all"] = sum(report["chance"].values()) / len(QUESTION_TYPES)
    report["wall_seconds"] = time.perf_counter() - wall0
    report["summary"] = summarize(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot_examples(report, test_im, out / "examples.png")
    _plot_loss(report, out / "loss.png")
    print(format_vl_demo(report))
    print(f"\n{report['summary']}\n")
    print(f"wrote {out / 'report.json'}, {out / 'examples.png'}, {out / 'loss.png'} "
          f"({report['wall_seconds']:.0f} s in all)")  # fmt: skip
    return report


def _head(data: Encoded, n: int) -> Encoded:
    pixels = None if data.pixels is None else data.pixels[:n]
    return Encoded(data.ids[:n], data.labels[:n], pixels, data.image_size, data.qtypes[:n])


def _pick_examples(samples: Sequence[Sample], n: int) -> list[int]:
    """The first n // 4 (at least one each while n allows) held-out samples of each type,
    in type order."""
    per = max(1, n // len(QUESTION_TYPES)) if n else 0
    picked = []
    for q in QUESTION_TYPES:
        picked += [i for i, s in enumerate(samples) if s.qtype == q][:per]
    return picked[:n]


def majority(train: Sequence[Sample], test: Sequence[Sample]) -> dict[str, float]:
    """Held-out accuracy of always answering each type's most frequent training answer."""
    acc = {}
    hits = 0
    for q in QUESTION_TYPES:
        common = Counter(s.answer for s in train if s.qtype == q).most_common(1)
        held = [s for s in test if s.qtype == q]
        if held:
            k = sum(bool(common) and s.answer == common[0][0] for s in held)
            acc[q] = k / len(held)
            hits += k
    acc["all"] = hits / max(1, len(test))
    return acc


def describe_task(cfg: VLDemoConfig) -> str:
    """One line: the pictures, the questions, the splits."""
    S = cfg.image_size
    return (f"1-3 shapes on {S}x{S} pictures, 4 question types; {cfg.train_size} training / "
            f"{cfg.test_size} held-out pictures; {cfg.steps} (VL) / {cfg.text_steps} (text-only) "
            f"steps of {cfg.batch_size}")  # fmt: skip


def summarize(report: dict) -> str:
    """One sentence from the numbers: both models' held-out accuracy and where the image
    helped (a type counts when the VL model is 0.2 or more above the baseline)."""
    vl, txt = report["results"]["vl"]["accuracy"], report["results"]["text-only"]["accuracy"]
    helped = [q for q in QUESTION_TYPES if q in vl and vl[q] - txt[q] >= 0.2]
    chance = report["chance"]["all"]
    said = (f"On held-out pictures the VL model answers {vl['all']:.2f} of the questions and "
            f"the text-only baseline {txt['all']:.2f} (chance {chance:.2f}); ")  # fmt: skip
    if helped:
        return said + "seeing the image helps on " + ", ".join(helped) + " questions."
    return said + "here the image helped on no question type."


def format_vl_demo(report: dict) -> str:
    """Markdown table: per question type, chance, majority, text-only and VL accuracy."""
    r = report["results"]
    head = ["question", "chance", "majority", "text-only", "VL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for q in (*QUESTION_TYPES, "all"):
        if q not in r["vl"]["accuracy"]:
            continue
        cells = [q, report["chance"][q], report["majority"][q],
                 r["text-only"]["accuracy"][q], r["vl"]["accuracy"][q]]  # fmt: skip
        lines.append("| " + " | ".join([cells[0]] + [f"{c:.2f}" for c in cells[1:]]) + " |")
    m = report["machine"]
    times = ", ".join(f"{n} {x['train_seconds']:.0f} s" for n, x in r.items())
    lines += ["", f"{report['task']}; training {times}; {report['wall_seconds']:.0f} s in all; "
              f"{m['cpu']}, {m['torch_threads']} threads"]  # fmt: skip
    return "\n".join(lines)


def _plot_examples(report: dict, images: Sequence[Image.Image], path: Path) -> None:
    from lightlong.plot import pyplot, save

    shown = report["examples"]
    if not shown:
        return
    plt = pyplot()
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, ex in zip(axes.flat, shown, strict=False):
        ax.imshow(images[ex["index"]], interpolation="nearest")
        said = {n: ex[n] or "(nothing)" for n in ("vl", "text-only")}
        mark = {n: "right" if ex[n] == ex["truth"] else "wrong" for n in said}
        ax.set_title(
            f"{ex['question']}\nVL: {said['vl']} ({mark['vl']})\n"
            f"text-only: {said['text-only']} ({mark['text-only']})\ntruth: {ex['truth']}",
            fontsize=7, loc="left",
        )  # fmt: skip
    fig.suptitle("held-out pictures: the VL model's and the text-only baseline's answers",
                 fontsize=9, y=1.02)  # fmt: skip
    save(fig, path)


def _plot_loss(report: dict, path: Path) -> None:
    from lightlong.plot import pyplot, save, series, tidy

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, r) in enumerate(report["results"].items()):
        ax.plot(*zip(*r["curve"], strict=True), label=name, **series(i, dense=True))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(report["task"], fontsize=7)
    tidy(ax)
    save(fig, path)
