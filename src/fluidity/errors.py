"""The exception hierarchy for errors a user can cause and act on.

Every error raised for a user mistake (bad config, missing certificate, wrong server name) derives
from :class:`FluidityError` and carries a message that says what was wrong and what to do. The CLI
prints that message without a stack trace and exits with status 2.
"""


class FluidityError(Exception):
    """An error with a message meant for the person running Fluidity."""


class ConfigError(FluidityError):
    """The configuration (file, environment or flags) is invalid."""


class CertificateError(FluidityError):
    """A certificate or key is missing, unreadable, mismatched or otherwise unusable."""
