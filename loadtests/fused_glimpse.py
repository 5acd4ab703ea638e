"""How often the fused glimpse routes a step differently from the separate glimpse (the reference).

    python -m loadtests.fused_glimpse [--prompts 8] [--url http://127.0.0.1:8000] [--key KEY]

Against a running cluster: every prompt is sent twice, greedy and with every step on the small pool (tau
above ln 20, so every step is glimpsed), once with separate glimpses and once with ``fused_glimpse``. Greedy
steps are the same in both runs, so step k has the same prompt: the separate run's entropy of step k is the
reference, the fused run's is the fused glimpse's (taken on the next prompt as the pool tokenizes it). Prints, for
several tau, how many steps the two would route differently; compares steps up to the first that differs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import httpx

from cluster.config import load_config
from cluster.ops.problems import problems

TAUS = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0]


def steps_of(client: httpx.Client, model: str, prompt: str, budget: int, fused: bool) -> list[dict]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0.0,
        "seed": 0,
        "policy": "glimprouter",
        "tau": 10.0,
        "fused_glimpse": fused,
        "token_budget": budget,
    }
    response = client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    return (client.get(f"/v1/requests/{response.json()['id']}")).json()["steps"]


def paired_entropies(separate: list[dict], fused: list[dict]) -> list[tuple[float, float]]:
    """(reference, fused) entropy of each step that took a fused glimpse, up to the first differing step."""
    pairs = []
    for ref, got in zip(separate, fused, strict=False):
        if got["glimpse_fused"]:
            pairs.append((ref["entropy"], got["entropy"]))
        if ref["text"] != got["text"]:
            break
    return pairs


def disagreement(pairs: list[tuple[float, float]], tau: float) -> float:
    """Share of steps the two glimpses send to different pools at ``tau``."""
    return sum((ref >= tau) != (got >= tau) for ref, got in pairs) / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="local")
    parser.add_argument("--url")
    parser.add_argument("--key", help="API key (default: GLIMP_API_KEY, else run/demo.key)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--budget", type=int, default=256, help="thinking tokens per request")
    parser.add_argument("--out", help="write the pairs and the table as JSON here")
    args = parser.parse_args()
    cfg = load_config(args.config)
    key = args.key or os.environ.get("GLIMP_API_KEY") or (Path("run") / "demo.key").read_text().strip()
    base = args.url or f"http://{cfg.router.host}:{cfg.router.port}"
    pairs, steps = [], 0
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=1800) as client:
        for i, prompt in enumerate(problems(args.prompts)):
            separate, fused = (steps_of(client, cfg.name, prompt, args.budget, f) for f in (False, True))
            steps += len(fused)
            pairs += paired_entropies(separate, fused)
            print(
                f"[fused] {i + 1}/{args.prompts} prompts, {len(pairs)} fused glimpses of {steps} steps",
                file=sys.stderr,
                flush=True,
            )
    gap = sum(abs(r - g) for r, g in pairs) / len(pairs)
    print(f"{len(pairs)} of {steps} steps took a fused glimpse; mean |entropy difference| {gap:.3f} nats")
    print(f"{'tau':>5} {'routed differently':>19}")
    table = {tau: disagreement(pairs, tau) for tau in TAUS}
    for tau, share in table.items():
        print(f"{tau:>5.2f} {share:>19.1%}")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"steps": steps, "pairs": pairs, "mean_abs_gap": gap, "disagreement": table}, indent=1)
        )


if __name__ == "__main__":
    main()
