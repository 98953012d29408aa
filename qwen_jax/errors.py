"""User-facing errors. The CLI prints these as one line and exits non-zero; anything else is a bug."""


class QwenJaxError(Exception):
    """Base class of every error caused by the user's input (config, checkpoint, arguments)."""


class ConfigError(QwenJaxError):
    """config.json (or an override) asks for something this model cannot do."""


class CheckpointError(QwenJaxError):
    """A checkpoint folder or file is missing, malformed, unsafe or does not match its config."""
