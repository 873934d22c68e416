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


# ----------------------------------------------------------------------------------------------------------------------
# Where the documented commands write: everything under outputs/ (git-ignored), nothing into the source tree.


def shell_commands() -> list[str]:
    """Every command of the bash blocks: continuation lines joined, comments and [optional flags] dropped, `&&`
    chains split."""
    commands = []
    for token in TOKENS:
        if token.type != "fence" or token.info.strip() not in ("bash", "sh", "shell"):
            continue
        for line in token.content.replace("\\\n", " ").splitlines():
            line = re.sub(r"\[[^\]]*\]", "", line.split(" # ")[0]).strip()
            if line and not line.startswith("#"):
                commands += [part.strip() for part in line.split("&&")]
    return commands


def written_paths(command: str) -> list[str]:
    """The paths a documented command writes: --out, train.output_dir (or its config's), convert's DST, sample-photos'
    OUT. Commands that write nothing of their own (pip, pytest, benchmarks printing a line) give none."""
    import shlex

    import yaml

    words = shlex.split(command)
    if "-m" in words and "kl_autoencoder.cli" in words:  # accelerate launch ... -m kl_autoencoder.cli encode ...
        words = ["kl-autoencoder", *words[words.index("kl_autoencoder.cli") + 1:]]
    paths = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--out"]
    paths += [word.split("=", 1)[1] for word in words if word.startswith("train.output_dir=")]
    if "training/train.py" in words and not any(w.startswith("train.output_dir=") for w in words):
        config = yaml.safe_load((ROOT / words[words.index("--config") + 1]).read_text())
        paths.append(config["train"]["output_dir"])
    if words[:2] in (["kl-autoencoder", "convert"], ["kl-autoencoder", "sample-photos"]):
        positional = [w for w in words[2:] if not w.startswith("-")]
        paths.append(positional[1] if words[1] == "convert" else positional[0])
    return paths


def test_every_documented_command_writes_under_outputs():
    commands = shell_commands()
    assert any(c.startswith("kl-autoencoder convert") for c in commands)  # the parser sees the command blocks
    checked = 0
    for command in commands:
        for path in written_paths(command):
            assert path.startswith("outputs/"), f"{command!r} writes {path!r}, outside outputs/"
            checked += 1
    python = "\n".join(t.content for t in TOKENS if t.type == "fence" and t.info.strip() == "python")
    for path in re.findall(r"save_pretrained\(\"([^\"]+)\"", python):
        assert path.startswith("outputs/"), path
        checked += 1
    assert checked >= 15


def test_the_accelerate_lines_name_a_config_file():
    """Without --config_file, accelerate launch prints its defaults warning; the main job avoids it and so does every
    training line."""
    for command in shell_commands():
        if command.startswith("accelerate launch") and "--num_machines" not in command:  # multi-node: accelerate config
            assert "--config_file configs/accelerate/" in command, command
            config = command.split("--config_file ", 1)[1].split()[0]
            assert (ROOT / config).is_file(), config
