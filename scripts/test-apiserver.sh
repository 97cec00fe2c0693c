#!/usr/bin/env bash
# Build, start and stop a REAL kube-apiserver (+ kube-controller-manager + etcd)
# for tests, listening on 127.0.0.1 only.
#
# Usage:
#   scripts/test-apiserver.sh build        # build + cache binaries (only if missing; needs root)
#   scripts/test-apiserver.sh start DIR    # start etcd, kube-apiserver, kube-controller-manager;
#                                          # state/logs/kubeconfig under DIR; prints kubeconfig path
#   scripts/test-apiserver.sh stop DIR     # stop what `start DIR` started (safe to call twice)
#   scripts/test-apiserver.sh env DIR      # prints: export KUBECONFIG=DIR/kubeconfig
#   scripts/test-apiserver.sh stop-apiserver DIR   # an outage: kube-apiserver alone goes away
#   scripts/test-apiserver.sh start-apiserver DIR  # ... and comes back as it was
#
# By default discovery.k8s.io/v1beta1 is off (tests install a CRD standing in
# for v1, which 1.20 lacks); MESH_TEST_APISERVER_V1BETA1=true serves it, as a
# 1.20 cluster does.
#
# The Kubernetes binaries are built from Debian bookworm's `kubernetes` source
# package (Kubernetes v1.20.2 with vendor/) with Debian's Go 1.19, fully
# offline apart from the apt downloads, and cached (outside the repository) in
#   ${MESH_TEST_APISERVER_CACHE:-/var/cache/mesh-test-apiserver}/<debian-source-version>/
#
# Typical use in a test:
#   scripts/test-apiserver.sh build
#   export KUBECONFIG="$(scripts/test-apiserver.sh start /tmp/apitest)"
#   kubectl get ns
#   scripts/test-apiserver.sh stop /tmp/apitest
#
# MESH_TEST_APISERVER_NODE=1 (used by scripts/test-node.sh, which adds a
# kubelet): run every controller (endpointslice and endpointslicemirroring
# too), serve discovery.k8s.io/v1beta1 (the only EndpointSlice version of
# 1.20) and keep the default endpoint reconciler, as a real cluster does; the
# API server also gets a client certificate for kubelets
# (DIR/certs/kubelet-client.{crt,key}, so `kubectl logs/exec` work).
# Unset or 0 (the default, which existing tests rely on): no endpointslice
# controllers, v1beta1 disabled, --endpoint-reconciler-type none.
# MESH_TEST_APISERVER_ADDRESS (default 127.0.0.1) sets the one address the API
# server binds and advertises: test-node.sh gives it the node's bridge address,
# because the default endpoint reconciler refuses a loopback address for the
# `kubernetes` Service, and pods reach the bridge address but not the host's
# loopback.
set -euo pipefail

