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
# ones (crates/testkit). So after installing rabbitmq-server this script makes sure
# the Debian package's own service is stopped and not enabled, so that it does
# not sit on 5672/25672/4369 or use CPU during CI.
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

# Keep the Debian package's own broker (node rabbit@HOST on 5672/25672, and
# its epmd on 4369) out of the way. Only done right after installing, or when
# such a broker is found running: a quiet no-op otherwise.
system_broker_running() {
    # The packaged service runs as user rabbitmq; our private nodes run as
    # whoever runs the tests (root in CI) and are never touched here.
    pgrep -u rabbitmq -f 'beam.*rabbit' >/dev/null 2>&1
}
if [ "$installed_rabbit" -eq 1 ] || system_broker_running; then
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now rabbitmq-server >/dev/null 2>&1 || true
    elif command -v update-rc.d >/dev/null 2>&1; then
        $SUDO update-rc.d rabbitmq-server disable >/dev/null 2>&1 || true
    fi
    if system_broker_running; then
        log "stopping the system rabbitmq-server service"
        $SUDO service rabbitmq-server stop >/dev/null 2>&1 || true
        for _ in $(seq 1 20); do
            system_broker_running || break
            sleep 0.5
        done
        if system_broker_running; then
            $SUDO pkill -KILL -u rabbitmq -f 'beam.*rabbit' || true
        fi
    fi
    # The service's epmd (run as user rabbitmq) would hold 4369; ours use
    # their own epmd ports, but leave nothing of the package's behind.
    $SUDO pkill -u rabbitmq -x epmd >/dev/null 2>&1 || true
fi

if [ ! -x "$PG_BIN/initdb" ]; then
    apt_install postgresql-15
    # Debian creates and may start a default cluster "15/main" on 5432; the
    # tests use private clusters, so stop it and keep it from autostarting.
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
