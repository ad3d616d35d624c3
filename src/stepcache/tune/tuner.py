"""``stepcache.tune.tune``: search every registered policy for a target, prove the winners on held-out seeds.

1. Candidates: every registered method times its ``search_space()`` (:mod:`stepcache.tune.space`).
2. Compute first: one unguided sample per candidate gives its executed MACs; a speed target drops the
   candidates below it (with slack, the proxy being unguided) before any quality sampling.
3. Successive halving on calibration seeds (:mod:`stepcache.tune.search`) for quality (PSNR / SSIM vs
   the uncached images of the same seeds; the digit judge's accuracy and FD on digits).
4. The best ``finalists`` and any ``compare`` specs (hand-picked settings) are sampled on held-out
   seeds, and timed against the uncached run in interleaved rounds (median of per-round ratios).
5. The choice is made on calibration figures only; held-out figures are reported beside them (the
   held-out gap), never used to choose.
Every measurement is a record in ``out_dir/tune_records.jsonl``; a killed tune re-run with the same
arguments redoes nothing it had finished.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

from stepcache.bench.methods import build_policy, parse_spec, policy_key_dict
from stepcache.bench.records import config_key
from stepcache.core.policy import NoCache
from stepcache.errors import ConfigError, StepcacheError
from stepcache.policy_file import model_identity
from stepcache.tune.evaluate import Evaluator, RunSpec, figures
from stepcache.tune.records import RECORDS_NAME, RecordStore
from stepcache.tune.search import Target, halving, seed_chunks
from stepcache.tune.space import Candidate, enumerate_candidates

BASES = ("ideal", "measured")
MEASURED_ATTEMPTS = 3  # searches at raised ideal targets until a finalist meets a measured-speedup target
PROXY_SLACK = 0.85  # a speed target prunes on the proxy only below this share of it (the proxy is unguided)


@dataclass(frozen=True)
class TuneOptions:
    target: Target
    calibration_seeds: int = 16
    held_out_seeds: int = 16
    seed: int = 0             # calibration seeds seed.., held-out seeds right after them
    first_chunk: int = 2      # seeds of rung 0 (the compute proxy) and rung 1
    eta: int = 3
    keep: int = 3
    finalists: int = 3
    timing_repeats: int = 3
    timing_seeds: int = 16    # the first held-out seeds, timed as one batch
    speedup_basis: str = "ideal"
    methods: tuple | None = None
    compare: tuple = ()       # hand-picked specs ("fora:interval=3") measured beside the finalists
    progress: bool = True

    def validate(self) -> None:
        if self.calibration_seeds < 1 or self.held_out_seeds < 1:
            raise ConfigError("A tune needs at least 1 calibration and 1 held-out seed.")
        if self.finalists < 1 or self.timing_repeats < 0:
            raise ConfigError(f"finalists must be >= 1 and timing repeats >= 0, got {self.finalists} and "
                              f"{self.timing_repeats}.")
        if self.speedup_basis not in BASES:
            raise ConfigError(f"speedup basis must be one of {', '.join(BASES)}, got {self.speedup_basis!r}.")
        if self.speedup_basis == "measured" and self.timing_repeats < 1:
            raise ConfigError("A measured speedup basis needs at least one timing round.")


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


class Tuner:
    """The state of one tune: model, records, references; see the module docstring for the steps."""

    def __init__(self, model, model_name: str, run: RunSpec, options: TuneOptions, out_dir, judge: bool,
                 log=print, jobs=None):
        """``model``: a native model, or a diffusers pipeline with ``jobs`` (its prompts, a
        :class:`~stepcache.tune.pipeline_eval.PipelineJobs`); the rest of the tune is the same."""
        options.validate()
        self.model, self.run, self.opts, self.judge, self.log = model, run, options, judge, log
        self.jobs = jobs
        self.identity = model_identity(model, model_name)
        header = {"model": self.identity, "run": asdict(run), "judge": judge}
        if jobs is not None:
            header["prompts"] = jobs.header()
        self.store = RecordStore(out_dir / RECORDS_NAME, header)
        if jobs is None:
            self.evaluator = Evaluator(model, run, judge, out_dir, fingerprint=config_key(header))
        else:
            from stepcache.tune.pipeline_eval import PipelineEvaluator

            self.evaluator = PipelineEvaluator(model, jobs, run, out_dir, fingerprint=config_key(header))
        n, s = options.calibration_seeds, options.seed
        self.calibration = list(range(s, s + n))
        self.held_out = tuple(range(s + n, s + n + options.held_out_seeds))
        self.timed = self.held_out[:max(1, options.timing_seeds)]
        self.chunks = seed_chunks(self.calibration, options.first_chunk)
        self.num_classes = model.config.num_classes if judge else None  # the judge checks label = seed mod classes
        self.new_runs = 0

    # ------------------------------------------------------------------ measurements (records)
    def record(self, cand: Candidate, chunk) -> dict:
        """The eval record of ``cand`` on ``chunk``: from the store, else sampled now and appended."""
        key = config_key({"policy": cand.key, "seeds": list(chunk)})
        rec = self.store.get(key)
        if rec is None:
            rec = {"kind": "eval", "key": key, "policy_key": cand.key, "label": cand.label, "seeds": list(chunk)}
            try:
                rec.update(self.evaluator.measure(cand.policy, chunk))
            except StepcacheError as exc:  # the policy refused this model or run: one sentence, kept
                rec["error"] = str(exc)
            self.new_runs += 1
            self.store.add(rec)
        return rec

    def compute_proxy(self, cands) -> dict:
        """{candidate key: compute record} from one unguided sample of the first calibration seed."""
        out, seed = {}, self.calibration[0]
        with _bar(len(cands), "tune compute proxy", self.opts.progress) as bar:
            for c in cands:
                key = config_key({"compute": c.key, "seed": seed})
                rec = self.store.get(key)
                if rec is None:
                    rec = {"kind": "compute", "key": key, "policy_key": c.key, "label": c.label}
                    try:
                        rec.update(self.evaluator.compute(c.policy, seed))
                    except StepcacheError as exc:
                        rec["error"] = str(exc)
                    self.new_runs += 1
                    self.store.add(rec)
                out[c.key] = rec
                bar.update()
        return out

    def prune_by_compute(self, cands, target: Target) -> tuple[list, dict]:
        """The candidates worth sampling for quality, and {key: proxy ideal speedup} of those that ran."""
        recs = self.compute_proxy(cands)
        speed = {k: r["macs_uncached"] / r["macs_executed"] for k, r in recs.items() if "error" not in r}
        ok = [c for c in cands if c.key in speed]
        if target.kind == "speedup":
            fast = [c for c in ok if speed[c.key] >= PROXY_SLACK * target.value]
            self.log(f"tune: compute proxy: {len(ok)} of {len(cands)} candidates run here, {len(fast)} reach "
                     f"{PROXY_SLACK:g} x {target.value:g}x ideal speedup")
            if ok and not fast:
                best = max(ok, key=lambda c: speed[c.key])
                raise ConfigError(f"No policy in the search space meets the target ({target.describe()}); the "
                                  f"fastest is {best.label} with {speed[best.key]:.2f}x ideal speedup.")
            ok = fast
        return ok, speed

    def measure_rung(self, cands, chunk, r: int) -> dict:
        out = {}
        with _bar(len(cands), f"tune rung {r} ({len(chunk)} seeds)", self.opts.progress) as bar:
            for c in cands:
                out[c.key] = self.record(c, chunk)
                bar.update()
        return out

    def pooled(self, cand: Candidate, chunks) -> "figures":
        recs = [self.record(cand, ch) for ch in chunks]
        labels = [s % self.num_classes for ch in chunks for s in ch] if self.judge else None
        return figures(recs, labels, fd=self.judge)

    def timing(self, cands) -> dict:
        """{candidate key: median over rounds of (uncached s / policy s)} on the first held-out seeds;
        rounds interleave the uncached run with every policy, so a drifting machine hits all alike."""
        n = self.opts.timing_repeats
        keys = {c.key: config_key({"timing": c.key, "seeds": list(self.timed), "repeats": n}) for c in cands}
        todo = [c for c in cands if self.store.get(keys[c.key]) is None]
        if todo and n:
            self.evaluator.sample(NoCache(), self.timed[:1])  # warm-up
            ratios = {c.key: [] for c in todo}
            with _bar(n * (len(todo) + 1), "tune timing", self.opts.progress) as bar:
                for _ in range(n):
                    base = self._time(NoCache())
                    bar.update()
                    for c in todo:
                        ratios[c.key].append(base / self._time(c.policy))
                        bar.update()
            for c in todo:
                self.store.add({"kind": "timing", "key": keys[c.key], "label": c.label, "ratios": ratios[c.key]})
        return {c.key: statistics.median(self.store.get(keys[c.key])["ratios"]) for c in cands if n}

    def _time(self, policy) -> float:
        """Seconds of one run; the images come back to the CPU at its end, so CUDA work is waited for."""
        t0 = time.perf_counter()
        self.evaluator.sample(policy, self.timed)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ the tune
    def compare_candidates(self) -> list[Candidate]:
        out = []
        for spec in self.opts.compare:
            policy = build_policy(spec, self.run.num_steps, self.run.sampler, self.identity["name"] == "embedded")
            params = tuple(parse_spec(spec)[1].items())
            out.append(Candidate(policy.method, params, policy, config_key(policy_key_dict(policy))))
        return out

    def search(self, cands, target: Target) -> tuple[list, list, dict]:
        """(pool after the compute proxy, survivors ranked best first, {key: figures}) for ``target``."""
        pool, self.proxy_speed = self.prune_by_compute(cands, target)
        if not pool:
            raise ConfigError("Every candidate policy refused this model or run; nothing to tune.")
        alive, seen = halving(pool, self.measure_rung, self.pooled, self.chunks, target, self.opts.eta,
                              self.opts.keep, self.log)
        if not alive:
            raise ConfigError(self._nothing_feasible(seen, cands, target))
        return pool, alive, seen

    def tune(self) -> dict:
        opts, target = self.opts, self.opts.target
        cands = enumerate_candidates(self.run.num_steps, self.run.sampler, self.identity["name"] == "embedded",
                                     opts.methods, self.log)
        if not cands:
            raise ConfigError("No registered policy can run on this model and sampler; nothing to tune.")
        self.log(f"tune: {len(cands)} candidates from {len({c.method for c in cands})} methods; "
                 f"{len(self.store)} records already in {self.store.path}")
        compares = self.compare_candidates()
        searched, found, sampled, earlier = target, None, {}, []
        for attempt in range(MEASURED_ATTEMPTS):
            try:
                pool, alive, seen = self.search(cands, searched)
            except ConfigError:
                if found is None:
                    raise
                break  # a raised ideal target nobody meets: keep the last search
            sampled.update((c.key, c) for c in pool)
            finalists = alive[:opts.finalists]
            checked = finalists + [c for c in compares if c.key not in {f.key for f in finalists}]
            speed = self.timing(checked)
            rows = [self._row(c, speed, c in compares, searched) for c in checked]
            if found is not None:
                earlier += found[1][:found[2]]
            found = (seen, rows, len(finalists), searched)
            raised = self._raised_target(rows[:len(finalists)], searched)
            if raised is None:
                break
            self.log(f"tune: no finalist reaches {target.value:g}x measured; searching again at {raised:.2f}x ideal")
            searched = Target("speedup", round(raised, 2))
        seen, rows, n_final, searched = found
        chosen, why = self._choose(rows[:n_final], searched)
        ordered, shown = rows[:n_final] + earlier + rows[n_final:], set()
        rows = [r for r in ordered if not (r["candidate"].key in shown or shown.add(r["candidate"].key))]
        proxy = {k: self.pooled(c, self.chunks[:1]) for k, c in sampled.items()
                 if "error" not in self.record(c, self.chunks[0])}
        refused = sum(k not in self.proxy_speed for k in (c.key for c in cands))
        return {"target": target, "basis": opts.speedup_basis, "searched_target": searched, "candidates": cands,
                "refused": refused,
                "compute_only": len(cands) - refused - len(sampled), "chosen": chosen, "why": why, "rows": rows,
                "proxy": proxy, "hand_proxy": {c.key: self.pooled(c, self.chunks[:1]) for c in compares},
                "proxy_seeds": len(self.chunks[0]), "seen": seen, "errors": self._errors(cands),
                "new_runs": self.new_runs, "reference_runs": self.evaluator.reference_runs,
                "resumed_records": self.store.resumed, "calibration_seeds": self.calibration,
                "held_out_seeds": list(self.held_out)}

    def _row(self, cand: Candidate, speed: dict, hand_picked: bool, searched: Target) -> dict:
        calib = self.pooled(cand, self.chunks)
        held = figures([self.record(cand, self.held_out)],
                       [s % self.num_classes for s in self.held_out] if self.judge else None, fd=self.judge)
        return {"candidate": cand, "hand_picked": hand_picked, "searched": searched, "calibration": calib,
                "held_out": held,
                "measured_speedup": speed.get(cand.key), "gap_db": calib.psnr - held.psnr}

    def _measured_basis(self) -> bool:
        return self.opts.target.kind == "speedup" and self.opts.speedup_basis == "measured"

    def _raised_target(self, finalists: list[dict], searched: Target) -> float | None:
        """Under a measured-speedup target that no finalist met: the ideal speedup to search for next,
        the target divided by the best finalist's measured / ideal ratio (its overheads); else None."""
        goal = self.opts.target.value
        if not self._measured_basis() or any(r["measured_speedup"] >= goal for r in finalists):
            return None
        best = finalists[0]
        efficiency = best["measured_speedup"] / best["held_out"].ideal_speedup
        return max(goal / efficiency, searched.value * 1.1)

    def _choose(self, finalists: list[dict], searched: Target) -> tuple[dict, str]:
        best, goal = finalists[0], self.opts.target.value
        why = f"{searched.describe()} on {len(self.calibration)} calibration seeds (ideal speedup = MACs ratio)"
        if not self._measured_basis():
            return best, why
        ok = [r for r in finalists if r["measured_speedup"] >= goal]
        if not ok:
            return best, f"{why}; no finalist reached {goal:g}x measured speedup, so the best of the search is kept"
        return ok[0], (f"best calibration PSNR among the finalists with >= {goal:g}x measured speedup (searched at "
                       f">= {searched.value:.2f}x ideal)")

    def _nothing_feasible(self, seen: dict, cands, target: Target) -> str:
        if not seen:
            return "Every candidate policy refused this model or run; nothing to tune."
        key = {"speedup": lambda f: f.ideal_speedup, "psnr": lambda f: f.psnr,
               "fd": lambda f: -(f.frechet_distance or 0.0)}[target.kind]
        best_key = max(seen, key=lambda k: key(seen[k]))
        label = next(c.label for c in cands if c.key == best_key)
        f = seen[best_key]
        return (f"No policy in the search space meets the target ({target.describe()}); the closest is {label} "
                f"with {f.ideal_speedup:.2f}x ideal speedup and {f.psnr:.1f} dB.")

    def _errors(self, cands) -> dict:
        out = {}
        for c in cands:
            rec = self.store.get(config_key({"compute": c.key, "seed": self.calibration[0]}))
            if rec is not None and "error" in rec:
                out.setdefault(c.method, rec["error"])
        return out


def tune(model, model_name: str, run: RunSpec, options: TuneOptions, out_dir, judge: bool = False,
         log=print, jobs=None) -> dict:
    """Run a tune (of a diffusers pipeline when ``jobs`` holds its prompts); the result dict is what
    :mod:`stepcache.tune.report` writes out."""
    from pathlib import Path

    return Tuner(model, model_name, run, options, Path(out_dir), judge, log, jobs).tune()
