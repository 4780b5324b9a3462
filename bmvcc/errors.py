"""The two error types: a user's mistake (one line naming the problem and the fix) and bmvcc's own bug."""

import contextlib


class BmvccError(Exception):
    """A user's mistake (bad input, bad option). The CLI prints it on one line and exits 2."""

    exit_code = 2


# Why Linux refuses the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM) and what to do instead.
_AMX_CAUSES = ("a CPU or kernel without AMX, or a process that cannot hold the state: a thread's signal stack too "
               "small for it, a seccomp filter")
_AMX_FIX = ("compile the model with --target host on the machine that runs it (in Python: in its process), or for a "
            "target without AMX")
# The message of an AMX build's kernels (schedules/w2a8_amx.py: their TIR assert) run where Linux refuses the tile
# state; what runs a model reports it as a BmvccError (amx_refusal).
def _amx_refused(device: str | None) -> str:
    where = ": Linux did not grant this process" if device is None else \
        f" on {device}: Linux there did not grant the model's process"
    return f"AMX refused{where} the AMX tile state ({_AMX_CAUSES}); {_AMX_FIX}"


AMX_REFUSED = _amx_refused(None)


@contextlib.contextmanager
def amx_refusal(device: str | None = None):
    """Runs a compiled model (on `device`, an RPC device's name, else here): its kernels' AMX_REFUSED error
    becomes a BmvccError (one line, naming the device), others pass."""
    try:
        yield
    except RuntimeError as e:
        if AMX_REFUSED not in str(e):
            raise
        raise BmvccError(_amx_refused(device)) from None


class InternalError(Exception):
    """An invariant of bmvcc itself broken (a bmvcc bug, not the user's mistake). The CLI prints the traceback,
    which the report needs, and exits 3."""

    exit_code = 3

    def __init__(self, problem: str):
        super().__init__(f"{problem}; this is a bmvcc bug: please report it with this traceback")
