"""One share cleanup run of one microscope as ONE task (the logic is cryoflow.archive.cleanup).

Scheduled runs do what the microscope's ``cleanup.mode`` says (``off``, ``dry-run`` or
``delete``). A run triggered by hand is a dry run unless its ``dry_run`` param is switched off;
even then it never deletes when the mode is ``off`` or ``dry-run``. The task's log has one line
per file (deleted, would be deleted, kept and why); its return value lists them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from cryoflow.archive.cleanup import cleanup_microscope
from cryoflow.config import load_site

if TYPE_CHECKING:
    from airflow.sdk import Context


def dry_run_requested(context: Context) -> bool:
    """A manual run's ``dry_run`` param (default true); other runs follow the config."""
    dag_run = context.get("dag_run")
    if dag_run is None or getattr(dag_run, "run_type", None) != "manual":
        return False
    return bool(context["params"].get("dry_run", True))


class ShareCleanupOperator(BaseOperator):
    """Free the microscope's share of files proven safe on GPFS (see the module doc)."""

    template_fields: Sequence[str] = ()
    ui_color = "#f2e6d9"

    def __init__(self, *, microscope_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.microscope_id = microscope_id

    def execute(self, context: Context) -> dict[str, Any]:
        site = load_site()
        scope = site.microscopes[self.microscope_id]
        report = cleanup_microscope(
            site.facility,
            scope,
            dry_run=dry_run_requested(context),
            run_id=context["run_id"],
        )
        return report.to_dict()
