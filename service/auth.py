"""Bearer tokens -> tenants. Sessions belong to the tenant that created them; other tenants cannot see them."""

import contextvars

from kvshard.service.errors import Unauthenticated

DEFAULT_TENANT = "default"
# Set by the interceptor for the duration of each RPC; handlers read it through current_tenant().
_TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("kvshard_tenant", default=DEFAULT_TENANT)


class Authenticator:
    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = dict(tokens or {})

    @property
    def required(self) -> bool:
        return bool(self.tokens)

    @classmethod
    def from_specs(cls, specs: list[str], path: str | None = None) -> "Authenticator":
        """Tokens from `TOKEN=TENANT` (or bare `TOKEN`, tenant "default") specs and a file of such lines."""
        lines = list(specs)
        if path:
            with open(path) as f:
                lines += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        tokens = {}
        for line in lines:
            token, _, tenant = line.partition("=")
            if not token:
                raise ValueError(f"auth token: empty token in {line!r}")
            tokens[token] = tenant or DEFAULT_TENANT
        return cls(tokens)

    def tenant_for(self, metadata) -> str:
        if not self.required:
            return DEFAULT_TENANT
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if header is None:
            raise Unauthenticated("authorization: missing; send 'authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in self.tokens:
            raise Unauthenticated("authorization: invalid bearer token")
        return self.tokens[token.strip()]


def set_current_tenant(tenant: str) -> None:
    _TENANT.set(tenant)


def current_tenant() -> str:
    return _TENANT.get()
