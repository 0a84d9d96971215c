"""Errors a user sees as one line. Anything else is a bug and keeps its traceback."""


class PipelineError(Exception):
    """A problem with the user's input, storage or cluster, stated in one line."""


class AdapterError(Exception):
    """One adapter is unusable; the message is its quarantine reason."""


class IntegrityError(PipelineError):
    """Stored bytes are not what the manifest says they are: corruption, never retried."""
