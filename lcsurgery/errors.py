"""Errors raised by lcsurgery: one exception type so callers can catch everything we refuse."""

from __future__ import annotations


class LCSurgeryError(ValueError):
    """A model, input or option that lcsurgery cannot handle; the message says why and what to do."""


class TraceError(LCSurgeryError):
    """torch.fx could not trace the model; the message names the module and fx's own reason."""


class NoResidualBlocksError(LCSurgeryError):
    """The model has no residual join that can be gated."""


class CheckpointMismatchError(LCSurgeryError):
    """A checkpoint does not fit the model it is loaded into."""
