"""The README and the guides in docs/ render as written and can be followed: every fence closed, every link resolves,
every command they show parses (its options exist), every command writes under outputs/, the two first-line commands
are the ones CI runs, the configuration reference is today's, and no document speaks of how the project was made."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARSER = MarkdownIt("commonmark").enable("table")


def tokens(path: Path) -> list:
    return PARSER.parse(path.read_text(encoding="utf-8"))


def fences(path: Path, info: tuple[str, ...] | None = None) -> list[str]:
    return [t.content for t in tokens(path) if t.type == "fence" and (info is None or t.info.strip() in info)]


def shell_commands(path: Path) -> list[str]:
    """Every command of the bash blocks: continuation lines joined, comments dropped, `&&` chains split."""
    commands = []
    for block in fences(path, ("bash", "sh", "shell")):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                commands += [part.strip() for part in line.split("&&")]
    return commands


ALL_COMMANDS = [(path.name, command) for path in DOCS for command in shell_commands(path)]


def test_the_pages_exist_and_the_front_page_is_short():
    names = {path.name for path in DOCS}
    assert {"training.md", "finetuning.md", "latents.md", "evaluation.md", "inference.md", "preview-decoders.md",
            "safety.md", "configuration.md"} <= names
    assert len((ROOT / "README.md").read_text().splitlines()) <= 160


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_fence_is_closed_and_no_fence_swallows_prose(path):
    text = path.read_text(encoding="utf-8")
    assert text.count("```") % 2 == 0
    for block in fences(path):
        assert "```" not in block
    headings = [t for t in tokens(path) if t.type == "heading_open"]
    assert len(headings) == len(re.findall(r"^#{1,6} ", re.sub(r"```.*?```", "", text, flags=re.S), flags=re.M))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    toks = tokens(path)
    return {_slug(toks[i + 1].content) for i, t in enumerate(toks) if t.type == "heading_open"}


def test_every_link_resolves():
    checked = 0
    for path in DOCS + [ROOT / "BENCHMARKS.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", path.read_text(), flags=re.S)):
            if target.startswith(("http://", "https://")):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            assert linked.exists(), f"{path.name}: link {target} names no file"
            if anchor:
                assert anchor in _anchors(linked), f"{path.name}: link {target}: no such heading"
            checked += 1
    assert checked >= 15


def _cli_words(words: list[str]) -> list[str] | None:
    """The kl-autoencoder arguments of a command line: `kl-autoencoder ...` or `... -m kl_autoencoder.cli ...`."""
    if words[0] == "kl-autoencoder":
        return words[1:]
    if "-m" in words and "kl_autoencoder.cli" in words:
        return words[words.index("kl_autoencoder.cli") + 1:]
    return None


def _check_training_line(words: list[str]) -> None:
    """The config file exists (or is a run's saved config.yaml) and every override names a key of it."""
    from kl_autoencoder.config import TrainConfig, apply_override, build_section

    script = next(i for i, w in enumerate(words) if w.endswith("training/train.py"))
    args = words[script + 1:]
    config = args[args.index("--config") + 1] if "--config" in args else None
    raw = {}
    if config is not None and not config.startswith("outputs/"):
        raw = yaml.safe_load((ROOT / config).read_text())
    for override in [a for a in args if "=" in a and not a.startswith("-")]:
        apply_override(raw, override)
    build_section(TrainConfig, raw, "")  # unknown keys and wrong types raise ConfigError naming them


@pytest.mark.parametrize("where,command", ALL_COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in ALL_COMMANDS])
def test_every_documented_command_parses(where, command):
    from kl_autoencoder.cli import build_parser
    from kl_autoencoder.evaluation import add_arguments

    words = shlex.split(command)
    cli = _cli_words(words)
    try:
        if cli is not None:
            build_parser().parse_args(cli)
        elif "eval/evaluate.py" in words:
            import argparse

            add_arguments(argparse.ArgumentParser()).parse_args(words[words.index("eval/evaluate.py") + 1:])
        elif any(w.endswith("training/train.py") for w in words):
            _check_training_line(words)
        else:
            for word in words:
                if re.match(r"^(benchmarks|examples|eval|training|configs)/\S+\.(py|sh|yaml)$", word):
                    assert (ROOT / word).is_file(), f"{where}: {word} does not exist"
    except SystemExit as stop:
        pytest.fail(f"{where}: {command!r} does not parse (argparse exit {stop.code})")


