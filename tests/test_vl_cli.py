"""`lightlong generate --image`: a vision-language model (tiny-vl) answering about image
files, its output checked against the offline `Engine` on the same prompt and images, and
each bad input a one-line error with exit status 2."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightlong.infer import Engine, SamplingParams
from lightlong.model.source import load_model
from lightlong.tokenizer import ByteTokenizer

MODEL = "tiny-vl"
NEW = 6
STATS = re.compile(r"^\[([\d,]+) prompt tokens at .* new at .*; finish: (\w+); cache .*\]$")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Seeded-noise PNGs a, b (b another size), c (a's size, other pixels); a non-image
    file; a truncated PNG."""
    d = tmp_path_factory.mktemp("images")
    files = {}
    for name, seed, size in [("a", 0, (40, 60)), ("b", 1, (50, 30)), ("c", 2, (40, 60))]:
        pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
        files[name] = d / f"{name}.png"
        Image.fromarray(pixels).save(files[name])
    files["text"] = d / "notes.png"
    files["text"].write_text("not an image at all\n")
    files["truncated"] = d / "truncated.png"
    files["truncated"].write_bytes(files["a"].read_bytes()[:2000])
    return files


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(load_model(MODEL, vision=True, seed=0), ByteTokenizer())


def engine_text(engine: Engine, prompt: str, paths: list[Path]) -> tuple[str, int]:
    """The Engine's greedy text for prompt and image files (as generate prints it: a
    newline added unless it ends one), and its prompt length with the images' features."""
    pils = [Image.open(p).convert("RGB") for p in paths]
    params = SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True)
    g = engine.generate(prompt, params, images=[pils])[0]
    return g.text if g.text.endswith("\n") else g.text + "\n", g.prompt_tokens


def generate(cli, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    return cli("generate", "--model", MODEL, "--max-new-tokens", str(NEW), "--temperature",
               "0", "--ignore-eos", *args, stdin=stdin)  # fmt: skip


@pytest.mark.timeout(120)
def test_generate_with_one_image_equals_engine(cli, engine, images):
    code, out, err = generate(cli, "--image", str(images["a"]), "--prompt", "What is this?")
    assert code == 0, err
    # a prompt without "<image>" gets "<image>\n" per image in front
    ref, length = engine_text(engine, "<image>\nWhat is this?", [images["a"]])
    assert out == ref
    stats = STATS.match(err.strip().splitlines()[-1])
    assert stats, err
    assert int(stats.group(1).replace(",", "")) == length > len("<image>\nWhat is this?")
    # the image matters: another one (same size) changes the answer
    code, other, err = generate(cli, "--image", str(images["c"]), "--prompt", "What is this?")
    assert code == 0, err
    assert other == engine_text(engine, "<image>\nWhat is this?", [images["c"]])[0] != out


@pytest.mark.timeout(120)
def test_generate_places_images_at_their_placeholders_in_order(cli, engine, images):
    a, b = str(images["a"]), str(images["b"])
    prompt = "Left: <image> right: <image> same?"
    code, out, err = generate(cli, "--image", a, "--image", b, "--prompt", prompt)
    assert code == 0, err
    assert out == engine_text(engine, prompt, [images["a"], images["b"]])[0]
    code, swapped, err = generate(cli, "--image", b, "--image", a, "--prompt", prompt)
    assert code == 0, err
    assert swapped == engine_text(engine, prompt, [images["b"], images["a"]])[0]
    code, front, err = generate(cli, "--image", a, "--image", b, "--prompt", "same?")
    assert code == 0, err
    assert front == engine_text(engine, "<image>\n<image>\nsame?", [images["a"], images["b"]])[0]


@pytest.mark.timeout(120)
def test_generate_reads_a_prompt_with_images_from_stdin(cli, engine, images):
    code, out, err = generate(cli, "--image", str(images["b"]), "--prompt-file", "-",
                              stdin="<image> is")  # fmt: skip
    assert code == 0, err
    assert out == engine_text(engine, "<image> is", [images["b"]])[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "{missing}", "--prompt", "x"], "--image {missing}: no such file"),
        (["--image", "{text}", "--prompt", "x"], "--image {text}: not an image"),
        (
            ["--image", "{truncated}", "--prompt", "x"],
            "--image {truncated}: the image data is truncated",
        ),
        (
            ["--image", "{a}", "--max-image-pixels", "2000", "--prompt", "x"],
            "more than the limit of 2000",
        ),
        (
            ["--image", "{a}", "--prompt", "<image> and <image>"],
            "the prompt holds 2 '<image>' but 1 --image was given",
        ),
        (
            ["--image", "{a}", "--image", "{b}", "--prompt", "only <image>"],
            "the prompt holds 1 '<image>' but 2 --image were given",
        ),
        (
            ["--prompt", "<image> without an image"],
            "the prompt holds 1 '<image>' but 0 --image were given",
        ),
        (
            ["--image", "{a}", "--sequence-parallel", "--prompt", "x"],
            "--sequence-parallel prefills text prompts only",
        ),
    ],
    ids=[
        "missing",
        "not-an-image",
        "truncated",
        "too-many-pixels",
        "more-placeholders",
        "fewer-placeholders",
        "placeholder-without-image",
        "sequence-parallel",
    ],
)
def test_generate_bad_image_input_is_a_one_line_error(cli, images, args, message):
    names = {k: str(v) for k, v in images.items()} | {"missing": str(images["a"]) + ".gone"}
    code, out, err = generate(cli, *(a.format(**names) for a in args))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightlong: error: "), err
    assert message.format(**names) in lines[0], err


@pytest.mark.timeout(60)
def test_image_with_a_text_model_is_a_clear_error(cli, images):
    code, out, err = cli("generate", "--model", "tiny", "--image", str(images["a"]),
                         "--prompt", "hi")  # fmt: skip
    assert code == 2 and out == ""
    assert err.strip() == (
        "lightlong: error: --image: model 'tiny' is a text model; it takes no images (a "
        "vision-language model does, e.g. tiny-vl)"
    )


def test_generate_help_explains_images(cli):
    code, out, _ = cli("generate", "--help")
    assert code == 0
    joined = " ".join(out.split())
    assert "--image FILE" in joined
    assert "a prompt without '<image>' gets one '<image>' and a newline per image" in joined
    assert "--max-image-pixels" in joined and "(default: 50000000)" in joined


@pytest.mark.parametrize(
    "argv",
    [("train", "model=tiny-vl", "steps=1"), ("eval", "niah", "--model", "tiny-vl")],
    ids=["train", "eval"],
)
def test_text_only_commands_refuse_a_vl_model(cli, argv):
    code, _, err = cli(*argv)
    assert code == 2
    assert "'tiny-vl' is a vision-language model; this command runs text models" in err
