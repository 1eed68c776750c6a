"""What every command line of streamsim and scadles shares: the ``--help`` formatter."""
from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, as ``(default: X)`` after its help.

    Left out where it would say nothing or mislead: flags that take no value (the
    ``store_true`` / ``store_false`` switches), defaults of ``None`` (no value: the help says
    what happens then), and help that already gives its default as "(default ...)". argparse
    shows defaults only for options with a help text, so every option with a default has one.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.nargs == 0 or action.default is None or action.default is argparse.SUPPRESS
                or "(default" in text):
            return text
        return super()._get_help_string(action)
