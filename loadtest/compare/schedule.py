"""Which of a comparison's servers are up together, so their steps can be interleaved round by round.

A target and the peers it is compared with (``report.VERSUS``; two front ends of one server) must
be up at the same time: their rounds are then minutes apart at most, and each server's start-up is
paid once for all its rounds.  ``--together all`` puts every target in one group; ``pairs`` makes one
group of each engine with its peers, run one group after the other; ``auto`` (the default) starts
from those groups and packs them, first fit in order, while their estimated memory fits in what
the machine has free, less a reserve for everything else on it.  The estimates are rough (base
memory by kind, the weights in the target's dtype, the KV caches as configured) and err high.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

GiB = 2**30
# Memory a server holds beside its weights, by label: the runtime, buffers, the KV cache.
BASE_BYTES = {
    "vllm": 3.0 * GiB,  # plus its --kv-cache-gb
    "vllm-openai": 3.0 * GiB,
    "vllm-openai-matched": 3.0 * GiB,
    "hf-cb": 2.2 * GiB,  # hf-cb's 1 GiB cache on a CPU
    "transformers-serve-matched": 2.2 * GiB,
    "transformers-serve-defaults": 2.2 * GiB,  # plus the cache it sizes itself
}
DEFAULT_BASE_BYTES = 1.0 * GiB
# The weights are held twice by transformers-based servers at load (checkpoint and converted).
WEIGHT_COPIES = 2


@dataclass
class Group:
    targets: list = field(default_factory=list)
    estimate_bytes: float = 0.0

    @property
    def labels(self) -> list[str]:
        return [t.label for t in self.targets]


def related(targets: Sequence, versus: Sequence[tuple[str, str, str]]) -> list[tuple[int, int]]:
    """Index pairs of targets that must be up together: compared pairs and shared servers."""
    where = {t.label: i for i, t in enumerate(targets)}
    pairs = [(where[a], where[b]) for a, b, _ in versus if a in where and b in where]
    for i, target in enumerate(targets):
        shared = getattr(target, "shares_with", None)
        if shared is not None and shared in targets:
            pairs.append((targets.index(shared), i))
    return pairs


def components(targets: Sequence, versus: Sequence[tuple[str, str, str]]) -> list[list[int]]:
    """Connected groups of ``related`` targets, in the order their first member comes."""
    parent = list(range(len(targets)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in related(targets, versus):
        parent[root(b)] = root(a)
    grouped: dict[int, list[int]] = {}
    for i in range(len(targets)):
        grouped.setdefault(root(i), []).append(i)
    return sorted(grouped.values(), key=lambda members: members[0])


def plan_groups(
    targets: Sequence,
    versus: Sequence[tuple[str, str, str]],
    mode: str,
    budget_bytes: float,
    estimate: Callable[[object], float],
) -> tuple[list[Group], str]:
    """The groups, each started together and interleaved, and a sentence for the report saying why."""
    if not targets:
        return [], "no targets"
    if mode == "all":
        group = Group(list(targets), sum(estimate(t) for t in targets))
        return [group], "all targets up together (--together all)"
    parts = [Group([targets[i] for i in c], sum(estimate(targets[i]) for i in c)) for c in components(targets, versus)]
    if mode == "pairs":
        return parts, "each engine up with the peers it is compared with, one group after another (--together pairs)"
    packed: list[Group] = []
    for part in parts:  # first fit: into the first group it fits beside, else a group of its own
        home = next((g for g in packed if g.estimate_bytes + part.estimate_bytes <= budget_bytes), None)
        if home is None:
            packed.append(part)
        else:
            home.targets += part.targets
            home.estimate_bytes += part.estimate_bytes
    total = sum(p.estimate_bytes for p in parts)
    if len(packed) == 1 and total <= budget_bytes:
        why = f"all targets up together: about {total / GiB:.1f} GiB, {budget_bytes / GiB:.1f} GiB to spare"
    elif len(packed) == 1:
        why = (
            f"all targets up together, since each is compared with another: about {total / GiB:.1f} GiB "
            f"estimated (transformers serve's default cache counted whole; it is capped at its start to what is "
            f"free), {budget_bytes / GiB:.1f} GiB free less a reserve for the rest of the machine"
        )
    else:
        why = (
            f"all targets together would take about {total / GiB:.1f} GiB, more than the {budget_bytes / GiB:.1f} GiB "
            f"free less a reserve for the rest of the machine: {len(packed)} groups, each engine with its peers, "
            "one group after another"
        )
    return packed, why


def memory_budget() -> float:
    """What the run may take: the memory free now, less the reserve the capped transformers-serve
    cache also leaves (loadtest/compare/targets/)."""
    import psutil

    from loadtest.compare.targets import MEMORY_RESERVE_BYTES, MEMORY_RESERVE_SHARE

    memory = psutil.virtual_memory()
    return max(0.0, memory.available - max(MEMORY_RESERVE_BYTES, MEMORY_RESERVE_SHARE * memory.total))


def target_estimate(params: float, kv_cache_gb: float, total_memory: float | None = None) -> Callable[[object], float]:
    """A target's estimated memory from the model's parameter count and the run's settings."""
    import psutil

    from loadtest.compare.targets import TRANSFORMERS_DEFAULT_MEMORY_SHARE

    total = psutil.virtual_memory().total if total_memory is None else total_memory

    def estimate(target) -> float:
        if getattr(target, "shares_with", None) is not None:
            return 0.0  # the other front end of a server counted already
        # Our targets by engine (hf-cb-http is hf-cb), the outside ones by label.
        kind = target.label if target.label in BASE_BYTES else getattr(target, "engine", target.label)
        dtype = getattr(target, "dtype", None) or target_dtype(target)
        weights = params * (2 if dtype in ("bfloat16", "float16") else 4)
        base = BASE_BYTES.get(kind, DEFAULT_BASE_BYTES)
        if kind in ("vllm", "vllm-openai", "vllm-openai-matched"):
            return base + kv_cache_gb * GiB + weights
        if kind == "transformers-serve-defaults":
            capped = _capped_share(getattr(target, "extra_args", []))
            return base + WEIGHT_COPIES * weights + (capped or TRANSFORMERS_DEFAULT_MEMORY_SHARE) * total
        return base + WEIGHT_COPIES * weights

    return estimate


def target_dtype(target) -> str:
    """Our server's dtype from its flags (``--dtype X``, the last one given, as yayi-serve takes it),
    float32 when auto on a CPU."""
    args = list(getattr(target, "server_args", []))
    value = "auto"
    for i, arg in enumerate(args):
        if arg == "--dtype" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--dtype="):
            value = arg.partition("=")[2]
    return "float32" if value == "auto" else value


def _capped_share(args: Sequence[str]) -> float | None:
    for i, arg in enumerate(args):
        if arg.startswith("--cb-max-memory-percent"):
            value = arg.partition("=")[2] or (args[i + 1] if i + 1 < len(args) else "")
            try:
                return float(value)
            except ValueError:
                return None
    return None
