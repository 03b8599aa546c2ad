"""The quality a profile measured when `kvshard calibrate` made it, as a committed result: ΔPPL per text and budget
against an fp16 cache (kvshard eval's chunked perplexity, chunk 256), with the effective bits really held.

    python benchmarks/profile_quality.py [--profile smollm2-135m] [--out benchmarks/results]
writes profile_quality.json and profile_quality.png. It reads the profile; it measures nothing itself.
"""

import argparse
import json
import os

from kvshard.quant import load_profile


def plot(rows: list, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    bits = [r["effective_bits"] for r in rows]
    for text in rows[0]["delta_ppl_pct"]:
        ax.plot(bits, [max(r["delta_ppl_pct"][text], 1e-2) for r in rows], marker=".", alpha=0.7, label=text)
    ax.plot(bits, [max(r["worst_delta_ppl_pct"], 1e-2) for r in rows], marker="o", color="black", label="worst text")
    targets = [(4.5, 1.0), (3.5, 2.5), (2.5, 8.0)]
    ax.scatter([b for b, _ in targets], [t for _, t in targets], marker="_", s=400, color="red", label="targets (issue 10)")
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per K/V element (bytes held)")
    ax.set_ylabel("ΔPPL % vs fp16 KV cache")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smollm2-135m")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    rows = profile.meta["measured"]
    report = {
        "profile": profile.name,
        "fingerprint": profile.fingerprint,
        "model_fingerprint": profile.model_fingerprint,
        "created": profile.meta.get("created"),
        "library_version": profile.meta.get("library_version"),
        "machine": profile.meta.get("machine", "this project's 2-core x86 CPU (MLX CPU, OpenBLAS preloaded)"),
        "commands": profile.meta.get("commands"),
        "calibration_texts": profile.meta.get("calibration_texts"),
        "window_tokens": profile.window,
        "sink_tokens": profile.meta.get("sink_tokens"),
        "recommended_bits": profile.recommended_bits,
        "measured": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile_quality.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot(rows, os.path.join(args.out, "profile_quality.png"),
         f"profile {profile.name}: chunked PPL, {rows[0]['tokens']} tokens × {len(rows[0]['delta_ppl_pct'])} texts")
    for row in rows:
        print(f"<= {row['budget_bits']} bits: {row['effective_bits']:.3f} held, mean {row['mean_delta_ppl_pct']:+.2f}%, "
              f"worst {row['worst_delta_ppl_pct']:+.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
