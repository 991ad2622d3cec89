"""One exception type for every mistake a user can fix; its message names the problem and the fix."""


class KDLabError(Exception):
    """Raised for a bad config, file or input, before any compute is spent where possible."""


class NonFiniteLossError(KDLabError):
    """A loss term became NaN or Inf during training."""
