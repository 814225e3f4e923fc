"""Errors a user can act on.

A ``UserError`` carries one sentence that names the file (or option) at fault and says
what to do. The CLI prints it without a traceback; ComfyUI shows it in the node's error box.
"""


class UserError(Exception):
    """Bad input from the user: the message is the whole story, no traceback needed."""


class CheckpointError(UserError):
    """A file or folder that is not a base model we can load."""


class Cancelled(KeyboardInterrupt):
    """A loop stopped because its ``should_stop()`` said so (ComfyUI's Cancel). It is a
    KeyboardInterrupt so that a cancel and a Ctrl-C take the same way out."""
