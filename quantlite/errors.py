"""The project's own exception types. Every failure a user can cause raises one of these."""


class QuantliteError(Exception):
    """Base class of every error quantlite raises on purpose."""


class QuantizationInputError(QuantliteError, ValueError):
    """A tensor handed to the quantizer cannot be quantized (bad shape, dtype, NaN/Inf, options)."""


class FormatError(QuantliteError, ValueError):
    """Stored data (a QWeight dict, a shard, a manifest) violates docs/FORMAT.md."""


class ConversionError(QuantliteError):
    """A checkpoint cannot be converted (unsupported model, missing or unreadable files)."""


class BackendUnavailable(QuantliteError, RuntimeError):
    """A kernel back-end was asked for by name but cannot run here; the message says why."""
