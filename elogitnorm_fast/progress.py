"""Optional progress bars: tqdm is not a dependency of the library, only of its extras."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal: in a log file every refresh of a bar is a line of its own."""
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def progress_bar(items: Iterable[T], *, show: bool | None, large: bool, **options) -> Iterable[T]:
    """``items`` wrapped in a tqdm bar when ``show`` is True, or, with ``show=None``, when the work
    is ``large`` and stderr is a terminal (a log file would fill with bar redraws). Without tqdm
    installed, ``items`` unchanged."""
    wanted = show if show is not None else large and stderr_is_terminal()
    if not wanted:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, **options)
