#!/usr/bin/env bash
# rauc-bench.sh - time RAUC 1.8 (Debian bookworm) installing a plain bundle
# into a file-backed raw slot with the noop bootloader, plus dd/hash references.
#
# usage: rauc-bench.sh [SIZE_MIB=200] [WORKDIR=/tmp/rauc-bench/work]
# env:   RUNS=3          number of timed runs per measurement
#        DROP_CACHES=0   1 = "sync; echo 3 > /proc/sys/vm/drop_caches" before every
#                        timed step (cold source). System-wide. Default: warm page cache.
#        KEEP=0          1 = leave the rauc service and dbus-daemon running at exit
#
# Needs root (loop-mounting the bundle, writing /proc/sys/vm/drop_caches, apt-get).
# The Debian rauc binary is built with the D-Bus service enabled, so `rauc install`
# is only a D-Bus client. This script starts a private dbus-daemon (session type,
# own socket in WORKDIR) and a foreground `rauc service --override-boot-slot=A` on it.
set -Eeuo pipefail

N=${1:-200}
WORK=${2:-/tmp/rauc-bench/work}
RUNS=${RUNS:-3}
DROP_CACHES=${DROP_CACHES:-0}
KEEP=${KEEP:-0}

die() { echo "rauc-bench: ERROR: $*" >&2; exit 1; }
log() { echo "rauc-bench: $*" >&2; }
trap 'die "command failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

