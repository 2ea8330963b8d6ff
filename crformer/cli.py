"""Shared command-line plumbing: config arguments and one-line user errors."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
import warnings
from pathlib import Path

from crformer.errors import UserError


def quiet_libraries() -> None:
    """Silence load reports and hub chatter that would bury the useful output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    logging.getLogger("timm").setLevel(logging.WARNING)


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors: one line, exit 2, like every other bad input."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see --help)")


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The CLIs' argument parser, described by the first paragraph of the module docstring."""
    return _OneLineParser(prog=prog, description=(doc or "").split("\n\n")[0])


def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: the embedded synthetic setup)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=5")


def check_writable(path: str | os.PathLike, what: str, folder: bool = False) -> Path:
    """UserError unless ``path`` (a file, or a folder with ``folder=True``) can be written; checked
    before any work, by a probe that leaves nothing behind (``os.access`` says yes to root on a
    read-only mount)."""
    p = Path(path).expanduser()
    if p.exists() and p.is_dir() != folder:
        raise UserError(f"{what} {p} is {'a file' if folder else 'a folder'}, not {'a folder' if folder else 'a file'}")
    if not folder and p.exists() and not p.is_file():  # a device or a FIFO: writing would hang or vanish
        raise UserError(f"{what} {p} exists and is not a regular file")
    probe = p if folder and p.exists() else p.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot write {what} {p}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UserError(f"cannot write {what} {p}: {e.strerror or e} in {probe}") from None
    return p


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
