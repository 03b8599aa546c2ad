"""What a per-head bit allocation would buy over the per-layer one that `klt` plans use, by the plans' own cost model.

plan_klt (quant/calibrate/klt.py) gives every KV head of a layer the same coordinate bits: a token's codes then have
one layout per layer, which the cache, the packing and the kernels rely on. A per-head allocation would let a head
whose energy sits in fewer directions give bits to another. Building it means a layout per head everywhere, so this
first asks the allocation's own Gaussian model what it could buy: the predicted distortion Σ c·λ·δ(b) (the quantity
the greedy allocation minimises) of the per-layer plan against a per-head plan with the same total bits, and the code
bits the per-layer plan would need to predict as little as the per-head one does.

    python benchmarks/per_head_allocation.py [--profile smollm2-135m] [--budgets 2.0 2.5 3.5 4.5] [--out FILE]
"""

import argparse
import json
import os

import numpy as np

from kvshard.quant import load_profile
from kvshard.quant.calibrate.klt import GAUSSIAN_DISTORTION, allocate_coordinate_bits, energy_costs


def head_costs(profile, probe_bits: int = 2) -> list[np.ndarray]:
    """Per (layer, side): (H, d) costs c·λ of every head's coordinates, as plan_klt weighs them."""
    costs = []
    for m, ((_, key_energy), (_, value_energy)), wk, wv in zip(
        profile.moments, profile._decomposed, profile.key_weights, profile.value_weights
    ):
        key_cost, value_cost = energy_costs(m, wk, wv, probe_bits)
        costs.append(key_cost * key_energy)
        costs.append(value_cost * value_energy)
    return costs


def distortion(costs: list[np.ndarray], bits: list) -> float:
    delta = np.asarray(GAUSSIAN_DISTORTION)
    return float(sum((c * delta[np.asarray(b)]).sum() for c, b in zip(costs, bits)))


def per_layer(costs, code_bits: float):
    """Distortion of the per-layer plan with `code_bits` per coordinate (one bit vector shared by a layer's heads)."""
    slots = [c.sum(axis=0) for c in costs]
    d = costs[0].shape[1]
    bits = allocate_coordinate_bits(slots, int(round(code_bits * d * len(slots))))
    return distortion(costs, [np.broadcast_to(b, c.shape) for b, c in zip(bits, costs)])


def per_head(costs, code_bits: float):
    slots = [row for c in costs for row in c]
    d = costs[0].shape[1]
    bits = allocate_coordinate_bits(slots, int(round(code_bits * d * len(slots))))
    heads = costs[0].shape[0]
    return distortion(costs, [np.stack(bits[i * heads : (i + 1) * heads]) for i in range(len(costs))])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smollm2-135m")
    parser.add_argument("--budgets", nargs="+", type=float, default=[2.0, 2.5, 3.5, 4.5])
    parser.add_argument("--out", default="benchmarks/results/per_head_allocation.json")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    costs = head_costs(profile)
    rows = []
    for budget in args.budgets:
        code_bits = _code_bits(profile, budget)
        shared, headwise = per_layer(costs, code_bits), per_head(costs, code_bits)
        # The per-layer code bits that predict as little distortion as the per-head plan (bisection; 1/64-bit steps).
        low, high = code_bits, code_bits + 1.0
        for _ in range(12):
            middle = (low + high) / 2
            low, high = (middle, high) if per_layer(costs, middle) > headwise else (low, middle)
        rows.append({"budget_bits": budget, "code_bits": round(code_bits, 4), "per_layer_distortion": shared,
                     "per_head_distortion": headwise, "distortion_ratio": headwise / shared,
                     "per_layer_code_bits_for_the_same": round(high, 4), "bits_saved": round(high - code_bits, 4)})
        print(f"<= {budget} bits ({code_bits:.3f} code bits): per-head / per-layer predicted distortion "
              f"{headwise / shared:.3f}, worth {high - code_bits:.3f} code bits")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"profile": profile.name, "fingerprint": profile.fingerprint, "model": "Gaussian (plan_klt's)",
                   "rows": rows}, f, indent=2)
    return 0


def _code_bits(profile, budget: float) -> float:
    """Code bits per coordinate of a coded token that Profile.config plans at `budget` with no window."""
    plans = profile.config(budget, window=0)
    return float(np.mean([p.coordinate_bits for p in plans.key_plans + plans.value_plans]))


if __name__ == "__main__":
    raise SystemExit(main())
