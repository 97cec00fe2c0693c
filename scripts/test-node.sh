#!/usr/bin/env bash
# Build, start and stop a REAL single-node Kubernetes node for tests: kubelet
# (dockershim) on a private dockerd, kube-scheduler, CNI bridge + host-local,
# against a real kube-apiserver + kube-controller-manager (every controller,
# EndpointSlices written by the real controller as discovery.k8s.io/v1beta1).
#
# Usage:
#   scripts/test-node.sh build                 # build + cache binaries and images (only if missing; root)
#   scripts/test-node.sh start DIR [KUBECONFIG] # start the node, state under DIR; prints the kubeconfig path
#   scripts/test-node.sh stop DIR              # stop everything `start DIR` started, remove what it
#                                              # created on the host, verify nothing is left (safe twice)
#   scripts/test-node.sh env DIR               # prints export KUBECONFIG=... DOCKER_HOST=...
#
# Without KUBECONFIG, `start` starts its own API server in DIR/apiserver with
#   MESH_TEST_APISERVER_NODE=1 scripts/test-apiserver.sh start DIR/apiserver
# (endpointslice controllers on, default endpoint reconciler, v1beta1 served).
# With KUBECONFIG (an admin kubeconfig of a running server), the node joins it.
#
# Binaries are built from Debian bookworm's `kubernetes` source package with
# the recipe of scripts/test-apiserver.sh (scripts/lib-kube.sh) and cached in
#   ${MESH_TEST_APISERVER_CACHE:-/var/cache/mesh-test-apiserver}/<debian-source-version>/
# next to kube-apiserver; images (pause; flaskapp, a tiny static HTTP server
# usable as the seed's flaskapp, with a /client; redis, Debian's redis-server)
# are built offline with `docker build` FROM scratch from images/ (repo root)
# and cached as `docker save` tarballs in .../<version>/images/.
#
# Only one node per machine: the kubelet hardcodes some host paths
# (/var/lib/kubelet/device-plugins, /var/log/pods) and the pods' cgroups are
# /kubepods; a lock file names the running node's DIR.
#
# Environment:
#   MESH_TEST_NODE_POD_CIDR   pod range, a /24 (default 10.253.0.0/24); start refuses a
#                             range that overlaps any address or route on the machine
#   MESH_TEST_NODE_BRIDGE     CNI bridge name (default meshnode0)
#   MESH_TEST_NODE_NAME       node name (default mesh-node)
#   MESH_TEST_NODE_TIMEOUT    seconds to wait for each component (default 120)
#   MESH_TEST_NODE_KUBE_PROXY `iptables`: also run kube-proxy (iptables mode) on the node;
#                             unset, empty or `none` (default): no kube-proxy
#   DOCKER                    docker client (default /usr/bin/docker from docker.io)
#
# See docs/node.md.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
PROG="$(basename "$0")"
log() { printf '[%s] %s\n' "$PROG" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$PROG" "$*" >&2; exit 1; }

# shellcheck source=scripts/lib-kube.sh
source "$SCRIPT_DIR/lib-kube.sh"

POD_CIDR="${MESH_TEST_NODE_POD_CIDR:-10.253.0.0/24}"
BRIDGE="${MESH_TEST_NODE_BRIDGE:-meshnode0}"
NODE_NAME="${MESH_TEST_NODE_NAME:-mesh-node}"
START_TIMEOUT="${MESH_TEST_NODE_TIMEOUT:-120}"
DOCKER="${DOCKER:-/usr/bin/docker}"
LOCK_FILE=/run/mesh-test-node.owner
NODE_BINS=(kubelet kube-scheduler kube-proxy)
KUBE_PROXY_MODE="${MESH_TEST_NODE_KUBE_PROXY:-none}"
NODE_PKGS=(docker.io containernetworking-plugins jq gcc libc6-dev iproute2 iptables curl)
CNI_BIN_DIR=/usr/lib/cni
# Sysctls the kubelet sets on the host (container_manager_linux.go,
# setupKernelTunables): saved at start, restored at stop. (net.ipv4.ip_forward
# is not ours: the node never changes it, other tests on the machine do; the
# one exception is kube-proxy's, see start_kube_proxy.)
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
    kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
# Host paths the kubelet or containerd create whatever their flags say; removed
# at stop when they did not exist before start.
# Mounts made shared while the node runs (see save_host_state), as systemd
# would have them: the agent's DaemonSet mounts them with HostToContainer.
SHARED_MOUNTS=(/sys/fs/cgroup /sys/fs/bpf)
# Host settings kube-proxy (iptables mode, flags of start_kube_proxy) may
# change: route_localnet it sets to 1 (Kubernetes 1.20 always does, for
# NodePorts on 127.0.0.1); the conntrack ones its flags tell it to leave alone,
# saved anyway so that stop restores them should a flag ever be lost.
# bridge-nf-call-iptables it only reads. Saved with SYSCTLS when it runs.
KUBE_PROXY_SYSCTLS=(net.ipv4.conf.all.route_localnet net.netfilter.nf_conntrack_max
    net.netfilter.nf_conntrack_tcp_timeout_established net.netfilter.nf_conntrack_tcp_timeout_close_wait
    net.bridge.bridge-nf-call-iptables)
HOST_PATHS=(/var/lib/kubelet /var/log/pods /var/log/containers /run/containerd /var/lib/dockershim /run/docker)

usage() {
    cat >&2 <<EOF
Usage: $PROG build | start DIR [KUBECONFIG] | stop DIR | env DIR
EOF
}

# ---------------------------------------------------------------------------
# images: sources in images/ (repo root), versioned by their content
# ---------------------------------------------------------------------------

IMAGES_SRC="$(cd "$SCRIPT_DIR/.." && pwd -P)/images"
REDIS_SERVER=/usr/bin/redis-server

# images/flaskapp: flaskapp.c, a tiny HTTP/1.0 server standing in for the
# seed's Flask app ("host=<hostname> version=<$VERSION> client=<ip>:<port>
# visits=<N>", N counted in redis), and client.c, shipped as /client for tests
# run from inside a pod (`client HOST PORT N`, `client --storm ...`). Both
# static. The tag is a hash of every file in images/flaskapp. Its tarball is
# cached as images/flaskapp-<hash>.tar, so checkouts with different sources
# (the cache is per machine, shared by every checkout) each find their own and
# never rebuild over each other; images/flaskapp.tar and IMAGES name the last
# one built.
flaskapp_tag() {
    local h
    h="$(cd "$IMAGES_SRC/flaskapp" && LC_ALL=C find . -type f | LC_ALL=C sort | xargs -d '\n' sha256sum | sha256sum | cut -c1-12)" ||
        die "cannot hash $IMAGES_SRC/flaskapp"
    printf 'mesh-test-node/flaskapp:%s\n' "$h"
}

# images/redis: Debian's redis-server with its shared libraries, FROM scratch.
# The tag is a hash of the Dockerfile and `redis-server --version`; cached as
# images/redis-<hash>.tar.
redis_tag() {
    local v h
    [[ -x "$REDIS_SERVER" ]] || die "$REDIS_SERVER missing; run '$PROG build' (installs redis-server)"
    v="$("$REDIS_SERVER" --version)" || die "$REDIS_SERVER --version failed"
    h="$({ cat "$IMAGES_SRC/redis/Dockerfile"; printf '%s\n' "$v"; } | sha256sum | cut -c1-12)"
    printf 'mesh-test-node/redis:%s\n' "$h"
}

bin_dir_for_build() { printf '%s/%s\n' "$KUBE_CACHE_ROOT" "$1"; }

# Cache directory with everything `start` needs (current Debian version first,
# else the newest complete one).
find_node_dir() {
    local ver d best=""
    ok_dir() {
        local x="$1" b
        for b in kube-apiserver kube-controller-manager "${NODE_BINS[@]}"; do
            [[ -x "$x/$b" ]] || return 1
        done
        [[ -f "$x/images/IMAGES" ]]
    }
    if ver="$(kube_debian_src_version)" && ok_dir "$KUBE_CACHE_ROOT/$ver"; then
        printf '%s\n' "$KUBE_CACHE_ROOT/$ver"
        return 0
    fi
    for d in "$KUBE_CACHE_ROOT"/*/; do
        d="${d%/}"
        ok_dir "$d" && best="$d"
    done
    [[ -n "$best" ]] || return 1
    printf '%s\n' "$best"
}

# ---------------------------------------------------------------------------
# process helpers (as in test-apiserver.sh)
# ---------------------------------------------------------------------------

pid_running() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state="$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$1/stat" 2>/dev/null || true)"
    [[ "$state" != Z ]]
}

pid_alive() {
    local pidfile="$1" name="$2" pid
    [[ -f "$pidfile" ]] || return 1
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    pid_running "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$name"
}


stop_one() {
    local name="$1" pidfile="$2" secs="${3:-10}" pid i
    if ! pid_alive "$pidfile" "$name"; then
        rm -f "$pidfile"
        return 0
    fi
    pid="$(cat "$pidfile")"
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
        pid_running "$pid" || break
        sleep 0.1
    done
    if pid_running "$pid"; then
        log "$name did not exit after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            pid_running "$pid" || break
            sleep 0.1
        done
    fi
    rm -f "$pidfile"
}


declare -a USED_PORTS=()

# wait_for SECONDS DESCRIPTION PIDFILE NAME CMD...: poll CMD every 0.2 s while
# the process in PIDFILE lives.
wait_for() {
    local secs="$1" what="$2" pidfile="$3" name="$4" i
    shift 4
    for ((i = 0; i < secs * 5; i++)); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        [[ -z "$pidfile" ]] || pid_alive "$pidfile" "$name" || { log "$name exited while waiting for: $what"; return 1; }
        sleep 0.2
    done
    log "timed out after ${secs}s waiting for: $what"
    return 1
}

# ---------------------------------------------------------------------------
# dockerd (used by `build` for images and by `start` for the node)
# ---------------------------------------------------------------------------

# The OCI runtime wrapper registered as dockerd's default runtime.
write_runtime_wrapper() {
    local f="$1"
    cat >"$f" <<'EOF'
#!/bin/sh
# runc wrapper, registered as dockerd's default runtime by scripts/test-node.sh.
#
# FOR THIS KIND OF VM ONLY: the test VMs deny a negative oom_score_adj (the
# process lacks CAP_SYS_RESOURCE), while dockershim gives every pod sandbox
# oom_score_adj -998 (and Guaranteed pods' containers -997), so runc fails with
# "can't get final child's PID from pipe: EOF" and no pod ever starts. This
# wrapper clamps process.oomScoreAdj to >= 0 in the OCI bundle's config.json
# (or in an exec's process.json) and then runs the real runc unchanged. On a
# normal machine (or a real node) it is not needed and should not be used: it
# only changes which processes the kernel OOM killer prefers.
#
# Same VM, same cause: CAP_SYS_RESOURCE is not in this machine's bounding set,
# so runc fails any container that asks for it ("unable to apply caps:
# operation not permitted"), such as the mesh agent's DaemonSet (which wants it
# for memlock limits on kernels older than 5.11, not on this one). When the
# bounding set lacks it, it is removed from the bundle's capability sets.
set -eu
bundle="" process="" cmd="" prev=""
for a in "$@"; do
    case "$prev" in
        --bundle | -b) bundle="$a" ;;
        --process | -p) process="$a" ;;
    esac
    case "$a" in
        --bundle=*) bundle="${a#--bundle=}" ;;
        --process=*) process="${a#--process=}" ;;
        create | run | exec) [ -n "$cmd" ] || cmd="$a" ;;
    esac
    prev="$a"
done
clamp() {
    f="$1"; filter="$2"
    [ -f "$f" ] || return 0
    t="$f.oomclamp.$$"
    if jq -c "$filter" "$f" >"$t"; then mv -f "$t" "$f"; else rm -f "$t"; fi
}
nocaps='.'
bnd="$(sed -n 's/^CapBnd:[[:space:]]*//p' /proc/self/status)"
if [ -n "$bnd" ] && [ $(((0x$bnd >> 24) & 1)) -eq 0 ]; then
    nocaps='if .capabilities then .capabilities |= with_entries(.value |= (if type == "array" then map(select(. != "CAP_SYS_RESOURCE")) else . end)) else . end'
fi
case "$cmd" in
    create | run)
        [ -n "$bundle" ] || bundle="$(pwd)"
        clamp "$bundle/config.json" "(if (.process.oomScoreAdj // 0) < 0 then .process.oomScoreAdj = 0 else . end) | .process |= ($nocaps)"
        ;;
    exec)
        [ -z "$process" ] || clamp "$process" "(if (.oomScoreAdj // 0) < 0 then .oomScoreAdj = 0 else . end) | $nocaps"
        ;;
