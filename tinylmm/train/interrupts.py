"""SIGINT and SIGTERM during training: finish the step, save a checkpoint, say how to resume.

The first signal only sets a flag; the loop reads it at the next step boundary, writes a
step checkpoint there and stops with `RunInterrupted` (exit 130 for SIGINT, 143 for SIGTERM,
the shell's 128 + signal number). A second SIGINT quits at once, as an untrapped Ctrl-C
does: whatever checkpoint was being written is left as `<name>.tmp`, which resume ignores.
In a multi-process run the processes stop at the same step: the flag is max-reduced over
them at each boundary (a signal may reach only some of them).

SIGKILL cannot be caught; there every checkpoint is written under a temporary name and
renamed into place when whole (tinylmm.files.write_atomically), so the last complete one
resumes.
"""

from __future__ import annotations

import signal
import sys
import threading

import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Context manager: traps SIGINT/SIGTERM while training (main thread only; elsewhere,
    e.g. a notebook's worker thread, signals keep their handlers and nothing is trapped)."""

    def __init__(self, announce: bool = True):
        self.announce = announce  # the main process says it is stopping; the others quietly
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Give the signals back their previous handlers (before evaluation, at the end)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            self.release()
            raise KeyboardInterrupt  # the second Ctrl-C: quit now
        self.signum = self.signum or signum
        if self.announce:
            name = signal.Signals(signum).name
            sys.stderr.write(f"\n{name}: stopping after this step with a checkpoint (Ctrl-C again to quit now)\n")

    def requested(self, accel) -> bool:
        """Whether any process was signalled (every process must call this at the boundary)."""
        if accel.num_processes == 1:
            return self.signum is not None
        flag = torch.tensor(0 if self.signum is None else self.signum, device=accel.device)
        agreed = int(accel.reduce(flag, reduction="max"))
        if agreed and self.signum is None:
            self.signum = agreed
        return bool(agreed)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGINT)
