"""Checks on config values, shared by config loading and the owners of the keys (methods, the bank). No torch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pirl.errors import PirlError


class ConfigValueError(PirlError):
    """An impossible config value; ``key`` is its current name (config loading names it as the user wrote it)."""

    def __init__(self, key: str, value: Any, what: str) -> None:
        self.key, self.value, self.what = key, value, what
        super().__init__(f"bad config value {key}={value!r}: {what}")

    def spelled(self, old: str) -> str:
        """The message for a value given under the key's old name ``old``."""
        return f"bad config value {old}={self.value!r}: {self.what} ({old} is now {self.key})"


def check(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigValueError(key, value, what)


def choice(key: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    check(value in choices, key, value, f"must be one of {', '.join(choices)}")
