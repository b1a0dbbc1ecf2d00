"""Stand-in for vLLM (CUDA-only) so that OpenRLHF's modules import on CPU; see ../README.md."""

__version__ = "0.0.0+tokencredit-stand-in"


class SamplingParams:
    """Holds what it is given: OpenRLHF's executor reads `max_tokens` and `logprobs` from it."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
