"""The facility's Airflow roles for the FAB auth manager (sign-in through Active Directory / LDAP).

Who may do what is decided by Airflow's auth manager; with the FAB auth manager that is a set of
roles, each a set of FAB permissions ``(action, resource)``, and ``config/auth/webserver_config.py``
maps the directory's groups to these roles at every sign-in. The roles come from the configuration:

``Operator_<microscope>`` (one per ``config/microscopes/<microscope>.yaml``)
    reads everything a researcher reads, and on its microscope's DAGs only -- ``session_<id>``,
    ``process_<id>`` and ``end_session_<id>`` -- may switch them on and off and create (and
    change) runs: start a session, end it, rerun processing. Any other DAG (another microscope's
    ``end_session_<id>`` too): read only.
``Researcher``
    read only: DAGs, their runs, task instances and task logs, the session view (it asks for
    read access to ``session_<id>``), assets, XComs. Triggers nothing, pauses nothing.
``Admin``
    FAB's own built-in role: every permission (FAB re-grants new ones at each API-server start).

FAB's permission names (``airflow.providers.fab.www.security.permissions``): a DAG's own resource
is ``DAG:<dag_id>`` (actions ``can_read``, ``can_edit``, ``can_delete``), its runs' resource is
``DAG Run:<dag_id>`` (``can_read``, ``can_create``, ``can_delete``). To trigger a DAG the FAB auth
manager asks for ``can_create`` on ``DAG Runs`` or ``DAG Run:<dag_id>`` AND ``can_edit`` on
``DAGs`` or ``DAG:<dag_id>``; pausing asks for ``can_edit`` on ``DAGs`` or ``DAG:<dag_id>``.
Limits of that model: an operator's ``can_edit`` on ``end_session_<id>`` also lets them pause it;
clearing task instances needs the global ``Task Instances`` permission, which operators lack.

``sync_roles`` creates missing roles and sets each managed role to exactly its permissions (a
permission added by hand to ``Researcher`` is removed again); other roles are left alone.
Run it after ``airflow db migrate`` and whenever a microscope is added::

    python -m cryoflow.auth_roles            # with the Airflow environment of the deployment
    python -m cryoflow.auth_roles --print    # show the roles as JSON, change nothing
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

OPERATOR_ROLE = "Operator_{microscope}"
RESEARCHER_ROLE = "Researcher"
ADMIN_ROLE = "Admin"  # FAB's built-in role: all permissions

# The DAGs an operator of a microscope runs (dags/microscope_sessions.py).
OPERATOR_DAGS = ("session_{microscope}", "process_{microscope}", "end_session_{microscope}")

# Directory groups (AD group names, the cn of their DNs) -> roles, see ldap_roles_mapping
OPERATOR_GROUP = "cryo-operators-{microscope}"
RESEARCHER_GROUP = "cryo-researchers"
ADMIN_GROUP = "cryo-admins"

# FAB action and resource names (checked against apache-airflow-providers-fab 3.10's
# airflow.providers.fab.www.security.permissions; plain strings so that this module imports
# without the provider, e.g. in webserver_config.py's process before FAB is set up)
CAN_READ, CAN_EDIT, CAN_CREATE, MENU = "can_read", "can_edit", "can_create", "menu_access"
DAG_PREFIX, DAG_RUN_PREFIX = "DAG:", "DAG Run:"

_READ = (
    "DAGs",
    "DAG Runs",
    "DAG Code",
    "DAG Dependencies",
    "DAG Versions",
    "DAG Warnings",
    "Task Instances",
    "Task Logs",
    "XComs",
    "Assets",
    "Asset Aliases",
    "Backfills",
    "HITL Detail",
    "ImportError",
    "Jobs",
    "Cluster Activity",
    "Pools",
    "Plugins",  # the UI lists plugins' navigation entries (the session view) from /api/v2/plugins
    "Website",
    "My Profile",
)
_MENUS = (
    "Browse",
    "DAGs",
    "DAG Runs",
    "DAG Dependencies",
    "Task Instances",
    "Assets",
    "Jobs",
    "Cluster Activity",
    "Docs",
    "Documentation",
)
READ_PERMISSIONS: tuple[tuple[str, str], ...] = tuple(
    [(CAN_READ, resource) for resource in _READ] + [(MENU, menu) for menu in _MENUS]
)


def operator_role(microscope: str) -> str:
    return OPERATOR_ROLE.format(microscope=microscope)


def operator_dags(microscope: str) -> tuple[str, ...]:
    return tuple(dag.format(microscope=microscope) for dag in OPERATOR_DAGS)


def operator_permissions(microscope: str) -> tuple[tuple[str, str], ...]:
    """Read everything; switch on/off and run (create, change runs of) its microscope's DAGs."""
    own: list[tuple[str, str]] = []
    for dag_id in operator_dags(microscope):
        own += [
            (CAN_READ, f"{DAG_PREFIX}{dag_id}"),
            (CAN_EDIT, f"{DAG_PREFIX}{dag_id}"),  # pause/unpause; required to trigger
            (CAN_READ, f"{DAG_RUN_PREFIX}{dag_id}"),
            (CAN_CREATE, f"{DAG_RUN_PREFIX}{dag_id}"),  # trigger
            (CAN_EDIT, f"{DAG_RUN_PREFIX}{dag_id}"),  # mark a run failed/success, notes
        ]
    return READ_PERMISSIONS + tuple(own)


