"""Exceptions for bad user input.

Library code raises these with a message that names the file, image id or config key; entry points
(`core.cli.run_main`) turn them into one line on stderr and exit code 2, never a bare traceback.
"""


class UserError(Exception):
    """Bad user input (file, annotation, config, checkpoint). The message names what is wrong."""


class ConfigError(UserError):
    """Unknown config key, wrong type, or malformed override."""


class DataError(UserError):
    """Missing/broken dataset file, annotation, proposal store or results file."""


class ImageError(DataError):
    """An image file that is missing, corrupt, truncated or not an image."""


class CheckpointError(UserError):
    """Missing, corrupt or mismatched checkpoint / weight file."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an out-of-memory failure: torch.OutOfMemoryError (CUDA / MPS), a RuntimeError from an allocator
    ('out of memory', "can't allocate memory" on CPU), or MemoryError. Per-image loops turn these into a UserError
    naming the image and the config key that bounds the memory."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
    return False
