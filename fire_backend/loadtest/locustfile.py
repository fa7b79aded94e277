"""Locust entry point for a FIRE server; see ``fire_backend.loadtest.users`` and ``loadtest/README.md``."""

from fire_backend.loadtest.users import FireGrpcUser, FireHttpUser

__all__ = ["FireGrpcUser", "FireHttpUser"]
