"""The error family every llama-chat layer raises for problems a user can act on."""


class LlamaChatError(Exception):
    """A failure with a message that says what went wrong and how to fix it."""

    title = "Error"
    exit_code: int | None = None  # what `llama-chat` exits with, when not its usual 1 (a setting to fix: 2)

    def __init__(self, message: str, title: str | None = None, *, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        if title:
            self.title = title
        if exit_code is not None:
            self.exit_code = exit_code


class ModelError(LlamaChatError):
    """The chat model could not be found, loaded or run."""

    title = "Model error"


class ContextError(ModelError):
    """The conversation cannot fit the model's context window."""

    title = "Message too long"
