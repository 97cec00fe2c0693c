# shellcheck shell=bash
# Shared helpers for scripts that build Kubernetes binaries from Debian's
# `kubernetes` source package (Kubernetes v1.20.2 with vendor/) and cache them in
#   ${MESH_TEST_APISERVER_CACHE:-/var/cache/mesh-test-apiserver}/<debian-source-version>/
#
# Sourced by scripts/test-apiserver.sh (whose `build` makes every binary the
# tests use, in one build) and scripts/test-node.sh. The recipe: GOPATH mode,
# GOPROXY=off, CGO_ENABLED=0, Debian's Go 1.19, the vendored modern-go/reflect2
# 1.0.1 replaced by Debian's 1.0.2, `make WHAT=...`.
#
# The caller defines log() and die().

# shellcheck disable=SC2034 # used by the scripts that source this file
KUBE_CACHE_ROOT="${MESH_TEST_APISERVER_CACHE:-/var/cache/mesh-test-apiserver}"
KUBE_SRC_PKG=kubernetes
KUBE_GO_BIN_DIR=/usr/lib/go-1.19/bin
KUBE_REFLECT2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2
KUBE_BUILD_DEPS=(golang-1.19-go rsync golang-github-modern-go-reflect2-dev dpkg-dev)

# Debian source version of the `kubernetes` package, from the binary package
# `kubernetes-client` which is built from it (no deb-src entries needed).
kube_debian_src_version() {
    local out src ver
    out="$(apt-cache show --no-all-versions kubernetes-client 2>/dev/null || true)"
    [[ -n "$out" ]] || return 1
    ver="$(printf '%s\n' "$out" | sed -n 's/^Version: *//p' | head -n1)"
    src="$(printf '%s\n' "$out" | sed -n 's/^Source: *//p' | head -n1)"
    if [[ "$src" =~ \((.*)\) ]]; then
        ver="${BASH_REMATCH[1]}"
    fi
    [[ -n "$ver" ]] || return 1
    printf '%s\n' "$ver"
}

# Same, running `apt-get update` once when the lists do not know the package.
kube_debian_src_version_or_update() {
    local ver
    if ! ver="$(kube_debian_src_version)"; then
        log "apt lists have no 'kubernetes-client'; running apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
        ver="$(kube_debian_src_version)" || die "Debian package 'kubernetes-client' (source '$KUBE_SRC_PKG') not found in apt"
    fi
    printf '%s\n' "$ver"
}

# "1.20.5+really1.20.2-1.1+deb12u1" -> "1.20.2"
kube_upstream_version() {
    local up="${1#*:}"
    up="${up%-*}"
    [[ "$up" == *really* ]] && up="${up##*really}"
    up="${up%%+*}"
    printf '%s\n' "$up"
}

kube_pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

# Install the Debian packages among "$@" that are missing, never letting the
# installation start system services (docker, containerd, etcd...).
kube_ensure_packages() {
    local missing=() p
    for p in "$@"; do
        kube_pkg_installed "$p" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing missing Debian packages: ${missing[*]}"
    local added_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    local rc=0
    {
        apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    } >&2 || rc=$?
    [[ $added_policy -eq 1 ]] && rm -f /usr/sbin/policy-rc.d
    [[ $rc -eq 0 ]] || die "apt-get install ${missing[*]} failed (rc=$rc)"
}

