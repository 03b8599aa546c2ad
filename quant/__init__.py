"""kvshard.quant — KV-cache quantization for MLX: TurboQuant (mse, prod), residual VQ, PolarQuant and QJL as
compressed mlx_lm caches, attention straight from the codes, and RateQuant bit allocation."""

from .batch_cache import BatchCompressedKVCache
from .builder import KVCacheBuilder, install_attention_hook
from .cache import CompressedKVCache
from .config import KVCacheConfig
from .methods import METHODS, make_method
from .precompute import ArtifactStore, precompute
from .observers import DistortionObserver, KeyNormObserver, LatencyObserver, MemoryObserver

__all__ = [
    "KVCacheBuilder",
    "KVCacheConfig",
    "CompressedKVCache",
    "BatchCompressedKVCache",
    "METHODS",
    "make_method",
    "install_attention_hook",
    "DistortionObserver",
    "LatencyObserver",
    "MemoryObserver",
    "KeyNormObserver",
    "ArtifactStore",
    "precompute",
    "QuantizedLinear",
    "quantize_model",
]


def __getattr__(name):
    # Heavier pieces load on first use so that `import kvshard.quant` stays cheap.
    if name in ("load_model",):
        from .models import load_model

        return load_model
    if name in ("QuantizedLinear", "quantize_model"):
        from . import weights

        return getattr(weights, name)
    if name in ("calibrate_key_scales",):
        from .calibrate.key_scales import calibrate_key_scales

        return calibrate_key_scales
    if name in (
        "calibrate_layer_sensitivities",
        "sensitivity_steps",
        "allocate_bits_ratequant",
        "allocate_kv_bits_ratequant",
        "fit_distortion_curve",
    ):
        from .calibrate import ratequant

        return getattr(ratequant, name)
    if name in ("collect_moments", "plan_klt", "calibration_texts", "allocate_coordinate_bits"):
        from .calibrate import klt

        return getattr(klt, name)
    if name in ("Profile", "load_profile", "save_profile", "calibrate_profile", "list_profiles"):
        from .calibrate import profile

        return getattr(profile, name)
    raise AttributeError(name)
