"""The docs cannot drift from the code: every command line in README.md, docs/ and bench/ runs as written.

A command is taken from a shell code block (```bash, ```sh or a bare fence: backslash continuations joined,
comments dropped, `;`, `&&`, `|` and `$( )` splitting it) or from inline code that starts with a command. What each
kind must satisfy:

- `lm2 ...` (also `python -m lm2.pipeline.cli ...` and `torchrun ... -m lm2.pipeline.cli ...`): the subcommands
  and flags exist in lm2's real parser (`lm2.pipeline.cli.build_parser()`), flag values have the flag's type and
  choices, and every `--config X` file exists. A code block's line must parse whole (required arguments included,
  a shell variable such as `$i` standing for a value); inline code may be a fragment (`lm2 eval ppl --carry`).
- `launch/local.sh ARGS` and `sbatch ... launch/slurm/train.sbatch ARGS`: the script exists and ARGS are
  `lm2 train` arguments, as above. `sbatch ... launch/slurm/prepare.sbatch CONFIG OUTPUT INPUT...`: its CONFIG exists.
- `python -m lm2.X`: X is a module that runs as a program. `python PATH.py`: the script exists.
- `make TARGET`: the Makefile (or a file it includes) defines the target.

Placeholders a reader replaces are fine where a value goes: an upper-case word (CONFIG, DIR, N), a path through
`path/to/`, `<...>`, a file of the reader's own named `my-...`, and `...` for "more arguments" (inline code only).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "bench").glob("*.md")])
SHELL_FENCES = {"", "bash", "sh", "shell"}
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")"}
KEYWORDS = {"do", "then", "else", "time", "exec", "!"}
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
SHELL_VARIABLE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")


@dataclass(frozen=True)
class Command:
    path: Path
    line: int
    text: str
    whole: bool
    """From a code block: it must parse whole. Inline code may be a fragment of a command."""

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.text}"


def _code_blocks(text: str) -> tuple[list[tuple[int, str]], str]:
    """(line number, logical line) of every shell code block, and the text with all code blocks blanked out."""
    lines, blanked, commands = text.splitlines(), [], []
    fence, pending, start = None, "", 0
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence = stripped[3:].strip()
            blanked.append("")
            continue
        if fence is not None:
            blanked.append("")
            if stripped == "```":
                fence = None
            elif fence in SHELL_FENCES:
                start = start if pending else number
                pending += stripped.removeprefix("$ ")
                if pending.endswith("\\"):
                    pending = pending[:-1] + " "
                else:
                    commands.append((start, pending))
                    pending = ""
            continue
        blanked.append(line)
    return commands, "\n".join(blanked)


def _inline_spans(text: str) -> list[tuple[int, str]]:
    spans = []
    for match in re.finditer(r"`([^`]+)`", text):
        line = text.count("\n", 0, match.start()) + 1
        spans.append((line, " ".join(match.group(1).split())))
    return spans


def _commands(words: list[str]) -> list[list[str]]:
    """Shell words split into simple commands, keywords and environment assignments dropped from their front."""
    commands, current = [], []
    for word in [*words, ";"]:
        if word in SEPARATORS:
            while current and (current[0] in KEYWORDS or ENV_ASSIGNMENT.match(current[0])):
                current.pop(0)
            if current:
                commands.append(current)
            current = []
        else:
            current.append(word)
    return commands


def _words(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    return list(lexer)


def is_checked(words: list[str]) -> bool:
    """Whether a command is one this test knows how to check."""
    program = words[0]
    return (
        Path(program).name in ("lm2", "local.sh", "sbatch", "make", "torchrun")
        or (Path(program).name.startswith("python") and len(words) > 1)
        or program.removeprefix("./").startswith("launch/")
    )


def collect(paths: list[Path]) -> list[Command]:
    found = []
    for path in paths:
        blocks, prose = _code_blocks(path.read_text())
        for whole, lines in ((True, blocks), (False, _inline_spans(prose))):
            for number, text in lines:
                try:
                    commands = _commands(_words(text))
                except ValueError:  # unbalanced quotes: inline code that is no command
                    continue
                for words in commands if whole else commands[:1]:  # inline code: a command only if it starts so
                    if is_checked(words):
                        found.append(Command(path, number, shlex.join(words), whole))
    return found


# ---- checking one command ------------------------------------------------------------------------------------------


def is_placeholder(value: str) -> bool:
    return bool(
        re.fullmatch(r"[A-Z][A-Z0-9_]*", value)
        or "path/to/" in value
        or (value.startswith("<") and value.endswith(">"))
        or Path(value).name.startswith("my-")
    )


def _parse_whole(argv: list[str]) -> str | None:
    """argparse's error for a full lm2 command line, or None when it parses."""
    from lm2.pipeline.cli import build_parser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = build_parser().parse_args(argv)
    except SystemExit:
        return stderr.getvalue().strip().splitlines()[-1]
    if getattr(args, "train_args", None) is not None:  # lm2 launch local|job-info: the rest is `lm2 train`'s
        rest = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
        return _parse_whole(["train", *rest])
    return None


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return None


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return dict(parser._option_string_actions)