# Write deb-src variants of the machine's own apt sources into $1/sources.list
# and $1/sources.list.d/*.sources (one-line and deb822 formats).
kube_derive_deb_src_sources() {
    local out="$1" f n=0
    mkdir -p "$out/sources.list.d"
    : >"$out/sources.list"
    local list_files=()
    [[ -f /etc/apt/sources.list ]] && list_files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list; do
        [[ -f "$f" ]] && list_files+=("$f")
    done
    for f in "${list_files[@]}"; do
        sed -n -E 's/^[[:space:]]*deb[[:space:]]+/deb-src /p' "$f" >>"$out/sources.list"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        n=$((n + 1))
        awk '
            function flush() {
                if (buf != "" && !disabled && hasdeb) printf "%s\n", buf
                buf = ""; disabled = 0; hasdeb = 0
            }
            /^[[:space:]]*$/ { flush(); next }
            /^[[:space:]]*#/ { next }
            tolower($1) == "types:" {
                for (i = 2; i <= NF; i++) if ($i == "deb") hasdeb = 1
                buf = buf "Types: deb-src\n"; next
            }
            tolower($1) == "enabled:" && tolower($2) == "no" { disabled = 1 }
            { buf = buf $0 "\n" }
            END { flush() }
        ' "$f" >"$out/sources.list.d/derived-$n.sources"
    done
    if ! grep -qs . "$out/sources.list" "$out"/sources.list.d/*.sources; then
        die "could not derive any deb-src entry from /etc/apt/sources.list{,.d/*}"
    fi
}

# kube_build_from_source WORK VER DEST CMD... [-- EXTRA_FILE...]
#   Downloads and unpacks Debian's kubernetes source VER in WORK (which the
#   caller removes), builds `make WHAT="cmd/A cmd/B"` and installs the binaries
#   A, B... into DEST (other files in DEST are left alone). Each EXTRA_FILE
#   (a path inside the source tree) is copied into DEST/src/ as well (e.g.
#   build/pause/linux/pause.c, so images can be built later without the tree).
kube_build_from_source() {
    local work="$1" ver="$2" dest="$3"
    shift 3
    local cmds=() extra=()
    while [[ $# -gt 0 && "$1" != -- ]]; do cmds+=("$1"); shift; done
    [[ $# -gt 0 ]] && shift
    extra=("$@")

    kube_ensure_packages "${KUBE_BUILD_DEPS[@]}"
    [[ -x "$KUBE_GO_BIN_DIR/go" ]] || die "$KUBE_GO_BIN_DIR/go missing (package golang-1.19-go)"
    [[ -f "$KUBE_REFLECT2_SRC/reflect2.go" ]] || die "$KUBE_REFLECT2_SRC missing (package golang-github-modern-go-reflect2-dev)"
    chmod 755 "$work"

    # --- source download with a private, derived deb-src configuration ------
    local aptdir="$work/apt"
    kube_derive_deb_src_sources "$aptdir"
    mkdir -p "$aptdir/lists/partial" "$work/src"
    chown -R _apt:root "$aptdir/lists" "$work/src" 2>/dev/null || true
    local aptopts=(
        -o "Dir::Etc::SourceList=$aptdir/sources.list"
        -o "Dir::Etc::SourceParts=$aptdir/sources.list.d"
        -o "Dir::State::Lists=$aptdir/lists"
        -o "Dir::Cache::pkgcache="
        -o "Dir::Cache::srcpkgcache="
    )
    log "apt-get update (deb-src variants of this machine's sources, private lists dir)"
    apt-get "${aptopts[@]}" update -qq >&2 || log "warning: some deb-src indexes failed to download (continuing)"
    log "downloading source package $KUBE_SRC_PKG=$ver"
    (cd "$work/src" && apt-get "${aptopts[@]}" source --download-only -qq "$KUBE_SRC_PKG=$ver" >&2) ||
        die "apt-get source $KUBE_SRC_PKG=$ver failed"
    local dsc
    dsc="$(ls "$work/src"/"${KUBE_SRC_PKG}"_*.dsc | head -n1)" || die "no .dsc downloaded"
    log "unpacking $(basename "$dsc")"
    dpkg-source --no-check -x "$dsc" "$work/tree" >/dev/null || die "dpkg-source -x failed"
    local tree="$work/tree"
    [[ -d "$tree/vendor" && -f "$tree/Makefile" ]] || die "unexpected source tree layout in $tree"

    # --- replace vendored reflect2 1.0.1 (crashes under Go >= 1.18) ---------
    local vr="$tree/vendor/github.com/modern-go/reflect2" f
    [[ -d "$vr" ]] || die "vendor/github.com/modern-go/reflect2 not found"
    rm -rf "$vr"
    mkdir -p "$vr"
    for f in "$KUBE_REFLECT2_SRC"/*; do
        case "$(basename "$f")" in
            *_test.go) ;;
            *.go | *.s | LICENSE | go.mod) cp -L "$f" "$vr/" ;;
        esac
    done

    local up
    up="$(kube_upstream_version "$ver")"
    [[ "$up" =~ ^([0-9]+)\.([0-9]+)\.[0-9]+ ]] || die "cannot parse upstream version from '$ver'"
    local major="${BASH_REMATCH[1]}" minor="${BASH_REMATCH[2]}"

    local what="" c
    for c in "${cmds[@]}"; do what+="${what:+ }cmd/$c"; done
    log "make WHAT=\"$what\" (v$up, go $("$KUBE_GO_BIN_DIR/go" env GOVERSION)); this takes a few minutes"
    (
        cd "$tree"
        unset GOFLAGS GO111MODULE GOPATH GOROOT GOBIN
        export PATH="$KUBE_GO_BIN_DIR:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        export GOPROXY=off GOSUMDB=off CGO_ENABLED=0
        export GOCACHE="$work/gocache" HOME="$work/home"
        export KUBE_GIT_VERSION="v$up" KUBE_GIT_MAJOR="$major" KUBE_GIT_MINOR="$minor"
        export KUBE_GIT_COMMIT="${KUBE_GIT_COMMIT:-0000000000000000000000000000000000000000}"
        export KUBE_GIT_TREE_STATE=clean
        export KUBE_VERBOSE=1
        mkdir -p "$HOME"
        nice -n 10 make WHAT="$what" >"$work/build.log" 2>&1
    ) || {
        tail -n 40 "$work/build.log" >&2 || true
        die "kubernetes build failed (log tail above)"
    }

    mkdir -p "$dest"
    chmod 755 "$dest"
    local b out
    for b in "${cmds[@]}"; do
        out=""
        for f in "$tree/_output/bin/$b" "$tree/_output/local/bin/linux/amd64/$b" "$tree/_output/local/go/bin/$b"; do
            [[ -x "$f" ]] && { out="$f"; break; }
        done
        [[ -n "$out" ]] || out="$(find "$tree/_output" -type f -name "$b" -perm -u+x | head -n1)"
        [[ -n "$out" ]] || die "built binary $b not found under $tree/_output"
        # install to a temporary name, then rename: a concurrent reader never sees half a binary
        install -m 0755 "$out" "$dest/.$b.tmp"
        mv -f "$dest/.$b.tmp" "$dest/$b"
    done
    for f in "${extra[@]}"; do
        [[ -f "$tree/$f" ]] || die "$f not found in the source tree"
        mkdir -p "$dest/src/$(dirname "$f")"
        install -m 0644 "$tree/$f" "$dest/src/$f"
    done
    [[ -f "$dest/DEBIAN_SOURCE_VERSION" ]] || printf '%s\n' "$ver" >"$dest/DEBIAN_SOURCE_VERSION"
}

# --- process and port helpers, shared by test-apiserver.sh and test-node.sh ---

# Absolute, physical path of directory $1 (created if missing).
abs_dir() {
    local d="$1"
    mkdir -p "$d"
    (cd "$d" && pwd -P)
}

# Whether nothing listens on TCP port $1 (IPv4 or IPv6).
port_free() {
    local hex
    hex="$(printf ':%04X' "$1")"
    ! awk -v h="$hex" 'FNR > 1 && $4 == "0A" && substr($2, length($2) - 4) == h { found = 1 } END { exit !found }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# A free TCP port not in USED_PORTS (the caller adds it there: this runs in a
# command substitution, a subshell).
# A free TCP port below the kernel's ephemeral range (ip_local_port_range):
# a port in that range can be taken by any process's outgoing connection
# between this check and the server's bind (CI saw etcd fail so).
free_port() {
    local p i lo=10000 hi
    hi="$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)"
    ((hi > lo + 2000)) || { lo=20000; hi=50000; }
    for i in $(seq 1 200); do
        p=$((lo + RANDOM % (hi - lo)))
        [[ " ${USED_PORTS[*]-} " == *" $p "* ]] && continue
        if port_free "$p"; then
            printf '%s\n' "$p"
            return 0
        fi
    done
    die "no free TCP port found"
}

# Starts a component in the background in its own session, its pid in PIDFILE
# (both scripts' servers; pid_alive checks it by name).
start_bg() {
    local name="$1" pidfile="$2" logf="$3"
    shift 3
    # Remember the command, so one component can be restarted as it was.
    printf '%s\0' "$@" >"$pidfile.cmd"
    setsid "$@" </dev/null >>"$logf" 2>&1 &
    local pid=$! i
    echo "$pid" >"$pidfile"
    # Until the child has exec'd "$1": before that its cmdline is this
    # script's, and pid_alive would call it gone (seen under load in CI).
    for ((i = 0; i < 100; i++)); do
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$1" && break
        [[ -d "/proc/$pid" ]] || break
        sleep 0.02
    done
    log "started $name (pid $pid, log $logf)"
}
