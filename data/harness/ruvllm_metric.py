"""lm-evaluation-harness scoring for the ruvllm_workloads task: the lab's one strict matcher."""
from __future__ import annotations

import dataclasses

from ruvllm_lab.workloads import WorkItem, is_correct

_FIELDS = {f.name for f in dataclasses.fields(WorkItem)}


def work_item(doc: dict) -> WorkItem:
    fields = {k: v for k, v in doc.items() if k in _FIELDS and v is not None}
    fields["aliases"] = tuple(fields.get("aliases") or ())
    return WorkItem(**fields)


def process_results(doc: dict, results: list[str]) -> dict:
    return {"acc": float(is_correct(work_item(doc), results[0]))}
