"""How a command's process runs and ends: ``run(main, argv)`` turns a UserError into one line and
exit status 2, Ctrl-C and SIGTERM into an orderly unwind (exit 130 / 143), and ends torchrun workers
without the interpreter finalization that can abort them."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import traceback
import warnings

from crformer.errors import UserError


class Terminated(KeyboardInterrupt):
    """SIGTERM (what batch schedulers send), raised where the process is, so it unwinds like Ctrl-C."""


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop(signum, frame) -> None:
    """The first Ctrl-C or SIGTERM unwinds the run; later ones are ignored, so a second Ctrl-C a few ms
    later cannot interrupt the cleanup and print a traceback (``kill -9`` still ends it)."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def run(main, argv=None) -> None:
    """Call ``main(argv)``; a UserError becomes one line on stderr and exit status 2. Ctrl-C and
    SIGTERM unwind the same way (temp files removed, process group closed), exit 130 / 143."""
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _stop) for sig in _STOP_SIGNALS} if on_main_thread else {}
    status = 0
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 2
    except Terminated:
        print("terminated", file=sys.stderr)
        status = 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    except Exception:
        if not _torchrun_worker():
            raise
        traceback.print_exc()
        status = 1
    finally:
        if status not in (130, 143):  # after a stop signal, stay deaf to the next one until exit
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if _torchrun_worker():
        _exit_torchrun_worker(status)
    if status:
        sys.exit(status)


def _torchrun_worker() -> bool:
    distributed = sys.modules.get("crformer.distributed")  # not imported: no process group joined
    return distributed is not None and distributed.joined_process_group()


def _exit_torchrun_worker(status: int) -> None:
    """End a torchrun worker without interpreter finalization. Why: DDP keeps a reference to the
    process group that ``destroy_process_group`` cannot drop (torch 2.14), so gloo's worker threads
    outlive it; one still releasing the last collective's tensors needs the GIL, and at finalization
    Python kills that thread inside a C++ destructor → ``std::terminate`` → SIGABRT after a run that
    succeeded (seen on 2 loaded cores in about 1 run in 5)."""
    sys.stdout.flush()
    sys.stderr.flush()
    ctypes.CDLL(None).fflush(None)  # C stdio too (e.g. NCCL_DEBUG output)
    os._exit(status)
