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


class GlobalRaces:
    """Global-memory race detector of one kernel launch (all its CTA batches).

    Every global byte remembers its last writer and last reader (thread ids of the launch) with the barrier
    epoch of their CTA at the time. An access conflicts with one by another thread that nothing orders
    before it: a thread of another CTA (a launch has no grid-wide barrier) or of the same CTA since its last
    `bar.sync`, when one of the two writes and the write changes the bytes. Several threads of one
    instruction storing the same bytes (a replicated result) mark them as written by all, which no read
    conflicts with.
    """

    REPLICATED = -2

    def __init__(self, threads_per_cta: int):
        self.per_cta = threads_per_cta
        self.state: dict[int, tuple] = {}  # id(buffer bytes) -> writer, writer epoch, reader, reader epoch
        self.count = 0
        self.reports: list[str] = []

    def _arrays(self, mem: np.ndarray):
        if id(mem) not in self.state:
            self.state[id(mem)] = tuple(np.full(mem.size, -1, np.int64) for _ in range(4))
        return self.state[id(mem)]

    def _unordered(self, other, other_epoch, tid, epoch):
        return (other >= 0) & (other != tid) & ((other // self.per_cta != tid // self.per_cta) | (other_epoch == epoch))

    def access(self, mem, idx, tid, epoch, new, where) -> None:
        """idx [n, width] byte indices into `mem` by threads tid [n] in barrier epochs epoch [n]; new: the bytes
        a store writes ([n, width], before they are stored), None for a load."""
        writer, w_epoch, reader, r_epoch = self._arrays(mem)
        t, e = tid[:, None], epoch[:, None]
        clash = self._unordered(writer[idx], w_epoch[idx], t, e)
        if new is None:
            reader[idx], r_epoch[idx] = t, e
        else:
            changes = new != mem[idx]
            clash = (clash | self._unordered(reader[idx], r_epoch[idx], t, e)) & changes
            flat = idx.reshape(-1)
            order = np.argsort(flat, kind="stable")
            dup = np.zeros(flat.size, bool)
            same = flat[order][1:] == flat[order][:-1]
            dup[order[1:][same]] = dup[order[:-1][same]] = True
            replicated = dup.reshape(idx.shape)
            if replicated.any():  # several threads store these bytes: the same value (benign) or a race
                vals = new.reshape(-1)[order]
                differ = np.zeros(flat.size, bool)
                differ[order[1:][same & (vals[1:] != vals[:-1])]] = True
                clash |= differ.reshape(idx.shape)
            writer[idx], w_epoch[idx] = np.where(replicated, self.REPLICATED, t), e
        if clash.any():
            row = int(np.nonzero(clash.any(axis=1))[0][0])
            self.count += 1
            if len(self.reports) < MAX_REPORTED:
                kind = "write" if new is not None else "read"
                self.reports.append(f"race: global {kind} of bytes another thread accesses without a barrier "
                                    f"between (another CTA, or the same CTA since its last bar.sync) at {where(row)}")
