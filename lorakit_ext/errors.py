"""Errors a user can act on. The CLI prints them as one line; the UI and API show the text."""


class UserError(Exception):
    """Bad input or a state the user must change: the message says what and why."""
