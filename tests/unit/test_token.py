"""The control token's one reader: --token-file, then FIRE_CONTROL_TOKEN_FILE, then FIRE_CONTROL_TOKEN; and the
environment `fire serve` hands its stubs, which must find the same token whatever the shell had set."""

from __future__ import annotations

from pathlib import Path

import pytest

from fire_backend.wire.token import TOKEN_ENV, TOKEN_FILE_ENV, pinned_token, read_token, stub_environment


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {"a": tmp_path / "a", "b": tmp_path / "b", "empty": tmp_path / "empty"}
    paths["a"].write_text("token-a\n")
    paths["b"].write_text("  token-b  ")
    paths["empty"].write_text("\n")
    for path in paths.values():
        path.chmod(0o600)
    return paths


def test_precedence(files: dict[str, Path]) -> None:
    env = {TOKEN_FILE_ENV: str(files["b"]), TOKEN_ENV: "token-env"}
    assert read_token(files["a"], env) == "token-a"  # the explicit file first
    assert read_token(None, env) == "token-b"  # then the file variable (stripped)
    assert read_token(None, {TOKEN_ENV: "token-env"}) == "token-env"  # then the variable
    assert read_token(None, {TOKEN_FILE_ENV: "", TOKEN_ENV: "token-env"}) == "token-env"  # empty means unset
    assert read_token(None, {}) is None


@pytest.mark.parametrize("which", ["empty", "missing"])
def test_a_bad_token_file_is_an_error_naming_it(files: dict[str, Path], which: str) -> None:
    path = files["empty"] if which == "empty" else files["a"].with_name("nope")
    with pytest.raises(ValueError, match=str(path)):
        read_token(path, {TOKEN_ENV: "fallback"})  # never falls back to a weaker source silently


def test_the_stubs_read_what_fire_serve_resolved(files: dict[str, Path]) -> None:
    shell = {TOKEN_FILE_ENV: str(files["b"]), TOKEN_ENV: "token-env"}
    stub = {**shell, **stub_environment(files["a"], shell)}  # the stubs inherit the shell, then the pins
    assert read_token(None, stub) == "token-a"
    stub = {**shell, **stub_environment(None, shell)}
    assert read_token(None, stub) == "token-b"
    only_value = {TOKEN_ENV: "token-env"}
    assert read_token(None, {TOKEN_FILE_ENV: str(files["b"]), **stub_environment(None, only_value)}) == "token-env"
    assert stub_environment(None, {}) == {}
    assert read_token(None, {**shell, **pinned_token("pinned")}) == "pinned"


def test_a_relative_token_file_is_pinned_absolute(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(files["a"].parent)
    pinned = stub_environment(Path("a"), {})
    assert Path(pinned[TOKEN_FILE_ENV]).is_absolute() and read_token(None, pinned) == "token-a"


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o620, 0o666])
def test_a_token_file_open_to_others_is_refused(files: dict[str, Path], mode: int) -> None:
    files["a"].chmod(mode)
    with pytest.raises(ValueError, match=rf"open to other users \(mode {mode:04o}\).*chmod 600"):
        read_token(files["a"], {})


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o440])
def test_a_private_or_group_readable_token_file_is_read(files: dict[str, Path], mode: int) -> None:
    files["a"].chmod(mode)
    assert read_token(files["a"], {}) == "token-a"
