"""Decode-step inputs built in place from persistent host arrays (the runner's fast path).

A decode step (one generated token per sequence, no images) is the common
step, so its inputs are not rebuilt from Python lists: every sequence the
runner knows owns a row of a persistent block-table array that only changes
when blocks are appended, and a step fills preallocated staging arrays (pinned
on CUDA) with a handful of numpy operations over the batch. The staging rows
are then copied to the device in three transfers, straight into the CUDA
graph's static buffers when a graph runs the step. Hybrid models' state slots
ride in the int32 transfer beside the context lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class HostDecodeBatch:
    """One decode step's inputs on the host (views of the staging arrays, valid until the next step).

    Shapes: longs [5, B] int64 rows (input id, 3 x mRoPE position, KV slot);
    ints [2, B] int32 rows (context length, linear-attention state slot, -1 for
    none); block_tables [B, width] int32.
    """

    size: int
    width: int
    longs: torch.Tensor
    ints: torch.Tensor
    block_tables: torch.Tensor


class DecodeInputs:
    """Persistent per-sequence rows (block table, mRoPE offset) and per-step staging arrays."""

    def __init__(self, block_size: int, device: torch.device, rows: int = 64, width: int = 64):
        self.block_size = block_size
        self.device = device
        self._pin = device.type == "cuda"
        self._tables = np.zeros((rows, width), dtype=np.int32)
        self._deltas = np.zeros(rows, dtype=np.int64)
        self._free_rows = list(range(rows - 1, -1, -1))
        self._copied: torch.cuda.Event | None = None  # the last H2D copy out of the staging arrays
        self._alloc_staging(rows, width)

    # ---- sequence rows -------------------------------------------------------------

    def add(self, mrope_delta: int) -> int:
        """A row for a new sequence."""
        if not self._free_rows:
            rows = self._tables.shape[0]
            self._tables = np.concatenate([self._tables, np.zeros_like(self._tables)])
            self._deltas = np.concatenate([self._deltas, np.zeros_like(self._deltas)])
            self._free_rows = list(range(2 * rows - 1, rows - 1, -1))
        row = self._free_rows.pop()
        self._deltas[row] = mrope_delta
        return row

    def free(self, row: int) -> None:
        self._tables[row] = 0  # staged tables are zero past each sequence's blocks, as the general path pads
        self._free_rows.append(row)

    def write_blocks(self, row: int, first: int, block_ids: tuple[int, ...], reset: bool = False) -> None:
        """Table entries [first, first + len(block_ids)) of `row`; `reset`: the whole table (zero the rest)."""
        if reset:
            self._tables[row] = 0
        end = first + len(block_ids)
        if end > self._tables.shape[1]:
            width = max(end, 2 * self._tables.shape[1])
            grown = np.zeros((self._tables.shape[0], width), dtype=np.int32)
            grown[:, : self._tables.shape[1]] = self._tables
            self._tables = grown
        self._tables[row, first:end] = block_ids

    # ---- one step --------------------------------------------------------------------

    def _alloc_staging(self, rows: int, width: int) -> None:
        # Flat buffers: a step of S rows views the first elements as contiguous [5, S] / [2, S] /
        # [S, width] blocks, so each goes to the device in one plain copy.
        self._cap_rows, self._cap_width = rows, width
        self._longs = torch.zeros(5 * rows, dtype=torch.int64, pin_memory=self._pin)
        self._ints = torch.zeros(2 * rows, dtype=torch.int32, pin_memory=self._pin)
        self._bt = torch.zeros(rows * width, dtype=torch.int32, pin_memory=self._pin)
        self._longs_np, self._ints_np, self._bt_np = self._longs.numpy(), self._ints.numpy(), self._bt.numpy()

    def stage(
        self, rows: list[int], starts: list[int], token_ids: list[int], pad_to: int = 0,
        state_slots: list[int] | None = None,
    ) -> HostDecodeBatch:
        """Fill the staging arrays for a decode step of `len(rows)` sequences.

        Sequence i computes token `starts[i]` (id `token_ids[i]`) past its prompt,
        so all three mRoPE rows are `start + delta`; it continues linear-attention
        state slot `state_slots[i]` (hybrid models; else -1). Rows `[B, pad_to)`
        are padding for a CUDA graph bucket: KV and state slot -1 (write nowhere),
        one context token.
        """
        b, bs = len(rows), self.block_size
        size = max(b, pad_to)
        self._wait_copy()
        start = np.asarray(starts, dtype=np.int64)
        row = np.asarray(rows, dtype=np.intp)
        width = int(start.max()) // bs + 1
        if size > self._cap_rows or size * width > self._bt_np.shape[0]:
            self._alloc_staging(max(size, 2 * self._cap_rows), max(width, 2 * self._cap_width))
        longs = self._longs_np[: 5 * size].reshape(5, size)
        ints = self._ints_np[: 2 * size].reshape(2, size)
        bt = self._bt_np[: size * width].reshape(size, width)
        longs[0, :b] = token_ids
        longs[1:4, :b] = start + self._deltas[row]
        bt[:b] = self._tables[row, :width]
        longs[4, :b] = self._tables[row, start // bs].astype(np.int64) * bs + start % bs
        ints[0, :b] = start + 1
        ints[1, :b] = -1 if state_slots is None else state_slots
        if size > b:
            longs[:, b:] = 0
            longs[4, b:] = -1
            ints[0, b:] = 1
            ints[1, b:] = -1
            bt[b:] = 0
        return HostDecodeBatch(
            size, width, self._longs[: 5 * size].view(5, size), self._ints[: 2 * size].view(2, size),
            self._bt[: size * width].view(size, width),
        )

    def mark_copied(self) -> None:
        """Record that the staging arrays were handed to asynchronous copies (CUDA)."""
        if self._pin:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def _wait_copy(self) -> None:
        # A non-blocking H2D copy reads the pinned staging arrays later: do not overwrite them first.
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
