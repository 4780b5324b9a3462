"""Shared-memory race detector of a batch of CTAs (machine.py).

Between two barriers of a CTA, every shared byte remembers which of the CTA's warps wrote it and which read
it (one bit per warp). An access by warp w races when another warp wrote the byte (w reads or writes) or
read it (w writes) since the CTA's last `bar.sync`. A cp.async is in flight from its issue to the
`cp.async.wait_group` that covers it: any access to its bytes in between races (the copy may land at any
time); when it lands it counts as a write by the issuing warp. Accesses of one instruction are recorded
before they are checked, so two warps writing the same byte in one instruction race too.
"""

from __future__ import annotations

import numpy as np

MAX_REPORTED = 20


class SharedRaces:
    def __init__(self, n_ctas: int, size: int):
        self.size = size
        self.written = np.zeros(n_ctas * size, np.uint32)  # warp bit mask per byte
        self.read = np.zeros(n_ctas * size, np.uint32)
        self.pending = np.zeros(n_ctas * size, np.uint8)  # cp.async copies in flight per byte
        self.count = 0
        self.reports: list[str] = []

    def access(self, idx: np.ndarray, warp_bits: np.ndarray, write: bool, where) -> None:
        """idx: flat byte indices [n, width]; warp_bits: the accessing warp's bit [n]; where(i) names the
        access of row i (kernel, PTX line, CTA, thread) for the report."""
        bits = np.broadcast_to(warp_bits[:, None], idx.shape)
        if self.pending[idx].any():
            row = int(np.nonzero(self.pending[idx].any(axis=1))[0][0])
            what = "write to" if write else "read of"
            self._report(f"{what} shared bytes whose cp.async is still pending", where(row))
        if write:
            np.bitwise_or.at(self.written, idx, bits)
            clash = (self.written[idx] | self.read[idx]) & ~bits
        else:
            np.bitwise_or.at(self.read, idx, bits)
            clash = self.written[idx] & ~bits
        if clash.any():
            row = int(np.nonzero(clash.any(axis=1))[0][0])
            other = int(clash[row][clash[row] != 0][0])
            self._report(f"shared {'write' if write else 'read'} conflicts with warp {other.bit_length() - 1}'s "
                         f"{'access' if write else 'write'} since the last bar.sync", where(row))

    def issue_async(self, idx: np.ndarray, warp_bits: np.ndarray, where) -> None:
        others = (self.read[idx] | self.written[idx]) & ~warp_bits[:, None]
        bad = (self.pending[idx] != 0) | (others != 0)
        if bad.any():
            row = int(np.nonzero(bad.any(axis=1))[0][0])
            self._report("cp.async into shared bytes still in flight or accessed by another warp since the last "
                         "bar.sync", where(row))
        np.add.at(self.pending, idx, 1)

    def land_async(self, idx: np.ndarray, warp_bits: np.ndarray) -> None:
        np.subtract.at(self.pending, idx, 1)
        np.bitwise_or.at(self.written, idx, np.broadcast_to(warp_bits[:, None], idx.shape))

    def barrier(self, ctas: np.ndarray | None) -> None:
        """A bar.sync of the CTAs with these batch indices (None: all)."""
        if ctas is None:
            self.written.fill(0)
            self.read.fill(0)
            return
        for c in ctas:
            self.written[c * self.size:(c + 1) * self.size] = 0
            self.read[c * self.size:(c + 1) * self.size] = 0

    def _report(self, what: str, where: str) -> None:
        self.count += 1
        if len(self.reports) < MAX_REPORTED:
            self.reports.append(f"race: {what} at {where}")
