"""Implementations of the ``distca`` subcommands, one module each (registered in distca.cli)."""
