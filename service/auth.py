"""Bearer tokens -> tenants. Sessions belong to the tenant that created them; other tenants cannot see them."""

import contextvars
import hashlib
import hmac
import re

from kvshard.service.errors import Unauthenticated

DEFAULT_TENANT = "default"
_SPEC = re.compile(r"(.*)=([A-Za-z0-9_.-]{1,64})")
# Set by the interceptor for the duration of each RPC; handlers read it through current_tenant().
_TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("kvshard_tenant", default=DEFAULT_TENANT)


class Authenticator:
    """Tokens are kept as sha256 digests and every one is compared in constant time, so neither the lookup nor
    the comparison tells a prober how much of a guess was right."""

    def __init__(self, tokens: dict[str, str] | None = None):
        self._digests = [(_digest(token), tenant) for token, tenant in (tokens or {}).items()]

    @property
    def required(self) -> bool:
        return bool(self._digests)

    @classmethod
    def from_specs(cls, specs: list[str], path: str | None = None) -> "Authenticator":
        """Tokens from `TOKEN=TENANT` (or bare `TOKEN`, tenant "default") specs and a file of such lines.

        The tenant is what follows the last `=`, when that is a tenant name ([A-Za-z0-9_.-], 1-64): so a
        base64 token's `=` padding stays part of the token (`c2VjcmV0==` is a bare token, `c2VjcmV0===a` is
        token `c2VjcmV0==` for tenant a)."""
        lines = list(specs)
        if path:
            with open(path) as f:
                lines += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        tokens = {}
        for line in lines:
            match = _SPEC.fullmatch(line)
            token, tenant = match.groups() if match else (line, DEFAULT_TENANT)
            if not token:
                raise ValueError("auth token: empty token in a TOKEN=TENANT spec")
            tokens[token] = tenant
        return cls(tokens)

    def tenant_for(self, metadata) -> str:
        if not self.required:
            return DEFAULT_TENANT
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if header is None:
            raise Unauthenticated("authorization: missing; send 'authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        digest = _digest(token.strip())
        tenant = None
        for known, owner in self._digests:
            if hmac.compare_digest(known, digest) and tenant is None:
                tenant = owner
        if scheme.lower() != "bearer" or tenant is None:
            raise Unauthenticated("authorization: invalid bearer token")
        return tenant


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def set_current_tenant(tenant: str) -> None:
    _TENANT.set(tenant)


def current_tenant() -> str:
    return _TENANT.get()
