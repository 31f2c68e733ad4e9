#!/usr/bin/env bash
# Bring up / tear down the real services cryoflow's cluster tests and demos talk to:
# a single-node Slurm (slurmctld + slurmd + slurmdbd on MariaDB, so `sacct` works) with a
# `cpu` and a `gpu` partition (fake GPUs: character devices, so CUDA_VISIBLE_DEVICES is set),
# and an sshd on 127.0.0.1:2222 that lets the test user `cryo` in by key only.
#
# One script for CI, tests and developers:  scripts/services.sh up|down|status
# (`scripts/services.sh chromium`: headless Chromium + chromedriver for the UI test; not in `up`)
# (`scripts/services.sh ldap`: an OpenLDAP directory standing in for the facility's Active
#  Directory, for the sign-in tests; not in `up`. `down` stops it too.)
# (`scripts/services.sh samba`: smbd on 127.0.0.1:4445 standing in for a microscope PC's share,
#  for the direct-SMB tests; also part of `up`. `samba-down` stops it, as `down` does.)
# Runs as root on a Debian 12 machine without systemd (PID 1 is not an init: exited daemons
# linger as zombies, so every health check asks the service itself, never pgrep).
#
# State written to $CRYOFLOW_SERVICES_DIR (default /var/lib/cryoflow-services):
#   id_ed25519 / id_ed25519.pub   the test user's key pair (private key: root only)
#   known_hosts                   the sshd host key as "[127.0.0.1]:2222 ssh-ed25519 ..."
#   host_key.pub                  the same key as "ssh-ed25519 AAAA..." (connection extra)
#   airflow_conn.json / .uri      a ready Airflow SSH connection (host key checking ON)
#   env                           shell exports (AIRFLOW_CONN_<ID>, CRYOFLOW_SLURM_*), `source`-able
#   ldap/                         `ldap` only (root-only, 0700): slapd.conf, db/, slapd.log, slapd.pid,
#     env                         exports CRYOFLOW_LDAP_* for config/auth/webserver_config.py
#     bind_password               the Airflow bind account's password (CRYOFLOW_LDAP_BIND_PASSWORD_FILE)
#     users.json                  the test users: uid -> {dn, password, groups}
#     rootpw                      the directory manager's password (loads entries; never Airflow's)
#   samba/                        `samba` (also in `up`; root-only, 0700): smb.conf, private/ (tdbsam),
#     password                    the test user's SMB password (CRYOFLOW_SMB_PASSWORD_FILE)
#     env                         exports CRYOFLOW_SMB_* for the SMB share tests
#   (the shared folder, //127.0.0.1:4445/microscope, is /srv/cryoflow-smb/microscope: the test
#    user's, outside this root-only dir)
set -euo pipefail

STATE_DIR="${CRYOFLOW_SERVICES_DIR:-/var/lib/cryoflow-services}"
SSH_PORT="${CRYOFLOW_SSH_PORT:-2222}"
SSH_USER="cryo"
# The experiment group the tests' sessions use; the cluster account belongs to it, as the
# facility's service account belongs to every experiment group it writes for.
EXPERIMENT_GROUP="${CRYOFLOW_EXPERIMENT_GROUP:-cryoflow-exp}"
CONN_ID="${CRYOFLOW_SSH_CONN_ID:-cryoflow_slurm_ssh}"
NODE_NAME="cryonode"
CLUSTER_NAME="cryoflow"
NODE_CPUS=8
NODE_GPUS=2
SLURM_ETC=/etc/slurm
SSHD_CONFIG=/etc/ssh/cryoflow_sshd_config
SSHD_PID=/run/sshd-cryoflow.pid
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd openssh-server)
DB_PASSWORD=''
WAIT_S=30
# OpenLDAP (`ldap`): loopback only, a non-standard port, as the tests' stand-in for AD.
LDAP_PORT="${CRYOFLOW_LDAP_PORT:-3890}"
LDAP_URI="ldap://127.0.0.1:$LDAP_PORT/"
LDAP_BASE="${CRYOFLOW_LDAP_BASE_DN:-dc=facility,dc=example}"
LDAP_DIR="$STATE_DIR/ldap"
LDAP_BIND_DN="uid=svc-airflow,ou=service,$LDAP_BASE"
# uid:groups (comma separated; none: a person in the directory who is in no cryoflow group)
LDAP_USERS=(op-krios1:cryo-operators-krios1 op-krios2:cryo-operators-krios2
    researcher:cryo-researchers cryo-admin:cryo-admins visitor:)
# Samba (`samba`): smbd only, loopback only, a non-standard port; stands in for a microscope PC.
SMB_PORT="${CRYOFLOW_SMB_PORT:-4445}"
SMB_SHARE="${CRYOFLOW_SMB_SHARE:-microscope}"
SMB_USER="${CRYOFLOW_SMB_USER:-cryosmb}"
SMB_DIR="$STATE_DIR/samba"
# The shared folder lives outside the root-only state dir: smbd opens files as the test user.
SMB_SHARE_DIR="${CRYOFLOW_SMB_SHARE_DIR:-/srv/cryoflow-smb/$SMB_SHARE}"

log() { printf '[services] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# --- small helpers ------------------------------------------------------------------------

wait_until() {  # wait_until <seconds> <description> <command...>
    local limit=$1 what=$2; shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${limit}s waiting for: $what"
            return 1
        fi
        sleep 0.2
    done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pid_alive() {  # true when the pid runs and is not a zombie
    local pid=$1 state
    [[ -r /proc/$pid/stat ]] || return 1
    state=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $state != Z && $state != X ]]
}

