"""The documentation's commands work: every command line of the ```bash blocks of README.md and
docs/*.md is pasteable (no `...`, no <placeholders>, no [optional] flags), every `gensr` line
(and every `python -m jobs.X` / `python -m gensr_ray.cli` line) parses with the CLI's own
parser, its `--set` overrides are config keys, its configs and sweeps load, and the cheap ones
run for real (help, version, `config show|help`, `prepare --dataset synthetic`). Links between
the pages, the repository paths they name and the module list of docs/layout.md are checked
against the files."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from gensr_ray.cli import build_parser, main
from gensr_ray.config import GenSRConfig, apply_overrides, describe_settings, load_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GENSR = ("gensr", ".venv/bin/gensr")
PYTHON = ("python", "python3", ".venv/bin/python")
SEPARATORS = ("&&", "||", ";", "|")
# a placeholder: <name>, an ellipsis, an [--optional] flag, or an all-caps word (DIR, FILE)
PLACEHOLDER = re.compile(r"<[^<>\s]*>|\.\.\.|\[--")
CAPS_WORD = re.compile(r"[A-Z][A-Z0-9]{2,}(?:[-_][A-Z0-9]+)*")
REPO_PATH = re.compile(r"^(?:configs|jobs|bench|cluster|tests|gensr_ray|docs)/[\w./-]*$")


def _fenced_blocks(path: Path) -> list[tuple[str, int, list[tuple[int, str]]]]:
    """(language, first line, [(line number, text)]) of every fenced block of a page."""
    blocks, current = [], None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            if current is None:
                current = (stripped[3:].strip().lower(), number, [])
            else:
                blocks.append(current)
                current = None
            continue
        if current is not None:
            current[2].append((number, raw))
    assert current is None, f"{path.name}: a fenced block opened at line {current[1]} never closes"
    return blocks


def _command_lines(path: Path) -> list[tuple[str, str]]:
    """("page:line", command) of every command in the page's bash blocks: continuation lines
    joined, comments and blank lines skipped, a leading `$ ` prompt stripped."""
    lines = []
    for language, start, body in _fenced_blocks(path):
        if language not in ("bash", "sh", "shell", "console"):
            continue
        pending, where = "", ""
        for number, raw in body:
            text = raw.strip()
            if not pending:
                if not text or text.startswith("#"):
                    continue
                text = text.removeprefix("$ ")
                where = f"{path.relative_to(ROOT)}:{number}"
            if text.endswith("\\"):
                pending += text[:-1] + " "
                continue
            lines.append((where, pending + text))
            pending = ""
        assert not pending, f"{where}: a continued line ends its block"
    return lines


ALL_LINES = [item for page in PAGES for item in _command_lines(page)]


def _commands(line: str) -> list[list[str]]:
    """The simple commands of a line (split at && || ; |), leading VAR=value dropped."""
    tokens = shlex.split(line, comments=True)
    commands, current = [], []
    for token in tokens + [";"]:
        if token in SEPARATORS:
            while current and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", current[0]):
                current.pop(0)
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    return commands


def _entrypoint(command: list[str]) -> list[str]:
    """`ray job submit [flags] -- ENTRYPOINT`: the entrypoint; any other command itself."""
    if command[:3] == ["ray", "job", "submit"]:
        assert "--" in command, f"ray job submit without `--` before its entrypoint: {command}"
        return command[command.index("--") + 1:]
    return command


def _module_file(module: str) -> Path:
    return ROOT / (module.replace(".", "/") + ".py")


def _gensr_argv(command: list[str]) -> list[str] | None:
    """The `gensr` argument list a command amounts to, or None for other programs."""
    command = _entrypoint(command)
    if command[0] in GENSR:
        return command[1:]
    if command[0] in PYTHON and len(command) > 2 and command[1] == "-m":
        module = command[2]
        if not _module_file(module).is_file():
            return None  # test_every_command_line_is_pasteable reports it
        if module.startswith("jobs."):
            return [module.removeprefix("jobs."), *command[3:]]
        if module == "gensr_ray.cli":
            return command[3:]
    return None


def _gensr_lines() -> list[tuple[str, str, list[str]]]:
    found = []
    for where, line in ALL_LINES:
        for command in _commands(line):
            argv = _gensr_argv(command)
            if argv is not None:
                found.append((where, line, argv))
    return found


GENSR_LINES = _gensr_lines()


def test_the_pages_have_commands():
    assert len(PAGES) >= 8, [p.name for p in PAGES]
    assert len(GENSR_LINES) >= 40
    readme = [line for where, line in ALL_LINES if where.startswith("README.md:")]
    assert [_commands(line) for line in readme[:2]] == [[["make", "demo"]], [["make", "test"]]]


@pytest.mark.parametrize("where,line", ALL_LINES, ids=[w for w, _ in ALL_LINES])
def test_every_command_line_is_pasteable(where, line):
    assert not PLACEHOLDER.search(line), f"{where}: placeholder in `{line}`"
    for command in _commands(line):
        program = _entrypoint(command)
        if program[0] == "make":
            targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE)
            assert set(program[1:]) <= set(targets), f"{where}: no such make target: {line}"
        if program[0] in PYTHON and len(program) > 1 and program[1].endswith(".py"):
            assert (ROOT / program[1]).is_file(), f"{where}: no {program[1]}"
        if program[0] in PYTHON and len(program) > 2 and program[1] == "-m":
            assert _module_file(program[2]).is_file(), \
                f"{where}: python -m {program[2]}: no {_module_file(program[2])}"
        if program[0].endswith("pip") and ".[" in " ".join(program):
            import tomllib

            extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
                "optional-dependencies"]
            for token in program:
                if token.startswith(".["):
                    wanted = set(token.removeprefix(".[").removesuffix("]").split(","))
                    assert wanted <= set(extras), f"{where}: no extra {wanted - set(extras)}"
        for token in command:
            if REPO_PATH.match(token) or re.fullmatch(r"configs/\S+\.yaml", token):
                assert (ROOT / token).exists(), f"{where}: {token} does not exist"


@pytest.mark.parametrize("where,line,argv", GENSR_LINES, ids=[w for w, _, _ in GENSR_LINES])
def test_every_gensr_line_parses(where, line, argv):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0 and {"--help", "-h", "--version"} & set(argv):
            return
        pytest.fail(f"{where}: `{line}` does not parse (exit {exc.code})")
    choices = {str(c) for row in describe_settings() for c in row["choices"] or ()}
    for token in argv:
        for part in re.split(r"[/:=,]", token):
            assert not CAPS_WORD.fullmatch(part) or part in choices, \
                f"{where}: placeholder {part!r} in `{line}`"
    sets = getattr(args, "set", [])
    config = getattr(args, "config", None)
    if args.command in ("train", "tune") or (args.command == "config" and args.action == "show"):
        load_config(ROOT / config if config else None, sets)  # keys, values, checks
    elif sets:
        apply_overrides(GenSRConfig(), sets)
    if args.command == "tune" and str(args.sweep).startswith("configs/"):
        from gensr_ray.sweep import load_sweep

        load_sweep(ROOT / args.sweep)


def _run(argv: list[str], capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:  # --help and --version exit from argparse
        code = exc.code
    out = capsys.readouterr()
    assert code in (0, None), f"gensr {shlex.join(argv)}: exit {code}\n{out.err}"
    return out.out


def test_help_version_and_config_commands_run(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert "usage: gensr" in _run(["--help"], capsys)
    for name in subcommands:
        assert f"gensr {name}" in _run([name, "--help"], capsys)
    assert _run(["--version"], capsys).startswith("gensr ")
    assert "train.lr_schedule" in _run(["config", "help"], capsys)
    documented = [argv for _, _, argv in GENSR_LINES
                  if argv[:1] in (["config"], ["--help"], ["--version"])
                  or argv[-1:] == ["--help"]]
    assert any(argv[:2] == ["config", "show"] for argv in documented)
    for argv in documented:
        out = _run(argv, capsys)
        if argv[:2] == ["config", "show"]:
            shown = yaml.safe_load(out)
            assert set(shown) == set(GenSRConfig().to_dict())


def test_documented_synthetic_prepare_runs(tmp_path, capsys):
    """`gensr prepare --dataset synthetic` as the docs write it, into tmp_path; without the
    LightGCN pretraining (its own tests run it), which would take most of this file's time."""
    lines = [argv for _, _, argv in GENSR_LINES if argv[:3] == ["prepare", "--dataset",
                                                                 "synthetic"]]
    assert lines, "docs/datasets.md should show `gensr prepare --dataset synthetic`"
    for n, argv in enumerate(lines):
        argv = list(argv)
        out = tmp_path / f"data-{n}"
        argv[argv.index("--out") + 1] = str(out)
        if "--no-cf" not in argv:
            argv.append("--no-cf")
        _run(argv, capsys)
        assert (out / "meta.json").is_file() and (out / "examples" / "train").is_dir()


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    fenced = {n for _, _, body in _fenced_blocks(path) for n, _ in body}
    return {_slug(line.lstrip("#")) for n, line in enumerate(path.read_text().splitlines(), 1)
            if line.startswith("#") and n not in fenced}


