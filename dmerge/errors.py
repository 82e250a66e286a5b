"""Error and warning types. Every user-facing failure is a DMergeError with a one-line
message; every warning a DMergeWarning, printed as one line by the command line."""

from __future__ import annotations

import sys
import warnings


class DMergeError(Exception):
    """A failure the user can act on (bad recipe, missing tensor, unreadable file)."""


class RecipeError(DMergeError):
    """The recipe is invalid; raised before any tensor data is read."""


class InputModelError(DMergeError):
    """A parent model folder or one of its files is missing, malformed or inconsistent."""


class MergeExecutionError(DMergeError):
    """A task failed while merging (e.g. NaN produced in an output tensor)."""


class DMergeWarning(UserWarning):
    """Something the merge goes on without (a token id out of range, a missing tokenizer)."""


class RecipeWarning(DMergeWarning):
    """Part of the recipe is ignored (a key outside the schema, a parameter the method does not read)."""


def install_warning_format() -> None:
    """Print dmerge's warnings as one line, ``warning: <message>``, on stderr.

    Python's default format names the source file and line that raised the warning,
    which tells a user nothing; other warnings keep it. Installing twice is harmless.
    """
    previous = warnings.showwarning
    if getattr(previous, "dmerge_format", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, DMergeWarning):
            previous(message, category, filename, lineno, file, line)
            return
        stream = file if file is not None else sys.stderr
        if stream is None:  # no console (pythonw)
            return
        try:
            stream.write("warning: " + str(message).replace("\n", " ") + "\n")
        except OSError:  # a closed stderr must not turn a warning into a failure
            pass

    show.dmerge_format = True
    warnings.showwarning = show


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, SLURM, Kubernetes, systemd): handled like Ctrl-C, so a merge
    stops promptly and leaves its folder unfinished, to be continued with --resume."""
