"""Errors the command line turns into exit codes (2: bad input, 1: bound not met)."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .report import Report

T = TypeVar("T")


class InputError(ValueError):
    """The model, an option or a data file is unusable; the message names the problem in one line."""


class BoundNotMet(RuntimeError):
    """No factorization keeps the error within the requested bound; nothing was written.

    `report` says how close the search got (its `validation` is the closest candidate's).
    """

    def __init__(self, message: str, report: Report):
        super().__init__(message)
        self.report = report


def known(value: T | None, what: str) -> T:
    """`value`, which the caller knows to be set (e.g. by an earlier stage of the run); a RuntimeError, our
    own bug, when it is not."""
    if value is None:
        raise RuntimeError(f"{what} is not set where it is read (a bug)")
    return value
