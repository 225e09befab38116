"""The transformers versions this package was tested with, and the warning for a newer one."""

from __future__ import annotations

import functools
import warnings

# The newest transformers release this package's CI has run its tests against (the version in the committed
# lock file, constraints.txt; a test keeps the two equal). A newer one may have changed how attention, masks
# or the cache reach the model: apply() warns once and names the self-test, ``infoscale doctor``.
TESTED_TRANSFORMERS = "5.25.0"


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("+")[0].split("."):
        digits = "".join(ch for ch in p if ch.isdigit()) if p[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def newer_than_tested(version: str) -> bool:
    """Whether a transformers version is past :data:`TESTED_TRANSFORMERS` (a dev or rc build of the next release
    counts as newer)."""
    return _version_tuple(version) > _version_tuple(TESTED_TRANSFORMERS)


@functools.lru_cache(maxsize=1)
def _warn_if_untested() -> None:
    import transformers

    if newer_than_tested(transformers.__version__):
        warnings.warn(f"transformers {transformers.__version__} is newer than the newest version infoscale was "
                      f"tested with ({TESTED_TRANSFORMERS}); run `infoscale doctor` to check that this install "
                      "still runs the methods correctly", stacklevel=3)
