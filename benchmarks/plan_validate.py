"""Predicted against measured: ``plait plan``'s step time and memory per rank beside short real runs.

One scenario per call (a model, ranks, a batch): measure the profile here (``plait plan --profile``),
predict every candidate, then train each candidate named in ``--candidates`` (and every scenario's pick) for ``--steps`` steps
with ``plait train`` (median step after the first; peak RSS of the largest rank) and print a
markdown table with the errors, and whether the pick was the measured fastest (or within 5%).

    python benchmarks/plan_validate.py --model gpt-tiny --nproc 2 --global-batch 32 --micro-batch 8 \
        --candidates ddp,zero1,zero2,zero3,tp,pp --out runs/plan_validate/tiny.json

``--memory-pass`` measures memory a second time with glibc's mmap threshold pinned (a profile and
one short run per candidate), so that peak RSS follows the live tensors the model counts (on a GPU
the allocator's peak does); the step times stay those of glibc's default, which users run.
``--replay`` measures nothing and judges a saved ``--out`` again with the current cost model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from plait.launch import LaunchConfig
from plait.plan.measure import measure_profile
from plait.plan.planner import make_plan, measure_candidate
from plait.plan.profile import Profile, load
from plait.plan.workload import workload_for

PORT = 29541
PINNED = "131072"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt-tiny")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each candidate; the fastest is kept")
    parser.add_argument(
        "--caps-gb",
        default="",
        help="memory caps (model states, GB) to re-plan under: more scenarios, same runs",
    )
    parser.add_argument(
        "--candidates", default="ddp,zero1,zero2,zero3,tp,pp", help="labels as plait plan prints them"
    )
    parser.add_argument("--hosts", type=int, default=1, help="emulated hosts (plait.testing.hosts; root)")
    parser.add_argument("--rate", default="1gbit", help="with --hosts: tc rate of each host's link")
    parser.add_argument(
        "--burst",
        default="1mb",
        help="with --hosts: tbf's bucket, what a host may send at veth speed after an idle moment "
        "(a real link has none to speak of)",
    )
    parser.add_argument(
        "--memory-pass",
        action="store_true",
        help="measure memory in a second pass (its own profile, one run per candidate) with glibc's mmap "
        "threshold pinned, so that peak RSS follows live tensors as the model counts them",
    )
    parser.add_argument("--out", default="runs/plan_validate/result.json")
    parser.add_argument(
        "--replay",
        action="store_true",
        help="measure nothing: judge --out's saved runs and profiles again with the current cost model",
    )
    args = parser.parse_args()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.replay:
        replay(args, out)
    elif args.hosts > 1:
        from plait.testing.hosts import Hosts

        with Hosts(args.hosts, rate=args.rate, burst=args.burst) as hosts:
            validate(args, out, OnHosts(hosts, args.nproc))
    else:
        validate(args, out, None)


class OnHosts:
    """One job over emulated hosts (``plait.testing.hosts``): a launcher per host, gloo on the shaped link."""

    def __init__(self, hosts, nproc: int) -> None:
        self.hosts, self.nproc, self.jobs = hosts, nproc, 0
        root = Path(__file__).resolve().parents[1]
        self.env = {**os.environ, "PYTHONPATH": str(root), "GLOO_SOCKET_IFNAME": "eth0"}

    def rendezvous(self) -> list[str]:
        """Launcher flags of a new job: every host's torchrun meets on host a."""
        self.jobs += 1
        return ["--nnodes", str(len(self.hosts)), "--rdzv-endpoint", self.hosts.endpoint(PORT + self.jobs),
                "--rdzv-id", f"plan-validate-{os.getpid()}-{self.jobs}"]  # fmt: skip

    def run(self, argv: list[str]) -> tuple[int, str]:
        jobs = [
            self.hosts.popen(i, argv, self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for i in range(len(self.hosts))
        ]
        try:
            errors = [job.communicate(timeout=400)[1] for job in jobs]
        except subprocess.TimeoutExpired as timeout:  # a hung job: end it and say what its ranks printed
            for host in self.hosts:
                host.kill()
            errors = [job.communicate()[1][-3000:] for job in jobs]
            raise SystemExit(f"a job on the hosts ran over 400 s: {argv}\n" + "\n".join(errors)) from timeout
        return next((job.returncode for job in jobs if job.returncode), 0), "\n".join(errors)

    def profile(self, model: str, micro_batch: int, path: str) -> Profile:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(self.nproc),
                "--rdzv-backend", "c10d", *self.rendezvous(), "-m", "plait.plan", model, str(micro_batch), path]  # fmt: skip
        code, errors = self.run(argv)
        if code != 0:
            raise SystemExit(f"measuring the profile on the hosts failed:\n{errors[-3000:]}")
        return load(path)


