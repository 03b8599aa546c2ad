"""What a block-diagonal key transform would cost `klt`'s pre-RoPE plans, by the plans' own cost model.

Keys coded before RoPE cannot be scored in the coded domain: every key is synthesised back (x = S ẑ, d × m
multiply-adds per key and KV head) before RoPE turns it, and on this CPU that synthesis is what keeps the
recommended configuration below mlx_lm's KVCache end to end (benchmarks/README.md, issue 9). A transform that is
block-diagonal over groups of coordinates (each block a few RoPE pairs) would cut the synthesis to Σ (block dims)²
per key: 4 blocks of 16 dims, a quarter. What it gives up is every correlation across blocks. This asks the
allocation's Gaussian model (the quantity plan_klt's greedy allocation minimises, Σ c·λ·δ(b)) what that costs: for
the shipped profile's keys, the energies of the query-weighted key moments decorrelated whole (the plans as built)
against decorrelated block by block (blocks of adjacent RoPE pairs, in the model's pair layout), values unchanged,
the same code bits in all; and how many more code bits per coordinate the block plans need to predict as little.
No model run.

    python benchmarks/block_synthesis.py [--profile smollm2-135m] [--budgets 2.3 3.3 4.3] [--blocks 2 4 8] [--out FILE]
"""

import argparse
import json
import os

import numpy as np

from kvshard.quant import load_profile
from kvshard.quant.calibrate import klt


def _blocks(d: int, count: int, traditional: bool) -> list[np.ndarray]:
    """Coordinates of `count` blocks of adjacent RoPE pairs: pairs (2i, 2i+1) when traditional, else (i, i + d/2)."""
    per = d // 2 // count
    if traditional:
        return [np.arange(2 * b * per, 2 * (b + 1) * per) for b in range(count)]
    return [np.r_[np.arange(b * per, (b + 1) * per), d // 2 + np.arange(b * per, (b + 1) * per)] for b in range(count)]


def _block_key_energies(moments: dict, blocks) -> np.ndarray:
    """(H, d) descending energies of the query-weighted key moments decorrelated block by block (each block's own
    metric: errors of different blocks are independent, so only the diagonal blocks of the query moment weigh
    them), with decompose's ridges."""
    query = klt._shrink(moments["query"], klt.QUERY_RIDGE)
    keys = klt._shrink(moments["keys"], klt.SHRINKAGE)
    heads = []
    for q, k in zip(query, keys):
        parts = []
        for block in blocks:
            metric = klt._sqrtm(q[np.ix_(block, block)])
            parts.append(np.maximum(np.linalg.eigvalsh(metric @ k[np.ix_(block, block)] @ metric), 0.0))
        heads.append(np.sort(np.concatenate(parts))[::-1])
    return np.stack(heads)


def _costs(profile, decomposed: list, blocks=None) -> list[np.ndarray]:
    """Per (layer, side) the (d,) costs c·λ plan_klt allocates over (keys' weights times the profile's key cost
    scale, as its plans use them): keys decorrelated whole (blocks None, the plans as built) or block by block."""
    costs = []
    for m, ((_, key_energy), (_, value_energy)), wk, wv in zip(profile.moments, decomposed, profile.key_weights,
                                                               profile.value_weights):
        key_cost, value_cost = klt.energy_costs(m, wk * profile.key_cost_scale, wv)
        if blocks is not None:
            key_energy = _block_key_energies(m, blocks)
        costs.append(key_cost * key_energy.sum(axis=0))
        costs.append(value_cost * value_energy.sum(axis=0))
    return costs


def _distortion(costs: list[np.ndarray], code_bits: float) -> tuple[float, float]:
    """(keys', values') predicted distortion Σ c·δ(b) of the allocation of code_bits per coordinate."""
    d = len(costs[0])
    bits = klt.allocate_coordinate_bits(costs, int(round(code_bits * d * len(costs))))
    delta = np.asarray(klt.GAUSSIAN_DISTORTION)
    per_side = [float(np.sum(c * delta[np.asarray(b)])) for c, b in zip(costs, bits)]
    return sum(per_side[0::2]), sum(per_side[1::2])


def _bits_to_match(costs: list[np.ndarray], target: float, low: float, high: float) -> float:
    """The code bits per coordinate at which these costs predict `target` (keys + values), by bisection."""
    for _ in range(24):
        middle = (low + high) / 2
        low, high = (middle, high) if sum(_distortion(costs, middle)) > target else (low, middle)
    return high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smollm2-135m")
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.3, 3.3, 4.3],
                        help="code bits per coordinate (the 2.5 / 3.5 / 4.5-bit budgets less scales and sinks)")
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--out", default="benchmarks/results/block_synthesis.json")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    d = profile.head_dim
    traditional = bool(profile.moments[0]["rope"][1])
    decomposed = [klt.decompose(m) for m in profile.moments]
    whole = _costs(profile, decomposed)
    blocked_costs = {count: _costs(profile, decomposed, _blocks(d, count, traditional)) for count in args.blocks}
    rows = []
    for budget in args.budgets:
        keys, values = _distortion(whole, budget)
        for count, blocked in blocked_costs.items():
            block_keys, block_values = _distortion(blocked, budget)
            row = {"code_bits": budget, "blocks": count, "block_dims": d // count,
                   "synthesis_multiply_adds_per_key": d * d // count, "whole_multiply_adds_per_key": d * d,
                   "key_distortion_ratio": block_keys / keys,
                   "total_distortion_ratio": (block_keys + block_values) / (keys + values),
                   "code_bits_to_match": _bits_to_match(blocked, keys + values, budget, budget + 1.0)}
            rows.append(row)
            print(f"{budget:.1f} code bits, {count} blocks of {d // count}: key distortion x{row['key_distortion_ratio']:.3f}, "
                  f"total x{row['total_distortion_ratio']:.3f}, same total at {row['code_bits_to_match']:.3f} code bits "
                  f"(+{row['code_bits_to_match'] - budget:.3f})", flush=True)
    result = {"profile": profile.name, "fingerprint": profile.fingerprint, "rope_traditional": traditional,
              "model": "plan_klt's Gaussian cost model (no model run)", "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
