"""CLI subcommands for serving (filled in below)."""

from __future__ import annotations


def register(sub) -> None:  # replaced as serving grows
    return None
