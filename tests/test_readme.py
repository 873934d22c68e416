"""The README renders as written: every fence closed, headings where they belong, commands inside code blocks, and the
two first-line commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
TOKENS = MarkdownIt("commonmark").enable("table").parse(README)


def headings() -> list[str]:
    return [TOKENS[i + 1].content for i, t in enumerate(TOKENS) if t.type == "heading_open"]


def fences() -> list[str]:
    return [t.content for t in TOKENS if t.type == "fence"]


def test_every_fence_is_closed_and_no_fence_swallows_prose():
    assert README.count("```") % 2 == 0
    for block in fences():
        assert "```" not in block
        assert not re.search(r"^#{1,3} \w", block, flags=re.M) or block.lstrip().startswith(("#", "kl_", "import")), block
    # a heading swallowed by an unclosed fence would be missing from the rendered headings
    assert headings() == ["kl-autoencoder", "The model in one paragraph", "Command line", "Training", "Evaluation",
                          "In a diffusers pipeline", "Tiny preview autoencoders", "Speed", "Learning: from autoencoder to VAE", "Layout"]


def test_every_command_of_the_cli_is_shown_inside_a_code_block():
    from kl_autoencoder.cli import build_parser

    shown = "\n".join(fences())
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in commands:
        assert re.search(rf"^kl-autoencoder {name}\b", shown, flags=re.M), name
    paragraphs = [t.content for t in TOKENS if t.type == "inline"]
    assert not any(p.startswith("kl-autoencoder encode --model") for p in paragraphs)  # not rendered as prose


def test_first_lines_are_the_main_job_and_the_ci_test_command():
    first = fences()[0].splitlines()
    main_job = next(line for line in first if line.startswith("pip install -e . &&"))
    assert "training/train.py --config configs/quickstart.yaml" in main_job and "eval/evaluate.py" in main_job
    tests = next(line for line in first if line.startswith('pip install -e ".[test]"'))
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.split("&&", 1)[1].strip() in ci


def test_no_unfilled_placeholder_is_left():
    assert not re.search(r"\b[A-Z]{3,}_[A-Z_]{3,}\b", README.replace("OMP_NUM_THREADS", "").replace(
        "PIL.Image.MAX_IMAGE_PIXELS", "").replace("OUTPUT_DIR", ""))
