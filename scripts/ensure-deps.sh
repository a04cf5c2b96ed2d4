#!/usr/bin/env bash
# ensure-deps.sh: make sure the external programs buildbus's tests, demo and
# benchmarks need are installed: RabbitMQ (Debian's rabbitmq-server),
# PostgreSQL 15 (/usr/lib/postgresql/15/bin) and Bazel 4.2.3 (Debian's
# bazel-bootstrap, /usr/bin/bazel-4) for the live BES test.
#
# Idempotent and quiet when everything is already present. Runs as root,
# non-interactively (no TTY). `apt-get update` runs once, and only when
# something has to be installed.
#
# The tests never use the system-wide broker or cluster: they start private
# ones (crates/testkit) beside whatever else runs here. This script never
# stops, disables or kills anything it did not start.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
PG_BIN=/usr/lib/postgresql/15/bin

log() { printf 'ensure-deps: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        log "apt-get update"
        $SUDO apt-get update -qq >/dev/null
        apt_updated=1
    fi
    log "apt-get install $*"
    # Forbid the packages' postinst scripts from starting their services
    # while installing (exit 101 = "action not allowed" for invoke-rc.d).
    # Restore whatever policy-rc.d was there before.
    local policy=/usr/sbin/policy-rc.d backup=""
    if [ -e "$policy" ]; then
        backup=$(mktemp)
        $SUDO cp -p "$policy" "$backup"
    fi
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    local rc=0
    $SUDO apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "$@" >/dev/null || rc=$?
    if [ -n "$backup" ]; then
        $SUDO cp -p "$backup" "$policy"
        rm -f "$backup"
    else
        $SUDO rm -f "$policy"
    fi
    return "$rc"
}

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/lib/rabbitmq/bin/$1" ]; }

installed_rabbit=0
if ! have rabbitmq-server || ! have rabbitmqctl; then
    apt_install rabbitmq-server
    installed_rabbit=1
fi

# The package's own broker (node rabbit@HOST on 5672/25672) is not ours to
# manage. The tests never use it: they start private nodes with their own
# ports, node names, data directories and epmd port (crates/testkit), so they
# run beside any broker already on this machine. This script therefore never
# stops, disables or kills a broker. policy-rc.d above keeps the package from
# starting its service while we install it; if it started anyway, it is the
# service we just installed, and only then do we ask its init script (never
# pkill: user rabbitmq runs everyone's nodes) to stop it.
if [ "$installed_rabbit" -eq 1 ] && command -v service >/dev/null 2>&1; then
    if $SUDO service rabbitmq-server status >/dev/null 2>&1; then
        log "stopping the rabbitmq-server service this script just installed"
        $SUDO service rabbitmq-server stop >/dev/null 2>&1 || true
    fi
fi

if [ ! -x "$PG_BIN/initdb" ]; then
    apt_install postgresql-15
    # Debian creates a default cluster "15/main" on 5432 (policy-rc.d keeps it
    # from starting during the install). The tests use private clusters: keep
    # the one just created from autostarting, and stop it only if it did start
    # (it is then the one this script installed).
    if command -v pg_ctlcluster >/dev/null 2>&1; then
        $SUDO pg_ctlcluster 15 main stop >/dev/null 2>&1 || true
        if [ -f /etc/postgresql/15/main/start.conf ]; then
            echo manual | $SUDO tee /etc/postgresql/15/main/start.conf >/dev/null
        fi
    fi
fi

# Real Bazel for the BES backend's test (it builds tests/fixtures/bazel/workspace
# offline). The package pulls a headless JDK and build-essential.
if [ ! -x /usr/bin/bazel-4 ]; then
    apt_install bazel-bootstrap
fi
if [ ! -x /usr/bin/bazel-4 ]; then
    log "/usr/bin/bazel-4 still missing after installing bazel-bootstrap"
    exit 1
fi

for bin in initdb pg_ctl pg_isready postgres psql; do
    if [ ! -x "$PG_BIN/$bin" ]; then
        log "missing $PG_BIN/$bin after install"
        exit 1
    fi
done
if ! have rabbitmq-server || ! have rabbitmqctl; then
    log "rabbitmq-server/rabbitmqctl still missing after install"
    exit 1
fi
