#!/usr/bin/env bash
# Install NVIDIA Triton's perf_analyzer privately (nothing system-wide) on
# Debian 12 (bookworm) x86_64.
#
# Why: the real perf-analyzer wheels (2.58+) are tagged manylinux_2_38, i.e.
# they need glibc >= 2.38 and a GCC 13+ libstdc++; bookworm has glibc 2.36 and
# GCC 12, so `pip install perf-analyzer` silently falls back to an empty 0.1.0
# placeholder. We download the real wheel anyway, take Debian trixie's libc6 /
# libstdc++6 / libgcc-s1 with a fully isolated apt configuration, unpack them
# with `dpkg -x`, and write a wrapper that runs the binary under trixie's
# dynamic loader.
#
# Usage:  benchmarks/install_perf_analyzer.sh [--force]
# Prints the wrapper path (<dir>/bin/perf_analyzer) on stdout; logs go to stderr.
# See benchmarks/README.perf_analyzer.md.
#
# Environment:
#   FERRY_PA_DIR            install/cache dir (default: <repo>/.cache/perf_analyzer)
#   FERRY_PA_PYTHON         python used for `pip download` (default: python3)
#   FERRY_PA_DEBIAN_MIRROR  Debian mirror URI (default: the one the host's apt uses)
#   FERRY_PA_SECURITY_MIRROR  debian-security URI, or "none" (default: the host's)
#   FERRY_PA_KEYRING        keyring for the trixie Release files
#                           (default: /usr/share/keyrings/debian-archive-keyring.gpg)
#   FERRY_PA_EXTRA_DEBS     extra trixie packages to unpack (space separated)

set -euo pipefail

# ---------------------------------------------------------------- settings --
PA_VERSION="2.60.0"
# sha256 of perf_analyzer-${PA_VERSION}-py3-none-${PA_PLATFORM}.whl, as listed by PyPI.
PA_WHEEL_SHA256="23ef56b107ae9233e5cf09fbdf508dd9b936a52f1bae2f63f53c8117087b3f25"
# The wheel is tagged py3-none-manylinux_2_38_x86_64 (pure-python tag + a
# bundled ELF), so --python-version only has to be some python 3.
PA_PLATFORM="manylinux_2_38_x86_64"
PA_PYTHON_VERSION="3.11"

DEBIAN_SUITE="trixie"
# Shared libraries the binary needs newer than bookworm's (readelf -V):
#   libc.so.6/libm.so.6 GLIBC_2.38 -> libc6 (also provides the loader)
#   libstdc++.so.6 GLIBCXX_3.4.31/32 -> libstdc++6 (GCC 13+)
#   libgcc_s.so.1 -> libgcc-s1 (trixie's libstdc++6 depends on it)
# libssl.so.3 / libcrypto.so.3 (OPENSSL_3.0.0) and libz.so.1 are fine from the host.
DEB_PACKAGES=(libc6 libstdc++6 libgcc-s1)
if [[ -n "${FERRY_PA_EXTRA_DEBS:-}" ]]; then
    read -r -a _extra <<<"${FERRY_PA_EXTRA_DEBS}"
    DEB_PACKAGES+=("${_extra[@]}")
fi

PYTHON="${FERRY_PA_PYTHON:-python3}"
KEYRING="${FERRY_PA_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}"
FALLBACK_MIRROR="http://deb.debian.org/debian"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"

