"""Errors of the training job, one small tree rooted in :class:`TrainError`."""

from __future__ import annotations


class TrainError(Exception):
    """Base of every error the training job raises on purpose."""


class CellConfigError(TrainError, ValueError):
    """The cell file is missing a key, has a wrong type, or asks for an impossible layout."""


class LaunchError(TrainError):
    """The process environment (ranks, rendezvous, devices) does not fit the cell."""


class EngineUnavailableError(TrainError):
    """The cell names an engine, or a feature of one, that this installation cannot run."""
