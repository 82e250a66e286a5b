"""Error types. Every user-facing failure is a DMergeError with a one-line message."""


class DMergeError(Exception):
    """A failure the user can act on (bad recipe, missing tensor, unreadable file)."""


class RecipeError(DMergeError):
    """The recipe is invalid; raised before any tensor data is read."""


class InputModelError(DMergeError):
    """A parent model folder or one of its files is missing, malformed or inconsistent."""


class MergeExecutionError(DMergeError):
    """A task failed while merging (e.g. NaN produced in an output tensor)."""
