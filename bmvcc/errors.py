"""The two error types: a user's mistake (one line naming the problem and the fix) and bmvcc's own bug."""

import contextlib


class BmvccError(Exception):
    """A user's mistake (bad input, bad option). The CLI prints it on one line and exits 2."""

    exit_code = 2


# The message of an AMX build's kernels (schedules/w2a8_amx.py: their TIR assert) run where Linux refuses the tile
# state; what runs a model reports it as a BmvccError (amx_refusal).
AMX_REFUSED = ("AMX refused: Linux did not grant this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM), "
               "as on a CPU or kernel without AMX; compile the model on this machine (bmvcc compile --target host)")


@contextlib.contextmanager
def amx_refusal():
    """Runs a compiled model: its kernels' AMX_REFUSED error becomes a BmvccError (one line), others pass."""
    try:
        yield
    except RuntimeError as e:
        if AMX_REFUSED not in str(e):
            raise
        raise BmvccError(AMX_REFUSED) from None


class InternalError(Exception):
    """An invariant of bmvcc itself broken (a bmvcc bug, not the user's mistake). The CLI prints the traceback,
    which the report needs, and exits 3."""

    exit_code = 3

    def __init__(self, problem: str):
        super().__init__(f"{problem}; this is a bmvcc bug: please report it with this traceback")
