"""Typed failures. Only ``cli/`` and ``server/`` catch these; everything else lets them rise.

Each error carries a one-line ``message`` with the numbers that matter and an optional ``hint`` saying
what the user can do about it.
"""

from __future__ import annotations


class HomespecError(Exception):
    """Base of every failure HomeSpec reports to a user."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(HomespecError):
    """A flag, option or config value is out of range or malformed."""

    exit_code = 2


class UntrustedPeerError(ConfigError):
    """A worker whose key this head has not been told to trust (DESIGN §7): it is never deployed to."""

    def __init__(self, message: str, key: str, hint: str | None = None, name: str = "") -> None:
        super().__init__(message, hint)
        self.key = key
        self.name = name  # the name it gives itself (a claim too)


class ModelError(HomespecError):
    """A model cannot be found, read or is of an unsupported architecture."""

    exit_code = 2


class DraftError(HomespecError):
    """A draft source cannot be built for this target (wrong spec, tokenizer mismatch)."""

    exit_code = 2


class TransportError(HomespecError):
    """A wire message is malformed, of an unknown kind, or over the size cap."""


class PeerLostError(HomespecError):
    """A stage or worker stopped answering."""


class RequestFailedError(HomespecError):
    """One request failed on a stage (its cache is full, a stage refused it): that request alone ends; the stages
    and every other request on them go on."""

    def __init__(self, request: int, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.request = request


class PlanError(HomespecError):
    """The model does not fit the devices, or a placement asked for cannot be made."""

    exit_code = 2


class CapacityError(HomespecError):
    """A request outgrew a preallocated buffer (context length, tree slots)."""

    exit_code = 2