[[ $N =~ ^[1-9][0-9]*$ ]] || die "image size must be a positive integer number of MiB, got '$N'"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, got '$RUNS'"
[[ $(id -u) -eq 0 ]] || die "must run as root (loop mount of the bundle, drop_caches, apt-get)"
case $WORK in /*) ;; *) die "work dir must be an absolute path, got '$WORK'";; esac
[[ $WORK != / && $WORK != /tmp && $WORK != /tmp/ ]] || die "refusing work dir '$WORK'"

# ---------------------------------------------------------------- packages
need_pkgs=()
command -v rauc        >/dev/null || need_pkgs+=(rauc)
command -v mksquashfs  >/dev/null || need_pkgs+=(squashfs-tools)
command -v dbus-daemon >/dev/null || need_pkgs+=(dbus-daemon)
command -v openssl     >/dev/null || need_pkgs+=(openssl)
command -v fallocate   >/dev/null || need_pkgs+=(util-linux)
if ((${#need_pkgs[@]})) || ! command -v b3sum >/dev/null; then
    log "installing packages: ${need_pkgs[*]:-} (+ optional b3sum)"
    apt-get update -qq >/dev/null || die "apt-get update failed"
    if ((${#need_pkgs[@]})); then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null \
            || die "apt-get install ${need_pkgs[*]} failed"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq b3sum >/dev/null 2>&1 \
        || log "b3sum not installable, skipping b3sum reference"
fi
for c in rauc mksquashfs dbus-daemon openssl fallocate cmp sha256sum; do
    command -v "$c" >/dev/null || die "required command '$c' still missing"
done
HAVE_B3=0; command -v b3sum >/dev/null && HAVE_B3=1

RAUC_VERSION=$(rauc --version 2>&1 | awk '{print $2}')
[[ $RAUC_VERSION == 1.8* ]] || log "WARNING: expected rauc 1.8, found '$RAUC_VERSION' (recipe written for 1.8)"
rauc service --help 2>&1 | grep -q -- --override-boot-slot \
    || die "this rauc has no 'service --override-boot-slot' (built without D-Bus service?); adapt the recipe"

# kernel features RAUC needs for plain bundles: loop devices + squashfs
[[ -e /dev/loop-control ]] || modprobe loop 2>/dev/null || true
[[ -e /dev/loop-control ]] || die "/dev/loop-control missing: RAUC loop-mounts the bundle"
grep -qw squashfs /proc/filesystems || modprobe squashfs 2>/dev/null || true
grep -qw squashfs /proc/filesystems || die "kernel lacks squashfs support: RAUC mounts the bundle as squashfs"

# ---------------------------------------------------------------- clean slate
stop_pidfile() {   # kill a process we started earlier, by its recorded pid only
    local f=$1 want=$2 pid
    [[ -f $f ]] || return 0
    pid=$(<"$f")
    if [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/cmdline ]] \
       && tr '\0' ' ' </proc/$pid/cmdline | grep -q -- "$want"; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do [[ -e /proc/$pid ]] || break; sleep 0.1; done
        [[ -e /proc/$pid ]] && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}
cleanup() {
    local rc=$?
    trap - ERR
    if [[ $KEEP != 1 ]]; then
        stop_pidfile "$WORK/rauc-service.pid" "$WORK/system.conf"
        stop_pidfile "$WORK/dbus.pid" "$WORK/dbus.conf"
    fi
    if [[ -n ${WORK:-} ]] && mountpoint -q "$WORK/mnt/bundle" 2>/dev/null; then
        umount "$WORK/mnt/bundle" 2>/dev/null || true
    fi
    exit $rc
}

if [[ -e $WORK ]]; then
    [[ -f $WORK/.rauc-bench ]] || [[ -z $(ls -A "$WORK") ]] \
        || die "work dir '$WORK' exists and was not created by this script (no .rauc-bench marker); refusing to wipe it"
    stop_pidfile "$WORK/rauc-service.pid" "$WORK/system.conf"
    stop_pidfile "$WORK/dbus.pid" "$WORK/dbus.conf"
    mountpoint -q "$WORK/mnt/bundle" 2>/dev/null && umount "$WORK/mnt/bundle"
    rm -rf "$WORK"
fi
mkdir -p "$WORK"/{pki,content,mnt,data,logs}
touch "$WORK/.rauc-bench"
trap cleanup EXIT
cd "$WORK"

MIB=$((1024 * 1024))
BYTES=$((N * MIB))
SLOT_BYTES=$(((N + 16) * MIB))
IMG=$WORK/content/rootfs.img
BUNDLE=$WORK/bundle.raucb
SLOT_A=$WORK/slot-a.img     # rootfs.0, bootname A: the "booted" slot (never written)
SLOT_B=$WORK/slot-b.img     # rootfs.1, bootname B: the inactive slot RAUC installs into

# ---------------------------------------------------------------- PKI (throwaway CA + signing cert)
log "creating throwaway CA and signing certificate"
(
    cd pki
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
        -keyout ca.key.pem -out ca.cert.pem -subj "/CN=rauc-bench CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" >/dev/null 2>&1
    openssl req -newkey rsa:2048 -nodes -sha256 \
        -keyout signing.key.pem -out signing.csr -subj "/CN=rauc-bench signing" >/dev/null 2>&1
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
        "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid" > signing.ext
    openssl x509 -req -sha256 -days 3650 -in signing.csr -CA ca.cert.pem -CAkey ca.key.pem \
        -CAcreateserial -extfile signing.ext -out signing.cert.pem >/dev/null 2>&1
    openssl verify -CAfile ca.cert.pem signing.cert.pem >/dev/null
) || die "PKI creation failed"

# ---------------------------------------------------------------- image + bundle
log "generating ${N} MiB of incompressible data"
head -c "$BYTES" /dev/urandom > "$IMG"
[[ $(stat -c %s "$IMG") -eq $BYTES ]] || die "image has wrong size"
IMG_SHA=$(sha256sum "$IMG" | awk '{print $1}')

cat > content/manifest.raucm <<EOF
[update]
compatible=rauc-bench
version=1

[bundle]
format=plain

[image.rootfs]
filename=rootfs.img
EOF

log "building plain bundle"
# -noI -noD -noF -noX: store uncompressed (random data would be stored uncompressed anyway,
# this only skips the futile compression attempt); -processors 1: keep CPU use modest.
rauc bundle --cert=pki/signing.cert.pem --key=pki/signing.key.pem --keyring=pki/ca.cert.pem \
    --mksquashfs-args="-noI -noD -noF -noX -processors 1" \
    content "$BUNDLE" > logs/bundle.log 2>&1 || { cat logs/bundle.log >&2; die "rauc bundle failed"; }
rauc info --keyring=pki/ca.cert.pem "$BUNDLE" > logs/info.log 2>&1 || { cat logs/info.log >&2; die "rauc info failed"; }
grep -Eq 'Bundle Format:[[:space:]]+plain' logs/info.log || { cat logs/info.log >&2; die "bundle is not in plain format"; }
BUNDLE_BYTES=$(stat -c %s "$BUNDLE")

# ---------------------------------------------------------------- system.conf
cat > system.conf <<EOF
[system]
compatible=rauc-bench
bootloader=noop
mountprefix=$WORK/mnt
data-directory=$WORK/data

[keyring]
path=$WORK/pki/ca.cert.pem

[slot.rootfs.0]
device=$SLOT_A
type=raw
bootname=A

[slot.rootfs.1]
device=$SLOT_B
type=raw
bootname=B
EOF

new_slot() { rm -f "$1"; fallocate -l "$SLOT_BYTES" "$1"; }
new_slot "$SLOT_A"
new_slot "$SLOT_B"

# ---------------------------------------------------------------- private D-Bus + rauc service
cat > dbus.conf <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=$WORK/dbus.sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
EOF
log "starting private dbus-daemon"
dbus-daemon --config-file="$WORK/dbus.conf" --nofork --nopidfile > logs/dbus.log 2>&1 </dev/null &
echo $! > dbus.pid
for _ in $(seq 100); do [[ -S $WORK/dbus.sock ]] && break; sleep 0.1; done
[[ -S $WORK/dbus.sock ]] || { cat logs/dbus.log >&2; die "dbus-daemon did not come up"; }

# RAUC picks the session bus when DBUS_STARTER_BUS_TYPE=session (client and service alike).
export DBUS_SESSION_BUS_ADDRESS="unix:path=$WORK/dbus.sock"
export DBUS_STARTER_BUS_TYPE=session

log "starting rauc service (booted slot forced to A)"
rauc service --conf="$WORK/system.conf" --override-boot-slot=A > logs/service.log 2>&1 </dev/null &
echo $! > rauc-service.pid
ok=0
for _ in $(seq 100); do
    # must wait for the booted name too: a proxy created just before the service owns
    # its bus name reports empty properties (race seen in practice)
    if rauc status --output-format=shell > logs/status.log 2>/dev/null \
       && grep -q "^RAUC_SYSTEM_BOOTED_BOOTNAME='A'" logs/status.log; then ok=1; break; fi
    [[ -e /proc/$(<rauc-service.pid) ]] || break
    sleep 0.1
done
((ok)) || { cat logs/service.log logs/status.log >&2; die "rauc service did not answer on the private bus (or does not see slot A as booted)"; }
grep -q "^RAUC_SYSTEM_BOOTED_BOOTNAME='A'" logs/status.log \
    || { cat logs/status.log >&2; die "rauc does not see slot A as booted"; }

# ---------------------------------------------------------------- helpers
now() { date +%s.%N; }
maybe_drop() { sync; if [[ $DROP_CACHES == 1 ]]; then echo 3 > /proc/sys/vm/drop_caches; fi; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
report() {  # label, file-with-seconds
    local med; med=$(median < "$2")
    awk -v l="$1" -v n="$N" -v m="$med" -v all="$(tr '\n' ' ' < "$2")" \
        'BEGIN {printf "%s: %d MiB in %.2f s (%.0f MiB/s)   [runs: %s]\n", l, n, m, n/m, all}'
}
check_slot() {  # file -> verifies the first N MiB equal the image
    cmp -n "$BYTES" "$IMG" "$1" || die "slot $1 does not hold the image bytes"
}
# hh:mm:ss.mmm of the first service-log line (after line $1) matching $2
svc_ts() { { tail -n +"$(($1 + 1))" logs/service.log | grep -m1 -- "$2" \
             | sed -nE 's/^rauc-Message: ([0-9]{2}):([0-9]{2}):([0-9]{2}\.[0-9]{3}):.*/\1 \2 \3/p' \
             | awk '{printf "%.3f", $1*3600 + $2*60 + $3}'; } || true; }

