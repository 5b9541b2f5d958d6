"""API keys: ``--api-key KEY``, ``--api-key-file FILE`` or ``$TRT_SD_API_KEY``.

With a key set, every route except ``/health`` needs ``Authorization: Bearer KEY`` (what the
``openai`` package sends) or HTTP basic auth with KEY as the password, any user name (what
WebUI clients such as ``webuiapi.set_auth`` send). The comparison is constant-time
(:func:`hmac.compare_digest`) so the answer's timing does not leak how much of a guess matched.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from pathlib import Path

from trt_sd.models.errors import InputError

KEY_ENV = "TRT_SD_API_KEY"
#: routes that stay open with a key set (load balancers probe them without credentials)
OPEN_PATHS = frozenset({"/health"})


def resolve_api_key(key: str | None, key_file: str | None) -> str | None:
    """The key from the flag, the file (first line) or the environment, in that order."""
    if key is not None and key_file is not None:
        raise InputError("give --api-key or --api-key-file, not both")
    if key_file is not None:
        try:
            lines = Path(key_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read the API key file {key_file}: {e}") from None
        key = lines[0] if lines else ""
    if key is None:
        key = os.environ.get(KEY_ENV)
        if key is None:
            return None
    key = key.strip()
    if not key or not key.isprintable() or any(c.isspace() for c in key):
        raise InputError("the API key must be one word of printable characters")
    return key


def presented_key(authorization: str) -> str | None:
    """The key an ``Authorization`` header carries (Bearer token, or basic-auth password)."""
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, sep, password = decoded.partition(":")
        return password if sep else None
    return None


def authorized(authorization: str | None, key: str | None) -> bool:
    """True when no key is set or the header carries it."""
    if key is None:
        return True
    presented = presented_key(authorization or "")
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode(), key.encode())


UNAUTHORIZED = (
    "missing or wrong API key: send Authorization: Bearer KEY (or basic auth, KEY as password)"
)