stop_pidfile() {  # stop_pidfile <pidfile> <expected exe basename>
    local pidfile=$1 exe=$2 pid
    [[ -s $pidfile ]] || return 0
    pid=$(tr -dc '0-9' <"$pidfile")
    if [[ -n $pid ]] && pid_alive "$pid" \
        && [[ $(readlink -f "/proc/$pid/exe" 2>/dev/null) == *"$exe"* ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        wait_until 15 "$exe to exit" bash -c "! [[ -r /proc/$pid/stat ]] || \
            grep -qE '^[0-9]+ \(.*\) [ZX]' /proc/$pid/stat" || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

mariadb_root() {  # SQL as MariaDB root: unix socket first, then TCP root without password
    mariadb -uroot "$@" 2>/dev/null || mariadb -h127.0.0.1 -P3306 -uroot "$@"
}

urlencode() {
    local s=$1 out='' c i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case $c in
            [A-Za-z0-9.~_-]) out+=$c ;;
            *) out+=$(printf '%%%02X' "'$c") ;;
        esac
    done
    printf '%s' "$out"
}

# --- packages -------------------------------------------------------------------------------

ensure_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    # MariaDB normally runs already on this machine kind; install it only where it is absent.
    command -v mariadbd >/dev/null 2>&1 || missing+=(mariadb-server)
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for a dpkg lock held by someone else instead of failing; `apt-get update` only when
    # the package lists are missing or stale (the first install attempt fails).
    local apt=(apt-get -o DPkg::Lock::Timeout=300 -y -q --no-install-recommends)
    if ! "${apt[@]}" install "${missing[@]}" >/dev/null 2>&1; then
        apt-get -o DPkg::Lock::Timeout=300 -q update >/dev/null
        "${apt[@]}" install "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
    fi
}

# --- MariaDB (accounting storage) ------------------------------------------------------------

mariadb_up() {
    if ! mariadb_root -e 'SELECT 1' >/dev/null 2>&1; then
        log "starting MariaDB"
        install -d -o mysql -g mysql -m 0755 /run/mysqld
        start-stop-daemon --start --oknodo --background --chuid mysql \
            --exec /usr/sbin/mariadbd -- --bind-address=127.0.0.1 --port=3306
        touch "$STATE_DIR/.mariadb-started-here"
        wait_until "$WAIT_S" "MariaDB to answer" mariadb_root -e 'SELECT 1' || die "MariaDB did not start"
    fi
    # The accounting DB password lives only in slurmdbd.conf (slurm-only, 0600): reuse it, so a
    # second state dir or a re-run never changes the password under a running slurmdbd.
    local pw=''
    [[ -r $SLURM_ETC/slurmdbd.conf ]] && pw=$(sed -n 's/^StoragePass=//p' "$SLURM_ETC/slurmdbd.conf")
    [[ -n $pw ]] || pw=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
    DB_PASSWORD=$pw
    mariadb_root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pw';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pw';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
}

mariadb_down() {
    [[ -e $STATE_DIR/.mariadb-started-here ]] || return 0  # not ours: leave it running
    log "stopping MariaDB (started by this script)"
    stop_pidfile /run/mysqld/mysqld.pid mariadbd
    rm -f "$STATE_DIR/.mariadb-started-here"
}

# --- munge -------------------------------------------------------------------------------------

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

