"""Every error graphopt raises on purpose derives from GraphoptError, so users can catch one type."""


class GraphoptError(Exception):
    """Base class: something the user gave or asked for cannot be done; the message says what to do."""


class InputError(GraphoptError):
    """Bad arguments or inputs: unknown target/pass/backend, inputs that do not match the example."""


class CaptureError(GraphoptError):
    """torch.export could not capture the model; the message names the module, line and reason."""


class UnsupportedError(GraphoptError):
    """A target, backend or operator that graphopt cannot handle (yet)."""


class VerificationError(GraphoptError):
    """A pass (or the backend) moved the outputs further from eager than the tolerance allows."""
