"""One exception type for every mistake a user can fix; its message names the problem and the fix."""


class KDLabError(Exception):
    """Raised for a bad config, file or input, before any compute is spent where possible."""


class NonFiniteLossError(KDLabError):
    """A loss term became NaN or Inf during training."""


def brief(e: BaseException, limit: int = 160, sentence: bool = False) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters, for one-sentence errors;
    ``sentence``: only its first sentence (library errors often go on with advice that does not apply)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if sentence and ". " in text:
        text = text[: text.index(". ") + 1]
    return f"{type(e).__name__}: {text[:limit]}"
