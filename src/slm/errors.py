"""The project's one error base class."""

from __future__ import annotations


class SlmError(ValueError):
    """Something the user can fix: a setting, a file, a request. Every module's own error derives from it, and
    the CLI prints it as one line with exit status 2; any other exception is a bug and keeps its traceback.
    (A ValueError subclass, so callers that caught ValueError before still do.)"""
