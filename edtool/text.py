"""Plain-text layout shared by the console and the demo: paragraphs wrapped for an 80-column terminal."""

import re
import textwrap
from typing import Optional


def paragraph(text: str, indent: int = 0, hang: Optional[int] = None) -> str:
    """TEXT wrapped to 80 columns (a terminal's usual width, and rich's in a pipe) between words, never
    inside a path or a `quoted phrase`; continuation lines indented by `hang` (default: `indent`). A word
    longer than a line stays whole."""
    whole = re.sub(r"`[^`]*`", lambda m: m.group(0).replace(" ", "\u00a0"), text)  # textwrap keeps NBSP
    hang = indent if hang is None else hang
    lines = textwrap.fill(whole, 80, initial_indent=" " * indent, subsequent_indent=" " * hang,
                          break_long_words=False, break_on_hyphens=False)
    return lines.replace("\u00a0", " ")
