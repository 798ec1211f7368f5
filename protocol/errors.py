"""Errors every layer shares.

A :class:`UserInputError` means the user's input is wrong (a bad recipe, a file that
fails verification, an unknown model). The CLI prints it as one ``error:`` line and
exits 2; anything else is a bug or an environment failure and exits 1.
"""


class UserInputError(Exception):
    """The input is wrong; the message says what and where."""


class ComputationError(Exception):
    """Valid inputs whose computation gave something that must not be written (a merge
    that produced NaN or Inf). The CLI prints one ``error:`` line and exits 1."""