CACHE_ROOT="${MESH_TEST_APISERVER_CACHE:-/var/cache/mesh-test-apiserver}"
# The build recipe (Debian's source, Go 1.19, offline make) and its constants.
# shellcheck source=scripts/lib-kube.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-kube.sh"
# Every Kubernetes binary the tests run, built together (they share most of
# their packages, so one build costs little more than the API server's alone):
# the API server's, and the test node's (scripts/test-node.sh; kube-proxy runs
# beside the mesh, as in a real cluster).
KUBE_BINS=(kube-apiserver kube-controller-manager kubelet kube-scheduler kube-proxy)
KUBE_SOURCES=(build/pause/linux/pause.c build/pause/Makefile)
START_TIMEOUT="${MESH_TEST_APISERVER_TIMEOUT:-90}"
NODE_MODE="${MESH_TEST_APISERVER_NODE:-0}"
API_ADDRESS="${MESH_TEST_APISERVER_ADDRESS:-127.0.0.1}"
[[ "$API_ADDRESS" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "MESH_TEST_APISERVER_ADDRESS must be an IPv4 address" >&2; exit 2; }
EXTRA_SAN=""
[[ "$API_ADDRESS" == 127.0.0.1 ]] || EXTRA_SAN=",IP:$API_ADDRESS"
if [[ "$NODE_MODE" == 1 ]]; then
    APISERVER_MODE_ARGS=()
    KCM_CONTROLLERS='*'
else
    APISERVER_MODE_ARGS=(--runtime-config "discovery.k8s.io/v1beta1=${MESH_TEST_APISERVER_V1BETA1:-false}" --endpoint-reconciler-type none)
    KCM_CONTROLLERS='*,-endpointslice,-endpointslicemirroring'
fi

PROG="$(basename "$0")"

log() { printf '[%s] %s\n' "$PROG" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$PROG" "$*" >&2; exit 1; }

usage() {
    cat >&2 <<EOF
Usage: $PROG build | start DIR | stop DIR | env DIR | stop-apiserver DIR | start-apiserver DIR

  build       Build kube-apiserver and kube-controller-manager from Debian's
              '$KUBE_SRC_PKG' source package and cache them under
              $CACHE_ROOT/<debian-version>/ (no-op when already cached; needs root).
  start DIR   Start etcd + kube-apiserver + kube-controller-manager on 127.0.0.1
              (free ports), state/logs/kubeconfig under DIR; waits until ready
              and prints the kubeconfig path on stdout.
  stop DIR    Stop the processes started by 'start DIR' (safe to call twice).
  env DIR     Print 'export KUBECONFIG=DIR/kubeconfig'.
EOF
}

# ---------------------------------------------------------------------------
# version / cache resolution
# ---------------------------------------------------------------------------

# Directory holding cached binaries for `start`: the one for the current
# Debian version if built, else the newest complete cache directory.
find_bin_dir() {
    local ver d best=""
    if [[ -n "${MESH_TEST_APISERVER_BIN_DIR:-}" ]]; then
        printf '%s\n' "$MESH_TEST_APISERVER_BIN_DIR"
        return 0
    fi
    if ver="$(kube_debian_src_version)" && [[ -x "$CACHE_ROOT/$ver/kube-apiserver" && -x "$CACHE_ROOT/$ver/kube-controller-manager" ]]; then
        printf '%s\n' "$CACHE_ROOT/$ver"
        return 0
    fi
    for d in "$CACHE_ROOT"/*/; do
        d="${d%/}"
        [[ -x "$d/kube-apiserver" && -x "$d/kube-controller-manager" ]] && best="$d"
    done
    [[ -n "$best" ]] || return 1
    printf '%s\n' "$best"
}

# ---------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------

cmd_build() {
    [[ $(id -u) -eq 0 ]] || die "build must run as root (it installs Debian packages and writes $CACHE_ROOT)"
    local ver b f missing=()
    ver="$(kube_debian_src_version_or_update)"
    local dest="$CACHE_ROOT/$ver"
    for b in "${KUBE_BINS[@]}"; do [[ -x "$dest/$b" ]] || missing+=("$b"); done
    for f in "${KUBE_SOURCES[@]}"; do [[ -f "$dest/src/$f" ]] || missing+=("$f"); done
    kube_ensure_packages etcd-server openssl
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "binaries already cached in $dest (nothing to build)"
        return 0
    fi
    # Only what is missing (a binary added to the list later costs only itself).
    local build=() t0=$SECONDS work
    for b in "${KUBE_BINS[@]}"; do [[ -x "$dest/$b" ]] || build+=("$b"); done
    [[ ${#build[@]} -gt 0 ]] || build=(kube-apiserver) # only the sources are missing
    log "building ${build[*]} from Debian source '$KUBE_SRC_PKG' $ver (missing: ${missing[*]})"
    work="$(mktemp -d /var/tmp/mesh-test-apiserver-build.XXXXXX)"
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    kube_build_from_source "$work" "$ver" "$dest" "${build[@]}" -- "${KUBE_SOURCES[@]}"
    rm -rf "$work"
    trap - EXIT
    log "cached $dest/{${build[*]// /,}} ($("$dest/kube-apiserver" --version 2>/dev/null)); build took $((SECONDS - t0))s"
}

# ---------------------------------------------------------------------------
# start / stop
# ---------------------------------------------------------------------------



declare -a USED_PORTS=()

# Set to 0 while `start` runs: its children may not have exec'ed yet, so
# their command line cannot be checked (a fresh pid cannot be a reused one).
NAME_CHECK=1

# process $1 exists and is not a zombie
pid_running() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state="$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$1/stat" 2>/dev/null || true)"
    [[ "$state" != Z ]]
}

# pid in pid file $1 alive (not a zombie) and, when NAME_CHECK=1, running a
# command line that contains $2 (guards against reused pids)?
pid_alive() {
    local pidfile="$1" name="$2" pid
    [[ -f "$pidfile" ]] || return 1
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    pid_running "$pid" || return 1
    [[ $NAME_CHECK -eq 0 ]] && return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$name"
}

# start_bg NAME PIDFILE LOG CMD...   (own session, survives this script)

stop_one() {
    local name="$1" pidfile="$2" pid i
    if ! pid_alive "$pidfile" "$name"; then
        rm -f "$pidfile"
        return 0
    fi
    pid="$(cat "$pidfile")"
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        pid_running "$pid" || break
        sleep 0.1
    done
    if pid_running "$pid"; then
        log "$name did not exit after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for i in $(seq 1 50); do
            pid_running "$pid" || break
            sleep 0.1
        done
    fi
    rm -f "$pidfile"
}

stop_all() {
    local dir="$1"
    stop_one kube-controller-manager "$dir/run/kube-controller-manager.pid"
    stop_one kube-apiserver "$dir/run/kube-apiserver.pid"
    stop_one etcd "$dir/run/etcd.pid"
}

fail_start() {
    local dir="$1" msg="$2" f
    log "ERROR: $msg"
    for f in etcd kube-apiserver kube-controller-manager; do
        if [[ -s "$dir/logs/$f.log" ]]; then
            log "---- last lines of $dir/logs/$f.log ----"
            tail -n 15 "$dir/logs/$f.log" >&2 || true
        fi
    done
    stop_all "$dir"
    exit 1
}

gen_certs() {
    local c="$1"
    mkdir -p "$c"
    (
        cd "$c"
        umask 077
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=mesh-test-apiserver-ca" \
            -keyout ca.key -out ca.crt 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
            -keyout apiserver.key -out apiserver.csr 2>/dev/null
        cat >apiserver.ext <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.96.0.1${EXTRA_SAN},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
        openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
            -extfile apiserver.ext -out apiserver.crt 2>/dev/null
        openssl genrsa -out sa.key 2048 2>/dev/null
        openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
        if [[ "$NODE_MODE" == 1 ]]; then
            openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=kube-apiserver-kubelet-client" \
                -keyout kubelet-client.key -out kubelet-client.csr 2>/dev/null
            printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' \
                >kubelet-client.ext
            openssl x509 -req -in kubelet-client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
                -extfile kubelet-client.ext -out kubelet-client.crt 2>/dev/null
            rm -f kubelet-client.csr
        fi
        rm -f apiserver.csr ca.srl
    ) || die "certificate generation with openssl failed"
}

write_kubeconfig() {
    local file="$1" server="$2" ca="$3" user="$4" token="$5"
    (
        umask 077
        cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: mesh-test
  cluster:
    server: $server
    certificate-authority: $ca
users:
- name: $user
  user:
    token: $token
contexts:
- name: mesh-test
  context:
    cluster: mesh-test
    user: $user
current-context: mesh-test
EOF
    )
}

rand_token() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }

cmd_start() {
    local dir
    dir="$(abs_dir "$1")"
    local bindir
    bindir="$(find_bin_dir)" || die "no cached binaries in $CACHE_ROOT; run '$PROG build' first"
    local etcd_bin
    etcd_bin="$(command -v etcd || true)"
    [[ -x "$etcd_bin" ]] || die "etcd not found (install Debian package etcd-server, or run '$PROG build')"
    command -v openssl >/dev/null || die "openssl not found"
    command -v curl >/dev/null || die "curl not found"

    if pid_alive "$dir/run/etcd.pid" etcd || pid_alive "$dir/run/kube-apiserver.pid" kube-apiserver ||
        pid_alive "$dir/run/kube-controller-manager.pid" kube-controller-manager; then
        die "processes from a previous 'start $dir' are still running; run '$PROG stop $dir' first"
    fi

    NAME_CHECK=0
    # fresh state every start
    rm -rf "$dir/etcd" "$dir/certs" "$dir/run" "$dir/logs" "$dir/kubeconfig" "$dir/controller-manager.kubeconfig" "$dir/tokens.csv"
    mkdir -p "$dir/run" "$dir/logs"

    local etcd_port peer_port api_port kcm_port
    etcd_port="$(free_port)"; USED_PORTS+=("$etcd_port")
    peer_port="$(free_port)"; USED_PORTS+=("$peer_port")
    api_port="$(free_port)"; USED_PORTS+=("$api_port")
    kcm_port="$(free_port)"; USED_PORTS+=("$kcm_port")

    log "generating certificates and service-account keys in $dir/certs"
    gen_certs "$dir/certs"
    local admin_token kcm_token
    admin_token="$(rand_token)"
    kcm_token="$(rand_token)"
    (
        umask 077
        printf '%s,admin,admin,"system:masters"\n' "$admin_token" >"$dir/tokens.csv"
        printf '%s,system:kube-controller-manager,system:kube-controller-manager\n' "$kcm_token" >>"$dir/tokens.csv"
    )
    local server="https://$API_ADDRESS:$api_port"
    if [[ "$NODE_MODE" == 1 ]]; then
        APISERVER_MODE_ARGS+=(--kubelet-client-certificate "$dir/certs/kubelet-client.crt"
            --kubelet-client-key "$dir/certs/kubelet-client.key"
            --kubelet-preferred-address-types InternalIP)
    fi
    write_kubeconfig "$dir/kubeconfig" "$server" "$dir/certs/ca.crt" admin "$admin_token"
    write_kubeconfig "$dir/controller-manager.kubeconfig" "$server" "$dir/certs/ca.crt" \
        system:kube-controller-manager "$kcm_token"

    # --- etcd ---------------------------------------------------------------
    start_bg etcd "$dir/run/etcd.pid" "$dir/logs/etcd.log" \
        "$etcd_bin" --name mesh-test --data-dir "$dir/etcd" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" \
        --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-cluster "mesh-test=http://127.0.0.1:$peer_port" \
        --initial-cluster-state new \
        --unsafe-no-fsync
    local i ok=0
    for i in $(seq 1 $((START_TIMEOUT * 5))); do
        pid_alive "$dir/run/etcd.pid" etcd || fail_start "$dir" "etcd exited during startup"
        if curl -fsS --max-time 2 "http://127.0.0.1:$etcd_port/health" 2>/dev/null | grep -q '"health":"true"'; then
            ok=1; break
        fi
        sleep 0.2
    done
    [[ $ok -eq 1 ]] || fail_start "$dir" "etcd not healthy after ${START_TIMEOUT}s"
    log "etcd healthy on 127.0.0.1:$etcd_port"

    # --- kube-apiserver -----------------------------------------------------
    start_bg kube-apiserver "$dir/run/kube-apiserver.pid" "$dir/logs/kube-apiserver.log" \
        "$bindir/kube-apiserver" \
        --etcd-servers "http://127.0.0.1:$etcd_port" \
        --bind-address "$API_ADDRESS" \
        --advertise-address "$API_ADDRESS" \
        --secure-port "$api_port" \
        --insecure-port 0 \
        --cert-dir "$dir/certs" \
        --tls-cert-file "$dir/certs/apiserver.crt" \
        --tls-private-key-file "$dir/certs/apiserver.key" \
        --client-ca-file "$dir/certs/ca.crt" \
        --token-auth-file "$dir/tokens.csv" \
        --authorization-mode Node,RBAC \
        --service-account-key-file "$dir/certs/sa.pub" \
        --service-account-signing-key-file "$dir/certs/sa.key" \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --service-cluster-ip-range 10.96.0.0/16 \
        "${APISERVER_MODE_ARGS[@]}" \
        --allow-privileged=true \
        --profiling=false
    ok=0
    for i in $(seq 1 $((START_TIMEOUT * 5))); do
        pid_alive "$dir/run/kube-apiserver.pid" kube-apiserver || fail_start "$dir" "kube-apiserver exited during startup"
        if [[ "$(curl -sS --max-time 2 --cacert "$dir/certs/ca.crt" -H "Authorization: Bearer $admin_token" \
            "$server/readyz" 2>/dev/null || true)" == ok ]]; then
            ok=1; break
        fi
        sleep 0.2
    done
    [[ $ok -eq 1 ]] || fail_start "$dir" "kube-apiserver not ready after ${START_TIMEOUT}s"
    log "kube-apiserver ready on $server"

    # --- kube-controller-manager --------------------------------------------
    start_bg kube-controller-manager "$dir/run/kube-controller-manager.pid" "$dir/logs/kube-controller-manager.log" \
        "$bindir/kube-controller-manager" \
        --kubeconfig "$dir/controller-manager.kubeconfig" \
        --authentication-kubeconfig "$dir/controller-manager.kubeconfig" \
        --authorization-kubeconfig "$dir/controller-manager.kubeconfig" \
        --bind-address 127.0.0.1 \
        --secure-port "$kcm_port" \
        --port 0 \
        --cert-dir "$dir/certs/kcm" \
        --leader-elect=false \
        --controllers "$KCM_CONTROLLERS" \
        --service-account-private-key-file "$dir/certs/sa.key" \
        --use-service-account-credentials \
        --root-ca-file "$dir/certs/ca.crt" \
        --cluster-signing-cert-file "$dir/certs/ca.crt" \
        --cluster-signing-key-file "$dir/certs/ca.key" \
        --service-cluster-ip-range 10.96.0.0/16 \
        --profiling=false
    ok=0
    for i in $(seq 1 $((START_TIMEOUT * 5))); do
        pid_alive "$dir/run/kube-controller-manager.pid" kube-controller-manager ||
            fail_start "$dir" "kube-controller-manager exited during startup"
        if [[ "$(curl -sk --max-time 2 "https://127.0.0.1:$kcm_port/healthz" 2>/dev/null || true)" == ok ]]; then
            ok=1; break
        fi
        sleep 0.2
    done
    [[ $ok -eq 1 ]] || fail_start "$dir" "kube-controller-manager not healthy after ${START_TIMEOUT}s"
    # The default service account appears once the controllers run.
    ok=0
    for i in $(seq 1 $((START_TIMEOUT * 5))); do
        if curl -fsS --max-time 2 --cacert "$dir/certs/ca.crt" -H "Authorization: Bearer $admin_token" \
            "$server/api/v1/namespaces/default/serviceaccounts/default" >/dev/null 2>&1; then
            ok=1; break
        fi
        pid_alive "$dir/run/kube-controller-manager.pid" kube-controller-manager ||
            fail_start "$dir" "kube-controller-manager exited during startup"
        sleep 0.2
    done
    [[ $ok -eq 1 ]] || fail_start "$dir" "default service account not created after ${START_TIMEOUT}s"
    log "kube-controller-manager healthy (127.0.0.1:$kcm_port)"

    printf 'server=%s\netcd=http://127.0.0.1:%s\nkubeconfig=%s\nbin_dir=%s\n' \
        "$server" "$etcd_port" "$dir/kubeconfig" "$bindir" >"$dir/info"
    log "ready: export KUBECONFIG=$dir/kubeconfig   (stop with: $PROG stop $dir)"
    printf '%s\n' "$dir/kubeconfig"
}

cmd_stop() {
    local dir="$1"
    if [[ ! -d "$dir" ]]; then
        log "$dir does not exist; nothing to stop"
        return 0
    fi
    dir="$(cd "$dir" && pwd -P)"
    stop_all "$dir"
    log "stopped (state kept in $dir)"
}

# An API server outage, for tests: stop kube-apiserver alone (etcd and the
# controller manager stay), then start it again exactly as it was (same port,
# certificates and tokens, so clients reconnect to the same address).
cmd_stop-apiserver() {
    local dir
    dir="$(abs_dir "$1")"
    NAME_CHECK=1
    stop_one kube-apiserver "$dir/run/kube-apiserver.pid"
}

cmd_start-apiserver() {
    local dir
    dir="$(abs_dir "$1")"
    local pidfile="$dir/run/kube-apiserver.pid"
    [[ -f "$pidfile.cmd" ]] || die "no kube-apiserver was started in $dir"
    local -a argv
    mapfile -d '' argv <"$pidfile.cmd"
    start_bg kube-apiserver "$pidfile" "$dir/logs/kube-apiserver.log" "${argv[@]}"
    local i
    for ((i = 0; i < START_TIMEOUT * 5; i++)); do
        if kubectl --kubeconfig "$dir/kubeconfig" get --raw /readyz >/dev/null 2>&1; then
            log "kube-apiserver ready again"
            return 0
        fi
        sleep 0.2
    done
    die "kube-apiserver did not become ready again"
}

cmd_env() {
    local dir
    dir="$(abs_dir "$1")"
    printf 'export KUBECONFIG=%q\n' "$dir/kubeconfig"
}

main() {
    local cmd="${1:-}"
    case "$cmd" in
        build)
            [[ $# -eq 1 ]] || { usage; exit 2; }
            cmd_build
            ;;
        start | stop | env | stop-apiserver | start-apiserver)
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
