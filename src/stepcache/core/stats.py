"""What a cached run did: decisions per step and site, model calls, multiply-accumulates, memory."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

KINDS = ("full", "partial", "reuse", "forecast")


@dataclass
class CacheStats:
    """Filled by the runtime during a run; read with ``handle.stats()``.

    ``decisions[i][site]`` is the number of tokens (per row) the site computed at step ``i``:
    all tokens for a full computation, 0 for a reuse or a forecast, k for a partial one. Sites are
    named ``"<layer>.<branch>"`` (e.g. ``"3.mlp"``); a span that was reused or forecast records each
    of its blocks' branches with 0. ``kinds[i][site]`` says which of :data:`KINDS` it was.

    Bytes moved (``moved[i] = [read, written]``, summed by step kind in :meth:`bytes_by_kind`) sit beside
    the MACs because the work a cache adds is memory-bound: it costs time that MACs do not show. The
    model counts whole tensors (``numel * element_size``) that the executor touches, per site:

    - a computed site's output kept in the cache: written once (the store);
    - a reused site's cached output: read once (by the gated residual add that consumes it);
    - a forecast (``Emit``): the site's history (every tensor in its slots) read, the output written;
    - a partial step: the cached (or forecast) base read as above, plus the scatter: the k fresh rows
      and their index read, the k rows written;
    - a span computed to refresh its residual: the block output and span input read, the residual written;
    - a history update (``observe`` changed the policy's slots): every tensor held before read, every
      tensor new or updated in place written (the site's output itself excluded: it is the store).

    Not counted: weights, the model's own activations and residual adds (the uncached model moves those
    too), and the adapter's gate multiplications. ``macs_fixed_skipped`` is the fixed per-block work
    (adaLN rows that only feed reused branches) an adapter skipped; it is neither executed nor policy work.
    """

    num_tokens: int = 0
    nfe: int = 0
    macs_executed: int = 0
    macs_uncached: int = 0
    macs_policy: int = 0  # work of the policy itself (forecast arithmetic, indicators), inside macs_executed
    peak_cache_bytes: int = 0
    macs_fixed_skipped: int = 0  # fixed work of executed blocks an adapter skipped (adaLN of reused branches)
    moved: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0]))  # i -> [bytes read, bytes written]
    wall_s: float | None = None  # from begin_run to end_run
    decisions: dict = field(default_factory=lambda: defaultdict(dict))
    kinds: dict = field(default_factory=lambda: defaultdict(dict))

    def record(self, i: int, site: str, tokens: int, macs: int, macs_full: int, kind: str | None = None) -> None:
        self.decisions[i][site] = tokens
        if kind is None:
            kind = "full" if tokens >= self.num_tokens else "reuse" if tokens == 0 else "partial"
        self.kinds[i][site] = kind
        self.macs_executed += macs
        self.macs_uncached += macs_full

    def add_fixed(self, macs: int) -> None:
        """Work done at every call whatever the policy (embeddings, adaLN, final layer)."""
        self.macs_executed += macs
        self.macs_uncached += macs

    def add_policy(self, macs: int) -> None:
        """Work the policy itself spent (a forecast, an indicator): executed, never part of the uncached run."""
        self.macs_executed += macs
        self.macs_policy += macs

    def add_skipped(self, macs: int) -> None:
        """Work of the uncached run that this run did not do outside any site (a skipped block's adaLN)."""
        self.macs_uncached += macs

    def add_unspent(self, macs: int) -> None:
        """Fixed work counted up front (``add_fixed``) that the model then skipped: it stays in the uncached
        total and leaves the executed one."""
        self.macs_executed -= macs
        self.macs_fixed_skipped += macs

    def add_bytes(self, i: int, read: int, written: int) -> None:
        """Bytes the executor moved at step ``i`` (see the model in the class docstring)."""
        cell = self.moved[i]
        cell[0] += read
        cell[1] += written

    def bytes_by_kind(self) -> dict[str, dict[str, int]]:
        """{"read": {kind: bytes}, "written": {kind: bytes}} summed over the steps of each step kind."""
        out = {"read": dict.fromkeys(KINDS, 0), "written": dict.fromkeys(KINDS, 0)}
        for i, (read, written) in self.moved.items():
            kind = self.step_kind(i)
            out["read"][kind] += read
            out["written"][kind] += written
        return out

    def note_memory(self, nbytes: int) -> None:
        self.peak_cache_bytes = max(self.peak_cache_bytes, nbytes)

    @property
    def ideal_speedup(self) -> float:
        return self.macs_uncached / self.macs_executed if self.macs_executed else 1.0

    @property
    def mac_ratio(self) -> float:
        """Executed over uncached work: 1.0 for no cache."""
        return self.macs_executed / self.macs_uncached if self.macs_uncached else 1.0

    def steps(self) -> list[int]:
        return sorted(self.decisions, reverse=True)

    def full_steps(self, branch: str | None = None) -> list[int]:
        """Steps (descending) at which every site (of ``branch``, if given) computed all tokens."""
        out = []
        for i in self.steps():
            sites = {s: k for s, k in self.decisions[i].items() if branch is None or s.endswith("." + branch)}
            if sites and all(k == self.num_tokens for k in sites.values()):
                out.append(i)
        return out

    def tokens(self, i: int, site: str) -> int:
        return self.decisions[i][site]

    def layer_tokens(self, branch: str = "mlp") -> dict[int, list[int]]:
        """Tokens computed per row by each layer's ``branch`` at each step: ``{i: [k_0, k_1, ...]}``."""
        table = {}
        for i in self.steps():
            per_layer = {int(s.split(".")[0]): k for s, k in self.decisions[i].items() if s.endswith("." + branch)}
            table[i] = [per_layer[l] for l in sorted(per_layer)]
        return table

    def share_computed(self, branch: str | None = None) -> float:
        """Token evaluations executed over uncached, over all steps and layers (of ``branch``)."""
        done = total = 0
        for per_site in self.decisions.values():
            for s, k in per_site.items():
                if branch is None or s.endswith("." + branch):
                    done += k
                    total += self.num_tokens
        return done / total if total else 1.0

    def step_kind(self, i: int) -> str:
        """One word for step i: full (every site computed), forecast / reuse (no site computed, the
        majority kind), else partial."""
        kinds = Counter(self.kinds[i].values())
        if not kinds:
            return "full"
        if set(kinds) == {"full"}:
            return "full"
        if kinds["full"] == 0 and kinds["partial"] == 0:
            return "forecast" if kinds["forecast"] >= kinds["reuse"] else "reuse"
        return "partial"

    def kind_counts(self) -> dict[str, int]:
        counts = Counter(self.step_kind(i) for i in self.steps())
        return {k: counts.get(k, 0) for k in KINDS}

    def branch_shares(self) -> dict[str, float]:
        """Share of token evaluations executed, per branch name."""
        names = sorted({s.split(".", 1)[1] for per in self.decisions.values() for s in per})
        return {n: self.share_computed(n) for n in names}

    def as_dict(self) -> dict:
        return {
            "nfe": self.nfe,
            "macs_executed": self.macs_executed,
            "macs_uncached": self.macs_uncached,
            "macs_policy": self.macs_policy,
            "ideal_speedup": self.ideal_speedup,
            "num_tokens": self.num_tokens,
            "peak_cache_bytes": self.peak_cache_bytes,
            "macs_fixed_skipped": self.macs_fixed_skipped,
            "bytes_read": self.bytes_by_kind()["read"],
            "bytes_written": self.bytes_by_kind()["written"],
            "wall_s": self.wall_s,
            "step_kinds": self.kind_counts(),
            "decisions": {str(i): dict(self.decisions[i]) for i in self.steps()},
        }

    def summary(self) -> str:
        return (f"{self.nfe} model calls, {format_macs(self.macs_executed)} of {format_macs(self.macs_uncached)} "
                f"executed (ideal speedup {self.ideal_speedup:.2f}x), cache {self.peak_cache_bytes / 2**20:.1f} MiB")

    def table(self, details: bool = False) -> str:
        """A table to tune with: step kinds, compute share per branch, MACs, memory (and per step)."""
        kinds = self.kind_counts()
        lines = [f"model calls        {self.nfe}",
                 "steps              " + ", ".join(f"{n} {k}" for k, n in kinds.items()),
                 f"MACs executed      {format_macs(self.macs_executed)} of {format_macs(self.macs_uncached)} "
                 f"({self.mac_ratio:.3f}; ideal speedup {self.ideal_speedup:.2f}x)"]
        if self.macs_policy:
            lines.append(f"  policy's own     {format_macs(self.macs_policy)} (forecasts, indicators)")
        if self.macs_fixed_skipped:
            lines.append(f"  adaLN skipped    {format_macs(self.macs_fixed_skipped)} "
                         "(rows feeding only reused branches)")
        moved = self.bytes_by_kind()
        parts = [f"{k} {format_bytes(moved['read'][k])} / {format_bytes(moved['written'][k])}"
                 for k in KINDS if kinds[k]]
        lines.append("bytes moved        read / written by step kind: " + ("; ".join(parts) or "none"))
        for name, share in self.branch_shares().items():
            lines.append(f"  {name:<16} {share:.3f} of its token evaluations")
        lines.append(f"cache memory       {self.peak_cache_bytes / 2**20:.2f} MiB (peak)")
        if self.wall_s is not None:
            lines.append(f"wall time          {self.wall_s:.2f} s")
        if details:
            lines.append("step   kind      tokens computed (share)   bytes read / written")
            for i in self.steps():
                share = sum(self.decisions[i].values()) / max(1, self.num_tokens * len(self.decisions[i]))
                read, written = self.moved.get(i, (0, 0))
                lines.append(f"{i:>4}   {self.step_kind(i):<9} {share:<25.3f} {format_bytes(read)} / "
                             f"{format_bytes(written)}")
        return "\n".join(lines)


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_macs(macs: int) -> str:
    for unit, scale in (("TMACs", 1e12), ("GMACs", 1e9), ("MMACs", 1e6), ("kMACs", 1e3)):
        if macs >= scale:
            return f"{macs / scale:.2f} {unit}"
    return f"{macs} MACs"
