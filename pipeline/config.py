"""Small shared types: the configuration every layer may read (entry points build it, operations
and the flow's steps pass it down), and its checks. Imports nothing of the pipeline but its
errors.

Names in problems are the configuration's keys (`components`, `svd_route`, `task_memory`, ...):
a job config's own, a CLI flag with `--` and dashes (`spell=cli_flag`)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from pipeline.errors import PipelineError

Method = Literal["auto", "flat", "aligned", "joint"]
SvdRoute = Literal["auto", "gram", "covariance", "svd", "randomized"]
QuantizeScheme = Literal["int8", "nf4"]
Operation = Literal["project", "rebase"]
METHODS: tuple[str, ...] = get_args(Method)
SVD_ROUTES: tuple[str, ...] = get_args(SvdRoute)
QUANTIZE_SCHEMES: tuple[str, ...] = get_args(QuantizeScheme)
OPERATIONS: tuple[str, ...] = get_args(Operation)
DEFAULT_TASK_MEMORY = 1 << 30
# The delta-W error bound of compress when none is given (`--max-error none`: no bound). On the
# trained benchmark's adapters every one with an error up to 0.944 kept at least 0.97 of its
# accuracy and the first to lose more had 0.946 (docs/benchmarks.md): a margin of 1.5x under that
# (0.63), rounded down, leaves room for tasks that are harder to keep than those.
DEFAULT_MAX_ERROR: float | None = 0.6
NO_BOUND = math.inf  # `--max-error none`: no bound, whatever the store recorded

Spell = Callable[[str], str]
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.I)


def cli_flag(key: str) -> str:
    """A configuration key as the CLI spells it: `svd_route` -> `--svd-route`."""
    return "--" + key.replace("_", "-")


def parse_size(text: str | int) -> int:
    """'512MiB', '2G', '1000' (or an int) -> bytes (powers of 1024); ValueError below one byte."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 512MiB, 2GiB)")
    unit = (match[2] or "B").upper()[0]
    size = int(float(match[1]) * 1024 ** "BKMGT".index(unit))
    if size < 1:
        raise ValueError(f"must be at least 1 byte, got {text!r}")
    return size


@dataclass(frozen=True)
class ComponentRule:
    """How many components each module keeps: an explicit count, or the fewest explaining
    `variance_threshold` of the variance, per module (`adaptive`) or once for all (vlora's rule:
    decided on the first module's lora_A, then used everywhere)."""

    components: int | None = None
    variance_threshold: float = 0.6
    adaptive: bool = False

    @property
    def needs_first_module(self) -> bool:
        return self.components is None and not self.adaptive

    def limits(self, fixed_k: int | None) -> tuple[int | None, float | None]:
        """(k, threshold) for one module side, given the collection-wide k if decided."""
        if self.components is not None:
            return self.components, None
        if self.adaptive or fixed_k is None:
            return None, self.variance_threshold
        return fixed_k, None


@dataclass(frozen=True)
class Options:
    """Every knob of compress, project and rebase. The fit's part (`rule`, `route`, `quantize`,
    `method`, `ratio`, `budget_bytes`) is stored in each version's manifest, and project and
    rebase take it from there (pipeline.io.format.read_parameters); the rest is the run's own."""

    rule: ComponentRule = ComponentRule()
    task_memory: int = DEFAULT_TASK_MEMORY  # bytes of stacked factors per shard task (not the storage budget)
    strict: bool = False  # fail on any quarantined adapter
    route: SvdRoute = "auto"
    # The relative delta-W error bound of every exported module (residuals where the shared bases
    # miss it); None: not given (project and rebase keep the store's), NO_BOUND: none.
    max_error: float | None = None
    quantize: QuantizeScheme | None = None  # bases stored packed (linalg.quantize)
    # flat (vlora's) | aligned (one gauge first) | joint (shared U, V) | auto: flat, or with a budget the better
    method: Method = "auto"
    # The storage budget: bases and loadings (float32 values) at most the adapters' tensor bytes / ratio,
    ratio: float | None = None
    budget_bytes: int | None = None  # or given in bytes (turned into a ratio of the collection's)
    # Groups of adapters by delta-W similarity, each with its own bases per module: a number, "auto"
    # (chosen for the budget and bound), or None: one basis per module for the whole collection.
    clusters: int | str | None = None

    @property
    def bound(self) -> float | None:
        """The error bound in force: None when there is none."""
        return None if self.max_error is None or self.max_error == NO_BOUND else self.max_error

    @property
    def budgeted(self) -> bool:
        return bool(self.ratio or self.budget_bytes)

    def problems(self, spell: Spell = str) -> list[str]:
        """Every problem of these options (types, ranges, combinations), each naming its keys as
        `spell` writes them; empty when they are sound."""
        return _value_problems(self, spell) + _combination_problems(self, spell)

    def without_idle_adaptive(self) -> Options:
        """These options with `adaptive` off where a k or a budget decides k, which it does not
        change: stores written before the two were refused together record both."""
        if self.rule.adaptive is True and (self.rule.components is not None or self.budgeted):
            return dataclasses.replace(self, rule=dataclasses.replace(self.rule, adaptive=False))
        return self

    def validated(self, spell: Spell = str) -> Options:
        """These options, or one PipelineError naming every problem."""
        raise_problems(self.problems(spell))
        return self


