"""Eval-time execution that skips gated-off blocks and channels for real."""
