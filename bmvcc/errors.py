"""The two error types: a user's mistake (one line naming the problem and the fix) and bmvcc's own bug."""


class BmvccError(Exception):
    """A user's mistake (bad input, bad option). The CLI prints it on one line and exits 2."""

    exit_code = 2


# The one line of an AMX build (schedules/w2a8_amx.py: its kernels' TIR assert) run where Linux refuses the tile
# state; bmvcc/runtime.py turns the kernel's error into a BmvccError with it.
AMX_REFUSED = ("AMX refused: Linux did not grant this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM), "
               "as on a CPU or kernel without AMX; compile the model on this machine (bmvcc compile --target host)")


class InternalError(Exception):
    """An invariant of bmvcc itself broken (a bmvcc bug, not the user's mistake). The CLI prints the traceback,
    which the report needs, and exits 3."""

    exit_code = 3

    def __init__(self, problem: str):
        super().__init__(f"{problem}; this is a bmvcc bug: please report it with this traceback")
