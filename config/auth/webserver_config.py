"""Sign-in through the facility's Active Directory (LDAP) with Airflow's FAB auth manager.

Used with ``AIRFLOW__CORE__AUTH_MANAGER=airflow.providers.fab.auth_manager.fab_auth_manager.
FabAuthManager`` and ``AIRFLOW__FAB__CONFIG_FILE=<this file>`` (or this file copied to
``$AIRFLOW_HOME/webserver_config.py``). FAB loads it silently: a wrong path is NOT reported, the
UI then offers database logins instead. Everything site-specific comes from the environment, so
one file serves the stack, a staging instance and the tests' OpenLDAP; credentials never live
here (the bind password is read from a file, e.g. a Docker secret).

    CRYOFLOW_LDAP_SERVER              ldaps://dc1.facility.example:636 (or ldap://...:389 with
                                      CRYOFLOW_LDAP_USE_TLS=true for StartTLS)      required
    CRYOFLOW_LDAP_SEARCH              where people are: OU=People,DC=facility,DC=example  required
    CRYOFLOW_LDAP_SEARCH_FILTER       optional, e.g. (&(objectCategory=person)(objectClass=user))
    CRYOFLOW_LDAP_UID_FIELD           the sign-in name's attribute: sAMAccountName (AD, default);
                                      uid for OpenLDAP
    CRYOFLOW_LDAP_BIND_USER           the read-only service account's DN (or user@domain for AD)
    CRYOFLOW_LDAP_BIND_PASSWORD_FILE  a file with its password
                                      (default /run/secrets/ldap_bind_password)
    CRYOFLOW_LDAP_GROUP_DN_TEMPLATE   the groups' DN with {group}, e.g.
                                      CN={group},OU=Groups,DC=facility,DC=example          required
    CRYOFLOW_LDAP_NESTED_GROUPS       true: AD's nested groups count (LDAP_MATCHING_RULE_IN_CHAIN)
    CRYOFLOW_LDAP_TLS_CACERTFILE      the CA of the domain controllers' certificates
    CRYOFLOW_LDAP_ROLES_MAPPING       optional JSON {"<group DN>": ["<role>", ...]} replacing the
                                      mapping below

Groups -> roles (``cryoflow.auth_roles``, which also creates the roles): ``cryo-operators-<id>`` ->
``Operator_<id>`` for each ``config/microscopes/<id>.yaml``, ``cryo-researchers`` -> ``Researcher``,
``cryo-admins`` -> ``Admin``. Roles are re-read from the directory at every sign-in; a person in
none of these groups signs in with the ``Public`` role, which may do nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flask_appbuilder.const import AUTH_LDAP


def _env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, "").strip()
    if value:
        return value
    if default is None:
        raise RuntimeError(f"webserver_config.py (LDAP sign-in): set {name}")
    return default


def _flag(name: str, default: bool = False) -> bool:
    return _env(name, "true" if default else "false").lower() in ("1", "true", "yes", "on")


def _secret(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        # the path, never the content
        raise RuntimeError(
            f"webserver_config.py: cannot read the LDAP bind password file {path}: {exc.strerror}"
        ) from None


def _roles_mapping() -> dict[str, list[str]]:
    given = os.environ.get("CRYOFLOW_LDAP_ROLES_MAPPING", "").strip()
    if given:
        mapping = json.loads(given)
        if not isinstance(mapping, dict) or not all(
            isinstance(v, list) and all(isinstance(r, str) for r in v) for v in mapping.values()
        ):
            raise RuntimeError('CRYOFLOW_LDAP_ROLES_MAPPING: {"<group DN>": ["<role>", ...]}')
        return mapping
    from cryoflow.auth_roles import ldap_roles_mapping, microscope_ids

    return ldap_roles_mapping(_env("CRYOFLOW_LDAP_GROUP_DN_TEMPLATE"), microscope_ids())


WTF_CSRF_ENABLED = True
WTF_CSRF_TIME_LIMIT = None

AUTH_TYPE = AUTH_LDAP
AUTH_LDAP_SERVER = _env("CRYOFLOW_LDAP_SERVER")
AUTH_LDAP_USE_TLS = _flag("CRYOFLOW_LDAP_USE_TLS")  # StartTLS on ldap://
if _env("CRYOFLOW_LDAP_TLS_CACERTFILE", ""):
    AUTH_LDAP_TLS_CACERTFILE = _env("CRYOFLOW_LDAP_TLS_CACERTFILE")
AUTH_LDAP_ALLOW_SELF_SIGNED = False
AUTH_LDAP_TLS_DEMAND = True  # verify the server's certificate whenever TLS is used

# Indirect bind: the service account searches for the person, then FAB binds as the person's DN
# with the password typed in (nothing is stored); AD's referrals are off (FAB sets that).
AUTH_LDAP_SEARCH = _env("CRYOFLOW_LDAP_SEARCH")
if _env("CRYOFLOW_LDAP_SEARCH_FILTER", ""):
    AUTH_LDAP_SEARCH_FILTER = _env("CRYOFLOW_LDAP_SEARCH_FILTER")
AUTH_LDAP_UID_FIELD = _env("CRYOFLOW_LDAP_UID_FIELD", "sAMAccountName")
AUTH_LDAP_BIND_USER = _env("CRYOFLOW_LDAP_BIND_USER")
AUTH_LDAP_BIND_PASSWORD = _secret(
    _env("CRYOFLOW_LDAP_BIND_PASSWORD_FILE", "/run/secrets/ldap_bind_password")
)
AUTH_LDAP_FIRSTNAME_FIELD = "givenName"
AUTH_LDAP_LASTNAME_FIELD = "sn"
AUTH_LDAP_EMAIL_FIELD = "mail"

# Groups -> roles, at every sign-in
AUTH_LDAP_GROUP_FIELD = "memberOf"
AUTH_LDAP_USE_NESTED_GROUPS_FOR_ROLES = _flag("CRYOFLOW_LDAP_NESTED_GROUPS")
AUTH_ROLES_MAPPING = _roles_mapping()
AUTH_ROLES_SYNC_AT_LOGIN = True

# A person of the directory gets an Airflow user at the first sign-in, with the mapped roles
# plus this one, which has no permissions: no group, no access.
AUTH_USER_REGISTRATION = True
AUTH_USER_REGISTRATION_ROLE = "Public"
AUTH_ROLE_ADMIN = "Admin"
