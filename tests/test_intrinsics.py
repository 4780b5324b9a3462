"""schedules/intrinsics.py: `ensure` registers a table entry with TVM on first use; a name that is neither
registered nor in the table is a bmvcc bug (a schedule naming an intrinsic nobody defined), not a KeyError."""

from __future__ import annotations

import re

import pytest

from bmvcc.errors import InternalError
from bmvcc.schedules import dot_intrinsics, intrinsics


def test_ensure_registers_a_table_entry():
    from tvm.s_tir import TensorIntrin

    name = dot_intrinsics.NAMES[0]
    assert intrinsics.ensure(name) == name
    assert TensorIntrin.get(name, allow_missing=True) is not None


def test_ensure_of_an_unknown_intrinsic_is_an_internal_error():
    with pytest.raises(InternalError, match=re.escape(
            "tensor intrinsic 'w2a8_dot_nowhere' is neither registered with TVM nor in "
            "bmvcc.schedules.intrinsics.INTRINSICS, so a schedule cannot tensorize with it; this is a bmvcc bug")):
        intrinsics.ensure("w2a8_dot_nowhere")