: > t_rauc; : > t_sig; : > t_copy; : > t_dd; : > t_ddbuf; : > t_sha; : > t_b3; : > t_dgst

# ---------------------------------------------------------------- rauc install runs
for i in $(seq "$RUNS"); do
    new_slot "$SLOT_B"
    maybe_drop
    l0=$(wc -l < logs/service.log)
    t0=$(now)
    rauc install "$BUNDLE" > "logs/install.$i.log" 2>&1 \
        || { cat "logs/install.$i.log" >&2; tail -n 30 logs/service.log >&2; die "rauc install run $i failed"; }
    t1=$(now)
    grep -q "succeeded" "logs/install.$i.log" || { cat "logs/install.$i.log" >&2; die "rauc install run $i did not report success"; }
    awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f\n", b-a}' >> t_rauc
    # phase breakdown from the service log (ms resolution)
    s0=$(svc_ts "$l0" "Verifying bundle signature"); s1=$(svc_ts "$l0" "Verified detached signature")
    c0=$(svc_ts "$l0" "writing data to device");    c1=$(svc_ts "$l0" "Marking target slot rootfs.1 as bootable")
    if [[ -n $s0 && -n $s1 && -n $c0 && -n $c1 ]]; then
        awk -v a="$s0" -v b="$s1" 'BEGIN {printf "%.3f\n", b-a}' >> t_sig
        awk -v a="$c0" -v b="$c1" 'BEGIN {printf "%.3f\n", b-a}' >> t_copy
    fi
    check_slot "$SLOT_B"
    cmp -s -n "$BYTES" "$IMG" "$SLOT_A" && die "booted slot A was written - wrong target"
