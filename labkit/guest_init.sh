#!/bin/busybox sh
# PID 1 of the lab's test guest (packed into the initramfs by labkit/image.py).
#
# For every virtio disk a writer appends sequence-numbered records: record N is one 512-byte sector at
# byte 1 MiB + N*512, holding the line "KSA1 <dev> <N> <boot id> <md5 of the first four fields>" padded with
# zeros. Each is written with O_DIRECT and fsync, and only then acknowledged on the serial console as
# "KSA-ACK <dev> <N> <boot id>": the host side (labkit/records.py) checks every acknowledged record.
# After a reboot a writer continues after the highest valid record, so acknowledged records are never
# overwritten. Records use the first half of each disk; the second half holds the host's filler data.
# Optionally a loop dirties memory (ksa.dirty MiB/s over a ksa.ws MiB tmpfs working set), and one rewrites
# the last ksa.hotmib MiB of disk ksa.hotdev at ksa.hot MiB/s (1 MiB O_DIRECT writes spread over each second,
# never touching records or filler), printing "KSA-HOT <dev> <MiB written> <uptime>" every 5 s; for
# ksa.hotsecs seconds if set, and at least once over the whole region (then "KSA-HOTSTOP <dev> <MiB written>").
# The memory checker (/bin/ksa-memcheck, labkit/memcheck.c) verifies and rewrites ksa.memmib MiB of pages
# at ksa.memrate MiB/s and prints "KSA-MEM ok <pages checked>" every 2 s, or "KSA-MEM STALE|BAD ..." on an
# inconsistent page (ksa.memmib=0: no checker).

/bin/busybox mkdir -p /proc /sys /dev /tmp /dirty /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
dmesg -n 1

CON=/dev/ttyS0
REGION=2048   # first record sector: 1 MiB
BOOT=$(tr -d '-' < /proc/sys/kernel/random/boot_id)

say() { echo "$*" > $CON; }

arg() {   # arg NAME DEFAULT: the value of ksa.NAME= on the kernel command line
    for word in $(cat /proc/cmdline); do
        case $word in ksa.$1=*) echo "${word#*=}"; return ;; esac
    done
    echo "$2"
}