def microscope_ids(config_dir: Path | None = None) -> list[str]:
    """The microscopes of a configuration: ``microscopes/<id>.yaml`` (the id equals the file name,
    which cryoflow.config validates), without loading (or failing on) the rest of the config."""
    if config_dir is None:
        from cryoflow.config import config_dir as default_dir

        config_dir = default_dir()
    scopes = Path(config_dir) / "microscopes"
    if not scopes.is_dir():
        return []
    return sorted({p.stem for p in scopes.iterdir() if p.suffix in (".yaml", ".yml")})


def role_definitions(microscopes: Iterable[str]) -> dict[str, tuple[tuple[str, str], ...]]:
    """The managed roles and their exact permissions (Admin is FAB's own and not listed)."""
    roles = {RESEARCHER_ROLE: READ_PERMISSIONS}
    for microscope in sorted(microscopes):
        roles[operator_role(microscope)] = operator_permissions(microscope)
    return roles


def ldap_roles_mapping(
    group_dn_template: str,
    microscopes: Iterable[str],
    *,
    operator_group: str = OPERATOR_GROUP,
    researcher_group: str = RESEARCHER_GROUP,
    admin_group: str = ADMIN_GROUP,
) -> dict[str, list[str]]:
    """FAB's ``AUTH_ROLES_MAPPING``: group DN (as the directory writes it in ``memberOf``) -> roles.

    ``group_dn_template`` has a ``{group}`` field, e.g.
    ``CN={group},OU=Groups,OU=Facility,DC=facility,DC=example``. FAB compares DNs as strings:
    write them with the directory's own spelling (an ``ldapsearch ... memberOf`` shows it)."""
    if "{group}" not in group_dn_template:
        raise ValueError(f"the group DN template needs a {{group}} field: {group_dn_template!r}")

    def dn(group: str) -> str:
        return group_dn_template.replace("{group}", group)

    mapping = {dn(researcher_group): [RESEARCHER_ROLE], dn(admin_group): [ADMIN_ROLE]}
    for microscope in sorted(microscopes):
        mapping[dn(operator_group.format(microscope=microscope))] = [operator_role(microscope)]
    return mapping


def sync_roles(security_manager, roles: Mapping[str, Iterable[tuple[str, str]]]) -> dict[str, dict]:
    """Create or update ``roles`` through FAB's security manager; return what changed per role.

    Each managed role ends with exactly its permissions; missing actions, resources (``DAG:<id>``
    of a DAG not parsed yet) and permissions are created. ``Admin`` (and FAB's other built-in
    roles) are made sure to exist by FAB's own ``sync_roles`` first."""
    sm = security_manager
    sm.sync_roles()  # FAB's built-in roles (Admin, Public, ...) with their current permissions
    changes: dict[str, dict] = {}
    for name, perms in roles.items():
        want = set(perms)
        role = sm.find_role(name)
        created = role is None
        if created:
            role = sm.add_role(name)
        have = {
            (p.action.name, p.resource.name): p
            for p in role.permissions
            if p.action is not None and p.resource is not None
        }
        added = sorted(want - set(have))
        removed = sorted(set(have) - want)
        for action, resource in added:
            perm = sm.get_permission(action, resource) or sm.create_permission(action, resource)
            sm.add_permission_to_role(role, perm)
        for key in removed:
            sm.remove_permission_from_role(role, have[key])
        changes[name] = {"created": created, "added": added, "removed": removed}
        log.info("role %s: %s, %d permission(s) added, %d removed",
                 name, "created" if created else "updated", len(added), len(removed))  # fmt: skip
    if sm.find_role(ADMIN_ROLE) is None:
        raise RuntimeError(f"FAB's {ADMIN_ROLE} role is missing after sync_roles")
    stale = [
        r.name for r in sm.get_all_roles()
        if r.name.startswith(OPERATOR_ROLE.split("{")[0]) and r.name not in roles
    ]  # fmt: skip
    for name in stale:
        log.warning("role %s has no microscope in the configuration (left as it is)", name)
    return changes


def sync_from_config(config_dir: Path | None = None) -> dict[str, dict]:
    """Sync the roles of a configuration in the Airflow database (needs the FAB auth manager's
    tables: ``airflow db migrate`` with the FAB provider installed)."""
    from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder

    roles = role_definitions(microscope_ids(config_dir))
    with get_application_builder() as appbuilder:
        return sync_roles(appbuilder.sm, roles)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cryoflow.auth_roles",
        description="Create/update the facility's Airflow roles (FAB auth manager) from config/.",
    )
    parser.add_argument(
        "--config-dir", type=Path, default=None,
        help="cryoflow configuration (default: $CRYOFLOW_CONFIG_DIR or the bundle's config/)",
    )  # fmt: skip
    parser.add_argument(
        "--print", action="store_true", dest="print_only",
        help="print the roles and their permissions as JSON; change nothing",
    )  # fmt: skip
    args = parser.parse_args(argv)
    microscopes = microscope_ids(args.config_dir)
    if not microscopes:
        parser.error(f"no microscopes/*.yaml in {args.config_dir or '$CRYOFLOW_CONFIG_DIR'}")
    if args.print_only:
        roles = role_definitions(microscopes)
        listed = {name: [list(p) for p in perms] for name, perms in roles.items()}
        print(json.dumps(listed, indent=2))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name, change in sync_from_config(args.config_dir).items():
        state = (
            "created" if change["created"]
            else "updated" if change["added"] or change["removed"]
            else "up to date"
        )  # fmt: skip
        print(f"{name}: {state} (+{len(change['added'])} -{len(change['removed'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