def _check_value(flag: str, action: argparse.Action, value: str) -> str | None:
    if is_placeholder(value) or SHELL_VARIABLE.search(value):
        return None
    if action.choices is not None and value not in action.choices:
        return f"{flag} {value}: not one of {', '.join(map(str, action.choices))}"
    if callable(action.type):
        try:
            action.type(value)
        except (TypeError, ValueError):
            return f"{flag} {value}: not a {action.type.__name__}"
    return None


def _walk(argv: list[str]) -> str | None:
    """Checks a fragment of an lm2 command: its subcommands and flags exist, flag values fit; arguments may be left
    out. Flags must be written in full (argparse would take an abbreviation; the docs should not)."""
    from lm2.pipeline.cli import build_parser

    parser, words, index = build_parser(), [w for w in argv if w != "..."], 0
    while True:
        subcommands = _subcommands(parser)
        while index < len(words) and words[index].startswith("-") and subcommands is not None:
            flag = words[index]
            if flag not in _options(parser):
                return f"{parser.prog}: no option {flag}"
            index += 1
        if subcommands is None or index == len(words):
            break
        if words[index] not in subcommands:
            return f"{parser.prog}: no subcommand {words[index]!r} (it has {', '.join(subcommands)})"
        parser, index = subcommands[words[index]], index + 1
    if any(action.nargs == argparse.REMAINDER for action in parser._actions):
        rest = words[index:]
        while rest and rest[0] != "--" and rest[0].startswith("-") and rest[0] in _options(parser):
            action = _options(parser)[rest[0]]
            rest = rest[1 + (action.nargs != 0) :]
        if parser.prog.endswith(" job-info") and rest:
            rest = rest[1:]  # the world size
        return _walk(["train", *(rest[1:] if rest[:1] == ["--"] else rest)])
    options = _options(parser)
    while index < len(words):
        word = words[index]
        index += 1
        if not word.startswith("-") or re.fullmatch(r"-\d+(\.\d+)?", word):
            continue
        flag, _, attached = word.partition("=")
        if flag not in options:
            return f"{parser.prog}: no option {flag}"
        action = options[flag]
        if action.nargs == 0:
            continue
        if attached:
            values = [attached]
        elif action.nargs in ("+", "*"):
            values = []
            while index < len(words) and not words[index].startswith("-"):
                values.append(words[index])
                index += 1
        else:
            values = words[index : index + 1]
            index += 1
        for value in values:
            problem = _check_value(flag, action, value)
            if problem:
                return f"{parser.prog}: {problem}"
    return None


def _config_problems(argv: list[str]) -> list[str]:
    problems = []
    for index, word in enumerate(argv):
        value = word.partition("=")[2] if word.startswith("--config=") else None
        if word == "--config" and index + 1 < len(argv):
            value = argv[index + 1]
        if value is not None and not is_placeholder(value) and not (ROOT / value).is_file():
            problems.append(f"--config {value}: no such file")
    if argv[:2] == ["launch", "config-value"] and len(argv) > 2:
        if not is_placeholder(argv[2]) and not (ROOT / argv[2]).is_file():
            problems.append(f"config {argv[2]}: no such file")
    return problems


