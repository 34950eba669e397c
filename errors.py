"""The exceptions that cross modules on the sampling side: raised by the generation (sampler.py, batching.py) and
answered by the server (sample_server.py). No TensorFlow, so that the HTTP layer catches them without loading it."""


class GenerationStopped(Exception):
    """generator.stop() was called (the server is shutting down) before the n tokens asked for were made."""


class Busy(Exception):
    """Every row of the batch and every waiting place is taken (the server answers 503)."""

    def __init__(self, generating, waiting, flags="--max_batch, --queue"):
        super().__init__(f"busy: {generating} requests are generating and {waiting} waiting ({flags}); retry in a "
                         f"moment")