def validate(args: argparse.Namespace, out: Path, on_hosts: OnHosts | None) -> None:
    def measured_profile(suffix: str) -> Profile:
        path = str(out.with_suffix(suffix))
        if on_hosts is None:
            return measure_profile(args.model, args.micro_batch, LaunchConfig(nproc=args.nproc), path)
        return on_hosts.profile(args.model, args.micro_batch, path)

    profile = measured_profile(".profile.json")
    workload = workload_for(args.model, args.global_batch, args.micro_batch)
    world = args.nproc * args.hosts

    def measure(candidate, steps: int = args.steps) -> dict:
        if on_hosts is None:
            return measure_candidate(candidate, args.model, args.nproc, workload, steps, [])
        return measure_candidate(
            candidate, args.model, args.nproc, workload, steps, on_hosts.rendezvous(), on_hosts.run
        )

    plans = {cap: make_plan(workload, profile, world, args.hosts, cap) for cap in _caps(args)}
    # every scenario's pick is measured too, whether or not --candidates names it
    wanted = set(args.candidates.split(",")) | {plan.pick.candidate.label for plan in plans.values()}
    chosen = [p.candidate for p in plans[None].predictions if p.candidate.label in wanted]
    runs: dict[str, list[dict]] = {c.label: [] for c in chosen}
    for round_ in range(args.rounds):  # in turn, the order reversed each round: a disturbed slice of
        # the machine hits one run of a candidate, and its fastest run is kept
        for candidate in chosen if round_ % 2 == 0 else chosen[::-1]:
            runs[candidate.label].append(measure(candidate))
    pinned, live = None, {}
    if args.memory_pass:
        # glibc keeps freed multi-MB blocks resident unless its mmap threshold is pinned (FACTS.md);
        # pinned, every large allocation faults fresh pages, so steps are slower: times come from the
        # first pass, memory from this one, against a profile whose base was measured the same way
        os.environ["MALLOC_MMAP_THRESHOLD_"] = PINNED
        if on_hosts is not None:
            on_hosts.env["MALLOC_MMAP_THRESHOLD_"] = PINNED
        pinned = measured_profile(".pinned.profile.json")
        live = {c.label: measure(c, min(args.steps, 4))["measured_mem_gb"] for c in chosen}
    report(args, out, profile, pinned, {c.label: (runs[c.label], live.get(c.label)) for c in chosen})


def _caps(args: argparse.Namespace) -> list[float | None]:
    return [None, *(float(c) for c in filter(None, args.caps_gb.split(",")))]


def replay(args: argparse.Namespace, out: Path) -> None:
    """The same measurements (``--out``'s JSON and profiles) judged again by the current cost model."""
    result = json.loads(out.read_text())
    if not all("runs" in r for r in result.get("rows", [])):
        raise SystemExit(f"{out} holds no runs to replay: it was written before --replay existed")
    for key in ("model", "nproc", "hosts", "rate", "global_batch", "micro_batch", "caps_gb"):
        setattr(args, key, result[key])
    args.burst = result.get("burst", "1mb")
    pinned_path = out.with_suffix(".pinned.profile.json")
    pinned = load(pinned_path) if pinned_path.exists() else None
    measured = {
        r["strategy"]: (r["runs"], r["measured_mem_gb"] if r.get("malloc_mmap_threshold") else None)
        for r in result["rows"]
    }
    report(args, out, load(out.with_suffix(".profile.json")), pinned, measured)