centis() {   # uptime in hundredths of a second, in CS (no fork: this runs in tight loops)
    read up rest < /proc/uptime
    CS=${up%.*}${up#*.}
    while [ "${CS#0}" != "$CS" ]; do CS=${CS#0}; done
    CS=${CS:-0}
}

valid() {   # valid DEV SLOT: the slot holds an intact record of this disk with that sequence number
    local dev=$1 slot=$2 line sum
    line=$(dd if=/dev/$dev bs=512 skip=$((REGION + slot)) count=1 2>/dev/null | tr -d '\000' | head -n 1)
    set -- $line
    [ "$1" = KSA1 ] && [ "$2" = "$dev" ] && [ "$3" = "$slot" ] && [ -n "$4" ] || return 1
    sum=$(printf '%s %s %s %s' "$1" "$2" "$3" "$4" | md5sum)
    [ "${sum%% *}" = "$5" ]
}

writer() {
    local dev=$1 slots lo hi mid n hdr sum
    slots=$(( $(cat /sys/block/$dev/size) / 2 - REGION ))
    # Records are written in order, so the valid ones form a prefix: binary search for its end.
    lo=0; hi=$slots
    while [ $lo -lt $hi ]; do
        mid=$(( (lo + hi) / 2 ))
        if valid $dev $mid; then lo=$((mid + 1)); else hi=$mid; fi
    done
    n=$lo
    say "KSA-START $dev $n $BOOT"
    while [ $n -lt $slots ]; do
        hdr="KSA1 $dev $n $BOOT"
        sum=$(printf '%s' "$hdr" | md5sum)
        if printf '%s %s\n' "$hdr" "${sum%% *}" |
            dd of=/dev/$dev bs=512 count=1 seek=$((REGION + n)) iflag=fullblock \
                conv=sync,notrunc,fsync oflag=direct 2>/dev/null; then
            say "KSA-ACK $dev $n $BOOT"
            n=$((n + 1))
        else
            say "KSA-ERR $dev $n write failed"
            sleep 1
        fi
    done
    say "KSA-FULL $dev $n"
}

dirtier() {   # dirtier MIB_PER_S|max WORKING_SET_MIB
    local rate=$1 ws=$2 n=0 j start left
    mount -t tmpfs -o size=$((ws + 3))m tmpfs /dirty
    dd if=/dev/urandom of=/dirty/chunk0 bs=1M count=1 2>/dev/null
    dd if=/dev/urandom of=/dirty/chunk1 bs=1M count=1 2>/dev/null
    dd if=/dev/zero of=/dirty/ws bs=1M count=$ws 2>/dev/null
    say "KSA-DIRTY $rate MiB/s over $ws MiB"
    if [ "$rate" = max ]; then
        # As fast as the vCPU goes: the dirtying is bound by the guest's CPU, so a throttle slows it. Both
        # loops say every 8 MiB written, with the guest's clock (KSA-DIRTIED MiB CS): the guest's true
        # speed, which QEMU's sampling estimate cannot show once the whole set changes within its window.
        while :; do
            dd if=/dirty/chunk$(( (n / ws) % 2 )) of=/dirty/ws bs=1M count=1 seek=$((n % ws)) \
                conv=notrunc 2>/dev/null
            n=$((n + 1))
            if [ $((n % 8)) -eq 0 ]; then centis; say "KSA-DIRTIED $n $CS"; fi
        done
    fi
    while :; do
        centis; start=$CS
        j=0
        while [ $j -lt $rate ]; do
            # Alternate the source on every pass so each write changes the page's content too:
            # QEMU's sampling dirty-rate estimate only sees changed content.
            dd if=/dirty/chunk$(( (n / ws) % 2 )) of=/dirty/ws bs=1M count=1 seek=$((n % ws)) \
                conv=notrunc 2>/dev/null
            n=$((n + 1)); j=$((j + 1))
            if [ $((n % 8)) -eq 0 ]; then centis; say "KSA-DIRTIED $n $CS"; fi
        done
        centis; left=$(( 100 - (CS - start) ))
        if [ $left -ge 100 ]; then sleep 1; elif [ $left -gt 0 ]; then sleep 0.$(printf %02d $left); fi
    done
}

hotwriter() {   # hotwriter DEV MIB_PER_S REGION_MIB SECONDS (0: forever)
    local dev=$1 rate=$2 region=$3 secs=$4 base n=0 due t0 last first
    base=$(( $(cat /sys/block/$dev/size) / 2048 - region ))   # MiB
    dd if=/dev/urandom of=/hot0 bs=1M count=1 2>/dev/null
    dd if=/dev/urandom of=/hot1 bs=1M count=1 2>/dev/null
    say "KSA-HOTSTART $dev $rate MiB/s over $region MiB at $base MiB"
    centis; t0=$CS; last=$CS; first=$CS
    while :; do
        centis
        # A guest slower than asked (a loaded machine) still leaves the whole region written before it stops.
        if [ "$secs" -gt 0 ] && [ $((CS - first)) -ge $((secs * 100)) ] && [ $n -ge "$region" ]; then
            say "KSA-HOTSTOP $dev $n"
            return
        fi
        due=$(( rate * (CS - t0) / 100 ))
        if [ $((due - n)) -gt $rate ]; then   # a second or more behind (paused, starved): no catch-up burst
            t0=$(( CS - n * 100 / rate )); due=$n
        fi
        if [ $n -lt $due ]; then
            # Alternate the source on every pass over the region, so each rewrite changes the content.
            dd if=/hot$(( (n / region) % 2 )) of=/dev/$dev bs=1M count=1 seek=$((base + n % region)) \
                oflag=direct conv=notrunc 2>/dev/null || say "KSA-ERR $dev hot write failed"
            n=$((n + 1))
        else
            sleep 0.05
        fi
        if [ $((CS - last)) -ge 500 ]; then
            last=$CS
            read up rest < /proc/uptime
            say "KSA-HOT $dev $n $up"
        fi
    done
}

heartbeat() {
    while :; do
        sleep 5
        read up rest < /proc/uptime
        say "KSA-HB $BOOT up=$up"
    done
}

for module in $(cat /lib/modules/load-order); do   # dependencies first (image.py sorted them)
    insmod /lib/modules/$module
done

DISKS=$(arg disks 1)
tries=0
while [ "$(ls /sys/block | grep -c '^vd')" -lt "$DISKS" ] && [ $tries -lt 300 ]; do
    sleep 0.1; tries=$((tries + 1))
done
say "KSA-BOOT $BOOT disks: $(ls /sys/block | grep '^vd' | tr '\n' ' ')"

for dev in $(ls /sys/block | grep '^vd'); do
    writer $dev &
done
DIRTY=$(arg dirty 0)
if [ "$DIRTY" = max ] || [ "$DIRTY" -gt 0 ]; then
    dirtier "$DIRTY" "$(arg ws 48)" &
fi
HOT=$(arg hot 0)
if [ "$HOT" -gt 0 ]; then
    hotwriter "$(arg hotdev vda)" "$HOT" "$(arg hotmib 64)" "$(arg hotsecs 0)" &
fi
MEMMIB=$(arg memmib 0)
if [ "$MEMMIB" -gt 0 ]; then
    # Pages that stay at the physical address the checker reports (the lab's corruption test writes there).
    echo 0 > /proc/sys/vm/compact_unevictable_allowed 2>/dev/null
    /bin/ksa-memcheck "$MEMMIB" "$(arg memrate 2)" 2 > $CON 2>&1 &
fi
heartbeat &
while :; do sleep 3600; done   # PID 1 must never exit
