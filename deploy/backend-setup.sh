#!/usr/bin/env bash
# Prepare a broker host for dsrlb's direct server return, or check that it is prepared.
#
#   backend-setup.sh apply  [--dev IFACE] [--decap (--source ADDR)... | --decap --any-source] [--advmss MSS] VIP [VIP...]
#   backend-setup.sh verify [--dev IFACE] [--decap ...] [--advmss MSS] VIP [VIP...]
#
# With --advmss the TCP segment size the broker advertises is clamped on its default routes
# (the way its replies go): MSS for IPv4, MSS - 40 for IPv6 (whose IP header and tunnel header
# are each 20 bytes longer). Clients then send segments that fit a tunnel without the
# balancer's ICMP "fragmentation needed" round trip: 1440 for IPIP on a 1500-byte path, 1432 for
# GUE (which also covers IPIP).
#
# With --decap the broker is one the balancer reaches through a tunnel (IPIP, IPv6 in IPv6 or
# GUE): `apply` also attaches `dsrlb decap` to IFACE for the VIPs, accepting tunnel frames from
# the balancers' --source addresses (or --any-source), and `verify` checks it is attached with
# every VIP. The loose rp_filter below also lets the unwrapped packets in: their source is a
# client's, reached through the router rather than the balancer. `dsrlb` must be on PATH (the
# package installs it; set DSRLB to use another path, and DSRLB_DECAP_PIN_ROOT for another
# pin root than dsrlb decap's default).
#
# A DR backend must (1) hold every VIP on lo as a /32, so it accepts frames the balancer
# rewrote to its MAC; (2) never answer ARP for a VIP (arp_ignore=1) nor use a VIP as ARP source
# (arp_announce=2), or clients would bypass the balancer; (3) accept packets whose source is
# reached another way (loose rp_filter=2). `verify` exits non-zero and says what is wrong.
# `apply` changes the running system only: persist it with the lines it prints.
#
# IPv6 VIPs go on lo as a /128. Linux needs no counterpart of arp_ignore and arp_announce there:
# it answers a neighbour solicitation only for an address of the interface it arrived on (an
# address on lo is not one of eth0's), and solicits from an address of the outgoing interface,
# never from one on lo. What must hold is that no VIP is on the broker's interface and that
# proxy_ndp is off (it would answer for addresses elsewhere). IPv6 has no rp_filter.
# (tests/tests/netns_smoke.rs checks on Linux that a broker set up so answers no solicitation
# for its VIP and accepts frames for it sent to its MAC.)
set -euo pipefail

usage() { echo "usage: $0 apply|verify [--dev IFACE] [--decap (--source ADDR)... | --decap --any-source] [--advmss MSS] VIP [VIP...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
action=$1; shift
dev=""
decap=0
decap_from=()
advmss=""
while [ $# -gt 0 ]; do
    case $1 in
    --dev) dev=${2:?--dev needs an interface}; shift 2 ;;
    --decap) decap=1; shift ;;
    --source) decap_from+=(--source "${2:?--source needs an address}"); shift 2 ;;
    --any-source) decap_from+=(--any-source); shift ;;
    --advmss) advmss=${2:?--advmss needs a segment size}; shift 2 ;;
    --*) echo "unknown option $1" >&2; usage ;;
    *) break ;;
    esac
