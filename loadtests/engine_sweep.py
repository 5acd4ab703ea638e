"""Engine cost profiles: one vLLM engine's iteration time against its batch, in process, alone or beside the other
pool's engine busy on the same GPU.

    python -m loadtests.gpu_models models/bench          # once, before the processes start
    python -m loadtests.engine_sweep run --model small --phases small:sweep,large:sweep,small:sweep+busy \\
        --sync /tmp/sweep --out results/gpu/sweep-small.json &
    python -m loadtests.engine_sweep run --model large --phases small:sweep,large:sweep,small:sweep+busy \\
        --sync /tmp/sweep --out results/gpu/sweep-large.json &
    wait; python -m loadtests.engine_sweep merge results/gpu/sweep-*.json --out engine-sweep.json

Each ``run`` process holds one engine of the GPU benchmark's pool (``cluster/configs/gpu-bench.yaml``, random
weights, the pool's engine settings; the KV cache and the chunked-prefill budget set for the sweep) with its
engine core in the process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), and times the core's own loop (schedule,
run, update; vLLM's async scheduling as the pools have it). Both processes walk the same ``--phases``; in each,
``MODEL:WHAT`` says which engine works and ``+busy`` that the other keeps a steady load meanwhile (``BUSY``),
else it idles. Phases meet through files in ``--sync``. What a phase does (``WHAT``):

- ``sweep``: for each context length, ``--decode-seqs`` requests with prompts of that length decode; with each
  number of them (largest first, the rest aborted), one request of ``--prefill`` fresh tokens (on the first
  prompt, cached) joins every iteration; the mean interval between the core's outputs is the row's iteration
  time. Rows the KV cache cannot hold are left out.
- ``levers``: the small pool's step-path variants (``LEVERS``) at one batch: sampling, log-probs, glimpses.
- ``profile``: the torch profiler over iterations of the pool's typical load (``BUSY``): GPU kernel time
  against the iteration, by kernel and by vLLM's scopes (``trace_summary``).
Results go to ``--out`` after every phase.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

from cluster.config import load_config
from cluster.pool_config import PoolSettings
from loadtests.engine_driver import GLIMPSE_TOKENS, STEP, Driver, Engine, Load
from loadtests.gpu_bench.layouts import parse_override, with_overrides
from loadtests.gpu_models import build_model, build_tokenizer

MODELS = {"small": "qwen2.5-1.5b", "large": "qwen2.5-14b"}
SWEEP_ENGINE = {  # the sweep's own engine settings: room for the largest rows, both engines on one GPU
    "small": {"kv_cache_gib": 14, "gpu_memory_utilization": 0.15, "max_num_batched_tokens": 4096},
    "large": {"kv_cache_gib": 64, "gpu_memory_utilization": 0.72, "max_num_batched_tokens": 4096},
}
BUSY = {  # each pool's load in the one-GPU system: the small one glimpses and steps, the large one prefills steps
    "small": Load(32, 1500, prefill=GLIMPSE_TOKENS, every=2, arrival={"temperature": 0.0, "logprobs": 20}),
    "large": Load(48, 1500, prefill=768, every=6),
}
LEVERS = {  # the small pool's step path at one batch, each against the one before or the first
    "decode_greedy": Load(32, 1500, decode={"temperature": 0.0}),
    "decode_step_sampling": Load(32, 1500),
    "decode_step_sampling_logprobs20": Load(32, 1500, decode={**STEP, "logprobs": 20}),
    "glimpse_lp20_every2": BUSY["small"],
    "glimpse_plain_every2": Load(32, 1500, prefill=GLIMPSE_TOKENS, every=2),
    "glimpse_lp20_every1": Load(
        32, 1500, prefill=GLIMPSE_TOKENS, every=1, arrival={"temperature": 0.0, "logprobs": 20}
    ),
}


class Sync:
    """Files in one folder through which the processes meet: ``<name>`` exists once it happened."""

    def __init__(self, folder: Path, poll_s: float = 0.05):
        self.folder, self.poll_s = folder, poll_s
        folder.mkdir(parents=True, exist_ok=True)

    def mark(self, name: str) -> None:
        (self.folder / name).touch()

    def seen(self, name: str) -> bool:
        return (self.folder / name).exists()

    def wait(self, names: list[str], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not all(self.seen(n) for n in names):
            if time.monotonic() > deadline:
                return False
            time.sleep(self.poll_s)
        return True


def parse_phases(text: str) -> list[tuple[str, str, bool]]:
    """``small:sweep,large:profile+busy`` -> [("small", "sweep", False), ("large", "profile", True)]."""
    phases = []
    for item in text.split(","):
        model, _, what = item.partition(":")
        what, busy = what.removesuffix("+busy"), what.endswith("+busy")
        if model not in MODELS or what not in ("sweep", "levers", "profile"):
            raise argparse.ArgumentTypeError(
                f"bad phase {item!r}: MODEL:WHAT[+busy], MODEL in {list(MODELS)}, WHAT in sweep, levers, profile"
            )
        phases.append((model, what, busy))
    return phases


def sweep_pool(model: str, overrides: dict) -> PoolSettings:
    """The GPU benchmark's pool ``model`` with the sweep's engine settings, then ``{dotted.path: value}``
    overrides of the whole config."""
    data = load_config("gpu-bench").model_dump(mode="json", exclude_none=True)
    data["pools"][model]["engine"].update(SWEEP_ENGINE[model])
    return getattr(with_overrides(data, overrides, "engine_sweep").pools, model)


def start_engine(model: str, pool: PoolSettings, models: Path) -> Engine:
    from cluster.topology import engine_env
    from deployments.pool import engine_args

    os.environ.update({**engine_env(pool), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    root = models.resolve()
    source = pool.model.model_copy(
        update={"path": str(build_model(root, MODELS[model])), "tokenizer": str(build_tokenizer(root))}
    )
    return Engine(LLMEngine.from_engine_args(EngineArgs(**engine_args(pool.model_copy(update={"model": source})))))


def run(args) -> None:
    sync, me = Sync(args.sync), args.model
    pool = sweep_pool(me, dict(args.set))
    t0 = time.monotonic()
    engine = start_engine(me, pool, args.models)
    result = {
        "model": MODELS[me],
        "role": me,
        "engine": pool.engine.model_dump(mode="json", exclude_none=True),
        "overrides": dict(args.set),
        "environment": environment(engine),
        "start_s": round(time.monotonic() - t0, 1),
        "rows": [],
        "levers": {},
        "profiles": {},
        "busy": [],
        "errors": [],
    }
    print(f"[{me}] engine ready in {result['start_s']} s: {result['environment']}", flush=True)
    sync.mark(f"ready.{me}")
    if not sync.wait([f"ready.{m}" for m in {p[0] for p in args.phases}], args.timeout):
        print(f"[{me}] the other engine did not start; going on alone", flush=True)
    driver = Driver(engine, random.Random(list(MODELS).index(me)))
    for index, (model, what, busy) in enumerate(args.phases):
        phase = f"{index}.{model}.{what}{'+busy' if busy else ''}"
        t1 = time.monotonic()
        try:
            if model == me:
                if busy and not sync.wait([f"{phase}.busy"], args.timeout):
                    raise RuntimeError("the other engine did not get busy")
                work(driver, result, what, busy, args)
            elif busy:
                done, busy_now = f"{phase}.done", f"{phase}.busy"
                figures = driver.busy(BUSY[me], lambda n=done: sync.seen(n), lambda n=busy_now: sync.mark(n))
                result["busy"].append({"phase": phase, "load": BUSY[me].__dict__, **figures})
            else:
                sync.wait([f"{phase}.done"], args.timeout)
        except Exception as exc:
            traceback.print_exc()
            result["errors"].append(f"{phase}: {exc!r}")
        finally:
            if model == me:
                sync.mark(f"{phase}.done")
        print(f"[{me}] phase {phase} took {time.monotonic() - t1:.1f} s", flush=True)
        save(args.out, result)
    sys.stdout.flush()
    os._exit(0)  # the engine's teardown costs seconds the run does not need


def work(driver: Driver, result: dict, what: str, busy: bool, args) -> None:
    if what == "sweep":
        rows = driver.sweep(args.decode_seqs, args.prefill, args.contexts, args.iterations)
        result["rows"] += [{"model": result["model"], "shared": busy, **row} for row in rows]
        for row in rows:
            print(f"[{args.model}] shared={busy} {row}", flush=True)
    elif what == "levers":
        figures = {}
        for name, load in LEVERS.items():
            figures[name] = {"load": load.__dict__, **driver.steady(load, args.lever_iterations)}
            print(f"[{args.model}] lever {name} shared={busy}: {figures[name]}", flush=True)
        result["levers"]["shared" if busy else "alone"] = figures
    else:
        from loadtests.trace_summary import profiled

        load = BUSY[args.model]
        plain = driver.steady(load, args.lever_iterations)
        trace = args.trace_dir / f"trace-{args.model}-{'shared' if busy else 'alone'}.json"
        summary = profiled(driver, load, args.profile_iterations, trace)
        result["profiles"]["shared" if busy else "alone"] = {"load": load.__dict__, "unprofiled": plain, **summary}
        print(f"[{args.model}] profile shared={busy}: {json.dumps(result['profiles'])}", flush=True)


def environment(engine: Engine) -> dict:
    import torch
    import vllm

    return {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "async_scheduling": engine.async_scheduling,
        "kv_capacity_tokens": engine.capacity_tokens,
        "max_num_batched_tokens": engine.core.vllm_config.scheduler_config.max_num_batched_tokens,
        "mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")),
        "mps_active_thread_percentage": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
    }


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def merge(args) -> None:
    """One profile file from the processes' results: hardware, versions, settings, and every sweep row, each
    tagged with whether CUDA MPS was on and with ``source``, the name of its result file's folder (one start of
    the pair)."""
    parts = [{**json.loads(Path(p).read_text()), "source": Path(p).parent.name} for p in args.files]
    env = parts[0]["environment"]
    out = {
        "hardware": args.hardware,
        "versions": {"vllm": env["vllm"], "torch": env["torch"], "gpu": env["gpu"]},
        "settings": {
            "weights": "random (load_format dummy), bf16",
            "measured": "the in-process engine core's loop "
            "(schedule, run, update; no output processing): mean interval between its outputs",
            "shared": "true: the other pool's engine on the same GPU kept its typical load meanwhile",
            "busy_loads": {role: load.__dict__ for role, load in BUSY.items()},
            "prefill_rows": "one request of prefill_tokens fresh tokens on a cached prompt of "
            "context_tokens joins every iteration; its admission (input processing, "
            "block hashing) runs in the timed loop",
            **{p["role"]: {"model": p["model"], "engine": p["engine"]} for p in reversed(parts)},
            "sources": {p["source"]: {} for p in parts},
        },
        "rows": [
            {**row, "mps": bool(p["environment"].get("mps")), "source": p["source"]} for p in parts for row in p["rows"]
        ],
    }
    for p in parts:
        out["settings"]["sources"][p["source"]][p["role"]] = p["environment"]
    save(args.out, out)
    print(f"wrote {args.out}: {len(out['rows'])} rows", flush=True)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="one engine's process")
    r.add_argument("--model", choices=list(MODELS), required=True)
    r.add_argument("--phases", type=parse_phases, required=True, help="MODEL:WHAT[+busy],... (the same in both)")
    r.add_argument("--sync", type=Path, required=True, help="a folder both processes see")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--models", type=Path, default=Path("models/bench"))
    r.add_argument("--trace-dir", type=Path, default=Path("results/gpu"))
    r.add_argument("--decode-seqs", type=int_list, default=[1, 8, 16, 32, 64, 128])
    r.add_argument("--prefill", type=int_list, default=[0, 256, 1024, 2048])
    r.add_argument("--contexts", type=int_list, default=[500, 2000, 4000])
    r.add_argument("--iterations", type=int, default=12, help="timed iterations per sweep row")
    r.add_argument("--lever-iterations", type=int, default=200)
    r.add_argument("--profile-iterations", type=int, default=30)
    r.add_argument("--timeout", type=float, default=420.0, help="seconds to wait for the other process")
    r.add_argument("--set", type=parse_override, action="append", default=[], metavar="PATH=VALUE")
    m = sub.add_parser("merge", help="the processes' results as one profile file")
    m.add_argument("files", nargs="+")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--hardware", default="one H200 141GB")
    args = parser.parse_args(argv)
    run(args) if args.command == "run" else merge(args)


if __name__ == "__main__":
    main()
