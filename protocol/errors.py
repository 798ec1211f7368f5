"""Errors every layer shares.

A :class:`UserInputError` means the user's input is wrong (a bad recipe, a file that
fails verification, an unknown model). The CLI prints it as one ``error:`` line and
exits 2; anything else is a bug or an environment failure and exits 1.
"""


class UserInputError(Exception):
    """The input is wrong; the message says what and where."""