done
[ $# -ge 1 ] || usage
if [ $decap = 0 ] && [ ${#decap_from[@]} -gt 0 ]; then echo "--source and --any-source go with --decap" >&2; exit 2; fi
if [ $decap = 1 ] && [ ${#decap_from[@]} -eq 0 ]; then
    echo "--decap needs the balancers' tunnel sources (--source ADDR, repeated) or --any-source" >&2; exit 2
fi
# (IPv6 gets 40 less, and its minimum path MTU of 1280 carries a segment of 1220.)
if [ -n "$advmss" ] && ! { [[ $advmss =~ ^[0-9]+$ ]] && [ "$advmss" -ge 1260 ] && [ "$advmss" -le 65495 ]; }; then
    echo "--advmss must be a segment size between 1260 and 65495, not $advmss" >&2; exit 2
fi
dsrlb=${DSRLB:-dsrlb}
pin_root=(); if [ -n "${DSRLB_DECAP_PIN_ROOT:-}" ]; then pin_root=(--pin-root "$DSRLB_DECAP_PIN_ROOT"); fi
if [ -z "$dev" ]; then
    # (awk reads all its input: exiting early would SIGPIPE `ip`, which pipefail reports)
    dev=$(ip -4 route show default | awk '!d {for (i=1;i<NF;i++) if ($i=="dev") {d=$(i+1)}} END {print d}')
    [ -n "$dev" ] || dev=$(ip -o -4 addr show scope global | awk '!d {d=$2} END {print d}')
fi
[ -n "$dev" ] || { echo "cannot tell the broker's interface: pass --dev IFACE" >&2; exit 2; }
v6=0
for vip in "$@"; do
    if [[ $vip =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}$ ]]; then continue; fi
    # An IPv6 address: hex digits and colons (with at most one ::), no prefix length.
    if [[ $vip =~ ^[0-9a-fA-F:]+$ && $vip == *:* ]]; then v6=1; continue; fi
    echo "not an IPv4 or IPv6 address: $vip" >&2; exit 2
done

sysctls=(
    "net.ipv4.conf.all.arp_ignore=1"
    "net.ipv4.conf.$dev.arp_ignore=1"
    "net.ipv4.conf.all.arp_announce=2"
    "net.ipv4.conf.$dev.arp_announce=2"
    "net.ipv4.conf.all.rp_filter=2"
    "net.ipv4.conf.$dev.rp_filter=2"
)
if [ $v6 = 1 ]; then
    sysctls+=("net.ipv6.conf.all.proxy_ndp=0" "net.ipv6.conf.$dev.proxy_ndp=0")
fi

is_v6() { [[ $1 == *:* ]]; }
# /32 or /128, and the `ip` family flag.
plen() { if is_v6 "$1"; then echo 128; else echo 32; fi; }
fam() { if is_v6 "$1"; then echo -6; else echo -4; fi; }
# Output captured first: `grep -q` in a pipeline can SIGPIPE `ip`, which pipefail reports.
# `ip` prints IPv6 addresses compressed; so is the comparison (through `ip` itself: ::1 forms).
has_addr() {
    local dev=$1 vip=$2 out want a
    out=$(ip "$(fam "$vip")" -o addr show dev "$dev")
    if is_v6 "$vip"; then
        want=$(canon6 "$vip")
        for a in $(awk '{print $4}' <<<"$out"); do
            if [ "$(canon6 "${a%/*}")" = "$want" ] && [[ -z ${3:-} || ${a#*/} == "$3" ]]; then return 0; fi
        done
        return 1
    else
        grep -w "inet $vip/${3:-[0-9]*}" <<<"$out" >/dev/null
    fi
}
# An IPv6 address written out whole (eight groups of four hex digits), to compare forms.
canon6() {
    local a=${1,,} head tail out="" i
    local -a h=() t=() groups=()
    if [[ $a == *::* ]]; then head=${a%%::*}; tail=${a#*::}; else head=$a; tail=""; fi
    IFS=: read -r -a h <<<"$head"; IFS=: read -r -a t <<<"$tail"
    # ${x[@]+...}: an empty array expands to nothing, also under `set -u` on bash < 4.4.
    groups=(${h[@]+"${h[@]}"})
    for ((i = ${#h[@]} + ${#t[@]}; i < 8; i++)); do groups+=(0); done
    groups+=(${t[@]+"${t[@]}"})
    for i in "${groups[@]}"; do out+=$(printf '%04x' "0x${i:-0}"); done
    echo "$out"
}
has_vip() { has_addr lo "$1" "$(plen "$1")"; }
# Whether address $1 is among the rest (IPv6 in any of its written forms).
listed() {
    local a=$1 h; shift
    for h in "$@"; do
        if is_v6 "$a" && is_v6 "$h"; then [ "$(canon6 "$a")" = "$(canon6 "$h")" ] && return 0
        elif [ "$a" = "$h" ]; then return 0; fi
    done
    return 1
}

# The default route of family $1 (-4 or -6) as `ip route change` takes it back: the line `ip`
# prints, less what it reports but does not take back (`expires`, the advmss being replaced).
# A multipath route or one through a nexthop object is not rewritten: nothing is printed, and
# apply says so.
default_route() {
    ip -o "$1" route show default | awk 'NR == 1 {
        if ($0 ~ /nexthop|nhid/) { print "multipath"; exit }
        out = ""
        for (i = 1; i <= NF; i++) {
            if ($i == "expires" || $i == "advmss") { i++; continue }
            if ($i == "linkdown" || $i == "dead") continue
            out = out (out == "" ? "" : " ") $i
        }
        print out
    }'
}
# The advmss of the default route of family $1, or nothing.
default_advmss() {
    ip "$1" route show default | awk 'NR == 1 { for (i = 1; i < NF; i++) if ($i == "advmss") print $(i + 1) }'
}
mss_of() { if [ "$1" = -6 ]; then echo $((advmss - 40)); else echo "$advmss"; fi; }

case $action in
apply)
    for s in "${sysctls[@]}"; do sysctl -qw "$s"; done
    for vip in "$@"; do has_vip "$vip" || ip "$(fam "$vip")" addr add "$vip/$(plen "$vip")" dev lo; done
    if [ -n "$advmss" ]; then
        for f in -4 -6; do
            route=$(default_route "$f")
            if [ "$route" = multipath ]; then
                echo "the $f default route is multipath (or a nexthop object): add advmss $(mss_of "$f") to it yourself" >&2; exit 1
            elif [ -n "$route" ]; then
                # shellcheck disable=SC2086 # the route's words, as `ip` printed them
                ip "$f" route change $route advmss "$(mss_of "$f")"
            fi
        done
    fi
    if [ $decap = 1 ]; then
        vip_args=(); for vip in "$@"; do vip_args+=(--vip "$vip"); done
        "$dsrlb" decap attach "$dev" "${vip_args[@]}" "${decap_from[@]}" ${pin_root[@]+"${pin_root[@]}"}
    fi
    echo "applied on $dev. To persist:"
    printf '  /etc/sysctl.d/90-dsrlb.conf:\n'; printf '    %s\n' "${sysctls[@]}"
    for vip in "$@"; do echo "  ip $(fam "$vip") addr add $vip/$(plen "$vip") dev lo   (in the host's network configuration)"; done
    if [ $decap = 1 ]; then echo "  the same dsrlb decap attach, once the interface is up (it is pinned, but not across a reboot)"; fi
    if [ -n "$advmss" ]; then echo "  advmss $advmss on the default route (advmss $((advmss - 40)) on the IPv6 one), in the host's network configuration"; fi
    ;&
verify)
    bad=0
    for s in "${sysctls[@]}"; do
        key=${s%%=*}; want=${s#*=}
        have=$(sysctl -n "$key" 2>/dev/null || echo missing)
        if [ "$have" = "$want" ]; then echo "ok    $key = $have"; else echo "FAIL  $key = $have (want $want)"; bad=1; fi
    done
    for vip in "$@"; do
        p=$(plen "$vip")
        if has_vip "$vip"; then echo "ok    $vip/$p on lo"; else echo "FAIL  $vip/$p is not on lo: ip $(fam "$vip") addr add $vip/$p dev lo"; bad=1; fi
        if has_addr "$dev" "$vip"; then
            if is_v6 "$vip"; then what="neighbour solicitations"; else what="ARP"; fi
            echo "FAIL  $vip is on $dev too: the broker would answer $what for it"; bad=1
        fi
    done
    if [ $decap = 1 ]; then
        if status=$("$dsrlb" decap status "$dev" ${pin_root[@]+"${pin_root[@]}"} 2>&1) && grep -q "^$dev: attached" <<<"$status"; then
            echo "ok    dsrlb decap attached to $dev"
            held=$(awk '$1 == "VIPs" {for (i = 2; i <= NF; i++) print $i}' <<<"$status")
            senders=$(awk '$1 == "sources" {for (i = 2; i <= NF; i++) print $i}' <<<"$status")
            if [ "${decap_from[0]}" = "--any-source" ]; then
                if [[ $senders == any* ]]; then echo "ok    dsrlb decap takes any source"; else echo "FAIL  dsrlb decap takes only $(echo $senders), not any source"; bad=1; fi
            elif [[ $senders == any* ]]; then
                echo "FAIL  dsrlb decap on $dev takes tunnel frames from any source: attach it again with --source"; bad=1
            else
                for ((i = 1; i < ${#decap_from[@]}; i += 2)); do
                    src=${decap_from[i]}
                    # shellcheck disable=SC2086 # the list is words
                    if listed "$src" $senders; then echo "ok    dsrlb decap takes $src"; else echo "FAIL  dsrlb decap on $dev does not take $src"; bad=1; fi
                done
            fi
            for vip in "$@"; do
                # shellcheck disable=SC2086 # the list is words
                if listed "$vip" $held; then echo "ok    dsrlb decap holds $vip"; else echo "FAIL  dsrlb decap on $dev does not hold $vip: attach it again with every VIP"; bad=1; fi
            done
        else
            echo "FAIL  dsrlb decap is not attached to $dev: ${status//$'\n'/ }"; bad=1
        fi
    fi
    if [ -n "$advmss" ]; then
        for f in -4 -6; do
            route=$(default_route "$f")
            [ -n "$route" ] || { [ $f = -6 ] && continue; echo "FAIL  no default route to clamp advmss on"; bad=1; continue; }
            have=$(default_advmss "$f")
            if [ "$have" = "$(mss_of "$f")" ]; then echo "ok    advmss $have on the $f default route"; else echo "FAIL  the $f default route has advmss ${have:-unset} (want $(mss_of "$f"))"; bad=1; fi
        done
    fi
    exit $bad
    ;;
*) usage ;;
esac
