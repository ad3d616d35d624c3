"""Lean reuse steps: measured over ideal speedup of FORA(3), TaylorSeer(4, 2) and Forecast(scope="branches")
on DiT-S/2 geometry (random weights, adaLN re-randomised), DDPM-50, CPU; optionally before / after a change.

"After" is the tree this script sits in; "before" (``--before-src``, optional) any earlier stepcache source
tree (e.g. the commit before the lean work, unpacked with ``git archive <commit> src | tar -x -C
/tmp/lean-before``). Each tree runs in its own worker process (same model, noise and seeds). Rounds are
interleaved and ABBA-ordered: in every round each worker times its uncached run, every policy, every policy
again in reverse order, and the uncached run again, so a drift of the machine's speed within a round
cancels; the measured speedup of a round is that worker's total uncached time over its total policy time.
Reported: the median over rounds of measured / ideal (ideal = uncached MACs / executed MACs of that code),
and, with a before tree, whether the two trees' outputs are bit-identical.

    .venv/bin/python benchmarks/bench_lean.py --rounds 5 --threads 1 --policies "fora(3)" \\
        --out benchmarks/results/lean_abba.json
    git archive 6849edb src | (mkdir -p /tmp/lean-before && tar -x -C /tmp/lean-before)
    .venv/bin/python benchmarks/bench_lean.py --before-src /tmp/lean-before/src --rounds 5 \\
        --out benchmarks/results/lean.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

POLICIES = {"none": {"method": "none"},
            "fora(3)": {"method": "fora", "interval": 3},
            "fora(3),fused": {"method": "fora", "interval": 3, "lean": "fused"},  # handle.lean = "fused"
            "taylorseer(4,2)": {"method": "taylorseer", "interval": 4, "order": 2},
            "forecast(branches,K=17,o=2)": {"method": "forecast", "num_full": 17, "power": 0.7, "order": 2,
                                            "scope": "branches"}}
HERE = Path(__file__).resolve()


# ----------------------------------------------------------------------------------------- worker
def worker(threads: int, steps: int, sampler: str) -> None:
    """Serve timing requests on stdin (one policy name per line), one JSON line per answer on stdout."""
    import torch

    import stepcache
    from stepcache.cli.common import randomize_
    from stepcache.core.policy import PolicyConfig

    torch.set_num_threads(threads)
    model = stepcache.DiT.from_preset("DiT-S/2", input_size=32)
    randomize_(model, 0)  # every weight, adaLN and the final layer included
    model.eval()
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([207, 360])
    print(json.dumps({"ready": stepcache.__file__}), flush=True)
    for line in sys.stdin:
        name, n = line.split()
        config = dict(POLICIES[name])
        lean = config.pop("lean", True)
        policy = PolicyConfig.from_dict(config)
        torch.manual_seed(1)
        start, cpu = time.perf_counter(), time.process_time()
        if lean is True:
            out, stats = stepcache.sample(model, z, y, int(n), sampler, 1.5, policy, return_stats=True)
        else:  # the handle's lean mode: applied here, sampled under it
            with stepcache.apply(model, policy) as handle:
                handle.lean = lean
                out = stepcache.sample(model, z, y, int(n), sampler, 1.5)
                stats = handle.stats()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        d = stats.as_dict()
        d.pop("decisions", None)
        print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "stats": d,
                          "sha256": hashlib.sha256(out.contiguous().numpy().tobytes()).hexdigest()}), flush=True)


class Worker:
    def __init__(self, src: Path, args):
        env = dict(os.environ, PYTHONPATH=str(src))
        self.proc = subprocess.Popen([sys.executable, str(HERE), "--worker", "--threads", str(args.threads),
                                      "--steps", str(args.steps), "--sampler", args.sampler],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.module = json.loads(self.proc.stdout.readline())["ready"]

    def run(self, name: str, steps: int) -> dict:
        self.proc.stdin.write(f"{name} {steps}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# ----------------------------------------------------------------------------------------- driver
def load_average() -> list[float]:
    return list(os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before-src", type=Path, required=False)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--policies", nargs="+", default=[p for p in POLICIES if p != "none"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/lean.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--markdown", type=Path, help="only rewrite the markdown table of this JSON record")
    args = ap.parse_args()
    if args.markdown:
        record = json.loads(args.markdown.read_text())
        return args.markdown.with_suffix(".md").write_text(markdown(record))
    if args.worker:
        return worker(args.threads, args.steps, args.sampler)
    trees = {"after": HERE.parents[1] / "src"}
    if args.before_src is not None:
        trees = {"before": args.before_src.resolve(), **trees}
    workers = {k: Worker(src, args) for k, src in trees.items()}
    names = ["none", *args.policies]
    for w in workers.values():  # warm-up: every policy once, short
        for name in names:
            w.run(name, 6)
    load = [load_average()]
    runs = {k: {n: [] for n in names} for k in workers}  # per round: the two runs of the ABBA order
    for r in range(args.rounds):
        pairs = {k: {n: [] for n in names} for k in workers}
        for name in names + names[::-1]:  # A B C ... C B A
            for k, w in workers.items():
                pairs[k][name].append(w.run(name, args.steps))
                print(f"  {k:6s} {name:28s} {pairs[k][name][-1]['seconds']:.2f} s", file=sys.stderr, flush=True)
        for k in workers:
            for name, (first, second) in pairs[k].items():
                runs[k][name].append({**second, "seconds": first["seconds"] + second["seconds"],
                                      "cpu_seconds": first["cpu_seconds"] + second["cpu_seconds"],
                                      "sha_same": first["sha256"] == second["sha256"]})
        load.append(load_average())
        print(f"round {r + 1}/{args.rounds} done, load {load[-1][0]:.2f}", flush=True)
    for w in workers.values():
        w.close()

    rows = []
    for name in args.policies:
        row = {"policy": name, "config": POLICIES[name]}
        for k in workers:
            base, mine = runs[k]["none"], runs[k][name]
            ideal = mine[-1]["stats"]["ideal_speedup"]
            ratios = [b["seconds"] / m["seconds"] / ideal for b, m in zip(base, mine)]
            cpu = [b["cpu_seconds"] / m["cpu_seconds"] / ideal for b, m in zip(base, mine) if "cpu_seconds" in m]
            row[k] = {"ideal_speedup": ideal, "measured_over_ideal_median": statistics.median(ratios),
                      "cpu_time_over_ideal_median": statistics.median(cpu) if cpu else None,
                      "cpu_time_over_ideal_rounds": cpu,
                      "measured_over_ideal_rounds": ratios,
                      "measured_speedup_median": statistics.median(b["seconds"] / m["seconds"]
                                                                   for b, m in zip(base, mine)),
                      "uncached_s": [b["seconds"] for b in base], "cached_s": [m["seconds"] for m in mine],
                      "stats": {key: v for key, v in mine[-1]["stats"].items() if key != "decisions"}}
        row["repeat_runs_identical"] = all(m["sha_same"] for k in workers for m in runs[k][name])
        if "before" in workers:
            row["bit_identical_outputs"] = runs["before"][name][-1]["sha256"] == runs["after"][name][-1]["sha256"]
        rows.append(row)
        print(f"{name:28s} " + ", ".join(f"measured/ideal {k} {row[k]['measured_over_ideal_median']:.3f}"
                                         for k in workers) +
              f" (ideal {row['after']['ideal_speedup']:.2f}x); outputs bit-identical before/after: "
              f"{row.get('bit_identical_outputs', '-')}")
    uncached_same = (runs["before"]["none"][-1]["sha256"] == runs["after"]["none"][-1]["sha256"]
                     if "before" in workers else None)
    from stepcache.bench.records import environment

    record = {"benchmark": "lean", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "model": "DiT-S/2 geometry (random weights, adaLN re-randomised), "
              "256 tokens, 2 labels x CFG (4 rows)", "sampler": f"{args.sampler}-{args.steps}",
              "threads": args.threads, "environment": environment(), "load_average_1_5_15": load,
              "trees": {k: w.module for k, w in workers.items()}, "uncached_bit_identical": uncached_same,
              "order": "abba",
              "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    args.out.with_suffix(".md").write_text(markdown(record))


def markdown(record: dict) -> str:
    """The result table of a record, with its conditions (records with or without a before tree)."""
    load = record["load_average_1_5_15"]
    before = "before" in record["results"][0]
    abba = record.get("order") == "abba"
    lines = [f"# Lean reuse steps{': before / after' if before else ''} ({record['date']})", "",
             f"`{record['command']}`", "",
             (f"{record['model']}, {record['sampler']}, CFG 1.5, {record['threads']} torch threads, "
              f"{len(record['results'][0]['after']['measured_over_ideal_rounds'])} interleaved rounds"
              f"{' (ABBA: each run twice per round, in mirrored order)' if abba else ''}; "
              f"machine: {record['environment'].get('cpu', '?')} ({record['environment'].get('cpu_count', '?')} "
              f"cores, shared), load average (1 min) at the start {load[0][0]:.2f}, after each round "
              f"{', '.join(f'{x[0]:.2f}' for x in load[1:])}."
              + (f" Outputs before and after bit-identical (uncached: {record['uncached_bit_identical']})."
                 if before else "")), ""]
    if before:
        lines += [("| policy | ideal before | ideal after | measured/ideal before (median) | after (median) | "
                   "per round, after (before) | outputs identical |"), "|---|---|---|---|---|---|---|"]
    else:
        lines += ["| policy | ideal speedup | measured speedup (median) | measured/ideal (median) | per round | "
                  "in CPU time (median) |", "|---|---|---|---|---|---|"]
    for row in record["results"]:
        a = row["after"]
        rounds = ", ".join(f"{r:.3f}" for r in a["measured_over_ideal_rounds"])
        if not before:
            lines.append(f"| {row['policy']} | {a['ideal_speedup']:.3f}x | {a['measured_speedup_median']:.3f}x | "
                         f"**{a['measured_over_ideal_median']:.3f}** | {rounds} | "
                         f"{a['cpu_time_over_ideal_median']:.3f} |")
            continue
        b = row["before"]
        rounds += " (before: " + ", ".join(f"{r:.3f}" for r in b["measured_over_ideal_rounds"]) + ")"
        if a.get("cpu_time_over_ideal_median") is not None:
            rounds += (f"; in CPU time: after {a['cpu_time_over_ideal_median']:.3f}, "
                       f"before {b['cpu_time_over_ideal_median']:.3f} (medians)")
        lines.append(f"| {row['policy']} | {b['ideal_speedup']:.3f}x | {a['ideal_speedup']:.3f}x | "
                     f"{b['measured_over_ideal_median']:.3f} | {a['measured_over_ideal_median']:.3f} | {rounds} | "
                     f"{row['bit_identical_outputs']} |")
    lines += ["", "Bytes moved per run, after (read / written, by step kind):", ""]
    for row in record["results"]:
        st = row["after"]["stats"]
        parts = [f"{k} {st['bytes_read'][k] / 2**20:.1f} / {st['bytes_written'][k] / 2**20:.1f} MiB"
                 for k in st["bytes_read"] if st["bytes_read"][k] or st["bytes_written"][k]]
        lines.append(f"- {row['policy']}: " + "; ".join(parts) +
                     f"; adaLN skipped {st['macs_fixed_skipped'] / 1e9:.2f} GMACs")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
