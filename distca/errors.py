"""The errors distca reports to its user as bad input (exit code 2, nothing on stdout).

A module that rejects user input raises one of these; the CLI (:mod:`distca.cli`) turns it into
one line on stderr. :class:`distca.config.ConfigError` is the config tree's own kind.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user: printed on stderr, exit code 2, nothing on stdout."""
