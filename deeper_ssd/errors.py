"""The errors that mean bad input, in a module that imports nothing heavy (the command line
builds its parser and answers ``--help`` without torch). The command line prints them as one
line and exits with status 2; :class:`deeper_ssd.io.CaffeFormatError` is the third kind."""

__all__ = ["UsageError", "LayerError"]


class UsageError(Exception):
    """Bad input from the user: one line; the command line prints it and exits with status 2."""


class LayerError(ValueError):
    """A layer's parameters or bottom shapes are invalid; the message names the layer."""
