#!/usr/bin/env bash
# Makes a Docker engine and a compose command available for `pytest -m docker`, or says why not.
#
# When `docker info` already answers, nothing changes. Otherwise, as root: installs Debian's
# docker.io (dockerd, containerd, runc), docker-compose (v1, when no `docker compose` v2 plugin
# is there) and debootstrap (docker/base-image.sh builds a base image with it where no registry
# is reachable) with apt-get, then starts dockerd in the background (log:
# $EXPVAULT_DOCKERD_LOG, default /var/log/expvault-dockerd.log), falling back to the vfs storage
# driver and then to no iptables where the defaults fail, and waits for it. Always exits 0: where
# no engine can run, the docker tests skip and name the reason.
set -uo pipefail

log() { echo "engine.sh: $*" >&2; }
engine_up() { docker info > /dev/null 2>&1; }
has_compose() { docker compose version > /dev/null 2>&1 || command -v docker-compose > /dev/null; }

DOCKERD_LOG="${EXPVAULT_DOCKERD_LOG:-/var/log/expvault-dockerd.log}"
WAIT_S="${EXPVAULT_DOCKERD_WAIT_S:-60}"

packages=()
command -v docker > /dev/null || packages+=(docker.io)
if ! engine_up; then
    command -v dockerd > /dev/null || packages+=(docker.io)
fi
has_compose || packages+=(docker-compose)
command -v debootstrap > /dev/null || packages+=(debootstrap)
if ((${#packages[@]})); then
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get > /dev/null; then
        log "missing ${packages[*]} and cannot install them (needs root and apt-get)"
    else
        log "installing ${packages[*]}"
        export DEBIAN_FRONTEND=noninteractive
        if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
            "${packages[@]}"; } > /tmp/expvault-engine-apt.log 2>&1; then
            tail -20 /tmp/expvault-engine-apt.log >&2
            log "apt-get install ${packages[*]} failed"
        fi
    fi
fi

if engine_up; then
    log "a Docker engine is running: $(docker version --format 'server {{.Server.Version}}')"
elif [[ $(id -u) -ne 0 ]] || ! command -v dockerd > /dev/null; then
    log "no Docker engine answers and none can be started here (needs root and dockerd);" \
        "the docker tests will skip"
    exit 0
else
    started=0
    # Defaults first; then what sandboxes without overlayfs or netfilter need.
    for flags in "" "--storage-driver=vfs" "--storage-driver=vfs --iptables=false"; do
        log "starting dockerd ${flags:-with default settings} (log $DOCKERD_LOG)"
        # shellcheck disable=SC2086  # flags are words
        setsid nohup dockerd $flags >> "$DOCKERD_LOG" 2>&1 < /dev/null &
        pid=$!
        for ((i = 0; i < WAIT_S * 2; i++)); do
            if engine_up; then
                started=1
                break
            fi
            kill -0 "$pid" 2> /dev/null || break
            sleep 0.5
        done
        ((started)) && break
        kill "$pid" 2> /dev/null
        wait "$pid" 2> /dev/null
        log "dockerd ${flags:-with default settings} did not come up; last lines of its log:"
        tail -5 "$DOCKERD_LOG" >&2
    done
    if ((started)); then
        log "dockerd running (pid $pid): $(docker version --format 'server {{.Server.Version}}')"
    else
        log "dockerd cannot run in this environment; the docker tests will skip"
        exit 0
    fi
fi
if docker compose version > /dev/null 2>&1; then
    log "compose: $(docker compose version)"
elif command -v docker-compose > /dev/null; then
    log "compose: $(docker-compose version --short) (docker-compose v1)"
else
    log "no compose command (docker compose or docker-compose): the compose test will skip"
fi
exit 0
