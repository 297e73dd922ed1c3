"""Request limits of the scoring service (kept apart from the app, so the CLI needs no web framework)."""

DEFAULT_MAX_CANDIDATES = 1000
DEFAULT_MAX_BODY_BYTES = 2_000_000