def parse_max_error(text: str | float | None) -> float | None:
    """A --max-error or job `max_error` value: a number, or `none` (NO_BOUND); ValueError otherwise."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "none"):
        return None if text is None else NO_BOUND
    if isinstance(text, bool):
        raise ValueError(f"not a number: {text!r}")
    return float(text)


def step_problems(
    chunk_size: int | None = None, full: bool = False, from_source: bool = False, spell: Spell = str
) -> list[str]:
    """The problems of how a compress or rebase proceeds (chunks, a full re-base, from the source)."""
    problems = _check(chunk_size, spell("chunk_size"), _is_int, "an integer", optional=True, least=1)
    if from_source and not full:
        problems.append(f"{spell('from_source')} needs {spell('full')}")
    if full and chunk_size:
        problems.append(f"{spell('chunk_size')} is for the incremental re-base, not {spell('full')}")
    return problems


def raise_problems(problems: list[str]) -> None:
    """One PipelineError naming every problem, if there is any."""
    if problems:
        raise PipelineError("; ".join(problems))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _check(value, name: str, kind: Callable, what: str, optional: bool = False, least=None) -> list[str]:
    if optional and value is None:
        return []
    if not kind(value):
        return [f"{name} must be {what}, got {type(value).__name__} {value!r}"]
    if least is not None and value < least:
        return [f"{name} must be at least {least}, got {value!r}"]
    return []


def _one_of(value, name: str, choices: tuple[str, ...], optional: bool = False) -> list[str]:
    if (optional and value is None) or value in choices:
        return []
    return [f"{name} must be one of {', '.join(choices)}, got {value!r}"]


def _value_problems(options: Options, spell: Spell) -> list[str]:
    rule = options.rule
    problems = _check(rule.components, spell("components"), _is_int, "an integer", optional=True, least=1)
    if not (_is_number(rule.variance_threshold) and 0 < rule.variance_threshold <= 1):
        problems.append(f"{spell('variance_threshold')} must be in (0, 1], got {rule.variance_threshold!r}")
    problems += _check(rule.adaptive, spell("adaptive"), lambda v: isinstance(v, bool), "true or false")
    problems += _check(options.task_memory, spell("task_memory"), _is_int, "a number of bytes", least=1)
    problems += _check(options.strict, spell("strict"), lambda v: isinstance(v, bool), "true or false")
    problems += _one_of(options.route, spell("svd_route"), SVD_ROUTES)
    problems += _check(
        options.max_error, spell("max_error"), lambda v: v == NO_BOUND or _is_number(v), "a number", True, least=0
    )
    problems += _one_of(options.quantize, spell("quantize"), QUANTIZE_SCHEMES, optional=True)
    problems += _one_of(options.method, spell("method"), METHODS)
    if options.ratio is not None and not _is_number(options.ratio):
        problems.append(f"{spell('ratio')} must be a finite number, got {options.ratio!r}")
    elif options.ratio is not None and options.ratio <= 1:
        problems.append(f"{spell('ratio')} must be above 1 (the compression factor), got {options.ratio!r}")
    problems += _check(options.budget_bytes, spell("budget_bytes"), _is_int, "a number of bytes", True, least=1)
    if options.clusters != "auto":
        problems += _check(options.clusters, spell("clusters"), _is_int, 'an integer or "auto"', True, least=1)
    return problems


def parse_clusters(text: str | int | None) -> int | str | None:
    """A --clusters or job `clusters` value: a number of groups, or `auto`; ValueError otherwise."""
    if text is None or text == "auto" or (isinstance(text, int) and not isinstance(text, bool)):
        return text
    if isinstance(text, str) and text.strip().isdigit():
        return int(text)
    raise ValueError(f'not a number of groups or "auto": {text!r}')


def _combination_problems(options: Options, spell: Spell) -> list[str]:
    problems = []
    if options.ratio is not None and options.budget_bytes is not None:
        problems.append(f"{spell('ratio')} and {spell('budget_bytes')} are two ways of giving one budget: give one")
    if options.rule.components is not None and options.budgeted:
        budget = spell(_budget_key(options))
        problems.append(f"{spell('components')} and {budget} exclude each other (a budget decides each module's k)")
    if options.rule.adaptive is True and (options.rule.components is not None or options.budgeted):
        given = "components" if options.rule.components is not None else _budget_key(options)
        problems.append(
            f"{spell('adaptive')} and {spell(given)} exclude each other ({spell('adaptive')} picks each module's k "
            f"from {spell('variance_threshold')}; {spell(given)} decides it)"
        )
    if options.method == "aligned" and options.rule.components is None:
        problems.append(
            f"{spell('method')} aligned needs {spell('components')} (the rank of the structure the alignment looks for)"
        )
    if options.clusters == "auto" and not options.budgeted:
        problems.append(
            f"{spell('clusters')} auto chooses the number of groups for a budget: give {spell('ratio')} or "
            f"{spell('budget_bytes')}, or a number of groups"
        )
    if options.route == "randomized" and options.rule.components is None and not options.budgeted:
        problems.append(
            f"{spell('svd_route')} randomized needs {spell('components')} or a budget: a variance threshold "
            "needs the whole spectrum, which only an exact route gives"
        )
    if options.method == "joint" and options.rule.components is None and not options.budgeted:
        problems.append(
            f"{spell('method')} joint needs {spell('components')} (the width of U and V) "
            f"or a budget ({spell('ratio')} or {spell('budget_bytes')})"
        )
    return problems


def _budget_key(options: Options) -> str:
    return "ratio" if options.ratio is not None else "budget_bytes"