def test_every_command_of_the_cli_is_shown_inside_a_code_block():
    from kl_autoencoder.cli import build_parser

    shown = {(_cli_words(shlex.split(c)) or [None])[0] for _, c in ALL_COMMANDS}
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(commands) <= shown, set(commands) - shown


def test_first_lines_are_the_main_job_and_the_ci_test_command():
    first = fences(ROOT / "README.md")[0].splitlines()
    main_job = next(line for line in first if line.startswith("pip install -e . &&"))
    assert "training/train.py --config configs/quickstart.yaml" in main_job and "eval/evaluate.py" in main_job
    tests = next(line for line in first if line.startswith('pip install -e ".[test]"'))
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.split("&&", 1)[1].strip() in ci


def written_paths(words: list[str]) -> list[str]:
    """The paths a documented command writes: --out, train.output_dir (or its config's), convert's DST, sample-photos'
    OUT. Commands that write nothing of their own (pip, pytest, benchmarks printing a line) give none."""
    cli = _cli_words(words)
    paths = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--out"]
    paths += [word.split("=", 1)[1] for word in words if word.startswith("train.output_dir=")]
    if any(w.endswith("training/train.py") for w in words) and not any(w.startswith("train.output_dir=") for w in words):
        config = words[words.index("--config") + 1]
        paths.append(str(Path(config).parent) if config.startswith("outputs/") else
                     yaml.safe_load((ROOT / config).read_text())["train"]["output_dir"])
    if cli and cli[0] in ("convert", "sample-photos"):
        positional = [w for w in cli[1:] if not w.startswith("-")]
        paths.append(positional[1] if cli[0] == "convert" else positional[0])
    return paths


def test_every_documented_command_writes_under_outputs():
    checked = 0
    for where, command in ALL_COMMANDS:
        for path in written_paths(shlex.split(command)):
            assert path.startswith("outputs/"), f"{where}: {command!r} writes {path!r}, outside outputs/"
            checked += 1
    for path in DOCS:
        for saved in re.findall(r"save_pretrained\(\"([^\"]+)\"", "\n".join(fences(path, ("python",)))):
            assert saved.startswith("outputs/"), saved
            checked += 1
    assert checked >= 20


def test_the_accelerate_lines_name_a_config_file():
    """Without --config_file, accelerate launch prints its defaults warning; every documented line avoids it."""
    for where, command in ALL_COMMANDS:
        if command.startswith("accelerate launch") and "--num_machines" not in command:  # multi-node: accelerate config
            assert "--config_file configs/accelerate/" in command, (where, command)
            config = command.split("--config_file ", 1)[1].split()[0]
            assert (ROOT / config).is_file(), config


def test_the_configuration_reference_is_generated_from_the_code():
    from kl_autoencoder.config.reference import reference, sections

    assert (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8") == reference(), (
        "docs/configuration.md is stale: python -m kl_autoencoder.config.reference > docs/configuration.md")
    undocumented = [key for _, _, rows in sections() for key, _, _, meaning in rows if not meaning]
    assert not undocumented, f"config keys without a comment in config/schema.py: {undocumented}"


DEVELOPMENT_WORDS = re.compile(r"\b[Ii]ssue \d+|\bsession \d|\bsessions\b|\.\./shared|/work/|/tmp/[a-z0-9]+/")


def test_no_document_speaks_of_how_the_project_was_made():
    code = [p for folder in ("kl_autoencoder", "training", "eval", "benchmarks", "configs", "tests", "examples")
            for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".sh", ".yaml") and p.name != "test_readme.py"]
    for path in DOCS + [ROOT / "BENCHMARKS.md", ROOT / "examples" / "README.md", *code]:
        found = DEVELOPMENT_WORDS.findall(path.read_text(encoding="utf-8"))
        assert not found, f"{path.name}: {found}"
