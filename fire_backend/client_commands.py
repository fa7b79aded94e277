"""CLI subcommands for clients and benchmarks (``fire infer``, ``fire bench``)."""

from __future__ import annotations


def register(sub) -> None:
    return None
