#!/usr/bin/env bash
# `make demo`: a small disk image with a partition table and an ext4
# filesystem, built and inspected through an imgfs mount.  Needs root (for
# losetup and mount); everything happens in a temporary directory.
set -euo pipefail

work=$(mktemp -d /var/tmp/imgfs-demo.XXXXXX)
loops=()
cleanup() {
    set +e
    mountpoint -q "$work/fs" && umount "$work/fs"
    for loop in "${loops[@]}"; do losetup -d "$loop" 2>/dev/null; done
    mountpoint -q "$work/mnt" && umount "$work/mnt"
    rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

fmt=raw
imgfs formats | grep -qw qcow2 && fmt=qcow2
mkdir "$work/mnt" "$work/fs"

step "imgfs create -f $fmt disk.$fmt 64M"
imgfs create -f "$fmt" "$work/disk.$fmt" 64M

step "imgfs mount disk.$fmt mnt/   (the image appears as mnt/disk.raw)"
imgfs mount "$work/disk.$fmt" "$work/mnt"
ls -l "$work/mnt"

step "sfdisk: one Linux partition on the raw view"
printf 'label: dos\n,,L\n' | sfdisk -q "$work/mnt/disk.raw"
step "fdisk -l mnt/disk.raw"
fdisk -l "$work/mnt/disk.raw"

step "losetup -P, mkfs.ext4 on the partition, write a file"
loop=$(losetup -P --show -f "$work/mnt/disk.raw")
loops+=("$loop")
partx -a "$loop" 2>/dev/null || true
part="${loop}p1"
if [ ! -b "$part" ]; then
    # This kernel does not scan partitions of loop devices: map it by offset.
    start=$(sfdisk -J "$work/mnt/disk.raw" | python3 -c \
        'import json,sys; p=json.load(sys.stdin)["partitiontable"]["partitions"][0]; print(p["start"], p["size"])')
    read -r first sectors <<<"$start"
    part=$(losetup --show -f -o $((first * 512)) --sizelimit $((sectors * 512)) "$work/mnt/disk.raw")
    loops+=("$part")
fi
mkfs.ext4 -q "$part"
mount "$part" "$work/fs"
echo "hello from inside a $fmt image, through imgfs" > "$work/fs/hello.txt"
umount "$work/fs"

step "mount it again read-only and read the file back"
mount -o ro "$part" "$work/fs"
cat "$work/fs/hello.txt"
umount "$work/fs"
for loop in "${loops[@]}"; do losetup -d "$loop"; done
loops=()

step "umount mnt/"
umount "$work/mnt"
imgfs info "$work/disk.$fmt"
printf '\nDone: the image was partitioned, formatted and written through the raw view.\n'
