#!/usr/bin/env bash
# Prepare a broker host for dsrlb's direct server return, or check that it is prepared.
#
#   backend-setup.sh apply  [--dev IFACE] VIP [VIP...]
#   backend-setup.sh verify [--dev IFACE] VIP [VIP...]
#
# A DR backend must (1) hold every VIP on lo as a /32, so it accepts frames the balancer
# rewrote to its MAC; (2) never answer ARP for a VIP (arp_ignore=1) nor use a VIP as ARP source
# (arp_announce=2), or clients would bypass the balancer; (3) accept packets whose source is
# reached another way (loose rp_filter=2). `verify` exits non-zero and says what is wrong.
# `apply` changes the running system only: persist it with the lines it prints.
set -euo pipefail

usage() { echo "usage: $0 apply|verify [--dev IFACE] VIP [VIP...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
action=$1; shift
dev=""
if [ "${1:-}" = "--dev" ]; then dev=${2:?--dev needs an interface}; shift 2; fi
[ $# -ge 1 ] || usage
if [ -z "$dev" ]; then
    # (awk reads all its input: exiting early would SIGPIPE `ip`, which pipefail reports)
    dev=$(ip -4 route show default | awk '!d {for (i=1;i<NF;i++) if ($i=="dev") {d=$(i+1)}} END {print d}')
    [ -n "$dev" ] || dev=$(ip -o -4 addr show scope global | awk '!d {d=$2} END {print d}')
fi
[ -n "$dev" ] || { echo "cannot tell the broker's interface: pass --dev IFACE" >&2; exit 2; }
for vip in "$@"; do
    [[ $vip =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}$ ]] || { echo "not an IPv4 address: $vip" >&2; exit 2; }
done

sysctls=(
    "net.ipv4.conf.all.arp_ignore=1"
    "net.ipv4.conf.$dev.arp_ignore=1"
    "net.ipv4.conf.all.arp_announce=2"
    "net.ipv4.conf.$dev.arp_announce=2"
    "net.ipv4.conf.all.rp_filter=2"
    "net.ipv4.conf.$dev.rp_filter=2"
)

# Output captured first: `grep -q` in a pipeline can SIGPIPE `ip`, which pipefail reports.
has_addr() { local out; out=$(ip -4 -o addr show dev "$1"); grep -w "inet $2" <<<"$out" >/dev/null; }
has_vip() { has_addr lo "$1/32"; }

case $action in
apply)
    for s in "${sysctls[@]}"; do sysctl -qw "$s"; done
    for vip in "$@"; do has_vip "$vip" || ip addr add "$vip/32" dev lo; done
    echo "applied on $dev. To persist:"
    printf '  /etc/sysctl.d/90-dsrlb.conf:\n'; printf '    %s\n' "${sysctls[@]}"
    for vip in "$@"; do echo "  ip addr add $vip/32 dev lo   (in the host's network configuration)"; done
    ;&
verify)
    bad=0
    for s in "${sysctls[@]}"; do
        key=${s%%=*}; want=${s#*=}
        have=$(sysctl -n "$key" 2>/dev/null || echo missing)
        if [ "$have" = "$want" ]; then echo "ok    $key = $have"; else echo "FAIL  $key = $have (want $want)"; bad=1; fi
    done
    for vip in "$@"; do
        if has_vip "$vip"; then echo "ok    $vip/32 on lo"; else echo "FAIL  $vip/32 is not on lo: ip addr add $vip/32 dev lo"; bad=1; fi
        if has_addr "$dev" "$vip"; then echo "FAIL  $vip is on $dev too: the broker would answer ARP for it"; bad=1; fi
    done
    exit $bad
    ;;
*) usage ;;
esac
