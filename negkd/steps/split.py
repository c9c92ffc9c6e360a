"""Placeholder until its issue lands."""

from negkd.errors import UserError


def command() -> None:
    """Not implemented yet."""
    raise UserError("not implemented yet")
