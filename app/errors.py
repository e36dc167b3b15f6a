"""The app's error classes; all are `LlamaChatError`s with a message a user can act on."""

from model.errors import LlamaChatError, ModelError  # noqa: F401  (re-exported for the app)


class ConfigError(LlamaChatError):
    title = "Configuration error"


class UsageError(LlamaChatError):
    title = "Usage"


class HistoryError(LlamaChatError):
    title = "History error"


class SessionError(LlamaChatError):
    title = "Chat error"


class HistoryDamaged(HistoryError):
    """The history file cannot be read as a database: `llama-chat history recover` is the way forward."""

    title = "History is damaged"
