"""The one exception type that means "the user gave us something we cannot use".

The CLI prints these as a single line and exits with status 2; anything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a missing file, a wrong shape, an unknown config key, a refused format."""
