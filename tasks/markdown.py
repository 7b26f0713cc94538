"""Text from catalogs, sheets and uploads, made safe for Prefect's markdown artifacts.

A SKU, a file name or a reason quoting a cell may hold newlines, pipes or markdown of its own; put into
an artifact as written, it would render a heading or a link, or break the table it sits in.
"""

from __future__ import annotations

import re
import unicodedata

# The characters with a meaning inside a line of (GitHub-flavoured) markdown or inline HTML. Those that
# mean something only at the start of a line (#, -, +, 1.) need none: the text is one line, always placed
# after a table's "| ", a list's "- " or a heading's "## ".
_MARKUP = re.compile(r"([\\`*_\[\]<>|~])")
# What GitHub-flavoured markdown turns into a link by itself (http://…, www.…): broken by an escape.
_AUTOLINK = re.compile(r"(?<=\w)(:)(?=//)|(?<=\bwww)(\.)", re.IGNORECASE)


def md_text(value: object) -> str:
    """``value`` as one line of literal text: control characters (newlines included) become spaces, runs
    of spaces one, and markdown punctuation is escaped, so it renders as written inside a table cell."""
    flat = "".join(" " if unicodedata.category(char)[0] == "C" else char for char in str(value))
    escaped = _MARKUP.sub(r"\\\1", " ".join(flat.split()))
    return _AUTOLINK.sub(lambda match: "\\" + match[0], escaped)
