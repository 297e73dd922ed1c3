"""Request limits of the scoring service (kept apart from the app, so the CLI needs no web framework)."""

DEFAULT_MAX_CANDIDATES = 1000
DEFAULT_MAX_BODY_BYTES = 2_000_000
DEFAULT_BODY_TIMEOUT_S = 10.0  # a client that promises more body than it sends is cut off (408) after this
MAX_STRING_CHARS = 1_000  # longest string feature value a request may hold
MAX_ERROR_CHARS = 300  # longest error message a 4xx answer holds (no echo of huge values)
MAX_ERROR_DETAILS = 10  # most entries in a 4xx answer's `detail`