esac
exec /usr/sbin/runc "$@"
EOF
    chmod 755 "$f"
}

# start_dockerd DIR: dockerd with every path under DIR (socket DIR/docker.sock).
start_dockerd() {
    local d="$1"
    mkdir -p "$d/docker/data" "$d/docker/exec" "$d/run" "$d/logs" "$d/bin"
    # containerd and shim sockets live under --exec-root; unix socket paths are limited to 107 bytes.
    local probe="$d/docker/exec/containerd/containerd.sock.ttrpc"
    [[ ${#probe} -lt 100 ]] || die "DIR path too long for unix sockets under it ($probe); use a shorter DIR"
    write_runtime_wrapper "$d/bin/runc-oomclamp"
    # dockerd 20.10 writes its trust key to /etc/docker/key.json unless told
    # otherwise (a daemon.json key only); /run/docker/plugins it always makes.
    printf '{"deprecated-key-path": "%s"}\n' "$d/docker/key.json" >"$d/docker/daemon.json"
    start_bg dockerd "$d/run/dockerd.pid" "$d/logs/dockerd.log" \
        /usr/sbin/dockerd \
        --config-file "$d/docker/daemon.json" \
        --data-root "$d/docker/data" \
        --exec-root "$d/docker/exec" \
        --pidfile "$d/docker/dockerd.pid" \
        -H "unix://$d/docker.sock" \
        --iptables=false --ip6tables=false --ip-masq=false --bridge=none \
        --userland-proxy=false \
        --exec-opt native.cgroupdriver=cgroupfs \
        --storage-driver overlay2 \
        --log-driver json-file \
        --add-runtime "oomclamp=$d/bin/runc-oomclamp" \
        --default-runtime oomclamp
    wait_for "$START_TIMEOUT" "dockerd to answer on $d/docker.sock" "$d/run/dockerd.pid" dockerd \
        env DOCKER_HOST="unix://$d/docker.sock" "$DOCKER" version
}

# ---------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------

# Debian's redis-server for the redis image: installed if missing, never left
# running on the host (kube_ensure_packages installs with a policy-rc.d that
# denies starting services; whatever started anyway is stopped here).
ensure_redis_server() {
    [[ -x "$REDIS_SERVER" ]] && return 0
    local before after p
    before="$(pgrep -x redis-server || true)"
    kube_ensure_packages redis-server
    [[ -x "$REDIS_SERVER" ]] || die "apt-get install redis-server did not give $REDIS_SERVER"
    if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
        systemctl disable --now redis-server >/dev/null 2>&1 || true
    else
        command -v update-rc.d >/dev/null && { update-rc.d redis-server disable >/dev/null 2>&1 || true; }
        command -v service >/dev/null && { service redis-server stop >/dev/null 2>&1 || true; }
    fi
    # Any redis-server the package started (never one that ran before).
    after="$(pgrep -x redis-server || true)"
    for p in $after; do
        grep -qx "$p" <<<"$before" && continue
        log "stopping redis-server pid $p started by the package install"
        kill -TERM "$p" 2>/dev/null || true
    done
    for _ in $(seq 50); do
        after="$(pgrep -x redis-server | grep -vxF -f <(printf '%s\n' "$before") || true)"
        [[ -z "$after" ]] && break
        sleep 0.1
    done
    # shellcheck disable=SC2086
    [[ -z "$after" ]] || kill -KILL $after 2>/dev/null || true
    log "installed $("$REDIS_SERVER" --version)"
}

# rootfs for the redis image in $1: redis-server and the libraries ldd names
# (symlinks followed: the file itself under the name the loader looks for).
redis_rootfs() {
    local root="$1" lib
    mkdir -p "$root/usr/bin"
    cp -L "$REDIS_SERVER" "$root/usr/bin/redis-server"
    while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done < <(ldd "$REDIS_SERVER" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) { print $i; break } }')
    [[ -n "$(find "$root" -name 'ld-linux*' -print -quit)" ]] || die "ldd $REDIS_SERVER named no dynamic loader"
}

build_images() {
    local dest="$1" ver="$2" out="$1/images"
    local pause_tag flask_tag redis_tag
    pause_tag="$(sed -n 's/^TAG *= *//p' "$dest/src/build/pause/Makefile" | head -n1)"
    [[ -n "$pause_tag" ]] || die "no TAG in $dest/src/build/pause/Makefile"
    pause_tag="mesh-test-node/pause:$pause_tag-$(kube_upstream_version "$ver")"
    flask_tag="$(flaskapp_tag)"
    redis_tag="$(redis_tag)"
    if [[ -f "$out/IMAGES" ]] && grep -qx "pause=$pause_tag" "$out/IMAGES" &&
        [[ -f "$out/flaskapp-${flask_tag##*:}.tar" && -f "$out/redis-${redis_tag##*:}.tar" ]]; then
        log "images already cached in $out ($pause_tag, $flask_tag, $redis_tag)"
        return 0
    fi
    log "building images $pause_tag, $flask_tag and $redis_tag offline (FROM scratch)"
    local work
    work="$(mktemp -d /var/tmp/mesh-test-node-img.XXXXXX)"
    BUILD_WORK="$work"
    mkdir -p "$work/pause" "$work/flaskapp" "$work/redis"
    nice gcc -Os -static -s -Wall -DVERSION="${pause_tag##*:}" -o "$work/pause/pause" "$dest/src/build/pause/linux/pause.c" ||
        die "gcc -static pause.c failed"
    printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$work/pause/Dockerfile"
    cp "$IMAGES_SRC/flaskapp/Dockerfile" "$work/flaskapp/"
    nice gcc -O2 -static -s -Wall -Wextra -o "$work/flaskapp/flaskapp" "$IMAGES_SRC/flaskapp/flaskapp.c" ||
        die "gcc -static flaskapp.c failed"
    nice gcc -O2 -static -s -Wall -Wextra -pthread -o "$work/flaskapp/client" "$IMAGES_SRC/flaskapp/client.c" ||
        die "gcc -static client.c failed"
    cp "$IMAGES_SRC/redis/Dockerfile" "$work/redis/"
    redis_rootfs "$work/redis/rootfs"

    # A throwaway dockerd, only to run `docker build` and `docker save`.
    local dd="$work/d" run_docker_absent=0
    [[ -e /run/docker ]] || run_docker_absent=1
    start_dockerd "$dd" || die "temporary dockerd did not start (log: $dd/logs/dockerd.log)"
    local rc=0
    (
        export DOCKER_HOST="unix://$dd/docker.sock" DOCKER_BUILDKIT=0
        "$DOCKER" build -q -t "$pause_tag" "$work/pause" >&2 &&
            "$DOCKER" build -q -t "$flask_tag" "$work/flaskapp" >&2 &&
            "$DOCKER" build -q -t "$redis_tag" "$work/redis" >&2 &&
            "$DOCKER" save -o "$work/pause.tar" "$pause_tag" &&
            "$DOCKER" save -o "$work/flaskapp.tar" "$flask_tag" &&
            "$DOCKER" save -o "$work/redis.tar" "$redis_tag"
    ) || rc=$?
    stop_one dockerd "$dd/run/dockerd.pid" 20
    umount_under "$dd"
    [[ $run_docker_absent -eq 0 ]] || rm -rf /run/docker
    [[ $rc -eq 0 ]] || die "docker build/save failed (rc=$rc; dockerd log $dd/logs/dockerd.log)"
    mkdir -p "$out"
    install -m 0644 "$work/pause.tar" "$out/pause.tar"
    install -m 0644 "$work/flaskapp.tar" "$out/flaskapp-${flask_tag##*:}.tar"
    install -m 0644 "$work/flaskapp.tar" "$out/flaskapp.tar"
    install -m 0644 "$work/redis.tar" "$out/redis-${redis_tag##*:}.tar"
    printf 'pause=%s\nflaskapp=%s\nredis=%s\n' "$pause_tag" "$flask_tag" "$redis_tag" >"$out/IMAGES.tmp"
    mv -f "$out/IMAGES.tmp" "$out/IMAGES"
    rm -rf "$work"
    BUILD_WORK=""
    log "cached images in $out: $pause_tag, $flask_tag, $redis_tag"
}

BUILD_WORK=""
build_cleanup() {
    [[ -n "$BUILD_WORK" && -d "$BUILD_WORK" ]] || return 0
    if [[ -f "$BUILD_WORK/d/run/dockerd.pid" ]]; then
        stop_one dockerd "$BUILD_WORK/d/run/dockerd.pid" 20 || true
    fi
    umount_under "$BUILD_WORK" || true
    rm -rf "$BUILD_WORK"
}

cmd_build() {
    [[ $(id -u) -eq 0 ]] || die "build must run as root"
    local t0=$SECONDS ver dest
    ver="$(kube_debian_src_version_or_update)"
    dest="$(bin_dir_for_build "$ver")"
    kube_ensure_packages "${NODE_PKGS[@]}"
    trap build_cleanup EXIT
    # kube-apiserver + kube-controller-manager first: test-apiserver.sh's build
    # replaces the whole version directory when it builds.
    if [[ ! -x "$dest/kube-apiserver" || ! -x "$dest/kube-controller-manager" ]]; then
        "$SCRIPT_DIR/test-apiserver.sh" build
    else
        kube_ensure_packages etcd-server openssl
    fi
    local need_build=0 b
    for b in "${NODE_BINS[@]}"; do [[ -x "$dest/$b" ]] || need_build=1; done
    [[ -f "$dest/src/build/pause/linux/pause.c" && -f "$dest/src/build/pause/Makefile" ]] || need_build=1
    if [[ $need_build -eq 1 ]]; then
        local work
        work="$(mktemp -d /var/tmp/mesh-test-node-build.XXXXXX)"
        BUILD_WORK="$work"
        log "building ${NODE_BINS[*]} from Debian source '$KUBE_SRC_PKG' $ver"
        kube_build_from_source "$work" "$ver" "$dest" "${NODE_BINS[@]}" -- \
            build/pause/linux/pause.c build/pause/Makefile
        rm -rf "$work"
        BUILD_WORK=""
        log "cached $dest/{${NODE_BINS[*]// /,}} ($("$dest/kubelet" --version 2>/dev/null))"
    else
        log "${NODE_BINS[*]} already cached in $dest"
    fi
    ensure_redis_server
    build_images "$dest" "$ver"
    trap - EXIT
    log "build done in $((SECONDS - t0))s: $dest"
}

# ---------------------------------------------------------------------------
# host state helpers
# ---------------------------------------------------------------------------

# Unmount every mount point at or under $1, deepest first.
umount_under() {
    local d="$1" m
    [[ -n "$d" && "$d" != / ]] || return 0
    for _ in 1 2 3; do
        local mounts=()
        while IFS= read -r m; do mounts+=("$m"); done < <(
            awk -v d="$d" '{ p = $5; gsub(/\\040/, " ", p); if (p == d || index(p, d "/") == 1) print p }' /proc/self/mountinfo |
                awk '{ print length($0) " " $0 }' | sort -rn | cut -d' ' -f2-
        )
        [[ ${#mounts[@]} -gt 0 ]] || return 0
        for m in "${mounts[@]}"; do
            umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
        done
    done
}

# ipv4 "a.b.c.d" -> integer
ip2int() {
    local IFS=.
    # shellcheck disable=SC2086
    set -- $1
    echo $((($1 << 24) | ($2 << 16) | ($3 << 8) | $4))
}

cidr_overlaps() {
    local a="$1" b="$2" an al bn bl m
    an="$(ip2int "${a%/*}")"; al="${a#*/}"
    bn="$(ip2int "${b%/*}")"; bl="${b#*/}"
    [[ "$a" == */* ]] || al=32
    [[ "$b" == */* ]] || bl=32
    m=$((al < bl ? al : bl))
    local mask=$(((0xffffffff << (32 - m)) & 0xffffffff))
    [[ $((an & mask)) -eq $((bn & mask)) ]]
}

# Refuse a pod range that overlaps any IPv4 address or route on the machine
# (all routing tables, the default route excepted).
check_pod_cidr() {
    [[ "$POD_CIDR" =~ ^([0-9]+\.[0-9]+\.[0-9]+)\.0/24$ ]] || die "MESH_TEST_NODE_POD_CIDR must be a /24 ending in .0 (got $POD_CIDR)"
    local x
    while read -r x; do
        [[ -z "$x" || "$x" == default ]] && continue
        if cidr_overlaps "$x" "$POD_CIDR"; then
            die "pod range $POD_CIDR overlaps '$x' on this machine; set MESH_TEST_NODE_POD_CIDR"
        fi
    done < <(
        ip -4 route show table all 2>/dev/null | awk '$1 != "broadcast" && $1 != "local" { print $1 } $1 == "local" { print $2 }'
        ip -4 -o addr show 2>/dev/null | awk '{ print $4 }'
    )
}

save_host_state() {
    local d="$1" s p
    : >"$d/run/sysctls"
    local sysctls=("${SYSCTLS[@]}")
    [[ "$KUBE_PROXY_MODE" == none ]] || sysctls+=("${KUBE_PROXY_SYSCTLS[@]}")
    for s in "${sysctls[@]}"; do
        printf '%s=%s\n' "$s" "$(sysctl -n "$s" 2>/dev/null || echo '?')" >>"$d/run/sysctls"
    done
    : >"$d/run/host-paths-absent"
    for p in "${HOST_PATHS[@]}"; do
        [[ -e "$p" ]] || echo "$p" >>"$d/run/host-paths-absent"
    done
    iptables_chains >"$d/run/iptables-chains" 2>/dev/null || true
    # Every KUBE- rule and chain already there (none on a machine without
    # Kubernetes): anything KUBE- beyond these at stop is kube-proxy's leftover.
    kube_iptables_rules >"$d/run/iptables-kube-rules" 2>/dev/null || true
    # With the nf_tables backend, a table appears in nft on first use (kube-proxy
    # makes KUBE-PROXY-CANARY in mangle): the tables absent now, deleted at
    # stop if empty again.
    : >"$d/run/nft-tables-absent"
    if iptables -V 2>/dev/null | grep -q nf_tables && command -v nft >/dev/null; then
        for p in filter nat mangle raw; do
            nft list table ip "$p" >/dev/null 2>&1 || echo "$p" >>"$d/run/nft-tables-absent"
        done
    fi
    # Mount propagation, as on a real node. The agent's DaemonSet mounts the
    # host's /sys/fs/cgroup and /sys/fs/bpf with mountPropagation
    # HostToContainer (rslave), which docker refuses unless the source mount is
    # shared or slave ("... is mounted on ... but it is not a shared or slave
    # mount": CreateContainerError). systemd makes every mount shared; this VM
    # has no systemd and its mounts are private. Made shared here (only these
    # two, only if private), made private again at stop.
    : >"$d/run/made-shared"
    for p in "${SHARED_MOUNTS[@]}"; do
        mountpoint -q "$p" || continue
        if [[ "$(findmnt -n -o PROPAGATION --mountpoint "$p" 2>/dev/null)" == private ]] &&
            mount --make-shared "$p"; then
            echo "$p" >>"$d/run/made-shared"
        fi
    done
}

iptables_chains() {
    local t
    for t in filter nat mangle raw; do
        iptables -w 5 -t "$t" -S 2>/dev/null | awk -v t="$t" '$1 == "-N" { print t " " $2 }'
    done
}

# KUBE- chains and rules (iptables -S lines) of the filter, nat and mangle tables.
kube_iptables_rules() {
    local t
    for t in filter nat mangle; do
        iptables -w 5 -t "$t" -S 2>/dev/null | grep -F -- KUBE- | sed "s/^/$t /" || true
    done
}

restore_host_state() {
    local d="$1" line k v cur p
    if [[ -f "$d/run/sysctls" ]]; then
        while IFS= read -r line; do
            k="${line%%=*}"; v="${line#*=}"
            [[ "$v" == '?' ]] && continue
            cur="$(sysctl -n "$k" 2>/dev/null || true)"
            if [[ "$cur" != "$v" ]]; then
                log "restoring sysctl $k=$v (was set to $cur)"
                sysctl -q -w "$k=$v" >/dev/null 2>&1 || log "warning: could not restore $k"
            fi
        done <"$d/run/sysctls"
    fi
    # net.ipv4.ip_forward: set to 1 by start only for kube-proxy, and only when
    # it was 0 (see start_kube_proxy); back to 0 then, else left alone.
    if [[ -f "$d/run/ip-forward-set" ]]; then
        if [[ "$(sysctl -n net.ipv4.ip_forward 2>/dev/null)" != 0 ]]; then
            log "restoring sysctl net.ipv4.ip_forward=0 (set to 1 for kube-proxy)"
            sysctl -q -w net.ipv4.ip_forward=0 >/dev/null 2>&1 || log "warning: could not restore net.ipv4.ip_forward"
        fi
        rm -f "$d/run/ip-forward-set"
    fi
    # iptables chains created since start (the kubelet's util chains are
    # disabled by flag; this catches anything else): unlink, flush, delete.
    if [[ -f "$d/run/iptables-chains" ]]; then
        local t c
        while read -r t c; do
            [[ -n "$c" ]] || continue
            grep -qx "$t $c" "$d/run/iptables-chains" && continue
            log "removing iptables chain $c (table $t) created by the node"
            iptables -w 5 -t "$t" -S 2>/dev/null | grep -E -- "-j $c( |\$)" | sed 's/^-A /-D /' |
                while read -r rule; do
                    # shellcheck disable=SC2086
                    eval iptables -w 5 -t "$t" $rule 2>/dev/null || true
                done
            iptables -w 5 -t "$t" -F "$c" 2>/dev/null || true
        done < <(iptables_chains)
        while read -r t c; do
            [[ -n "$c" ]] || continue
            grep -qx "$t $c" "$d/run/iptables-chains" && continue
            iptables -w 5 -t "$t" -X "$c" 2>/dev/null || true
        done < <(iptables_chains)
    fi
    if [[ -s "$d/run/nft-tables-absent" ]]; then
        local rules
        while IFS= read -r p; do
            [[ -n "$p" ]] || continue
            nft list table ip "$p" >/dev/null 2>&1 || continue
            rules="$(iptables -w 5 -t "$p" -S 2>/dev/null | grep -v '^-P [A-Z]* ACCEPT$' || true)"
            if [[ -z "$rules" ]]; then
                log "removing nft table ip $p (empty; created while the node ran)"
                nft delete table ip "$p" 2>/dev/null || log "warning: could not delete nft table ip $p"
            fi
        done <"$d/run/nft-tables-absent"
    fi
    if [[ -f "$d/run/made-shared" ]]; then
        while IFS= read -r p; do
            [[ -n "$p" ]] || continue
            if ! { mountpoint -q "$p" && mount --make-private "$p"; }; then
                log "warning: could not make $p private again"
            fi
        done <"$d/run/made-shared"
        rm -f "$d/run/made-shared"
    fi
    if [[ -f "$d/run/host-paths-absent" ]]; then
        while IFS= read -r p; do
            [[ -n "$p" && -e "$p" ]] || continue
            umount_under "$p"
            log "removing $p (created while the node ran)"
            rm -rf "$p"
        done <"$d/run/host-paths-absent"
    fi
}

remove_forward_chain() {
    while iptables -w 5 -D FORWARD -j MESH-TEST-NODE-FWD 2>/dev/null; do :; done
    iptables -w 5 -F MESH-TEST-NODE-FWD 2>/dev/null || true
    iptables -w 5 -X MESH-TEST-NODE-FWD 2>/dev/null || true
}

# Pids of processes started for DIR: any process whose command line mentions
# DIR and whose executable is one we start (never this script or its callers).
node_pids() {
    local d="$1" p exe
    for p in /proc/[0-9]*; do
        p="${p#/proc/}"
        [[ "$p" == "$$" || "$p" == "$BASHPID" ]] && continue
        exe="$(readlink "/proc/$p/exe" 2>/dev/null || true)"
        case "$(basename "$exe")" in
            dockerd | containerd | containerd-shim* | runc | kubelet | kube-scheduler | kube-proxy | docker-proxy | docker-init) ;;
            *) continue ;;
        esac
        tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$d/" && echo "$p"
    done
}

# kubepods cgroups (cgroupfs driver) in every hierarchy, v1 and unified.
kubepods_cgroups() {
    local c
    for c in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
        [[ -d "$c" ]] && echo "$c"
    done
}

kill_kubepods_processes() {
    local c p n=0
    for c in $(kubepods_cgroups); do
        while IFS= read -r p; do
            [[ -n "$p" ]] || continue
            kill -KILL "$p" 2>/dev/null && n=$((n + 1))
        done < <(find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u)
    done
    [[ $n -eq 0 ]] || log "killed $n leftover pod processes"
}

remove_kubepods_cgroups() {
    local c i
    for c in $(kubepods_cgroups); do
        for i in 1 2 3 4 5; do
            find "$c" -depth -type d -exec rmdir {} + 2>/dev/null || true
            [[ -d "$c" ]] || break
            sleep 0.2
        done
        [[ -d "$c" ]] && log "warning: could not remove cgroup $c"
    done
    return 0
}

# ---------------------------------------------------------------------------
# start / stop
# ---------------------------------------------------------------------------


kubectl_k() { kubectl --kubeconfig "$KUBECONFIG_PATH" "$@"; }

# Ready, and schedulable: no taints left (the node lifecycle controller
# removes not-ready once it sees Ready; a pressure condition adds its own).
node_ready() {
    [[ "$(kubectl_k get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}/{.spec.taints}' 2>/dev/null)" == True/ ]]
}

# Why node_ready is false, for the log.
node_state() {
    kubectl_k get node "$NODE_NAME" \
        -o jsonpath='{range .status.conditions[*]}{.type}={.status} {end}taints={.spec.taints}' 2>&1 || true
}

START_DIR=""
on_start_exit() {
    local rc=$?
    [[ -n "$START_DIR" ]] || return 0
    local f
    log "start failed (rc=$rc); cleaning up"
    for f in dockerd kube-scheduler kubelet kube-proxy; do
        if [[ -s "$START_DIR/logs/$f.log" ]]; then
            log "---- last lines of $START_DIR/logs/$f.log ----"
            tail -n 15 "$START_DIR/logs/$f.log" >&2 || true
        fi
    done
    cleanup_node "$START_DIR" || true
    exit "$rc"
}

cmd_start() {
    [[ $(id -u) -eq 0 ]] || die "start must run as root"
    local dir ext_kubeconfig="${2:-}"
    dir="$(abs_dir "$1")"
    case "$KUBE_PROXY_MODE" in
        none | iptables) ;;
        *) die "MESH_TEST_NODE_KUBE_PROXY must be iptables, none or empty (got '$KUBE_PROXY_MODE')" ;;
    esac
    local cache
    cache="$(find_node_dir)" || die "no complete cache in $KUBE_CACHE_ROOT; run '$PROG build' first"
    local p
    for p in /usr/sbin/dockerd /usr/sbin/runc "$CNI_BIN_DIR/bridge" "$CNI_BIN_DIR/host-local" "$CNI_BIN_DIR/loopback"; do
        [[ -x "$p" ]] || die "$p missing; run '$PROG build' (installs ${NODE_PKGS[*]})"
    done
    for p in jq kubectl curl ip iptables "$DOCKER"; do
        command -v "$p" >/dev/null || die "$p not found"
    done

    # Already running as asked: idempotent.
    if pid_alive "$dir/run/kubelet.pid" kubelet && pid_alive "$dir/run/dockerd.pid" dockerd &&
        pid_alive "$dir/run/kube-scheduler.pid" kube-scheduler && [[ -f "$dir/kubeconfig" ]] &&
        grep -qx "kube_proxy=$KUBE_PROXY_MODE" "$dir/info" 2>/dev/null &&
        { [[ "$KUBE_PROXY_MODE" == none ]] || pid_alive "$dir/run/kube-proxy.pid" kube-proxy; }; then
        KUBECONFIG_PATH="$dir/kubeconfig"
        if node_ready; then
            log "node $NODE_NAME already running from $dir"
            printf '%s\n' "$dir/kubeconfig"
            return 0
        fi
    fi
    # One node per machine.
    if [[ -f "$LOCK_FILE" ]]; then
        local other
        other="$(cat "$LOCK_FILE" 2>/dev/null || true)"
        if [[ -n "$other" && "$other" != "$dir" ]] && [[ -n "$(node_pids "$other")" ]]; then
            die "another test node is running from $other (one per machine); '$PROG stop $other' first"
        fi
    fi
    # Leftovers of an earlier run of this DIR (or of a crashed one).
    if [[ -d "$dir/run" ]]; then
        log "cleaning up an earlier node in $dir first"
        cleanup_node "$dir" || die "could not clean up the earlier node in $dir"
    fi
    ip link show "$BRIDGE" >/dev/null 2>&1 &&
        die "link $BRIDGE already exists (another test node, or a leftover: '$PROG stop DIR', or 'ip link del $BRIDGE')"
    check_pod_cidr

    local t0=$SECONDS
    START_DIR="$dir"
    trap on_start_exit EXIT
    # Interrupted (a test killed, ^C): exit, which runs the cleanup above.
    trap 'exit 130' INT TERM HUP
    printf '%s\n' "$dir" >"$LOCK_FILE"
    rm -rf "${dir:?}/run" "$dir/logs" "$dir/cni" "$dir/kubelet" "$dir/dockershim" "$dir/docker" "${dir:?}/bin" \
        "$dir/kubeconfig" "$dir/info" "$dir/env"
    mkdir -p "$dir/run" "$dir/logs" "$dir/bin"
    save_host_state "$dir"

    # --- CNI: a bridge this script owns, host-local IPAM ---------------------
    # The bridge gets the gateway address here, and the bridge plugin runs
    # with isGateway=false: it then neither assigns addresses to the bridge nor
    # turns on net.ipv4.ip_forward. Pods get a default route to the bridge
    # address, so they reach the host (and each other) and nothing else:
    # with ip_forward 0 nothing they send leaves the machine. The API server we
    # start and the kubelet listen on the bridge address too (not on eth0).
    local prefix="${POD_CIDR%.0/24}"
    local gw="$prefix.1"
    ip link add "$BRIDGE" type bridge
    touch "$dir/run/bridge-created"
    ip addr add "$gw/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    # And should the host forward anyway (net.ipv4.ip_forward is 1 on this
    # machine whenever some other test turned it on), nothing is routed between
    # the bridge and any other interface: pods talk to each other and to the
    # host, never beyond. (A chain of ours, removed at stop with its jump.)
    remove_forward_chain
    iptables -w 5 -N MESH-TEST-NODE-FWD
    iptables -w 5 -A MESH-TEST-NODE-FWD -i "$BRIDGE" ! -o "$BRIDGE" -j DROP
    iptables -w 5 -A MESH-TEST-NODE-FWD -o "$BRIDGE" ! -i "$BRIDGE" -j DROP
    iptables -w 5 -I FORWARD 1 -j MESH-TEST-NODE-FWD
    mkdir -p "$dir/cni/net.d" "$dir/cni/cache" "$dir/cni/ipam"
    cat >"$dir/cni/net.d/10-mesh-test-node.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "mesh-test-node",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$dir/cni/ipam",
        "ranges": [[{ "subnet": "$POD_CIDR", "gateway": "$gw" }]],
        "routes": [{ "dst": "0.0.0.0/0", "gw": "$gw" }]
      }
    }
  ]
}
EOF

    local kubelet_auth=()
    # --- API server ----------------------------------------------------------
    if [[ -n "$ext_kubeconfig" ]]; then
        [[ -f "$ext_kubeconfig" ]] || die "kubeconfig $ext_kubeconfig not found"
        cp "$ext_kubeconfig" "$dir/kubeconfig"
        chmod 600 "$dir/kubeconfig"
        log "joining the API server of $ext_kubeconfig (without endpointslice controllers it will not fill EndpointSlices)"
    else
        local kc
        kc="$(MESH_TEST_APISERVER_NODE=1 MESH_TEST_APISERVER_ADDRESS="$gw" "$SCRIPT_DIR/test-apiserver.sh" start "$dir/apiserver")" ||
            die "test-apiserver.sh start $dir/apiserver failed"
        touch "$dir/run/own-apiserver"
        kubelet_auth=(--client-ca-file "$dir/apiserver/certs/ca.crt")
        ln -sf "$kc" "$dir/kubeconfig"
    fi
    KUBECONFIG_PATH="$dir/kubeconfig"
    kubectl_k get --raw /readyz >/dev/null 2>&1 || die "API server of $KUBECONFIG_PATH not ready"

    # --- dockerd + images ----------------------------------------------------
    start_dockerd "$dir" || die "dockerd did not start"
    export DOCKER_HOST="unix://$dir/docker.sock"
    local pause_tag flask_tag redis_tag
    pause_tag="$(sed -n 's/^pause=//p' "$cache/images/IMAGES")"
    flask_tag="$(flaskapp_tag)"
    redis_tag="$(redis_tag)"
    [[ -f "$cache/images/flaskapp-${flask_tag##*:}.tar" ]] ||
        die "image $flask_tag not cached (another checkout's sources built the cache); run '$PROG build'"
    [[ -f "$cache/images/redis-${redis_tag##*:}.tar" ]] ||
        die "image $redis_tag not cached (built before the redis image existed, or redis-server changed); run '$PROG build'"
    "$DOCKER" load -q -i "$cache/images/pause.tar" >&2 || die "docker load pause.tar failed"
    "$DOCKER" load -q -i "$cache/images/flaskapp-${flask_tag##*:}.tar" >&2 || die "docker load $flask_tag failed"
    "$DOCKER" load -q -i "$cache/images/redis-${redis_tag##*:}.tar" >&2 || die "docker load $redis_tag failed"

    # --- kube-scheduler -------------------------------------------------------
    local sched_port kubelet_port healthz_port
    sched_port="$(free_port)"; USED_PORTS+=("$sched_port")
    kubelet_port="$(free_port)"; USED_PORTS+=("$kubelet_port")
    healthz_port="$(free_port)"; USED_PORTS+=("$healthz_port")
    start_bg kube-scheduler "$dir/run/kube-scheduler.pid" "$dir/logs/kube-scheduler.log" \
        "$cache/kube-scheduler" \
        --kubeconfig "$KUBECONFIG_PATH" \
        --authentication-kubeconfig "$KUBECONFIG_PATH" \
        --authorization-kubeconfig "$KUBECONFIG_PATH" \
        --bind-address 127.0.0.1 \
        --secure-port "$sched_port" \
        --port 0 \
        --cert-dir "$dir/run/scheduler-certs" \
        --leader-elect=false
    wait_for "$START_TIMEOUT" "kube-scheduler healthz" "$dir/run/kube-scheduler.pid" kube-scheduler \
        sh -c "[ \"\$(curl -sk --max-time 2 https://127.0.0.1:$sched_port/healthz)\" = ok ]" ||
        die "kube-scheduler not healthy"

    # --- kubelet ---------------------------------------------------------------
    mkdir -p "$dir/kubelet" "$dir/dockershim"
    start_bg kubelet "$dir/run/kubelet.pid" "$dir/logs/kubelet.log" \
        "$cache/kubelet" \
        --kubeconfig "$KUBECONFIG_PATH" \
        --hostname-override "$NODE_NAME" \
        --root-dir "$dir/kubelet" \
        --cert-dir "$dir/kubelet/pki" \
        --volume-plugin-dir "$dir/kubelet/volume-plugins" \
        --container-runtime docker \
        --docker-endpoint "unix://$dir/docker.sock" \
        --container-runtime-endpoint "unix://$dir/run/dockershim.sock" \
        --image-service-endpoint "unix://$dir/run/dockershim.sock" \
        --experimental-dockershim-root-directory "$dir/dockershim" \
        --network-plugin cni \
        --cni-bin-dir "$CNI_BIN_DIR" \
        --cni-conf-dir "$dir/cni/net.d" \
        --cni-cache-dir "$dir/cni/cache" \
        --pod-infra-container-image "$pause_tag" \
        --fail-swap-on=false \
        --cgroup-driver cgroupfs \
        --make-iptables-util-chains=false \
        --address "$gw" \
        --node-ip "$gw" \
        --port "$kubelet_port" \
        --read-only-port 0 \
        --healthz-bind-address 127.0.0.1 \
        --healthz-port "$healthz_port" \
        --anonymous-auth=false \
        --authorization-mode AlwaysAllow \
        "${kubelet_auth[@]}" \
        `# Absolute, not percentages: this VM's disk reports a capacity far` \
        `# above what is free (252G, 8G available), and a DiskPressure taint` \
        `# would leave every pod Pending.` \
        --eviction-hard 'memory.available<100Mi,nodefs.available<64Mi,imagefs.available<64Mi,nodefs.inodesFree<1000,imagefs.inodesFree<1000' \
        --image-gc-high-threshold 100 \
        --image-gc-low-threshold 99 \
        --max-pods 100 \
        --register-node=true
    wait_for "$START_TIMEOUT" "kubelet healthz" "$dir/run/kubelet.pid" kubelet \
        sh -c "[ \"\$(curl -s --max-time 2 http://127.0.0.1:$healthz_port/healthz)\" = ok ]" ||
        die "kubelet not healthy"
    wait_for "$START_TIMEOUT" "node $NODE_NAME Ready and untainted" "$dir/run/kubelet.pid" kubelet node_ready ||
        die "node $NODE_NAME not Ready and untainted: $(node_state)"

    # --- kube-proxy (opt-in) ------------------------------------------------------
    if [[ "$KUBE_PROXY_MODE" == iptables ]]; then
        local t_kp
        t_kp="$(date +%s%N)"
        start_kube_proxy "$dir" "$cache" "$gw" || die "kube-proxy did not start"
        log "kube-proxy (iptables) serving Services $((($(date +%s%N) - t_kp) / 1000000)) ms after its start"
    fi

    cat >"$dir/info" <<EOF
