"""Calibrate: RateQuant on the served model, through kvshard.quant's public functions."""

import math
from dataclasses import dataclass

from kvshard import quant

DEFAULT_BIT_CHOICES = (2, 3, 4, 5, 6, 8)
DEFAULT_TARGET_BITS = 4.0
MAX_PROMPTS = 32
MAX_PROMPT_CHARS = 8192
MODES = ("kl", "key_norm")


@dataclass
class CalibrationPlan:
    method: str
    prompts: list[str] | None
    target_avg_bits: float
    bit_choices: tuple[int, ...]
    beta: float | None  # None: fit it for the method
    mode: str


@dataclass
class CalibrationResult:
    sensitivities: list[float]
    key_bits: list[int]
    average_bits: float
    beta: float


def check_prompts(request) -> None:
    if len(request.prompts) > MAX_PROMPTS or any(len(p) > MAX_PROMPT_CHARS for p in request.prompts):
        raise ValueError(f"prompts: at most {MAX_PROMPTS} prompts of at most {MAX_PROMPT_CHARS} characters")
    if any(not p for p in request.prompts):
        raise ValueError("prompts: an empty prompt")


def check_request(request, limits, methods) -> CalibrationPlan:
    method = request.method or "turboquant_mse"
    if method not in methods:
        raise ValueError(f"method: unknown method {method!r}; one of {', '.join(methods)}")
    check_prompts(request)
    choices = tuple(sorted(set(request.bit_choices))) or DEFAULT_BIT_CHOICES
    for b in choices:
        if not limits.min_bits <= b <= limits.max_bits:
            raise ValueError(f"bit_choices: {b} is out of range [{limits.min_bits}, {limits.max_bits}]")
    target = request.target_avg_bits or DEFAULT_TARGET_BITS
    if not (math.isfinite(target) and choices[0] <= target <= choices[-1]):
        raise ValueError(f"target_avg_bits: must be within the bit choices [{choices[0]}, {choices[-1]}], got {target}")
    if request.beta and not (math.isfinite(request.beta) and request.beta > 1):
        raise ValueError(f"beta: must be greater than 1, got {request.beta}")
    mode = request.mode or MODES[0]
    if mode not in MODES:
        raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")
    return CalibrationPlan(method, list(request.prompts) or None, target, choices, request.beta or None, mode)


def calibration_steps(model, plan: CalibrationPlan):
    """Sensitivities on real activations, then the allocation for the target average, as a generator: each
    next() is one forward pass (the fp16 reference, then one per probed layer); returns the CalibrationResult.
    The shard drives it in its calibration worker process (service/calibration_worker.py)."""
    sensitivities = yield from quant.sensitivity_steps(
        model.model, model.tokenizer, prompts=plan.prompts, method=plan.method, mode=plan.mode, progress=False
    )
    if plan.beta is not None:
        beta = plan.beta
    else:
        _, beta = quant.fit_distortion_curve(plan.method, head_dim=model.shape["head_dim"])
    bits = quant.allocate_bits_ratequant(
        sensitivities, target_avg_bits=plan.target_avg_bits, beta=beta, bit_choices=plan.bit_choices
    )
    bits = [int(b) for b in bits]
    return CalibrationResult([float(w) for w in sensitivities], bits, sum(bits) / len(bits), float(beta))