def report(
    args: argparse.Namespace,
    out: Path,
    profile: Profile,
    pinned: Profile | None,
    measured: dict[str, tuple[list[dict], float | None]],
) -> None:
    """Predictions beside ``measured`` (label: its runs, and its peak RSS with the threshold pinned);
    writes ``out`` and prints the markdown table and the picks."""
    workload = workload_for(args.model, args.global_batch, args.micro_batch)
    world = args.nproc * args.hosts
    plans = {cap: make_plan(workload, profile, world, args.hosts, cap) for cap in _caps(args)}
    by_label = {p.candidate.label: p for p in plans[None].predictions}
    if pinned is not None:
        memory_of = {p.candidate.label: p for p in make_plan(workload, pinned, world, args.hosts).predictions}
    else:
        memory_of = by_label
    rows = []
    for label, (runs, live_mem) in measured.items():
        p = by_label[label]
        fastest = min(runs, key=lambda m: m["measured_step_s"])
        rows.append(
            {
                "strategy": label,
                "predicted_step_s": p.step_s,
                "measured_step_s": fastest["measured_step_s"],
                "predicted_mem_gb": memory_of[label].mem_bytes / 1e9,
                "measured_mem_gb": fastest["measured_mem_gb"] if live_mem is None else live_mem,
                "measured_mem_gb_default_malloc": fastest["measured_mem_gb"],
                "malloc_mmap_threshold": PINNED if live_mem is not None else None,
                "predicted_model_state_gb": p.model_state_bytes / 1e9,
                "measured_model_state_gb": fastest["measured_model_state_gb"],
                "predicted_comm_s": p.exposed_comm_s,
                "measured_comm_s": fastest["measured_comm_s"],
                "predicted_compute_s": p.compute_s + p.optimizer_s,
                "predicted_activation_gb": memory_of[label].activation_bytes / 1e9,
                "predicted_buffer_gb": memory_of[label].buffer_bytes / 1e9,
                "measured_step_s_runs": [m["measured_step_s"] for m in runs],
                "runs": runs,
                "exact": p.candidate.exact,
                "pick": p is plans[None].pick,
            }
        )
    scenarios = []
    for cap, capped in plans.items():
        # the pick is made among the exact candidates (lossy compression is never picked): it is
        # judged against the fastest of those that fit
        fitting = [r for r in rows if r["exact"] and (cap is None or r["measured_model_state_gb"] <= cap)]
        fastest = min(fitting, key=lambda r: r["measured_step_s"])
        pick = next((r for r in rows if r["strategy"] == capped.pick.candidate.label), None)
        scenarios.append(
            {
                "mem_cap_gb": cap,
                "pick": capped.pick.candidate.label,
                "measured_fastest": fastest["strategy"],
                "pick_within_5pct": pick is not None
                and pick["measured_step_s"] <= 1.05 * fastest["measured_step_s"],
            }
        )
    result = {
        "model": args.model,
        "nproc": args.nproc,
        "hosts": args.hosts,
        "rate": args.rate if args.hosts > 1 else None,
        "burst": args.burst if args.hosts > 1 else None,
        "global_batch": args.global_batch,
        "micro_batch": args.micro_batch,
        "caps_gb": args.caps_gb,
        "rows": rows,
        "scenarios": scenarios,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    memory_pass = pinned is not None
    memory = "peak RSS, mmap threshold pinned" if memory_pass else "measured peak RSS"
    print(
        f"| {args.model}, {args.hosts} x {args.nproc} ranks{f' at {args.rate} (tbf burst {args.burst})' if args.hosts > 1 else ''}, B={args.global_batch}, b={args.micro_batch} | predicted step | measured step | error | predicted mem | {memory} | error |"
        + (" peak RSS, glibc's default |" if memory_pass else "")
    )
    print("|---|---|---|---|---|---|---|" + ("---|" if memory_pass else ""))
    errors, mem_errors = [], []
    for r in sorted(rows, key=lambda r: r["predicted_step_s"]):
        step_error = r["predicted_step_s"] / r["measured_step_s"] - 1
        mem_error = r["predicted_mem_gb"] / r["measured_mem_gb"] - 1
        errors.append(abs(step_error))
        mem_errors.append(abs(mem_error))
        print(
            f"| {r['strategy']}{' (pick)' if r['pick'] else ''} | {r['predicted_step_s'] * 1e3:,.0f} ms | "
            f"{r['measured_step_s'] * 1e3:,.0f} ms | {step_error:+.0%} | {r['predicted_mem_gb'] * 1e3:,.0f} MB | "
            f"{r['measured_mem_gb'] * 1e3:,.0f} MB | {mem_error:+.0%} |"
            + (f" {r['measured_mem_gb_default_malloc'] * 1e3:,.0f} MB |" if memory_pass else "")
        )
    print(
        f"median |step error| {statistics.median(errors):.0%}, max {max(errors):.0%}; "
        f"memory within 10% in {sum(e <= 0.10 for e in mem_errors)} of {len(mem_errors)}"
    )
    for sc in scenarios:
        print(
            f"cap {sc['mem_cap_gb']} GB: pick {sc['pick']}, measured fastest {sc['measured_fastest']}, "
            f"pick within 5%: {sc['pick_within_5pct']}"
        )


if __name__ == "__main__":
    main()