kubeconfig=$KUBECONFIG_PATH
docker_host=unix://$dir/docker.sock
node=$NODE_NAME
pod_cidr=$POD_CIDR
bridge=$BRIDGE
gateway=$gw
pause_image=$pause_tag
flaskapp_image=$flask_tag
redis_image=$redis_tag
cache=$cache
kube_proxy=$KUBE_PROXY_MODE
EOF
    printf 'export KUBECONFIG=%q\nexport DOCKER_HOST=%q\n' "$KUBECONFIG_PATH" "unix://$dir/docker.sock" >"$dir/env"
    trap - EXIT INT TERM HUP
    START_DIR=""
    log "node $NODE_NAME Ready after $((SECONDS - t0))s; images: $flask_tag, $redis_tag"
    log "ready: source $dir/env   (stop with: $PROG stop $dir)"
    printf '%s\n' "$KUBECONFIG_PATH"
}

# kube-proxy in iptables mode (MESH_TEST_NODE_KUBE_PROXY=iptables), a host
# process like the kubelet, with the admin kubeconfig. Flags:
#   --masquerade-all: every packet to a ClusterIP is SNATed (to the bridge
#     address, 10.253.0.1). Needed for a pod reaching a Service whose backend is
#     another pod on the same bridge: the DNATed packet is routed back onto the
#     bridge, and the backend's reply goes straight to the client over the
#     bridge, never through the host's conntrack to be un-DNATed (the client
#     would get a reply from the pod's address, not the ClusterIP, and reset
#     it), unless the bridge hands bridged frames to iptables
#     (br_netfilter, net.bridge.bridge-nf-call-iptables=1). That is a host-wide
#     switch for every bridge on the machine (docker's too) and a module we
#     could not unload; masquerading changes nothing outside the node's own
#     rules. The price: backends see the bridge address, not the client pod's,
#     as the source of Service traffic that went through kube-proxy (a meshed
#     pod's traffic does not: the agent connects it to the backend directly).
#   --cluster-cidr: the pod range (what kube-proxy calls local traffic).
#   --bind-address / --nodeport-addresses: the node's address (the bridge's);
#     NodePorts answer on it only, never on the machine's other addresses.
#   --healthz/--metrics-bind-address: 127.0.0.1 on free ports.
#   --conntrack-max-per-core 0, --conntrack-tcp-timeout-established 0,
#   --conntrack-tcp-timeout-close-wait 0: leave the host's conntrack sysctls
#     alone (by default it raises nf_conntrack_max and sets both timeouts).
#   --oom-score-adj 0: the default -999 is denied on this VM (it only logs).
# What it changes on the host anyway: net.ipv4.conf.all.route_localnet=1
# (saved and restored with the other sysctls), its KUBE-* chains and jumps in
# filter/nat/mangle (removed at stop by `kube-proxy --cleanup`, then by our
# own removal of any chain that appeared), and conntrack entries. It also puts
# its KUBE-FORWARD jump first in FORWARD, ahead of MESH-TEST-NODE-FWD, where
# it would ACCEPT service traffic DNATed to an address beyond the bridge: our
# chain is moved back to first place once kube-proxy's rules are in (it only
# checks that its jump exists, so it does not move it again).
# net.ipv4.ip_forward must be 1 for pod -> ClusterIP -> pod (the host routes
# the DNATed packet back onto the bridge): set if 0, and put back to 0 at stop.
start_kube_proxy() {
    local dir="$1" cache="$2" gw="$3" hz_port metrics_port
    hz_port="$(free_port)"; USED_PORTS+=("$hz_port")
    metrics_port="$(free_port)"; USED_PORTS+=("$metrics_port")
    if [[ "$(sysctl -n net.ipv4.ip_forward)" == 0 ]]; then
        touch "$dir/run/ip-forward-set"
        log "setting net.ipv4.ip_forward=1 for kube-proxy (0 again at stop)"
        sysctl -q -w net.ipv4.ip_forward=1 >/dev/null || return 1
    fi
    # Marks that stop must run `kube-proxy --cleanup` (names the binary).
    printf '%s\n' "$cache/kube-proxy" >"$dir/run/kube-proxy-started"
    start_bg kube-proxy "$dir/run/kube-proxy.pid" "$dir/logs/kube-proxy.log" \
        "$cache/kube-proxy" \
        --kubeconfig "$KUBECONFIG_PATH" \
        --proxy-mode iptables \
        --hostname-override "$NODE_NAME" \
        --cluster-cidr "$POD_CIDR" \
        --masquerade-all \
        --bind-address "$gw" \
        --nodeport-addresses "$gw/32" \
        --healthz-bind-address "127.0.0.1:$hz_port" \
        --metrics-bind-address "127.0.0.1:$metrics_port" \
        --conntrack-max-per-core 0 \
        --conntrack-tcp-timeout-established 0 \
        --conntrack-tcp-timeout-close-wait 0 \
        --oom-score-adj 0
    wait_for "$START_TIMEOUT" "kube-proxy healthz" "$dir/run/kube-proxy.pid" kube-proxy \
        curl -sf --max-time 2 "http://127.0.0.1:$hz_port/healthz" || return 1
    wait_for "$START_TIMEOUT" "kube-proxy rules for default/kubernetes" "$dir/run/kube-proxy.pid" kube-proxy \
        kube_proxy_rules_ready || return 1
    iptables -w 5 -D FORWARD -j MESH-TEST-NODE-FWD 2>/dev/null || true
    iptables -w 5 -I FORWARD 1 -j MESH-TEST-NODE-FWD
    [[ "$(iptables -w 5 -S FORWARD | sed -n 2p)" == "-A FORWARD -j MESH-TEST-NODE-FWD" ]] ||
        { log "MESH-TEST-NODE-FWD is not the first rule of FORWARD: $(iptables -w 5 -S FORWARD | tr '\n' ';')"; return 1; }
}

