"""Tensors that wait between sampling steps in pinned CPU memory instead of on the GPU.

Used for the head cache of a sampling run (engine.py: cached heads of every layer are kept for the next step,
up to ~6 GB at Flux 2K) and for the previous outputs of the calibration search. A stored tensor is copied to a
reused pinned host buffer on a side stream; `prefetch` starts the copy back (e.g. one layer ahead) and `get`
makes the current stream wait for it, so the copies overlap with attention and MLP work.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

__all__ = ["OffloadStore"]


class OffloadStore:
    """Per key, one tensor. With `offload` (and a CUDA tensor) it lives in pinned host memory until
    prefetched; otherwise it stays where it is. `get` hands the device copy out once (a later `get` copies
    again from the host); `discard` forgets the key."""

    def __init__(self, offload: bool = True) -> None:
        self.offload = offload
        self._host: dict[Hashable, torch.Tensor] = {}
        self._device_of: dict[Hashable, torch.device] = {}
        self._events: dict[Hashable, torch.cuda.Event] = {}
        self._on_device: dict[Hashable, torch.Tensor] = {}
        self._stream: torch.cuda.Stream | None = None

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def __contains__(self, key: Hashable) -> bool:
        return key in self._on_device or key in self._host

    def __len__(self) -> int:
        return len(self._on_device.keys() | self._host.keys())

    @property
    def device_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._on_device.values())

    def put(self, key: Hashable, t: torch.Tensor) -> None:
        self._on_device.pop(key, None)
        if not (self.offload and t.is_cuda):
            self._on_device[key] = t
            return
        buf = self._host.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self._host[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self._device_of[key] = t.device
        side = self._side(t.device)
        side.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(side):
            buf.copy_(t, non_blocking=True)
            t.record_stream(side)  # t's memory is reused only after the copy
            ev = torch.cuda.Event()
            ev.record(side)
        self._events[key] = ev

    def prefetch(self, key: Hashable) -> None:
        """Start copying `key` back to its device (no-op if it is there already or unknown)."""
        if key in self._on_device or key not in self._host:
            return
        device = self._device_of[key]
        side = self._side(device)
        with torch.cuda.stream(side):
            side.wait_event(self._events[key])
            t = self._host[key].to(device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(side)
        self._on_device[key] = t
        self._events[key] = ev

    def get(self, key: Hashable) -> torch.Tensor | None:
        if key not in self._on_device:
            if key not in self._host:
                return None
            self.prefetch(key)
        t = self._on_device.pop(key)
        if t.is_cuda and key in self._events:
            stream = torch.cuda.current_stream(t.device)
            stream.wait_event(self._events[key])
            t.record_stream(stream)
        return t

    def discard(self, key: Hashable) -> None:
        self._on_device.pop(key, None)
        self._host.pop(key, None)
        self._events.pop(key, None)
        self._device_of.pop(key, None)

    def clear(self) -> None:
        self._host.clear()
        self._events.clear()
        self._on_device.clear()
        self._device_of.clear()
