"""Exceptions shared across sixbit-tune. Stdlib only: the policy module and the runtime import this."""

from __future__ import annotations


class SixbitError(Exception):
    """Base class of every error sixbit-tune raises on purpose."""


class PolicyError(SixbitError, ValueError):
    """A policy is malformed, of an unsupported version, or does not fit the model/GPU it is applied to.

    ``key`` names the offending JSON path (``"tdc.tolerance"``) when there is one.
    """

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class NonFiniteError(SixbitError, ValueError):
    """NaN or Inf where a finite tensor is required (e.g. activations entering a quantizer)."""


class UnsupportedModelError(SixbitError, ValueError):
    """A model family or class sixbit-tune has no adapter for."""


class StoreError(SixbitError, RuntimeError):
    """The store cannot do what was asked (e.g. it is not writable); the message says what to do."""


class StoreReadOnlyError(StoreError, PermissionError):
    """The store folder cannot be written (permissions, a read-only mount); raised on opening it for writing."""


class StoreSchemaError(StoreError):
    """A store written with another schema version than this code reads."""


class NotBuiltYet(SixbitError, NotImplementedError):
    """A part of the workflow that is not implemented yet. Raised instead of producing fake output."""