def test_links_point_to_files_and_headings():
    checked = 0
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            assert path.exists(), f"{page.name}: link to missing {target}"
            if anchor and path.suffix == ".md":
                assert anchor in _anchors(path), f"{page.name}: no heading #{anchor} in {file}"
            checked += 1
    assert checked >= 20


def test_named_repository_paths_exist():
    for page in PAGES:
        for span in re.findall(r"`([^`\n]+)`", page.read_text()):
            if REPO_PATH.match(span):
                assert (ROOT / span).exists(), f"{page.name}: `{span}` does not exist"


def test_sweep_examples_load(tmp_path):
    from gensr_ray.sweep import load_sweep

    for page in PAGES:
        for language, start, body in _fenced_blocks(page):
            data = yaml.safe_load("\n".join(t for _, t in body)) if language == "yaml" else None
            if isinstance(data, dict) and "trials" in data:
                path = tmp_path / f"{page.stem}-{start}.yaml"
                path.write_text(yaml.safe_dump(data))
                load_sweep(path)


def _modules() -> list[str]:
    """The package's and the jobs' modules: those git tracks in a checkout (a module being
    written and not yet added is not held against the docs), else every file."""
    import subprocess

    try:
        tracked = subprocess.run(["git", "ls-files", "gensr_ray", "jobs"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        tracked = []
    if tracked:
        return sorted(p for p in tracked if p.endswith(".py") and (ROOT / p).is_file())
    return sorted(str(p.relative_to(ROOT)) for d in ("gensr_ray", "jobs")
                  for p in (ROOT / d).rglob("*.py"))


def test_layout_lists_every_module():
    listed = re.findall(r"^((?:gensr_ray|jobs)/\S+\.py)\s", (ROOT / "docs" / "layout.md")
                        .read_text(), re.MULTILINE)
    assert len(listed) == len(set(listed))
    assert sorted(listed) == _modules()
