"""Errors a user can cause. Each message says what to do; the CLI prints it as one line."""

from __future__ import annotations


class FramePackError(Exception):
    """Base of every error we raise on purpose. `exit_code` is what the CLI returns."""

    exit_code = 1


class InputError(FramePackError):
    """Bad input from the user: a missing image, seconds out of range, an unknown preset."""

    exit_code = 2


class ModelUnavailableError(FramePackError):
    """Weights are neither on disk nor downloadable. The message names the repo and the ways to provide it."""

    exit_code = 2


class Cancelled(FramePackError):
    """The job was stopped by the user; what finished before is on disk (and in `.result` if set)."""

    exit_code = 130
    result = None