kube_proxy_rules_ready() {
    iptables -w 5 -t nat -S KUBE-SERVICES 2>/dev/null | grep -qF 'default/kubernetes'
}

# After kube-proxy stopped: `kube-proxy --cleanup` removes its iptables chains
# and rules (and, where IPVS is usable, flushes IPVS and its ipsets: there is
# no IPVS on this VM), then says what it left (restore_host_state removes any
# chain that appeared since start, verify_clean reports what is still there).
cleanup_kube_proxy() {
    local d="$1" bin x
    [[ -f "$d/run/kube-proxy-started" ]] || return 0
    bin="$(cat "$d/run/kube-proxy-started")"
    if [[ -x "$bin" ]]; then
        log "kube-proxy --cleanup (log $d/logs/kube-proxy-cleanup.log)"
        # It exits non-zero (1) whenever a step failed; without the `ipset` command
        # (not installed here) every `ipset destroy KUBE-...` of the IPVS
        # step fails, which is fine: only the IPVS mode makes ipsets.
        local rc=0
        timeout 60 "$bin" --cleanup >"$d/logs/kube-proxy-cleanup.log" 2>&1 || rc=$?
        if [[ $rc -ne 0 ]]; then
            x="$(grep '^E' "$d/logs/kube-proxy-cleanup.log" | grep -v 'ipset.*executable file not found' || true)"
            if [[ -z "$x" ]] && ! command -v ipset >/dev/null; then
                log "kube-proxy --cleanup exited $rc: only its ipset steps failed (no ipset command; iptables mode makes no ipsets)"
            else
                log "warning: kube-proxy --cleanup exited $rc: $(head -n 3 <<<"$x")"
            fi
        fi
    else
        log "warning: $bin missing; cannot run kube-proxy --cleanup"
    fi
    if [[ -f "$d/run/iptables-kube-rules" ]]; then
        x="$(kube_iptables_rules | grep -vxF -f "$d/run/iptables-kube-rules" || true)"
        [[ -z "$x" ]] || log "KUBE- chains kube-proxy --cleanup does not remove (its canaries, KUBE-MARK-*), removed below: $(awk '$2 == "-N" { printf "%s %s; ", $1, $3 }' <<<"$x")"
    fi
    rm -f "$d/run/kube-proxy-started"
}

