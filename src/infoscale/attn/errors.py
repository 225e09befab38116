"""The error hierarchy's root, defined in the attention core so that the core stays self-contained."""


class InfoscaleError(Exception):
    """Bad input the user can fix: the command line prints the message as one line and exits with 2."""


class MethodError(InfoscaleError, ValueError):
    """A method string, parameter or combination that cannot be used (the message says why)."""
