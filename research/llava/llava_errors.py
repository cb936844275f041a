"""The one exception type the product raises for bad input; the CLIs print it as one line and exit 2."""


class LlavaError(ValueError):
    """A user-facing problem with an input (file, key, shape, limit); the message names it."""


class LimitError(LlavaError):
    """An input over a size limit (bytes, pixels): the server answers it with HTTP 413."""
