"""What a cached run did: decisions per step and site, model calls, and multiply-accumulates."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class CacheStats:
    """Filled by the runtime during a run; read with ``handle.stats()``.

    ``decisions[i][site]`` is the number of tokens (per row) the site computed at step ``i``:
    all tokens for a full computation, 0 for a reuse, k for a partial one. Sites are named
    ``"<layer>.<branch>"`` (e.g. ``"3.mlp"``).
    """

    num_tokens: int = 0
    nfe: int = 0
    macs_executed: int = 0
    macs_uncached: int = 0
    decisions: dict = field(default_factory=lambda: defaultdict(dict))

    def record(self, i: int, site: str, tokens: int, macs: int, macs_full: int) -> None:
        self.decisions[i][site] = tokens
        self.macs_executed += macs
        self.macs_uncached += macs_full

    def add_fixed(self, macs: int) -> None:
        """Work done at every call whatever the policy (embeddings, adaLN, final layer)."""
        self.macs_executed += macs
        self.macs_uncached += macs

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

    def as_dict(self) -> dict:
        return {
            "nfe": self.nfe,
            "macs_executed": self.macs_executed,
            "macs_uncached": self.macs_uncached,
            "ideal_speedup": self.ideal_speedup,
            "num_tokens": self.num_tokens,
            "decisions": {str(i): dict(self.decisions[i]) for i in self.steps()},
        }

    def summary(self) -> str:
        return (f"{self.nfe} model calls, {self.macs_executed / 1e9:.2f} of {self.macs_uncached / 1e9:.2f} GMACs "
                f"executed (ideal speedup {self.ideal_speedup:.2f}x)")
