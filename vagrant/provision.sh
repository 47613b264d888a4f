#!/usr/bin/env bash
# Provisions one box of the operator matrix (see Vagrantfile) and runs the project's tests.
#
#   provision.sh [all|check|deps|test|kernel]      (as root; default: all)
#     check   kernel >= 5.10, cgroup v2 mounted, /sys/kernel/btf/vmlinux; exit 1 if not
#     deps    packages (apt or dnf), then rustup with the stable toolchain
#     test    cd /enforcer && cargo xtask test $ENFORCER_TEST_ARGS
#     all     check, deps, test
#     kernel  a kernel older than 5.10 with a known upgrade (Ubuntu 20.04: HWE 5.15) gets
#             it installed; the Vagrantfile reboots the box afterwards
#
# The last line is "enforcer-provision: PASS ..." or "enforcer-provision: FAIL: <reason>".
set -euo pipefail

SRC=${ENFORCER_SRC:-/enforcer}
MIN_MAJOR=5
MIN_MINOR=10

say() { printf 'enforcer-provision: %s\n' "$*"; }
fail() {
    printf 'enforcer-provision: FAIL: %s\n' "$*" >&2
    exit 1
}

os_field() {
    # os_field KEY: the value of KEY in /etc/os-release, unquoted.
    local key=$1 line
    while IFS= read -r line; do
        if [[ $line == "$key="* ]]; then
            line=${line#*=}
            line=${line#\"}
            printf '%s\n' "${line%\"}"
            return 0
        fi
    done </etc/os-release
}

distro() { printf '%s %s' "$(os_field ID)" "$(os_field VERSION_ID)"; }

# 0 when the running kernel is at least MIN_MAJOR.MIN_MINOR.
kernel_ok() {
    local rel major minor
    rel=$(uname -r)
    major=${rel%%.*}
    minor=${rel#*.}
    minor=${minor%%[!0-9]*}
    ((major > MIN_MAJOR || (major == MIN_MAJOR && minor >= MIN_MINOR)))
}

# Prints the cgroup2 mount point(s) from /proc/self/mountinfo (fstype follows " - ").
cgroup2_mounts() {
    local line pre post
    while IFS= read -r line; do
        pre=${line%% - *}
        post=${line#* - }
        if [[ ${post%% *} == cgroup2 ]]; then
            # field 5 of the part before " - " is the mount point
            read -r _ _ _ _ mnt _ <<<"$pre"
            printf '%s\n' "$mnt"
        fi
    done </proc/self/mountinfo
}

check() {
    local problems=() rel mounts
    rel=$(uname -r)
    say "box: $(distro), kernel $rel, $(nproc) CPUs, $(awk '/MemTotal/ {printf "%d MiB", $2/1024}' /proc/meminfo)"
    if kernel_ok; then
        say "ok   kernel $rel >= $MIN_MAJOR.$MIN_MINOR"
    else
        problems+=("kernel $rel is older than $MIN_MAJOR.$MIN_MINOR")
    fi
    mounts=$(cgroup2_mounts | tr '\n' ' ')
    mounts=${mounts% }
    if [[ -z $mounts ]]; then
        problems+=("no cgroup2 mount in /proc/self/mountinfo (cgroup v2 needed)")
    elif [[ $mounts == /sys/fs/cgroup ]]; then
        say "ok   cgroup v2 mounted at /sys/fs/cgroup (unified)"
    else
        say "ok   cgroup v2 mounted at $mounts (hybrid: v1 controllers are mounted too)"
    fi
    if [[ -r /sys/kernel/btf/vmlinux ]]; then
        say "ok   BTF at /sys/kernel/btf/vmlinux"
    else
        problems+=("no /sys/kernel/btf/vmlinux (kernel built without CONFIG_DEBUG_INFO_BTF)")
    fi
    if ((${#problems[@]})); then
        local joined=${problems[0]} p
        for p in "${problems[@]:1}"; do joined+="; $p"; done
        fail "$(distro) cannot run the enforcer: $joined"
    fi
}

kernel() {
    if kernel_ok; then
        say "kernel $(uname -r) >= $MIN_MAJOR.$MIN_MINOR: nothing to install"
        return 0
    fi
    if [[ "$(os_field ID) $(os_field VERSION_ID)" == "ubuntu 20.04" ]]; then
        say "kernel $(uname -r) < $MIN_MAJOR.$MIN_MINOR: installing the HWE kernel (linux-generic-hwe-20.04)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --install-recommends linux-generic-hwe-20.04
        say "HWE kernel installed; the box reboots into it (the Vagrantfile sets reboot: true)"
        return 0
    fi
    fail "kernel $(uname -r) < $MIN_MAJOR.$MIN_MINOR and no known upgrade for $(distro)"
}

deps() {
    if command -v apt-get >/dev/null 2>&1; then
        say "installing packages (apt)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends \
            ca-certificates curl build-essential git pkg-config python3 python3-venv iproute2
    elif command -v dnf >/dev/null 2>&1; then
        say "installing packages (dnf)"
        # curl: RHEL 9 and Amazon Linux 2023 may ship curl-minimal, which conflicts with curl;
        # either one will do.
        local pkgs=(ca-certificates gcc gcc-c++ make git pkgconf-pkg-config python3 python3-pip
            iproute tar gzip findutils)
        command -v curl >/dev/null 2>&1 || pkgs+=(curl)
        dnf install -y -q "${pkgs[@]}"
    else
        fail "$(distro): neither apt-get nor dnf found"
    fi

    rust_env
    if command -v rustup >/dev/null 2>&1; then
        say "rustup present: $(rustup --version 2>/dev/null)"
    else
        say "installing rustup (stable, minimal profile) into $CARGO_HOME"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
            sh -s -- -y --no-modify-path --default-toolchain stable --profile minimal
    fi
    rust_env
    cargo --version >/dev/null || fail "cargo does not run after installing rustup"
}

rust_env() {
    local home
    home=$(getent passwd "$(id -un)" | cut -d: -f6)
    export HOME=${home:-/root}
    export RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}
    export CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
    case ":$PATH:" in
        *":$CARGO_HOME/bin:"*) ;;
        *) export PATH="$CARGO_HOME/bin:$PATH" ;;
    esac
}

run_tests() {
    rust_env
    [[ -f $SRC/Cargo.toml ]] || fail "$SRC/Cargo.toml missing: is the rsync synced folder there? (vagrant rsync)"
    local start args=()
    read -r -a args <<<"${ENFORCER_TEST_ARGS:-}"
    say "running cargo xtask test ${args[*]} in $SRC"
    start=$SECONDS
    cd "$SRC"
    # CI is left unset: the vagrant test skips inside the box (no vagrant there) and the
    # real-kernel tests run because this is root.
    if env -u CI cargo xtask test "${args[@]}"; then
        say "PASS $(distro) kernel $(uname -r): cargo xtask test ($((SECONDS - start)) s)"
    else
        fail "$(distro) kernel $(uname -r): cargo xtask test failed ($((SECONDS - start)) s); see the output above"
    fi
}

main() {
    local stage=${1:-all}
    [[ $(id -u) -eq 0 ]] || fail "run as root (vagrant's shell provisioner does: privileged: true)"
    case $stage in
        check) check ;;
        kernel) kernel ;;
        deps) deps ;;
        test) run_tests ;;
        all)
            check
            deps
            run_tests
            ;;
        *) fail "unknown stage '$stage' (all|check|deps|test|kernel)" ;;
    esac
}

main "$@"
