"""Errors a user can fix, in one shape: what went wrong, where (a file, a field), and how to fix it.

The CLI prints one line, `pairforge: <what> (<where>): <how to fix>`, and under --json the object
{"error": what, "field": field, "where": where, "hint": hint}. A message given as one string still works (it is
the `what`), so older raises keep their text."""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class UserError(ValueError):
    """Bad input (a spec, a source, a path, a name): the command stops before any work, exit code 2."""

    exit_code = 2

    def __init__(self, what: str, where: str | None = None, hint: str | None = None, field: str | None = None):
        self.what, self.where, self.hint, self.field = str(what), where, hint, field
        super().__init__(self.line())

    def line(self) -> str:
        """`<what> (<where>): <how to fix>`, the parts that are known."""
        text = self.what + (f" ({self.where})" if self.where else "")
        return text + (f": {self.hint}" if self.hint else "")

    def as_json(self) -> dict:
        return {"error": self.what, "field": self.field, "where": self.where, "hint": self.hint}

    def __reduce__(self):  # keeps the parts across processes (Ray workers)
        return type(self), (self.what, self.where, self.hint, self.field)


def did_you_mean(name: str, valid: Iterable[str], what: str = "valid", limit: int = 40) -> str:
    """A hint for an unknown name: the closest valid one, then the valid ones (the first `limit`)."""
    valid = [str(v) for v in valid]
    by_lower = {v.lower(): v for v in valid}
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.5)
    close = [by_lower[c] for c in close]
    shown = ", ".join(valid[:limit]) + (f", ... ({len(valid)} in all)" if len(valid) > limit else "")
    return (f"did you mean {close[0]!r}? " if close else "") + (f"{what}: {shown}" if valid else f"no {what} names")


_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


def exception_text(e: BaseException) -> str:
    """`Type: message` of an exception as stable text: object reprs with memory addresses left out (PIL names the
    BytesIO it could not read), so the same bad input gives the same detail in every run."""
    if type(e).__name__ == "UnidentifiedImageError":
        return "UnidentifiedImageError: not an image format PIL can read"
    text = _OBJECT_REPR.sub("", str(e)).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
