"""What may be shown or logged: credentials dropped from URIs, secret-looking values masked.

Every value a tracker sends (params, tags, dataset sources, the command line) passes
through here first, so a token in a config or an override never reaches the store."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

SECRET_WORDS = re.compile(r"(password|passwd|secret|token|api[_-]?key|credential)", re.IGNORECASE)
USERINFO = re.compile(r"(?<=://)[^/\s@]+@")
SECRET_QUERY = re.compile(
    r"([?&][^=&\s]*(?:token|key|secret|password|sig|signature|credential)[^=&\s]*=)[^&\s]+", re.IGNORECASE
)


def redact_uri(uri: str) -> str:
    """Drop user:password@ and query strings (tokens live there) from a URI before it is shown or logged."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable uri>"
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return uri  # nothing to drop; urlunsplit would also turn sqlite:////abs into sqlite://abs
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact_text(text: str) -> str:
    """Credentials inside any URL of a free text: user:password@ and secret-looking query values."""
    return SECRET_QUERY.sub(r"\1***", USERINFO.sub("", text))


def safe_params(params: dict[str, Any]) -> dict[str, str]:
    """Stringified params with secret-looking keys masked and URIs stripped of credentials, cut
    to MLflow's limits (keys 250 characters, values 6000)."""
    result = {}
    for key, value in params.items():
        text = "" if value is None else str(value)
        if SECRET_WORDS.search(key):
            text = "***"
        elif "://" in text:
            text = redact_text(text)
        result[key[:250]] = text[:6000]
    return result


def safe_overrides(overrides: list[str]) -> str:
    """Command-line KEY=VALUE words as one line. A value is masked whole when the word names a
    secret anywhere: in its key, or inside a mapping value (tracking.tags={api_token: ...})."""
    words = []
    for word in overrides:
        key, sep, _ = word.partition("=")
        words.append(f"{key}{sep}***" if sep and SECRET_WORDS.search(word) else word)
    return redact_text(" ".join(words))
