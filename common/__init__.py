"""Shared pieces of the masked-image-modeling reference: data, ViT blocks, training utilities, evaluation."""


class UserError(Exception):
    """Bad input from the user (a path, a size, a flag). The scripts print it as one line and exit with code 2.

    A DataLoader worker re-raises exceptions in the main process as `UserError("Caught UserError in DataLoader
    worker process 0.\\nOriginal Traceback ...")`; only the original message is kept.
    """

    def __init__(self, message):
        message = str(message)
        if message.startswith("Caught UserError in DataLoader worker"):
            message = message.rstrip().splitlines()[-1].split("UserError: ", 1)[-1]
        super().__init__(message)
