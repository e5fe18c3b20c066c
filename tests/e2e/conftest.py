"""Fixtures of the end-to-end tests: a private containerd on `lamina serve`."""

from containerd_stack import stack

__all__ = ["stack"]
