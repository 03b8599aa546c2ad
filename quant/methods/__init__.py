"""The quantization methods, one module each, all with the same verbs:
encode(x) -> codes, decode(codes) -> x̂, score(q, codes) -> q·k̂, plus the rotated-domain pieces
(rotate_query, decode_rotated, unrotate) that attention uses to avoid materialising x̂."""

from .klt import KLT
from .polar import PolarQuant
from .qjl import QJL
from .turboquant_mse import TurboQuantMSE
from .turboquant_prod import TurboQuantProd
from .turboquant_rvq import TurboQuantRVQ

METHODS = {
    m.name: m for m in (TurboQuantMSE, TurboQuantProd, TurboQuantRVQ, PolarQuant, QJL, KLT)
}


def make_method(name: str, head_dim: int, bits: int, seed: int = 42):
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2:
        raise ValueError(f"head_dim must be an integer >= 2, got {head_dim!r}")
    return METHODS[name](head_dim, bits, seed)
