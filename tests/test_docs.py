"""The docs cite only sections that exist, and the README claims only what is measured."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _docs() -> dict[Path, str]:
    files = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return {p: p.read_text() for p in files}


def test_docs_cite_only_sections_that_exist():
    docs = _docs()
    for path, text in docs.items():
        # DESIGN.md is not part of the repository: a reader cannot follow "DESIGN §N".
        assert "DESIGN §" not in text, path
        for target, section in re.findall(r"([\w/]+\.md),? \"([^\"]+)\"", text):
            heading_file = next((p for p in docs if str(p).endswith(target)), None)
            assert heading_file is not None, (path, target)
            assert re.search(rf"^#+ {re.escape(section)}\s*$", docs[heading_file], re.M), (path, target, section)
        for target in re.findall(r"docs/(\w+\.md)", text):
            assert (ROOT / "docs" / target).exists(), (path, target)


def test_readme_claims_only_measured_costs_and_says_how_lr_scales():
    readme = (ROOT / "README.md").read_text()
    assert "2-3x" not in readme
    assert "3.4-3.6x" in readme and "~2.9x" in readme
    example = readme[readme.index("torchrun --nproc_per_node 8"):][:900]
    assert "-b 32" in example and "global batch" in example and "--lr 0.8" in example


def _cli_options() -> dict[str, dict[str, object]]:
    """{command: {option string: the field's built-in default}} of every automix-fast command."""
    import argparse
    from dataclasses import MISSING

    from automix_fast.cli import build_parser
    from automix_fast.config import FIELDS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = {}
    for name, parser in sub.choices.items():
        options[name] = {}
        for action in parser._actions:
            field = FIELDS.get(action.dest) if name == "train" else None
            default = field.default if field is not None and field.default is not MISSING else action.default
            options[name].update((o, default) for o in action.option_strings)
    return options


# A command in the docs: `automix-fast [COMMAND] ...` to the end of its line (a trailing backslash
# continues it), an inline code span or a comment; no command is `train`.
_COMMAND = re.compile(r"automix-fast\)?(?:[ \t]+(train|eval|export|visualize|models)\b)?((?:\\\n|[^\n`#])*)")
_FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


def test_commands_in_the_docs_use_only_flags_their_command_has():
    options = _cli_options()
    checked = 0
    for path, text in _docs().items():
        for command in _COMMAND.finditer(text):
            name = command.group(1) or "train"
            for flag in _FLAG.findall(command.group(2)):
                checked += 1
                assert flag in options[name], (path.name, f"automix-fast {name} has no {flag}", command.group(0))
    assert checked > 40  # the pattern still finds the commands


# Flags the docs name that are not automix-fast's: torchrun's, timm's, and the bench scripts'
# (bench/README.md documents those, script by script).
_NOT_OURS = {
    "--nproc_per_node", "--nnodes", "--rdzv_backend", "--rdzv_endpoint", "--shutdown-timeout",  # torchrun
    "--warmup-prefix", "--lr-base",  # timm's train.py, named where we differ
    "--configs", "--quick", "--dry-run",  # bench/bench_train_step.py, bench/gpu_check.sh
    "--list", "--only", "--plan", "--report", "--runs", "--stop-at",  # bench/quality_study.py
}


def test_flags_named_in_the_docs_exist():
    known = set().union(*(set(o) for o in _cli_options().values())) | _NOT_OURS
    for path, text in _docs().items():
        if path.parent.name == "bench":
            continue
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", text):
            assert flag in known, (path.name, flag)


def _table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the body rows of the first table at or after `heading`."""
    section = text[text.index(heading):]
    table = section[section.index("|"):].split("\n\n")[0]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in table.splitlines()[2:]]


def _states_default(cell: str, default) -> bool:
    if cell == "off":
        return default in (None, False)
    if cell == "none":
        return default is None
    try:
        return float(cell) == float(default)
    except (TypeError, ValueError):
        return cell == str(default)


def test_timm_flags_tables_state_our_defaults():
    text = (ROOT / "docs" / "TIMM_FLAGS.md").read_text()
    options = _cli_options()["train"]
    rows = [(r[0], r[1]) for r in _table_rows(text, "# timm's training flags")]
    rows += [(r[0], r[1]) for r in _table_rows(text, "## Flags that differ from timm only in their default")]
    checked = 0
    for flag_cell, default_cell in rows:
        flag = re.findall(r"--[\w-]+", flag_cell)[-1]
        assert flag in options, flag
        if re.fullmatch(r"[\w.+-]+", default_cell):  # a bare value; prose cells are read by people
            checked += 1
            assert _states_default(default_cell, options[flag]), (flag, default_cell, options[flag])
    assert checked >= 25