def check_lm2(argv: list[str], whole: bool) -> list[str]:
    problems = _config_problems(argv)
    if whole:
        problem = _parse_whole([SHELL_VARIABLE.sub("0", word) for word in argv])
        # A placeholder where argparse wants a number (`--segments N`) is no error: _walk checks the rest.
        invalid = re.search(r"invalid \w+ value: '(.*)'", problem or "")
        if problem and not (invalid and is_placeholder(invalid.group(1))):
            problems.append(problem)
    problem = _walk(argv)
    return problems + ([problem] if problem else [])


def _make_targets() -> set[str]:
    """The targets make knows after reading the Makefile and what it includes (its database, so that targets
    written with variables and static patterns count)."""
    database = subprocess.run(["make", "-pRrq", "-C", str(ROOT), ":"], capture_output=True, text=True).stdout
    return {match.group(1) for match in re.finditer(r"^([A-Za-z][\w.-]*):(?!=)", database, re.M)}


def _module_runs(name: str) -> bool:
    """Whether `python -m name` runs a program: a package with a __main__.py, or a module that checks __main__.
    lm2's own modules are looked up in the tree (pyproject's package-dir), without importing them."""
    parts = name.split(".")
    if parts[0] == "lm2" and len(parts) > 1:
        path = ROOT.joinpath(*parts[1:])
        origin = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    else:
        spec = importlib.util.find_spec(parts[0]) if len(parts) == 1 else None
        origin = Path(spec.origin) if spec is not None and spec.origin else None
    if origin is None or not origin.is_file():
        return False
    if origin.name == "__init__.py":
        return (origin.parent / "__main__.py").is_file()
    return "__main__" in origin.read_text()


def check(command: str, whole: bool) -> list[str]:
    """What is wrong with one simple command; [] when nothing is."""
    words = shlex.split(command)
    words[0] = words[0].removeprefix("./")
    program = Path(words[0]).name
    if program == "lm2":
        return check_lm2(words[1:], whole)
    if program == "torchrun" or program.startswith("python"):
        if "-m" in words:
            module = words[words.index("-m") + 1]
            if module == "lm2.pipeline.cli":
                return check_lm2(words[words.index("-m") + 2 :], whole)
            return [] if _module_runs(module) else [f"python -m {module}: no such program"]
        script = next((word for word in words[1:] if word.endswith(".py")), None)
        return [] if script is None or (ROOT / script).is_file() else [f"{script}: no such script"]
    if program == "make":
        targets = [word for word in words[1:] if not word.startswith("-") and "=" not in word]
        return [f"make {target}: no such target" for target in targets if target not in _make_targets()]
    script = words[0] if words[0].startswith("launch/") else next((w for w in words if w.endswith(".sbatch")), None)
    if script is None or (ROOT / script).is_dir():
        return []  # sbatch without a script of ours (e.g. `sbatch --help`), or a folder named in prose
    if any(char in script for char in "*?["):
        return [] if list(ROOT.glob(script)) else [f"{script}: matches no script"]
    if not (ROOT / script).is_file():
        return [f"{script}: no such script"]
    args = words[words.index(script) + 1 :]
    if script.endswith("prepare.sbatch"):
        if args[:1] == ["--merge"] or not args:
            return []
        config = args[0]
        return [] if is_placeholder(config) or (ROOT / config).is_file() else [f"config {config}: no such file"]
    return check_lm2(["train", *args], whole)


COMMANDS = collect(DOCS)


def test_the_docs_hold_commands_of_every_kind():
    kinds = {Path(shlex.split(command.text)[0]).name for command in COMMANDS}
    assert {"lm2", "local.sh", "sbatch", "make"} <= kinds, kinds
    assert len(COMMANDS) > 50


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_every_command_in_the_docs_parses(command: Command):
    assert check(command.text, command.whole) == [], str(command)