# ----------------------------------------------------------------- helpers --
log() { printf '[install_perf_analyzer] %s\n' "$*" >&2; }
die() { printf '[install_perf_analyzer] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

FORCE=0
while (($#)); do
    case "$1" in
        --force) FORCE=1 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
    shift
done

need() {
    command -v "$1" >/dev/null 2>&1 || die "required command '$1' not found${2:+ ($2)}"
}

# Print the first URI of an enabled "deb" entry in the host's apt sources
# whose suite is exactly $1 (one-line .list and deb822 .sources formats).
host_mirror_for_suite() {
    local suite="$1" f
    local -a lists=() sources=()
    [[ -f /etc/apt/sources.list ]] && lists+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list; do [[ -f "$f" ]] && lists+=("$f"); done
    for f in /etc/apt/sources.list.d/*.sources; do [[ -f "$f" ]] && sources+=("$f"); done
    {
        if ((${#lists[@]})); then
            # deb [opts] URI SUITE COMPONENTS...
            sed -E -e 's/#.*//' -e 's/\[[^]]*\]//' "${lists[@]}" |
                awk -v s="$suite" '$1 == "deb" && $3 == s { print $2 }'
        fi
        if ((${#sources[@]})); then
            local src
            for src in "${sources[@]}"; do
                # deb822: blank-line separated stanzas; "#" lines are comments.
                awk -v s="$suite" '
                    function flush() {
                        if (types ~ /(^| )deb( |$)/ && enabled !~ /^[[:space:]]*no/ && (" " suites " ") ~ (" " s " ")) {
                            split(uris, u, " "); if (u[1] != "") print u[1]
                        }
                        types = ""; uris = ""; suites = ""; enabled = ""
                    }
                    /^#/ { next }
                    /^[[:space:]]*$/ { flush(); next }
                    {
                        line = $0; key = tolower(line); sub(/:.*/, "", key)
                        val = line; sub(/^[^:]*:[[:space:]]*/, "", val)
                        if (key == "types") types = val
                        else if (key == "uris") uris = val
                        else if (key == "suites") suites = val
                        else if (key == "enabled") enabled = tolower(val)
                    }
                    END { flush() }
                ' "$src"
            done
        fi
    } | head -n 1
}

# ------------------------------------------------------------ preconditions --
[[ "$(uname -s)" == Linux && "$(uname -m)" == x86_64 ]] ||
    die "only Linux x86_64 is supported (got $(uname -s) $(uname -m))"

PA_DIR="${FERRY_PA_DIR:-${REPO_ROOT}/.cache/perf_analyzer}"
mkdir -p "$PA_DIR" || die "cannot create FERRY_PA_DIR=$PA_DIR"
PA_DIR="$(cd "$PA_DIR" && pwd)"

WHEEL_NAME="perf_analyzer-${PA_VERSION}-py3-none-${PA_PLATFORM}.whl"
WHEEL_DIR="$PA_DIR/wheel"           # downloaded .whl
PKG_DIR="$PA_DIR/pkg"               # unzipped wheel
APT_DIR="$PA_DIR/apt"               # private apt config + state
DEB_DIR="$PA_DIR/debs"              # downloaded .deb files
SYSROOT="$PA_DIR/sysroot"           # dpkg -x of the trixie packages
WRAPPER="$PA_DIR/bin/perf_analyzer"
STAMP="$PA_DIR/.install-stamp"
LOADER_REL="sysroot/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
SYSROOT_LIBS_REL="sysroot/usr/lib/x86_64-linux-gnu"

INSTALL_KEY="perf-analyzer=${PA_VERSION} wrapper=2 sha256=${PA_WHEEL_SHA256} suite=${DEBIAN_SUITE} debs=${DEB_PACKAGES[*]}"

# Keep the cache out of git without touching the repo's .gitignore.
[[ -f "$PA_DIR/.gitignore" ]] || printf '*\n' >"$PA_DIR/.gitignore"

# ---------------------------------------------------------------- fast path --
if ((!FORCE)) && [[ -x "$WRAPPER" && -f "$STAMP" ]] &&
    [[ "$(cat "$STAMP")" == "$INSTALL_KEY" ]] &&
    "$WRAPPER" --version >/dev/null 2>&1; then
    log "already installed (${INSTALL_KEY%% *}); use --force to reinstall"
    printf '%s\n' "$WRAPPER"
    exit 0
fi
rm -f "$STAMP"
if ((FORCE)); then
    log "--force: discarding previous install in $PA_DIR"
    rm -rf "$PKG_DIR" "$SYSROOT" "$DEB_DIR" "$APT_DIR" "${PA_DIR:?}/bin"
fi

need "$PYTHON" "set FERRY_PA_PYTHON"
need sha256sum
need apt-get "this script expects a Debian system"
need dpkg-deb "this script expects a Debian system"

TMP="$(mktemp -d "$PA_DIR/.tmp.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# ------------------------------------------------------ 1. the real wheel ---
mkdir -p "$WHEEL_DIR"
wheel="$WHEEL_DIR/$WHEEL_NAME"
if [[ -f "$wheel" ]] && echo "$PA_WHEEL_SHA256  $wheel" | sha256sum --check --status; then
    log "wheel already downloaded: $wheel"
else
    rm -f "$wheel"
    "$PYTHON" -m pip --version >/dev/null 2>&1 ||
        die "'$PYTHON -m pip' does not work; set FERRY_PA_PYTHON to a python with pip"
    log "downloading perf-analyzer==$PA_VERSION ($PA_PLATFORM) from PyPI"
    # --platform makes pip ignore this host's glibc, so it cannot fall back to
    # the empty 0.1.0 placeholder; the version pin makes the choice explicit.
    if ! "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
        --platform "$PA_PLATFORM" --python-version "$PA_PYTHON_VERSION" \
        --dest "$TMP/wheel" "perf-analyzer==$PA_VERSION" >&2; then
        die "pip download of perf-analyzer==$PA_VERSION for $PA_PLATFORM failed (is PyPI reachable?)"
    fi
    [[ -f "$TMP/wheel/$WHEEL_NAME" ]] ||
        die "expected $WHEEL_NAME, pip gave: $(find "$TMP/wheel" -mindepth 1 -printf '%f ' 2>/dev/null)"
    echo "$PA_WHEEL_SHA256  $TMP/wheel/$WHEEL_NAME" | sha256sum --check --status ||
        die "sha256 mismatch for $WHEEL_NAME (expected $PA_WHEEL_SHA256)"
    mv -f "$TMP/wheel/$WHEEL_NAME" "$wheel"
fi

if [[ -f "$PKG_DIR/.from" && "$(cat "$PKG_DIR/.from")" == "$WHEEL_NAME" ]]; then
    log "wheel already unpacked: $PKG_DIR"
else
    log "unpacking $WHEEL_NAME"
    rm -rf "$PKG_DIR" "$TMP/unzip"
    "$PYTHON" -m zipfile -e "$wheel" "$TMP/unzip"
    printf '%s\n' "$WHEEL_NAME" >"$TMP/unzip/.from"
    mv "$TMP/unzip" "$PKG_DIR"
fi

# The executable is perf_analyzer/bin/perf_analyzer; search to be robust to
# layout changes (zipfile does not keep the exec bit, so look for ELF files).
PA_BIN=""
while IFS= read -r -d '' f; do
    if [[ "$(head -c 4 "$f" | od -An -c | tr -d ' ')" == '177ELF' ]]; then
        PA_BIN="$f"
        break
    fi
done < <(find "$PKG_DIR" -type f -name perf_analyzer -print0)
[[ -n "$PA_BIN" ]] || die "no perf_analyzer executable found in $WHEEL_NAME (placeholder wheel?)"
chmod +x "$PA_BIN"
PA_BIN_REL="${PA_BIN#"$PA_DIR"/}"

# Shared objects bundled in the wheel (none in 2.60.0, auditwheel-style
# *.libs dirs in other builds): add their directories to the library path.
WHEEL_LIB_DIRS_REL=()
while IFS= read -r d; do
    WHEEL_LIB_DIRS_REL+=("${d#"$PA_DIR"/}")
done < <(find "$PKG_DIR" -type f \( -name '*.so' -o -name '*.so.*' \) -printf '%h\n' | sort -u)

# ------------------------------------ 2. trixie runtime libs, isolated apt ---
SYSROOT_KEY="suite=${DEBIAN_SUITE} debs=${DEB_PACKAGES[*]}"
if [[ -f "$SYSROOT/.from" && "$(cat "$SYSROOT/.from")" == "$SYSROOT_KEY" && -f "$PA_DIR/$LOADER_REL" ]]; then
    log "$DEBIAN_SUITE libraries already unpacked: $SYSROOT"
else
    # shellcheck source=/dev/null
    host_codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    mirror="${FERRY_PA_DEBIAN_MIRROR:-}"
    if [[ -z "$mirror" && -n "$host_codename" ]]; then
        mirror="$(host_mirror_for_suite "$host_codename" || true)"
    fi
    if [[ -z "$mirror" ]]; then
        mirror="$FALLBACK_MIRROR"
        log "no '$host_codename' mirror found in /etc/apt/sources.list*; using $mirror"
    fi
    security="${FERRY_PA_SECURITY_MIRROR:-}"
    if [[ -z "$security" && -n "$host_codename" ]]; then
        security="$(host_mirror_for_suite "${host_codename}-security" || true)"
    fi
    [[ "$security" == none ]] && security=""
    [[ -r "$KEYRING" ]] || die "keyring $KEYRING not readable (install debian-archive-keyring or set FERRY_PA_KEYRING)"

    log "fetching ${DEB_PACKAGES[*]} from $mirror $DEBIAN_SUITE${security:+ (+ $security ${DEBIAN_SUITE}-security)}"

    # A private apt universe: APT_CONFIG is read before apt.conf.d, so pointing
    # Dir::Etc::Parts/Main away also drops the host's hooks (e.g. appstream's
    # APT::Update::Post-Invoke-Success). Lists, caches, status and logs live
    # under $APT_DIR; the host's /etc/apt and /var/lib/apt are never used.
    rm -rf "$APT_DIR"
    mkdir -p "$APT_DIR"/{etc/apt.conf.d,etc/sources.list.d,etc/preferences.d,etc/trusted.gpg.d,etc/auth.conf.d} \
        "$APT_DIR"/{state/lists/partial,cache/archives/partial,log}
    : >"$APT_DIR/state/status"
    {
        printf 'deb [signed-by=%s] %s %s main\n' "$KEYRING" "$mirror" "$DEBIAN_SUITE"
        [[ -z "$security" ]] ||
            printf 'deb [signed-by=%s] %s %s-security main\n' "$KEYRING" "$security" "$DEBIAN_SUITE"
    } >"$APT_DIR/etc/sources.list"
    A="$APT_DIR"
    cat >"$APT_DIR/apt.conf" <<EOF
Dir::Etc "$A/etc";
Dir::Etc::Main "/dev/null";
Dir::Etc::Parts "$A/etc/apt.conf.d";
Dir::Etc::SourceList "$A/etc/sources.list";
Dir::Etc::SourceParts "$A/etc/sources.list.d";
Dir::Etc::Preferences "$A/etc/preferences";
Dir::Etc::PreferencesParts "$A/etc/preferences.d";
Dir::Etc::Trusted "$A/etc/trusted.gpg";
Dir::Etc::TrustedParts "$A/etc/trusted.gpg.d";
Dir::Etc::netrc "$A/etc/auth.conf";
Dir::Etc::netrcparts "$A/etc/auth.conf.d";
Dir::State "$A/state";
Dir::State::Lists "$A/state/lists";
Dir::State::status "$A/state/status";
Dir::Cache "$A/cache";
Dir::Cache::Archives "$A/cache/archives";
Dir::Log "$A/log";
APT::Architecture "amd64";
APT::Architectures { "amd64"; };
Acquire::Languages "none";
Acquire::Retries "3";
EOF
    export APT_CONFIG="$APT_DIR/apt.conf"

    update_hint="mirror $mirror; check the network and that $KEYRING has the $DEBIAN_SUITE keys"
    apt-get -q update >&2 || die "apt-get update for $DEBIAN_SUITE failed ($update_hint)"
    # apt-get update exits 0 on some fetch failures; require the main index.
    compgen -G "$APT_DIR/state/lists/*_dists_${DEBIAN_SUITE}_main_binary-amd64_Packages*" >/dev/null ||
        die "apt-get update fetched no $DEBIAN_SUITE package index ($update_hint)"

    # apt downloads as user _apt when run as root; let it write the target dir
    # (otherwise it falls back to an unsandboxed download with a warning).
    mkdir -p "$TMP/debs"
    if [[ $EUID -eq 0 ]] && id -u _apt >/dev/null 2>&1; then
        chmod 711 "$TMP"
        chown _apt "$TMP/debs"
    fi
    (cd "$TMP/debs" && apt-get -q download "${DEB_PACKAGES[@]}") >&2 ||
        die "apt-get download ${DEB_PACKAGES[*]} from $DEBIAN_SUITE failed"
    unset APT_CONFIG
    # The trixie indexes (~140 MB unpacked) are only needed for this download.
    rm -rf "$APT_DIR/state/lists" "$APT_DIR/cache"

    rm -rf "$DEB_DIR"
    mkdir -p "$DEB_DIR"
    mv "$TMP"/debs/*.deb "$DEB_DIR"/
    [[ $EUID -ne 0 ]] || chown -R 0:0 "$DEB_DIR"

    log "unpacking $(cd "$DEB_DIR" && echo *.deb)"
    rm -rf "$SYSROOT"
    mkdir -p "$TMP/sysroot"
    for deb in "$DEB_DIR"/*.deb; do
        dpkg-deb -x "$deb" "$TMP/sysroot"
    done
    # Drop payload we never use (docs, locales, gdb helpers) to keep it small.
    rm -rf "$TMP/sysroot/usr/share"
    printf '%s\n' "$SYSROOT_KEY" >"$TMP/sysroot/.from"
    mv "$TMP/sysroot" "$SYSROOT"
    [[ -f "$PA_DIR/$LOADER_REL" ]] || die "dynamic loader missing after unpack: $PA_DIR/$LOADER_REL"
fi

# -------------------------------------------------------------- 3. wrapper ---
LIB_PATH_REL=("$SYSROOT_LIBS_REL" "${WHEEL_LIB_DIRS_REL[@]}")
mkdir -p "$PA_DIR/bin"
# Relative paths are emitted as "$root"/<shell-quoted path>.
q_loader="\"\$root\"/$(printf '%q' "$LOADER_REL")"
q_binary="\"\$root\"/$(printf '%q' "$PA_BIN_REL")"
q_libs=""
for d in "${LIB_PATH_REL[@]}"; do
    q_libs+="${q_libs:+:}\"\$root\"/$(printf '%q' "$d")"
done
cat >"$TMP/wrapper" <<EOF
#!/usr/bin/env bash
# Generated by benchmarks/install_perf_analyzer.sh (perf-analyzer ${PA_VERSION}); do not edit.
# Runs perf_analyzer under Debian ${DEBIAN_SUITE}'s loader and libc (the wheel needs glibc >= 2.38).
# Paths are relative to the install dir, so the whole dir can be moved.
set -euo pipefail
root="\$(cd "\$(dirname "\$(readlink -f "\${BASH_SOURCE[0]}")")/.." && pwd)"
loader=${q_loader}
binary=${q_binary}
libs=${q_libs}
# perf_analyzer has no --help: it prints its usage (on stderr, exit 99) when
# called without arguments (ending with a "-m must be specified" error).
# Make \`perf_analyzer --help\` / \`-h\` print just the usage on stdout, exit 0.
if [[ \$# -eq 1 && ( "\$1" == --help || "\$1" == -h ) ]]; then
    rc=0
    "\$loader" --library-path "\$libs" --argv0 "\$0" "\$binary" 2>&1 |
        sed '/^Error: Failed to parse -m (model name)/d' || rc=\$?
    if [[ \$rc -eq 99 ]]; then exit 0; fi
    exit "\$rc"
fi
exec "\$loader" --library-path "\$libs" --argv0 "\$0" "\$binary" "\$@"
EOF
chmod 755 "$TMP/wrapper"
mv -f "$TMP/wrapper" "$WRAPPER"

# ------------------------------------------------------------------ checks ---
loader="$PA_DIR/$LOADER_REL"
libs="$(IFS=:; echo "${LIB_PATH_REL[*]/#/$PA_DIR/}")"
if deps="$("$loader" --list --library-path "$libs" "$PA_DIR/$PA_BIN_REL" 2>&1)" &&
    ! grep -q 'not found' <<<"$deps"; then
    log "resolved libraries:"
    printf '%s\n' "$deps" >&2
else
    printf '%s\n' "$deps" >&2
    die "perf_analyzer has unresolved libraries (add the trixie packages via FERRY_PA_EXTRA_DEBS)"
fi
version="$("$WRAPPER" --version 2>&1)" || die "'$WRAPPER --version' failed: $version"
log "ok: $version"

printf '%s\n' "$INSTALL_KEY" >"$STAMP"
printf '%s\n' "$WRAPPER"