done
grep -q "^sha256=$IMG_SHA" data/central.raucs || die "RAUC status file does not record the image sha256"

# ---------------------------------------------------------------- references
for i in $(seq "$RUNS"); do
    # dd O_DIRECT, 1 MiB blocks, fsync at end
    new_slot "$SLOT_B"; maybe_drop
    t0=$(now); dd if="$IMG" of="$SLOT_B" bs=1M oflag=direct conv=fsync,notrunc status=none; t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f\n", b-a}' >> t_dd
    check_slot "$SLOT_B"

    # dd buffered 8 KiB blocks + fsync: the same write pattern RAUC 1.8 uses
    new_slot "$SLOT_B"; maybe_drop
    t0=$(now); dd if="$IMG" of="$SLOT_B" bs=8k conv=fsync,notrunc status=none; t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f\n", b-a}' >> t_ddbuf
    check_slot "$SLOT_B"

    # SHA-256 over the whole bundle file: what RAUC's signature check hashes
    maybe_drop
    t0=$(now); openssl dgst -sha256 "$BUNDLE" > /dev/null; t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f\n", b-a}' >> t_dgst

    # hashes of the slot's first N MiB (= image bytes), also a verification
    maybe_drop
    t0=$(now); h=$(head -c "$BYTES" "$SLOT_B" | sha256sum | awk '{print $1}'); t1=$(now)
    [[ $h == "$IMG_SHA" ]] || die "sha256 of slot prefix differs from image"
    awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f\n", b-a}' >> t_sha
    if ((HAVE_B3)); then
        maybe_drop
        t0=$(now); head -c "$BYTES" "$SLOT_B" | b3sum > /dev/null; t1=$(now)
        awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f\n", b-a}' >> t_b3
    fi
done

# ---------------------------------------------------------------- results
echo "# rauc $RAUC_VERSION, kernel $(uname -r), $(nproc) CPUs, load avg $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# image $N MiB ($BYTES B), bundle $BUNDLE_BYTES B (plain), slot file $SLOT_BYTES B on $(df --output=fstype "$WORK" | tail -1 | tr -d ' '), runs $RUNS, drop_caches=$DROP_CACHES"
echo "# slot verified after every write: first $N MiB of $SLOT_B == image (sha256 $IMG_SHA)"
report "rauc install" t_rauc
[[ -s t_sig ]]  && report "  rauc phase: signature check (sha256 over whole bundle)" t_sig
[[ -s t_copy ]] && report "  rauc phase: image copy (8 KiB read/write + fsync)" t_copy
report "dd bs=1M oflag=direct conv=fsync" t_dd
report "dd bs=8k buffered conv=fsync" t_ddbuf
report "openssl dgst -sha256 bundle" t_dgst
report "sha256sum (slot, first N MiB via pipe)" t_sha
((HAVE_B3)) && report "b3sum (slot, first N MiB via pipe)" t_b3
exit 0