@pytest.mark.parametrize(
    "line, whole",
    [
        ("lm2 data prepare corpus --tokenizr t.model --output out", True),  # a misspelt flag
        ("lm2 data prepare --tokenizr t.model", False),
        ("lm2 data prepare corpus --tokenizer t.model --output out --packing wholes", True),  # not a choice
        ("lm2 eval ppl --carry --context many", False),  # not an integer
        ("lm2 data prepar corpus", False),  # no such subcommand
        ("lm2 info --config configs/tiny.yml", False),  # no such config
        ("lm2 export hf runs/tiny/checkpoints", True),  # an argument missing from a whole line
        ("lm2 launch local --nproc 2 -- --config configs/tiny.yaml --resum auto", True),
        ("launch/local.sh --config configs/tiny.yaml --override-schedul", False),
        ("launch/locl.sh --config configs/tiny.yaml", False),
        ("sbatch -N 2 launch/slurm/train.sbatch --confg configs/tiny.yaml", True),
        ("python -m lm2.pipeline.checkpoint.universal runs/tiny/checkpoints step_00000100", False),
        ("make quickstrat", False),
    ],
)
def test_the_check_finds_what_is_wrong(line: str, whole: bool):
    assert check(line, whole) != []


@pytest.mark.parametrize(
    "line, whole",
    [
        ("lm2 data prepare corpus --tokenizer runs/tiny/tokenizer.model --output out --packing whole", True),
        ("lm2 eval memory --model M --text FILE --segments N", True),
        ("lm2 --verbose ...", False),
        ("NPROC=2 launch/local.sh --config configs/tiny.yaml parallel.tp=2 --resume auto", True),
        ("lm2 data prepare corpus --tokenizer t.model --output parts --num-shards 4 --shard-index $i", True),
        ("sbatch --dependency=afterok:$job launch/slurm/prepare.sbatch --merge s3://bucket/books", True),
        (
            "torchrun --nproc_per_node 2 -m lm2.pipeline.cli import hf path/to/llama --config my-run.yaml --output o",
            True,
        ),
    ],
)
def test_the_check_accepts_what_is_right(line: str, whole: bool):
    assert check(line, whole) == []


def test_commands_are_found_in_code_blocks_and_inline_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Run `lm2 ckpt inspect DIR` or:\n\n```bash\nfor i in 0 1; do lm2 data merge \\\n    out; done  # note\n"
        "job=$(sbatch --parsable launch/slurm/prepare.sbatch C out in)\n```\n\n```python\nlm2 = 1\n```\n"
    )
    found = [(command.line, command.text, command.whole) for command in collect([page])]
    assert found == [
        (4, "lm2 data merge out", True),
        (6, "sbatch --parsable launch/slurm/prepare.sbatch C out in", True),
        (1, "lm2 ckpt inspect DIR", False),
    ]


# ---- links -----------------------------------------------------------------------------------------------------------


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    _, prose = _code_blocks(path.read_text())
    return {_anchor(line.lstrip("#")) for line in prose.splitlines() if re.match(r"#{1,6} ", line)}


LINKS = [
    (path, text.count("\n", 0, match.start()) + 1, match.group(1))
    for path in DOCS
    for text in [_code_blocks(path.read_text())[1]]
    for match in re.finditer(r"\]\(([^)\s]+)\)", text)
    if not re.match(r"[a-z]+:", match.group(1))
]


@pytest.mark.parametrize("path, line, target", LINKS, ids=[f"{p.relative_to(ROOT)}:{n}: {t}" for p, n, t in LINKS])
def test_every_link_in_the_docs_resolves(path: Path, line: int, target: str):
    file, _, anchor = target.partition("#")
    linked = (path.parent / file).resolve() if file else path
    assert linked.exists(), f"{path.relative_to(ROOT)}:{line}: {file} does not exist"
    if anchor:
        assert anchor in _anchors(linked), f"{path.relative_to(ROOT)}:{line}: {linked.name} has no heading #{anchor}"
