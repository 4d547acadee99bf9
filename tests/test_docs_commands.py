"""Every command line documented in README.md and docs/*.md runs as written, up to its data.

Each line of a fenced code block and each inline code span is read as a shell would read it
(``shlex``; ``NAME="…"`` lines define variables that later ``$NAME`` expand, word-split with their
quotes kept, as unquoted shell expansion does). Then:

- Hydra scripts (``training_scripts/*.py``, ``eval_scripts/*.py``, also behind ``accelerate launch`` or
  ``torchrun``): the overrides parse with Hydra's own parser and the config composes with them (group
  options exist, keys exist; a sweep composes with its first values);
- ``taskmerge …``: the CLI's argparse accepts the arguments (a bare ``taskmerge NAME`` in prose: NAME exists);
- ``training_scripts/import_clip.py``: its argparse accepts them (the conversion is not run);
- ``python -c``: the code compiles and every ``from M import N`` resolves; ``python -m M``: M exists;
- a span of bare overrides (``key=value …``, e.g. ``finetuned.pattern=…`` in prose): Hydra parses it.

Placeholders are the docs' conventions: a token holding ``…`` is elided text and is dropped (a table
cell ``… more`` continues the cell above's command), and ``N`` in ``tallN`` stands for 8, 14 or 20.
Only the data (checkpoints, datasets) a command names is not checked.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
HYDRA_SCRIPTS = {  # script -> (config dir, default config name)
    "finetune.py": ("configs", "suite"), "run_suite.py": ("configs", "suite"), "compute_stats.py": ("configs", "suite"),
    "run_vision.py": ("configs", "vision"), "finetune_vision.py": ("configs", "vision"),
    "run_language.py": ("configs", "language_mats"),
}
PLACEHOLDERS = {"tallN": "tall8"}
OVERRIDE = re.compile(r"^[+~]{0,2}[\w.\-/@]+=")


@dataclass
class Command:
    source: str
    tokens: list[str]
    kind: str
    script: str | None = None
    defs: dict = field(default_factory=dict)

    def __str__(self):
        return f"{self.source}: {' '.join(self.tokens)}"


def _spans(text: str):
    """(line number, code) for fenced-block lines (continuations joined) and inline code spans."""
    fenced, buf, start = False, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            if not buf:
                start = n
            buf += line.rstrip()
            if buf.endswith("\\"):
                buf = buf[:-1] + " "
                continue
            yield start, buf.strip(), True
            buf = ""
        else:
            for code in re.findall(r"`([^`]+)`", line):
                yield n, code.strip(), False


def _top_level_names() -> set[str]:
    """Top-level keys and group names of the script configs (what a bare override may start with)."""
    import yaml

    names = {"hydra"}
    for folder, files in (("configs", ["suite.yaml", "vision.yaml", "language_mats.yaml", "language_knots.yaml"]),):
        names |= {p.name for p in (REPO / folder).iterdir() if p.is_dir()}
        for f in files:
            names |= set(yaml.safe_load((REPO / folder / f).read_text()))
    return names - {"defaults"}


TOP_LEVEL = _top_level_names()


def _config_key(token: str) -> bool:
    key = token.lstrip("+~").split("=", 1)[0]
    return re.split(r"[./]", key)[0] in TOP_LEVEL


def _classify(tokens: list[str]) -> tuple[str, str | None, list[str]] | None:
    if not tokens:
        return None
    head = tokens[0]
    if head in ("accelerate", "torchrun"):
        script = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
        return _classify(["python", *tokens[script:]]) if script is not None else None
    if head in ("python", "python3") and len(tokens) > 1:
        if tokens[1] == "-c":
            return "python-c", None, tokens[2:]
        if tokens[1] == "-m":
            return ("cli", None, tokens[3:]) if tokens[2] == "taskmerge.cli" else ("module", tokens[2], [])
        return _classify(tokens[1:])
    if head == "taskmerge":
        return "cli", None, tokens[1:]
    name = Path(head).name
    if name in HYDRA_SCRIPTS:
        return "hydra", name, tokens[1:]
    if name == "import_clip.py":
        return "import_clip", None, tokens[1:]
    if all(OVERRIDE.match(t) and _config_key(t) for t in tokens):
        return "overrides", None, tokens
    return None


def _tokens(doc: Path):
    for n, code, fenced in _spans(doc.read_text()):
        try:
            yield n, shlex.split(code, comments=fenced), fenced
        except ValueError:
            continue  # not shell text (e.g. a lone quote in prose)


def _definition(tokens, fenced) -> tuple[str, list[str]] | None:
    if fenced and len(tokens) == 1 and re.match(r"^[A-Z][A-Z0-9_]*=", tokens[0]):
        name, _, value = tokens[0].partition("=")
        return name, value.split()  # unquoted expansion: split on blanks, inner quotes kept
    return None


def extract() -> list[Command]:
    defs = dict(d for doc in DOCS for _, tokens, fenced in _tokens(doc) if (d := _definition(tokens, fenced)))
    out = []
    for doc in DOCS:
        table_base = None
        for n, tokens, fenced in _tokens(doc):
            if _definition(tokens, fenced):
                continue
            if tokens and tokens[0] == "…" and table_base is not None:  # a table cell continuing the one above
                keys = {t.split("=")[0] for t in tokens[1:]}
                tokens = [t for t in table_base if t.split("=")[0] not in keys] + tokens[1:]
            elif tokens and _classify(tokens) and _classify(tokens)[0] == "hydra":
                table_base = tokens
            expanded = []
            for t in tokens:
                for word in defs.get(t[1:], [t]) if t.startswith("$") else [t]:
                    for placeholder, value in PLACEHOLDERS.items():
                        word = word.replace(placeholder, value)
                    expanded.append(word)
            kind = _classify(expanded)
            if kind is None:
                continue
            out.append(Command(f"{doc.relative_to(REPO)}:{n}", expanded, kind[0], kind[1], dict(defs)))
    return out


COMMANDS = extract()


def _hydra_check(cmd: Command):
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [t for t in _classify(cmd.tokens)[2] if "…" not in t]
    config_dir, name = HYDRA_SCRIPTS[cmd.script]
    overrides, multirun, i = [], False, 0
    while i < len(args):
        a = args[i]
        if a in ("-m", "--multirun"):
            multirun = True
        elif a in ("--config-name", "-cn"):
            name, i = args[i + 1], i + 1
        elif a.startswith("--config-name="):
            name = a.split("=", 1)[1]
        else:
            overrides.append(a)
        i += 1
    parsed = OverridesParser.create().parse_overrides(overrides)  # what Hydra does first: the grammar
    first = []
    for o, text in zip(parsed, overrides):
        if o.is_sweep_override():
            assert multirun, f"{text}: a sweep needs -m"
            first.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
        else:
            first.append(text)
    with initialize_config_dir(str(REPO / config_dir), version_base="1.3"):
        compose(name, overrides=first, return_hydra_config=True)


def _cli_check(cmd: Command):
    from taskmerge.cli import build_parser, parse_args

    args = _classify(cmd.tokens)[2]
    parser = build_parser()
    if len(args) == 1:  # a subcommand named in prose (`taskmerge report refuses …`): it must exist
        choices = next(a for a in parser._actions if a.dest == "command").choices
        assert args[0] in choices, f"taskmerge has no subcommand {args[0]!r}"
        return
    try:
        parse_args(args)  # as `taskmerge` reads it (eval takes Hydra overrides after its options)
    except SystemExit as e:
        raise AssertionError(f"taskmerge's argparse refuses it (exit {e.code})") from None


def _import_clip_check(cmd: Command, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("import_clip", REPO / "training_scripts" / "import_clip.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    seen = []
    monkeypatch.setattr(mod, "convert", lambda *a, **k: seen.append((a, k)) or {})
    try:
        assert mod.main(_classify(cmd.tokens)[2]) == 0 and seen
    except SystemExit as e:
        raise AssertionError(f"import_clip's argparse refuses it (exit {e.code})") from None


def _python_c_check(cmd: Command):
    code = _classify(cmd.tokens)[2][0]
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


def test_commands_were_found():
    kinds = {c.kind for c in COMMANDS}
    assert {"hydra", "cli", "overrides"} <= kinds and len(COMMANDS) > 40


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.source for c in COMMANDS])
def test_documented_command_runs_as_written(cmd: Command, monkeypatch):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        if cmd.kind == "hydra":
            _hydra_check(cmd)
        elif cmd.kind == "cli":
            _cli_check(cmd)
        elif cmd.kind == "import_clip":
            _import_clip_check(cmd, monkeypatch)
        elif cmd.kind == "python-c":
            _python_c_check(cmd)
        elif cmd.kind == "module":
            assert importlib.util.find_spec(cmd.script), f"no module {cmd.script}"
        elif cmd.kind == "overrides":
            OverridesParser.create().parse_overrides([t for t in cmd.tokens if "…" not in t])
    except Exception as e:  # noqa: BLE001 — report which documented line fails, and why
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        pytest.fail(f"{cmd}\n  -> {type(e).__name__}: {first}", pytrace=False)
