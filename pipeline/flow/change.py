"""What a new version is made of (Change) and what making it reports (Summary): what an
operation hands the flow's steps, and gets back."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.flow.scan import ScannedAdapter

log = logging.getLogger(__name__)

# fit: new bases; absorb: the parent's updated; project: the parent's kept; quantize: the parent's
# packed (its rows keep their loadings); import: bases and rows read from another layout (vlora)
Mode = Literal["fit", "absorb", "project", "quantize", "import"]


@dataclass
class Change:
    """What a new version is made of. `adapters`: freshly scanned ones (ok ones are read from
    their files); the parent's rows are kept except for those the adapters replace."""

    operation: str  # compress | project | rebase | rebase-full | quantize | vlora-import
    mode: Mode
    adapters: list[ScannedAdapter]
    parent: str | None = None  # the version current when the work began
    parent_manifest: dict | None = None  # set when the new version grows from the parent's data
    parent_status: dict[str, str] = field(default_factory=dict)  # task id -> status in the parent's catalog
    refit: bool = False  # fit mode over the parent's rebuilt rows too (rebase --full from the store)
    counts: dict[str, int] = field(default_factory=dict)  # discovery figures for the summary
    scan_seconds: float = 0.0
    catalog: list[dict] = field(default_factory=list)  # catalog rows of adapters not scanned (vlora-import)
    groups: Any = None  # the new version's groups (pipeline.flow.grouping.Groups), None when ungrouped
    chunk: int | None = None  # fit: the adapters a shard task reads and fits at a time (flow.chunked)


@dataclass
class Summary:
    operation: str
    version: str
    parent: str | None
    store: str
    adapters_ok: int
    adapters_quarantined: int
    quarantined: dict[str, str]  # found in this run
    kept_previous: dict[str, str]  # replacements rejected: the earlier upload stays
    modules: int
    shards: int
    error: dict[str, float]
    read_error: dict[str, float]  # summary over the adapters whose files this run read
    read_errors: dict[str, float]  # each of them (mean over modules); not for compress
    flagged: dict[str, float]
    changes: dict[str, int]
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)  # what the user asked for and did not get, and why
    # adapters this run stored with residuals (their largest error without one), and the version's total
    residuals: dict[str, float] = field(default_factory=dict)
    residuals_stored: dict[str, int] = field(default_factory=dict)  # {adapters, modules, bytes}

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def good_adapters(adapters: list[ScannedAdapter]) -> list[ScannedAdapter]:
    return sorted((a for a in adapters if a.ok), key=lambda a: a.task_id)