# Stop everything of DIR and undo what it did to the host. Tolerates any
# partial state; safe to repeat.
cleanup_node() {
    local d="$1" p
    # kube-proxy first, so it rewrites no rule while they are removed.
    stop_one kube-proxy "$d/run/kube-proxy.pid"
    cleanup_kube_proxy "$d"
    # kubelet first, so it restarts nothing.
    stop_one kubelet "$d/run/kubelet.pid" 15
    stop_one kube-scheduler "$d/run/kube-scheduler.pid"
    # Pods: remove every container while dockerd still runs (the pods'
    # network namespaces go with their sandboxes, and with them the veths).
    if pid_alive "$d/run/dockerd.pid" dockerd; then
        local ids
        ids="$(DOCKER_HOST="unix://$d/docker.sock" timeout 30 "$DOCKER" ps -aq 2>/dev/null || true)"
        if [[ -n "$ids" ]]; then
            log "removing $(wc -w <<<"$ids") containers"
            # shellcheck disable=SC2086
            DOCKER_HOST="unix://$d/docker.sock" timeout 60 "$DOCKER" rm -f $ids >/dev/null 2>&1 || true
        fi
    fi
    stop_one dockerd "$d/run/dockerd.pid" 30
    # Anything still alive that belongs to DIR (containerd, shims after a
    # crash), then whatever is left in the pods' cgroups.
    local pids
    pids="$(node_pids "$d")"
    if [[ -n "$pids" ]]; then
        log "killing leftover processes: ${pids//$'\n'/ }"
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        sleep 0.5
    fi
    kill_kubepods_processes
    umount_under "$d"
    remove_kubepods_cgroups
    # The API server we started (it listens on the bridge address).
    if [[ -f "$d/run/own-apiserver" ]]; then
        "$SCRIPT_DIR/test-apiserver.sh" stop "$d/apiserver" || true
        rm -f "$d/run/own-apiserver"
    fi
    # Network: the bridge (routes for the pod range go with its address) and
    # any veth still attached to it.
    if ip link show "$BRIDGE" >/dev/null 2>&1 && [[ -f "$d/run/bridge-created" ]]; then
        for p in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{ print $2 }' | cut -d@ -f1); do
            ip link del "$p" 2>/dev/null || true
        done
        ip link del "$BRIDGE" 2>/dev/null || log "warning: could not delete $BRIDGE"
    fi
    rm -f "$d/run/bridge-created"
    remove_forward_chain
    restore_host_state "$d"
    # Files the kubelet left outside DIR for our pods.
    if [[ -d /var/log/pods && -d "$d/kubelet/pods" ]]; then
        for p in "$d"/kubelet/pods/*/; do
            p="$(basename "$p")"
            [[ "$p" =~ ^[0-9a-f-]{36}$ ]] || continue
            rm -rf /var/log/pods/*_"$p"
        done
    fi
    if [[ -d /var/log/containers ]]; then
        find /var/log/containers -maxdepth 1 -type l -lname "$d/*" -delete 2>/dev/null || true
    fi
    if [[ -f "$LOCK_FILE" && "$(cat "$LOCK_FILE" 2>/dev/null)" == "$d" ]]; then
        rm -f "$LOCK_FILE"
    fi
    verify_clean "$d"
}

# Report anything the node left behind; returns 1 if something is left.
verify_clean() {
    local d="$1" left=0 x
    x="$(node_pids "$d")"
    [[ -z "$x" ]] || { log "LEFT: processes ${x//$'\n'/ }"; left=1; }
    for f in kubelet.pid kube-scheduler.pid kube-proxy.pid dockerd.pid; do
        [[ ! -f "$d/run/$f" ]] || { log "LEFT: $d/run/$f"; left=1; }
    done
    x="$(awk -v d="$d" '{ if ($5 == d || index($5, d "/") == 1) print $5 }' /proc/self/mountinfo)"
    [[ -z "$x" ]] || { log "LEFT: mounts ${x//$'\n'/ }"; left=1; }
    x="$(ip -o link show 2>/dev/null | awk -F': ' -v b="$BRIDGE" '$2 == b || $0 ~ ("master " b " ") { print $2 }')"
    [[ -z "$x" ]] || { log "LEFT: links ${x//$'\n'/ }"; left=1; }
    x="$(ip -4 route show table all 2>/dev/null | grep -F "${POD_CIDR%.0/24}." || true)"
    [[ -z "$x" ]] || { log "LEFT: routes: $x"; left=1; }
    x="$(kubepods_cgroups)"
    [[ -z "$x" ]] || { log "LEFT: cgroups ${x//$'\n'/ }"; left=1; }
    if [[ -f "$d/run/iptables-chains" ]]; then
        x="$(iptables_chains | grep -vxF -f "$d/run/iptables-chains" || true)"
        [[ -z "$x" ]] || { log "LEFT: iptables chains ${x//$'\n'/ }"; left=1; }
    fi
    if [[ -s "$d/run/nft-tables-absent" ]]; then
        while IFS= read -r x; do
            [[ -n "$x" ]] || continue
            ! nft list table ip "$x" >/dev/null 2>&1 || { log "LEFT: nft table ip $x"; left=1; }
        done <"$d/run/nft-tables-absent"
    fi
    # kube-proxy's: any KUBE- chain or rule in filter/nat/mangle not there at start.
    if [[ -f "$d/run/iptables-kube-rules" ]]; then
        x="$(kube_iptables_rules | grep -vxF -f "$d/run/iptables-kube-rules" || true)"
        [[ -z "$x" ]] || { log "LEFT: KUBE- iptables rules: ${x//$'\n'/; }"; left=1; }
    fi
    if [[ $left -eq 0 ]]; then
        log "clean: no processes, mounts, links, routes, cgroups, iptables chains or KUBE- rules of $d left"
    fi
    return $left
}

cmd_stop() {
    [[ $(id -u) -eq 0 ]] || die "stop must run as root"
    local dir="$1"
    if [[ ! -d "$dir" ]]; then
        log "$dir does not exist; nothing to stop"
        return 0
    fi
    dir="$(cd "$dir" && pwd -P)"
    # `||` turns off errexit inside: cleanup goes on past any failing step.
    local rc=0
    cleanup_node "$dir" || rc=$?
    [[ $rc -eq 0 ]] || die "stopped, but something was left behind (see LEFT above)"
    log "stopped (state and logs kept in $dir)"
}

cmd_env() {
    local dir
    dir="$(abs_dir "$1")"
    printf 'export KUBECONFIG=%q\nexport DOCKER_HOST=%q\n' "$dir/kubeconfig" "unix://$dir/docker.sock"
}

main() {
    local cmd="${1:-}"
    case "$cmd" in
        build)
            [[ $# -eq 1 ]] || { usage; exit 2; }
            cmd_build
            ;;
        start)
            [[ $# -ge 2 && $# -le 3 && -n "$2" ]] || { usage; exit 2; }
            cmd_start "$2" "${3:-}"
            ;;
        stop | env)
            [[ $# -eq 2 && -n "$2" ]] || { usage; exit 2; }
            "cmd_$cmd" "$2"
            ;;
        -h | --help | help)
            usage
            ;;
        *)
            usage
            exit 2
            ;;
    esac
}

main "$@"
