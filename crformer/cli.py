"""Shared command-line plumbing: argument parsers whose errors are one line, config arguments, quiet
libraries. How a command runs and ends (signals, exit status, torchrun) is :mod:`crformer.process`."""

from __future__ import annotations

import argparse
import logging
import os

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
