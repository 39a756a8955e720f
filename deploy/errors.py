"""The deploy tool's one error type: `deploy` prints its one-line message and exits 2."""


class DeployError(RuntimeError):
    """The deployment did not come up or a run did not finish; the message is one line."""
