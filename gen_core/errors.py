"""Errors that are the user's to fix (bad config, missing or corrupt data).

The CLI turns a `UserError` into one line on stderr and exit status 2, never a traceback.
"""


class UserError(Exception):
    """A mistake in the input that the user can fix; its message names what and how."""
