"""Every example runs as written (issue 26): each `fire` command in the README, docs/, loadtest/README.md and every
`--help` epilog parses as the `fire` command line reads it; the README quickstart's offline commands run for real
(the serving ones need a running server: tests/integration runs those steps against the real tritonserver);
the README's test command is the one CI runs; nothing points outside the repository; relative links resolve."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from fire_backend.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
#: the documents a newcomer reads, whose commands must run as written
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "loadtest" / "README.md", *(ROOT / "docs").rglob("*.md")])


def shell_lines(text: str) -> Iterator[str]:
    """The command lines of fenced shell blocks (```bash, ```sh, unnamed; in ```console only the ``$ `` lines, the
    rest being output), continuations joined, comments dropped. Inline `fire ...` fragments in the prose name a
    command's options, not a whole command line, and are not checked."""
    language, lines = None, []
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if language is None:
                language, lines = line.strip().strip("`").strip(), []
                continue
            if language in ("", "bash", "sh", "shell", "console"):
                for command in "\n".join(lines).replace("\\\n", " ").splitlines():
                    if language == "console" and not command.startswith("$ "):
                        continue
                    yield re.sub(r"(^|\s)#.*$", "", command.removeprefix("$ ")).strip()
            language = None
        elif language is not None:
            lines.append(line)


def fire_commands(line: str) -> Iterator[str]:
    """Each `fire ...` command of a shell line: split on && || ; | & outside quotes, leading VAR=value assignments
    dropped."""
    for part in re.split(r"\s*(?:&&|\|\||;|\||&)\s*(?=(?:[^']*'[^']*')*[^']*$)", line):
        words = part.split()
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words.pop(0)
        if words[:1] == ["fire"]:
            yield " ".join(words)


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for path in DOCUMENTS:
        for line in shell_lines(path.read_text()):
            found += [(str(path.relative_to(ROOT)), command) for command in fire_commands(line)]
    return found


def help_epilogs(parser: argparse.ArgumentParser, prog: str = "fire") -> Iterator[tuple[str, str]]:
    """(command, example line) of every parser's examples, subcommands included."""
    for line in (parser.epilog or "").replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        yield from ((prog, command) for command in fire_commands(line))
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from help_epilogs(sub, f"{prog} {name}")


def parse(command: str) -> None:
    """``command`` as `fire` parses it; AssertionError with argparse's message when it does not. A shell variable
    stands for a value its loop or its script sets (``$alpha``: 1), a command substitution for its output."""
    expanded = re.sub(r"\$\{?\w+\}?", "1", re.sub(r"\$\([^)]*\)", "X", command))
    argv = shlex.split(expanded)[1:]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            assert exc.code == 0, f"{command!r}: {err.getvalue().strip().splitlines()[-1]}"


DOCUMENTED = documented_commands()
EXAMPLES = sorted(set(help_epilogs(build_parser())))


def test_the_documents_hold_the_commands_a_newcomer_runs() -> None:
    commands = {command for _, command in DOCUMENTED}
    assert len(DOCUMENTED) >= 40
    for expected in ("fire demo", "fire ctl observe flagged.npz", "fire ctl history", "fire infer --npz poisoned.npz"):
        assert expected in commands, expected
    assert len(EXAMPLES) >= 40 and any(c == "fire ctl" for c, _ in EXAMPLES)


@pytest.mark.parametrize(("where", "command"), DOCUMENTED, ids=[f"{w}: {c}"[:90] for w, c in DOCUMENTED])
def test_every_documented_fire_command_parses(where: str, command: str) -> None:
    parse(command)


@pytest.mark.parametrize(("where", "command"), EXAMPLES, ids=[f"{w}: {c}"[:90] for w, c in EXAMPLES])
def test_every_help_example_parses(where: str, command: str) -> None:
    parse(command)


def test_the_readme_quickstart_offline_steps_run_as_written(digits_checkpoint, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The quickstart's commands that need no server, run in a fresh directory; `fire train`'s checkpoint is the
    tests' digits BadNets model (the same configuration: `fire train` with its defaults)."""
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = [c for line in shell_lines(quickstart) for c in fire_commands(line)]
    assert commands[0] == "fire train --out runs/digits"
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "digits").symlink_to(digits_checkpoint("badnets"), target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    offline = [c for c in commands if c.split()[1] in ("data", "repo")]
    assert [c.split()[1:3] for c in offline] == [["repo", "build"], ["data", "export"], ["data", "export"]]
    for command in offline:
        assert main(shlex.split(command)[1:]) == 0, command
        assert "asked for" not in capsys.readouterr().out, f"{command} wrote fewer images than it asks for"
    assert (tmp_path / "repo" / "models" / "fire_ensemble" / "config.pbtxt").is_file()
    assert (tmp_path / "flagged.npz").is_file() and (tmp_path / "poisoned.npz").is_file()


def test_the_readme_test_command_is_the_one_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install, test = "pip install 'torch==2.13.0' -e '.[test]'", "python -m pytest -q"
    assert f"{install} && {test}\n" in readme
    assert re.search(r"^python -m pip install --quiet 'torch==2\.13\.0' -e '\.\[test\]'$", ci, re.M)
    assert re.search(rf"^{re.escape(test)}$", ci, re.M)


def test_nothing_points_outside_the_repository(capsys) -> None:
    """Data and models are found through FIRE_SHARED_DIR (docs/data.md), never a path beside the clone."""
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in
             [*DOCUMENTS, *(ROOT / "scripts").iterdir(), *(ROOT / "benchmarks").glob("*.md"),
              *(ROOT / "benchmarks" / "gpu").iterdir(), ROOT / "tests" / "conftest.py"] if p.is_file()}
    for command in ("train", "data", "import", "eval", "sweep", "repo", "bench"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        texts[f"fire {command} --help"] = capsys.readouterr().out
    texts["fire --help examples"] = "\n".join(command for _, command in EXAMPLES)
    outside = [name for name, text in texts.items() if re.search(r"\.\./shared|/work/", text)]
    assert outside == []


def test_relative_links_in_the_documents_resolve() -> None:
    missing = []
    for path in DOCUMENTS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            resolved = (path.parent / target).resolve()
            if not resolved.exists():
                missing.append(f"{path.relative_to(ROOT)}: {target}")
    assert missing == []


def test_the_skip_message_names_the_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fire_backend.defaults import SHARED_DIR_ENV, shared_dir, shared_hint

    monkeypatch.setenv(SHARED_DIR_ENV, str(tmp_path))
    assert shared_dir(ROOT) == tmp_path
    monkeypatch.delenv(SHARED_DIR_ENV)
    assert shared_dir(ROOT) == ROOT / "shared"
    hint = shared_hint("data/cifar10.npz", tmp_path)
    assert "FIRE_SHARED_DIR" in hint and "data/cifar10.npz" in hint and str(tmp_path) in hint
    assert "shared/" in hint and "docs/data.md" in hint and os.path.isfile(ROOT / "docs" / "data.md")


def unfilled_placeholders(text: str) -> list[str]:
    """Lines that are a bare upper-case token (``EVAL_OUTPUT``): output a document promised and never showed."""
    return [line for line in text.splitlines() if re.fullmatch(r"[A-Z][A-Z0-9]*_[A-Z0-9_]+", line.strip())]


def test_every_document_shows_its_outputs() -> None:
    assert unfilled_placeholders("$ fire eval\nEVAL_OUTPUT\nCA 0.99\n") == ["EVAL_OUTPUT"]
    found = {str(path.relative_to(ROOT)): unfilled_placeholders(path.read_text()) for path in DOCUMENTS}
    assert {name: lines for name, lines in found.items() if lines} == {}