munge_up() {
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
    [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    munge_ok && return 0
    log "starting munged"
    rm -f /run/munge/munge.socket.2 /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
    wait_until "$WAIT_S" "munged" munge_ok || die "munged did not start (see /var/log/munge/munged.log)"
}

munge_down() { stop_pidfile /run/munge/munged.pid munged; }

# --- Slurm -------------------------------------------------------------------------------------

write_slurm_configs() {
    local host; host=$(hostname -s)
    install -d -m 0755 "$SLURM_ETC"
    install -d -o slurm -g slurm -m 0755 /run/slurm /var/log/slurm /var/lib/slurm \
        /var/lib/slurm/slurmctld
    install -d -m 0755 /var/lib/slurm/slurmd
    local i gpu_files=()
    for ((i = 0; i < NODE_GPUS; i++)); do
        # GRES File= must be a character device or Slurm does not set CUDA_VISIBLE_DEVICES.
        [[ -c /dev/cryoflow-fakegpu$i ]] || { rm -f "/dev/cryoflow-fakegpu$i"; mknod -m 0666 "/dev/cryoflow-fakegpu$i" c 1 3; }
        gpu_files+=("/dev/cryoflow-fakegpu$i")
    done
    local tmp
    tmp=$(mktemp "$SLURM_ETC/.slurm.conf.XXXXXX")
    cat >"$tmp" <<CONF
# Written by cryoflow scripts/services.sh: single-node test cluster. Do not edit by hand.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups on this machine kind: track processes by parent pid, no task affinity.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Lets the node declare more CPUs than the machine has (8 slots on a 2-core VM).
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
# Test cluster: backfill every second (default 30 s) so array waves start without long gaps.
SchedulerParameters=bf_interval=1
KillWait=5
InactiveLimit=0
MinJobAge=300
MaxArraySize=1001
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
GresTypes=gpu
NodeName=$NODE_NAME NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=4000 Gres=gpu:$NODE_GPUS State=UNKNOWN
PartitionName=cpu Nodes=$NODE_NAME Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE_NAME MaxTime=INFINITE State=UP
CONF
    chmod 0644 "$tmp" && mv -f "$tmp" "$SLURM_ETC/slurm.conf"

    tmp=$(mktemp "$SLURM_ETC/.gres.conf.XXXXXX")
    printf 'NodeName=%s Name=gpu File=/dev/cryoflow-fakegpu[0-%d]\n' "$NODE_NAME" $((NODE_GPUS - 1)) >"$tmp"
    chmod 0644 "$tmp" && mv -f "$tmp" "$SLURM_ETC/gres.conf"

    tmp=$(mktemp "$SLURM_ETC/.slurmdbd.conf.XXXXXX")
    cat >"$tmp" <<CONF
# Written by cryoflow scripts/services.sh. Holds the database password: slurm-only.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
CONF
    chown slurm:slurm "$tmp" && chmod 0600 "$tmp" && mv -f "$tmp" "$SLURM_ETC/slurmdbd.conf"
}

slurmctld_ok() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_ready() { sinfo -h -n "$NODE_NAME" -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)'; }
sacct_ok() { sacct -n -X -S now-1minutes -o JobID >/dev/null 2>&1; }

slurm_up() {
    write_slurm_configs
    if ! port_open 6819; then
        log "starting slurmdbd"
        runuser -u slurm -- /usr/sbin/slurmdbd
        wait_until "$WAIT_S" "slurmdbd on :6819" port_open 6819 || die "slurmdbd did not start (see /var/log/slurm/slurmdbd.log)"
    fi
    if ! slurmctld_ok; then
        log "starting slurmctld"
        /usr/sbin/slurmctld
        wait_until "$WAIT_S" "scontrol ping" slurmctld_ok || die "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
    else
        scontrol reconfigure >/dev/null 2>&1 || true
    fi
    if ! port_open 6818; then
        log "starting slurmd -N $NODE_NAME"
        /usr/sbin/slurmd -N "$NODE_NAME"
        wait_until "$WAIT_S" "slurmd on :6818" port_open 6818 || die "slurmd did not start (see /var/log/slurm/slurmd.log)"
    fi
    if ! wait_until 10 "node $NODE_NAME to be ready" node_ready; then
        scontrol update NodeName="$NODE_NAME" State=RESUME >/dev/null 2>&1 || true
        wait_until "$WAIT_S" "node $NODE_NAME to be ready" node_ready \
            || die "node $NODE_NAME is $(sinfo -h -n "$NODE_NAME" -o '%T %E')"
    fi
    wait_until "$WAIT_S" "sacct to answer" sacct_ok || die "sacct does not answer (slurmdbd/MariaDB)"
}

slurm_down() {
    if slurmctld_ok; then
        # Stops slurmctld and every slurmd cleanly (state saved for the next start).
        scontrol shutdown >/dev/null 2>&1 || true
        wait_until 15 "slurmctld to stop" bash -c '! scontrol ping 2>/dev/null | grep -q "is UP"' || true
    fi
    stop_pidfile /run/slurm/slurmd.pid slurmd
    stop_pidfile /run/slurm/slurmctld.pid slurmctld
    stop_pidfile /run/slurm/slurmdbd.pid slurmdbd
}

# --- accounts (before any daemon: slurmd and slurmctld cache a user's groups) ----------------

accounts_up() {
    local changed=0
    if ! getent group "$EXPERIMENT_GROUP" >/dev/null; then
        groupadd "$EXPERIMENT_GROUP"; changed=1
    fi
    if ! id "$SSH_USER" >/dev/null 2>&1; then
        # '*' (not the default '!'): a locked account is refused even for key logins.
        useradd --create-home --shell /bin/bash -p '*' "$SSH_USER"; changed=1
    fi
    if ! id -nG "$SSH_USER" | tr ' ' '\n' | grep -qxF "$EXPERIMENT_GROUP"; then
        usermod -aG "$EXPERIMENT_GROUP" "$SSH_USER"; changed=1
    fi
    if (( changed )) && { port_open 6818 || slurmctld_ok; }; then
        # Daemons started before this membership would run jobs without it: restart them.
        log "accounts changed while Slurm runs: restarting slurmd and slurmctld"
        stop_pidfile /run/slurm/slurmd.pid slurmd
        stop_pidfile /run/slurm/slurmctld.pid slurmctld
    fi
}

# --- sshd + test user --------------------------------------------------------------------------

ssh_login_ok() {
    ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$STATE_DIR/known_hosts" \
        -o IdentitiesOnly=yes -o ConnectTimeout=3 -i "$STATE_DIR/id_ed25519" -p "$SSH_PORT" \
        "$SSH_USER@127.0.0.1" "sinfo -h -o %P" 2>/dev/null | grep -q .
}

sshd_up() {
    install -d -m 0755 /run/sshd
    [[ -s /etc/ssh/ssh_host_ed25519_key ]] || ssh-keygen -A >/dev/null
    local home; home=$(getent passwd "$SSH_USER" | cut -d: -f6)
    [[ -s $STATE_DIR/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -C "$SSH_USER@cryoflow-services" -f "$STATE_DIR/id_ed25519"
    install -d -o "$SSH_USER" -g "$SSH_USER" -m 0700 "$home/.ssh"
    # Append, never replace: several state dirs (CI, a developer) may share this machine's user.
    touch "$home/.ssh/authorized_keys"
    grep -qxF "$(<"$STATE_DIR/id_ed25519.pub")" "$home/.ssh/authorized_keys" \
        || cat "$STATE_DIR/id_ed25519.pub" >>"$home/.ssh/authorized_keys"
    chown "$SSH_USER:$SSH_USER" "$home/.ssh/authorized_keys" && chmod 0600 "$home/.ssh/authorized_keys"
    install -d -o "$SSH_USER" -g "$SSH_USER" -m 0755 "$home/cryoflow-jobs"

    local tmp
    tmp=$(mktemp /etc/ssh/.cryoflow_sshd_config.XXXXXX)
    cat >"$tmp" <<CONF
# Written by cryoflow scripts/services.sh: key-only sshd for the test user, loopback only.
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile $SSHD_PID
AllowUsers $SSH_USER
PermitRootLogin no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
X11Forwarding no
Subsystem sftp internal-sftp
MaxStartups 50:30:200
MaxSessions 50
CONF
    chmod 0644 "$tmp" && mv -f "$tmp" "$SSHD_CONFIG"
    /usr/sbin/sshd -t -f "$SSHD_CONFIG" || die "sshd config rejected"

    local host_pub; host_pub=$(cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub)
    printf '%s\n' "$host_pub" >"$STATE_DIR/host_key.pub"
    printf '[127.0.0.1]:%s %s\n' "$SSH_PORT" "$host_pub" >"$STATE_DIR/known_hosts"

    if ! port_open "$SSH_PORT"; then
        log "starting sshd on 127.0.0.1:$SSH_PORT"
        /usr/sbin/sshd -f "$SSHD_CONFIG"
        wait_until "$WAIT_S" "sshd on :$SSH_PORT" port_open "$SSH_PORT" || die "sshd did not start"
    fi
    wait_until 10 "key login as $SSH_USER" ssh_login_ok || die "key login as $SSH_USER to :$SSH_PORT fails"
    write_connection "$home/cryoflow-jobs" "$host_pub"
}

sshd_down() { stop_pidfile "$SSHD_PID" sshd; }

write_connection() {  # write_connection <remote workdir> <host public key>
    local workdir=$1 host_pub=$2 key="$STATE_DIR/id_ed25519"
    local json uri env tmp
    json=$(printf '{"conn_type": "ssh", "host": "127.0.0.1", "port": %s, "login": "%s", "extra": {"key_file": "%s", "host_key": "%s", "look_for_keys": "false", "conn_timeout": "10"}}' \
        "$SSH_PORT" "$SSH_USER" "$key" "$host_pub")
    uri="ssh://$SSH_USER@127.0.0.1:$SSH_PORT/?key_file=$(urlencode "$key")&host_key=$(urlencode "$host_pub")&look_for_keys=false&conn_timeout=10"
    env=$(printf 'export AIRFLOW_CONN_%s=%q\nexport CRYOFLOW_SSH_CONN_ID=%q\nexport CRYOFLOW_SLURM_WORKDIR=%q\nexport CRYOFLOW_SERVICES_DIR=%q\n' \
        "${CONN_ID^^}" "$json" "$CONN_ID" "$workdir" "$STATE_DIR")
    for pair in "airflow_conn.json:$json" "airflow_conn.uri:$uri" "env:$env"; do
        tmp=$(mktemp "$STATE_DIR/.tmp.XXXXXX")
        printf '%s\n' "${pair#*:}" >"$tmp" && mv -f "$tmp" "$STATE_DIR/${pair%%:*}"
    done
}

# --- OpenLDAP: the facility's directory for the sign-in tests (not part of `up`) -----------
# Debian's slapd with a plain slapd.conf under $LDAP_DIR (no cn=config, no init system), the
# memberof overlay (FAB maps roles from the user's memberOf, as with Active Directory), people
# under ou=people, groupOfNames under ou=groups, a read-only bind account for Airflow under
# ou=service. No anonymous reads. Entries are loaded online with ldapadd: slapadd would not fill
# memberOf. Passwords are random per state dir, kept in root-only files, never on a command line.

ldap_packages() {
    [[ -x /usr/sbin/slapd && -x /usr/sbin/slappasswd ]] && command -v ldapadd >/dev/null 2>&1 && return 0
    log "installing slapd ldap-utils"
    # no_configuration: the postinst would otherwise build /etc/ldap/slapd.d and try to start it
    echo "slapd slapd/no_configuration boolean true" | debconf-set-selections
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get -o DPkg::Lock::Timeout=300 -y -q --no-install-recommends)
    if ! "${apt[@]}" install slapd ldap-utils >/dev/null 2>&1; then
        apt-get -o DPkg::Lock::Timeout=300 -q update >/dev/null
        "${apt[@]}" install slapd ldap-utils >/dev/null || die "apt-get install slapd ldap-utils failed"
    fi
}

new_secret() { head -c 24 /dev/urandom | base64 | tr -d '/+=' | head -c 24; }

secret_file() {  # secret_file <path>: create once (0600), print the secret
    local path=$1
    if [[ ! -s $path ]]; then
        (umask 077 && new_secret >"$path.tmp" && mv -f "$path.tmp" "$path")
    fi
    tr -d '\n' <"$path"
}

ldap_secrets() {  # passwords of the root DN, the bind account and each test user (stable)
    install -d -m 0700 "$LDAP_DIR" "$LDAP_DIR/secrets"
    secret_file "$LDAP_DIR/rootpw" >/dev/null
    secret_file "$LDAP_DIR/bind_password" >/dev/null
    local entry uid
    for entry in "${LDAP_USERS[@]}"; do
        uid=${entry%%:*}
        secret_file "$LDAP_DIR/secrets/$uid" >/dev/null
    done
}

write_slapd_conf() {
    local tmp rootpw_hash
    rootpw_hash=$(slappasswd -T "$LDAP_DIR/rootpw" -h '{SSHA}')
    install -d -m 0700 "$LDAP_DIR/db"
    tmp=$(mktemp "$LDAP_DIR/.slapd.conf.XXXXXX")
    cat >"$tmp" <<CONF
# Written by cryoflow scripts/services.sh: the sign-in tests' directory. Do not edit by hand.
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/nis.schema
include /etc/ldap/schema/inetorgperson.schema
pidfile $LDAP_DIR/slapd.pid
argsfile $LDAP_DIR/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload memberof
# Like AD: nothing for anonymous clients but binding.
disallow bind_anon
require authc

database mdb
maxsize 67108864
suffix "$LDAP_BASE"
rootdn "cn=admin,$LDAP_BASE"
rootpw $rootpw_hash
directory $LDAP_DIR/db
index objectClass eq
index uid,cn,member,memberOf eq
overlay memberof
memberof-group-oc groupOfNames
memberof-member-ad member
memberof-memberof-ad memberOf
memberof-refint TRUE
access to attrs=userPassword
    by self write
    by anonymous auth
    by * none
access to *
    by dn.exact="$LDAP_BIND_DN" read
    by self read
    by users read
    by * none
CONF
    chmod 0600 "$tmp" && mv -f "$tmp" "$LDAP_DIR/slapd.conf"
    slaptest -Q -u -f "$LDAP_DIR/slapd.conf" >/dev/null 2>&1 \
        || die "slapd rejects $LDAP_DIR/slapd.conf: $(slaptest -u -f "$LDAP_DIR/slapd.conf" 2>&1 | tail -3)"
}

ldap_entries() {  # the LDIF of the whole tree (passwords as salted hashes)
    local entry uid groups g hash ou
    declare -A members=()
    printf 'dn: %s\nobjectClass: dcObject\nobjectClass: organization\no: cryoflow test facility\ndc: %s\n\n' \
        "$LDAP_BASE" "$(sed -E 's/^dc=([^,]+).*/\1/' <<<"$LDAP_BASE")"
    for ou in people groups service; do
        printf 'dn: ou=%s,%s\nobjectClass: organizationalUnit\nou: %s\n\n' "$ou" "$LDAP_BASE" "$ou"
    done
    hash=$(slappasswd -T "$LDAP_DIR/bind_password" -h '{SSHA}')
    printf 'dn: %s\nobjectClass: inetOrgPerson\nuid: svc-airflow\ncn: Airflow directory reader\nsn: svc-airflow\nuserPassword: %s\n\n' \
        "$LDAP_BIND_DN" "$hash"
    for entry in "${LDAP_USERS[@]}"; do
        uid=${entry%%:*} groups=${entry#*:}
        hash=$(slappasswd -T "$LDAP_DIR/secrets/$uid" -h '{SSHA}')
        printf 'dn: uid=%s,ou=people,%s\nobjectClass: inetOrgPerson\nuid: %s\ncn: %s\nsn: %s\ngivenName: %s\nmail: %s@facility.example\nuserPassword: %s\n\n' \
            "$uid" "$LDAP_BASE" "$uid" "$uid" "$uid" "$uid" "$uid" "$hash"
        for g in ${groups//,/ }; do members[$g]+="uid=$uid,ou=people,$LDAP_BASE;"; done
    done
    # groups after the people: the overlay writes memberOf into member entries that exist
    for g in "${!members[@]}"; do
        printf 'dn: cn=%s,ou=groups,%s\nobjectClass: groupOfNames\ncn: %s\n' "$g" "$LDAP_BASE" "$g"
        local m; IFS=';' read -ra m <<<"${members[$g]}"
        printf 'member: %s\n' "${m[@]}"
        printf '\n'
    done
}

ldap_search() {  # ldap_search <filter> <attrs...>: as the bind account
    ldapsearch -x -LLL -o ldif-wrap=no -H "$LDAP_URI" -D "$LDAP_BIND_DN" -y "$LDAP_DIR/bind_password" \
        -b "$LDAP_BASE" "$@"
}

ldap_ok() {  # slapd answers, every user binds with its password and has its memberOf groups
    port_open "$LDAP_PORT" || return 1
    local entry uid groups g found
    for entry in "${LDAP_USERS[@]}"; do
        uid=${entry%%:*} groups=${entry#*:}
        ldapwhoami -x -H "$LDAP_URI" -D "uid=$uid,ou=people,$LDAP_BASE" -y "$LDAP_DIR/secrets/$uid" \
            >/dev/null 2>&1 || return 1
        found=$(ldap_search "(uid=$uid)" memberOf 2>/dev/null) || return 1
        for g in ${groups//,/ }; do
            grep -qixF "memberOf: cn=$g,ou=groups,$LDAP_BASE" <<<"$found" || return 1
        done
    done
}

slapd_running_ours() {
    local pid
    [[ -s $LDAP_DIR/slapd.pid ]] || return 1
    pid=$(tr -dc '0-9' <"$LDAP_DIR/slapd.pid")
    [[ -n $pid ]] && pid_alive "$pid" && [[ $(readlink -f "/proc/$pid/exe" 2>/dev/null) == *slapd* ]]
}

slapd_stop() {
    slapd_running_ours || { rm -f "$LDAP_DIR/slapd.pid"; return 0; }
    log "stopping slapd"
    local pid; pid=$(tr -dc '0-9' <"$LDAP_DIR/slapd.pid")
    kill -INT "$pid" 2>/dev/null || true  # slapd's clean shutdown
    wait_until 15 "slapd to exit" bash -c "! [[ -r /proc/$pid/stat ]] || \
        grep -qE '^[0-9]+ \(.*\) [ZX]' /proc/$pid/stat" || kill -KILL "$pid" 2>/dev/null || true
    rm -f "$LDAP_DIR/slapd.pid"
}

write_ldap_env() {
    local tmp users='' entry uid groups sep=''
    for entry in "${LDAP_USERS[@]}"; do
        uid=${entry%%:*} groups=${entry#*:}
        users+=$(printf '%s"%s": {"dn": "uid=%s,ou=people,%s", "password": "%s", "groups": [%s]}' \
            "$sep" "$uid" "$uid" "$LDAP_BASE" "$(tr -d '\n' <"$LDAP_DIR/secrets/$uid")" \
            "$(sed -E 's/([^,]+)/"\1"/g; s/,/, /g' <<<"$groups")")
        sep=', '
    done
    tmp=$(mktemp "$LDAP_DIR/.users.json.XXXXXX")
    printf '{%s}\n' "$users" >"$tmp" && chmod 0600 "$tmp" && mv -f "$tmp" "$LDAP_DIR/users.json"
    tmp=$(mktemp "$LDAP_DIR/.env.XXXXXX")
    {
        printf 'export CRYOFLOW_LDAP_SERVER=%q\n' "ldap://127.0.0.1:$LDAP_PORT"
        printf 'export CRYOFLOW_LDAP_SEARCH=%q\n' "ou=people,$LDAP_BASE"
        printf 'export CRYOFLOW_LDAP_UID_FIELD=uid\n'
        printf 'export CRYOFLOW_LDAP_BIND_USER=%q\n' "$LDAP_BIND_DN"
        printf 'export CRYOFLOW_LDAP_BIND_PASSWORD_FILE=%q\n' "$LDAP_DIR/bind_password"
        printf 'export CRYOFLOW_LDAP_GROUP_DN_TEMPLATE=%q\n' "cn={group},ou=groups,$LDAP_BASE"
        printf 'export CRYOFLOW_LDAP_USERS_FILE=%q\n' "$LDAP_DIR/users.json"
        printf 'export CRYOFLOW_LDAP_LOG=%q\n' "$LDAP_DIR/slapd.log"
    } >"$tmp" && chmod 0600 "$tmp" && mv -f "$tmp" "$LDAP_DIR/env"
}

ldap_up() {  # idempotent: a healthy directory is left alone; anything else is rebuilt
    [[ $EUID -eq 0 ]] || die "run as root (installs and starts slapd)"
    install -d -m 0700 "$STATE_DIR"
    ldap_packages
    ldap_secrets
    write_slapd_conf
    write_ldap_env
    if ldap_ok; then
        log "ldap: up at $LDAP_URI ($LDAP_BASE); exports in $LDAP_DIR/env"
        return 0
    fi
    port_open "$LDAP_PORT" && ! slapd_running_ours \
        && die "port $LDAP_PORT is taken by something else than this state dir's slapd"
    # Throw-away test directory: rebuild it whole rather than patch a stale one.
    slapd_stop
    rm -rf "$LDAP_DIR/db" && install -d -m 0700 "$LDAP_DIR/db"
    log "starting slapd on $LDAP_URI"
    # -d stats: slapd stays in the foreground and writes its connection/operation log (binds,
    # searches; never a password) to stderr, i.e. to slapd.log; setsid detaches it from us.
    setsid /usr/sbin/slapd -d stats -f "$LDAP_DIR/slapd.conf" -h "$LDAP_URI" \
        >>"$LDAP_DIR/slapd.log" 2>&1 </dev/null &
    disown || true
    wait_until "$WAIT_S" "slapd on :$LDAP_PORT" port_open "$LDAP_PORT" \
        || die "slapd did not start (see $LDAP_DIR/slapd.log: $(tail -3 "$LDAP_DIR/slapd.log"))"
    local out
    out=$(ldap_entries | ldapadd -x -H "$LDAP_URI" -D "cn=admin,$LDAP_BASE" -y "$LDAP_DIR/rootpw" 2>&1) \
        || die "ldapadd failed: $out"
    wait_until 10 "every test user to bind with its memberOf groups" ldap_ok \
        || die "the directory's users or groups are not as loaded (see $LDAP_DIR/slapd.log)"
    log "ldap: up at $LDAP_URI ($LDAP_BASE); exports in $LDAP_DIR/env"
}

ldap_down() { [[ -d $LDAP_DIR ]] && slapd_stop; return 0; }

# --- Samba: a microscope PC's SMB share for the direct-SMB tests (part of `up`) ---------------
# Debian's smbd alone (no nmbd, no winbind), on 127.0.0.1:$SMB_PORT only, its config, tdbsam
# passdb, locks, state and logs under $SMB_DIR, the shared folder in $SMB_SHARE_DIR (smbd opens
# files as the user, who cannot enter the root-only state dir). One test user, a system
# account without a login, whose SMB password is random per state dir, kept in a root-only file
# and handed to smbpasswd on stdin, never on a command line.

samba_packages() {
    [[ -x /usr/sbin/smbd && -x /usr/bin/smbpasswd && -x /usr/bin/pdbedit ]] && return 0
    log "installing samba"
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get -o DPkg::Lock::Timeout=300 -y -q --no-install-recommends)
    if ! "${apt[@]}" install samba >/dev/null 2>&1; then
        apt-get -o DPkg::Lock::Timeout=300 -q update >/dev/null
        "${apt[@]}" install samba >/dev/null || die "apt-get install samba failed"
    fi
}

write_smb_conf() {
    local tmp
    install -d -m 0700 "$SMB_DIR" "$SMB_DIR/private" "$SMB_DIR/lock" "$SMB_DIR/state" \
        "$SMB_DIR/cache" "$SMB_DIR/run" "$SMB_DIR/log"
    id "$SMB_USER" >/dev/null 2>&1 \
        || useradd --system --no-create-home --shell /usr/sbin/nologin -p '*' "$SMB_USER"
    # the parent only if missing: never change the mode of an existing folder such as /srv
    [[ -d $(dirname "$SMB_SHARE_DIR") ]] || install -d -m 0755 "$(dirname "$SMB_SHARE_DIR")"
    install -d -o "$SMB_USER" -g "$SMB_USER" -m 0755 "$SMB_SHARE_DIR"
    tmp=$(mktemp "$SMB_DIR/.smb.conf.XXXXXX")
    cat >"$tmp" <<CONF
# Written by cryoflow scripts/services.sh: the SMB share tests' server. Do not edit by hand.
[global]
    server role = standalone server
    smb ports = $SMB_PORT
    interfaces = lo
    bind interfaces only = yes
    disable netbios = yes
    server min protocol = SMB2_10
    passdb backend = tdbsam:$SMB_DIR/private/passdb.tdb
    private dir = $SMB_DIR/private
    lock directory = $SMB_DIR/lock
    state directory = $SMB_DIR/state
    cache directory = $SMB_DIR/cache
    pid directory = $SMB_DIR/run
    ncalrpc dir = $SMB_DIR/run/ncalrpc
    log file = $SMB_DIR/log/smbd.log
    max log size = 1000
    log level = 1
    # Like a microscope PC: a named user with a password, nothing for guests.
    map to guest = never
    restrict anonymous = 2
    load printers = no
    printing = bsd
    printcap name = /dev/null
    disable spoolss = yes

[$SMB_SHARE]
    path = $SMB_SHARE_DIR
    read only = no
    valid users = $SMB_USER
    create mask = 0644
    directory mask = 0755
CONF
    chmod 0600 "$tmp" && mv -f "$tmp" "$SMB_DIR/smb.conf"
    testparm -s "$SMB_DIR/smb.conf" >/dev/null 2>&1 \
        || die "testparm rejects $SMB_DIR/smb.conf: $(testparm -s "$SMB_DIR/smb.conf" 2>&1 | tail -3)"
}

samba_user() {  # the test user's tdbsam entry, with the password of this state dir
    secret_file "$SMB_DIR/password" >/dev/null
    local pw; pw=$(tr -d '\n' <"$SMB_DIR/password")
    # -s: the password twice on stdin (never on a command line); -a adds or resets the entry.
    printf '%s\n%s\n' "$pw" "$pw" | smbpasswd -c "$SMB_DIR/smb.conf" -s -a "$SMB_USER" >/dev/null 2>&1 \
        || die "smbpasswd -a $SMB_USER failed"
}

samba_running_ours() {
    local pid
    [[ -s $SMB_DIR/run/smbd.pid ]] || return 1
    pid=$(tr -dc '0-9' <"$SMB_DIR/run/smbd.pid")
    [[ -n $pid ]] && pid_alive "$pid" && [[ $(readlink -f "/proc/$pid/exe" 2>/dev/null) == *smbd* ]]
}

samba_ok() {  # smbd answers on its port and knows the test user
    port_open "$SMB_PORT" && samba_running_ours \
        && pdbedit -s "$SMB_DIR/smb.conf" -L 2>/dev/null | grep -q "^$SMB_USER:"
}

write_samba_env() {
    local tmp
    tmp=$(mktemp "$SMB_DIR/.env.XXXXXX")
    {
        printf 'export CRYOFLOW_SMB_HOST=127.0.0.1\n'
        printf 'export CRYOFLOW_SMB_PORT=%q\n' "$SMB_PORT"
        printf 'export CRYOFLOW_SMB_SHARE=%q\n' "$SMB_SHARE"
        printf 'export CRYOFLOW_SMB_USER=%q\n' "$SMB_USER"
        printf 'export CRYOFLOW_SMB_PASSWORD_FILE=%q\n' "$SMB_DIR/password"
        printf 'export CRYOFLOW_SMB_SHARE_PATH=%q\n' "$SMB_SHARE_DIR"
        printf 'export CRYOFLOW_SMB_LOG=%q\n' "$SMB_DIR/log/smbd.log"
    } >"$tmp" && chmod 0600 "$tmp" && mv -f "$tmp" "$SMB_DIR/env"
}

samba_up() {  # idempotent: a healthy smbd of this state dir is left alone
    [[ $EUID -eq 0 ]] || die "run as root (installs and starts smbd)"
    install -d -m 0700 "$STATE_DIR"
    samba_packages
    write_smb_conf
    samba_user
    write_samba_env
    if samba_ok; then
        log "samba: up at //127.0.0.1:$SMB_PORT/$SMB_SHARE (user $SMB_USER); exports in $SMB_DIR/env"
        return 0
    fi
    port_open "$SMB_PORT" && ! samba_running_ours \
        && die "port $SMB_PORT is taken by something else than this state dir's smbd"
    samba_down
    log "starting smbd on 127.0.0.1:$SMB_PORT"
    # --foreground under setsid: no init here to reap a daemonised smbd; its log goes to log/.
    setsid /usr/sbin/smbd --foreground --no-process-group -s "$SMB_DIR/smb.conf" \
        >>"$SMB_DIR/log/smbd.stdout" 2>&1 </dev/null &
    disown || true
    wait_until "$WAIT_S" "smbd on :$SMB_PORT" samba_ok \
        || die "smbd did not start (see $SMB_DIR/log/smbd.log: $(tail -3 "$SMB_DIR/log/smbd.log" 2>/dev/null))"
    log "samba: up at //127.0.0.1:$SMB_PORT/$SMB_SHARE (user $SMB_USER); exports in $SMB_DIR/env"
}

samba_down() { [[ -d $SMB_DIR ]] && stop_pidfile "$SMB_DIR/run/smbd.pid" smbd; return 0; }

# --- headless Chromium for the UI tests (not part of `up`) -----------------------------------

chromium_ok() { chromium --version >/dev/null 2>&1 && chromedriver --version >/dev/null 2>&1; }

chromium_up() {  # idempotent: Debian's chromium + chromedriver (/usr/bin/chromedriver)
    if ! chromium_ok; then
        [[ $EUID -eq 0 ]] || die "run as root (apt-get install chromium chromium-driver)"
        log "installing chromium chromium-driver"
        export DEBIAN_FRONTEND=noninteractive
        local apt=(apt-get -o DPkg::Lock::Timeout=300 -y -q --no-install-recommends)
        # fonts-liberation: without any font, screenshots show boxes instead of text
        local pkgs=(chromium chromium-driver fonts-liberation)
        if ! "${apt[@]}" install "${pkgs[@]}" >/dev/null 2>&1; then
            apt-get -o DPkg::Lock::Timeout=300 -q update >/dev/null
            "${apt[@]}" install "${pkgs[@]}" >/dev/null || die "apt-get install ${pkgs[*]} failed"
        fi
        chromium_ok || die "chromium/chromedriver installed but do not run"
    fi
    log "chromium: $(chromium --version 2>/dev/null); $(chromedriver --version 2>/dev/null | cut -d' ' -f1-2)"
}

# --- commands ----------------------------------------------------------------------------------

# PostgreSQL and Redis: this machine kind runs them on loopback (the ledger and Airflow on
# PostgreSQL, Celery's broker on Redis: tests/test_celery_e2e.py). Started here only if they are
# installed but down; never installed or configured by this script.
loopback_dbs_up() {
    if ! port_open 5432; then
        if command -v pg_ctlcluster >/dev/null; then
            log "PostgreSQL is down: starting its clusters"
            for cluster in /etc/postgresql/*/*/; do
                [[ -d $cluster ]] || continue
                pg_ctlcluster "$(basename "$(dirname "$cluster")")" "$(basename "$cluster")" start || true
            done
        fi
        wait_until 30 "PostgreSQL on 127.0.0.1:5432" port_open 5432
    fi
    if ! port_open 6379; then
        if command -v redis-server >/dev/null; then
            log "Redis is down: starting redis-server on 127.0.0.1:6379"
            redis-server --bind 127.0.0.1 --port 6379 --daemonize yes >/dev/null
        fi
        wait_until 30 "Redis on 127.0.0.1:6379" port_open 6379
    fi
}

cmd_up() {
    [[ $EUID -eq 0 ]] || die "run as root (starts system daemons)"
    install -d -m 0700 "$STATE_DIR"
    ensure_packages
    accounts_up
    mariadb_up
    munge_up
    slurm_up
    sshd_up
    samba_up
    loopback_dbs_up
    log "up: Slurm ($CLUSTER_NAME: partitions cpu, gpu), sshd 127.0.0.1:$SSH_PORT, smbd 127.0.0.1:$SMB_PORT, PostgreSQL :5432, Redis :6379; state in $STATE_DIR"
}

cmd_down() {
    [[ $EUID -eq 0 ]] || die "run as root"
    ldap_down
    samba_down
    sshd_down
    slurm_down
    munge_down
    mariadb_down
    log "down"
}

cmd_status() {
    local rc=0 name check checks
    checks=("mariadb:mariadb_root -e 'SELECT 1'" "munge:munge_ok" "slurmdbd:port_open 6819"
        "slurmctld:slurmctld_ok" "slurmd:node_ready" "sacct:sacct_ok"
        "sshd:port_open $SSH_PORT" "ssh-login:ssh_login_ok" "samba:samba_ok")
    # the directory only where `ldap` set it up in this state dir
    [[ -s $LDAP_DIR/slapd.conf ]] && checks+=("ldap:ldap_ok")
    for pair in "${checks[@]}"; do
        name=${pair%%:*} check=${pair#*:}
        if eval "$check" >/dev/null 2>&1; then
            printf '%-10s up\n' "$name"
        else
            printf '%-10s DOWN\n' "$name"; rc=1
        fi
    done
    return $rc
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    chromium) chromium_up ;;
    ldap) ldap_up ;;
    samba) samba_up ;;
    samba-down) samba_down ;;
    *) echo "usage: $0 up|down|status|chromium|ldap|samba|samba-down   (state dir: \$CRYOFLOW_SERVICES_DIR, default /var/lib/cryoflow-services)" >&2; exit 2 ;;
esac
