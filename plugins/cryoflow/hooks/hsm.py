"""Commands on the HSM node (``dsmmigrate``, ``dsmls``) over SSH.

An ordinary Airflow SSH connection (host, login, key file, ``host_key`` extra) names the node
where IBM Storage Protect for Space Management runs. What is sent and how the answers are read
live in :mod:`cryoflow.archive.hsm` (no Airflow there); this hook only runs a command line.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow.providers.ssh.hooks.ssh import SSHHook
from airflow.sdk.bases.hook import BaseHook


class HsmNodeHook(BaseHook):
    """Run command lines on the HSM node; one SSH connection for all of them."""

    conn_name_attr = "ssh_conn_id"
    default_conn_name = "hsm_node"
    conn_type = "ssh"
    hook_name = "HSM node over SSH"

    def __init__(self, ssh_conn_id: str = default_conn_name, command_timeout_s: float = 3600):
        super().__init__()
        self.ssh_conn_id = ssh_conn_id
        self.command_timeout_s = command_timeout_s  # a migration to tape may take a while

    @cached_property
    def ssh_hook(self) -> SSHHook:
        return SSHHook(ssh_conn_id=self.ssh_conn_id, cmd_timeout=self.command_timeout_s)

    def run(self, command: str) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) of one command line (already shell-quoted)."""
        client = self.ssh_hook.get_conn()
        status, out, err = self.ssh_hook.exec_ssh_client_command(
            client, command, get_pty=False, environment=None
        )
        return status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def close(self) -> None:
        hook = self.__dict__.get("ssh_hook")
        if hook is not None and hook.client is not None:
            hook.client.close()
            hook.client = None

    def __enter__(self) -> HsmNodeHook:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
