"""Bearer-token auth: ``authorization: Bearer <token>`` in gRPC call metadata or an HTTP header.

One shared token, set with ``--auth-token-file`` or ``YAYI_AUTH_TOKEN``: enough to keep
strangers off expensive hardware without an identity provider, and the header is the one
gRPC's own ``access_token_call_credentials`` sends.  The token is compared in constant
time and never logged.  The check runs before a request is read: in server/grpc/gate.py for
gRPC, in server/http/app.py for HTTP.
"""

from __future__ import annotations

import hmac

_HEADER = "authorization"


class TokenAuth:
    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the auth token must not be empty")
        self._expected = token.encode()

    def refusal(self, metadata) -> str | None:
        """Why a call with this metadata is refused, or None; the reason never holds the token."""
        given = next((value for key, value in metadata or () if key == _HEADER), None)
        if given is None:
            return "missing credentials: send 'authorization: Bearer <token>' (gRPC metadata or HTTP header)"
        given = given.encode() if isinstance(given, str) else given
        # The scheme's name is case-insensitive (RFC 7235): "bearer" is "Bearer".
        scheme, _, credentials = given.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return "the authorization header must be 'Bearer <token>'"
        # Constant time, so the time of a refusal does not tell how much of a guess was right.
        if not hmac.compare_digest(credentials.strip(), self._expected):
            return "invalid bearer token"
        return None
