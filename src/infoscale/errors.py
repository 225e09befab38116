"""One error hierarchy: every problem a user can fix is an :class:`InfoscaleError`.

``infoscale`` commands catch the base class, print its message as one line and exit with status 2;
library users can catch the base class or one of its kinds.
"""

from .attn.errors import InfoscaleError, MethodError


class DataError(InfoscaleError):
    """A corpus, run directory, checkpoint or record file that cannot be used; the message says how to fix it."""


class ConfigError(InfoscaleError, ValueError):
    """An option or configuration field with an invalid value; the message names the field and what it accepts."""


__all__ = ["InfoscaleError", "MethodError", "DataError", "ConfigError"]
