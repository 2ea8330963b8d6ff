"""Shared command-line plumbing: config arguments and one-line user errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

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


def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: the embedded synthetic setup)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=5")


def run(main, argv=None) -> None:
    """Call ``main(argv)``; a UserError becomes one line on stderr and exit status 2."""
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
