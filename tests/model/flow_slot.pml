/*
 * The flow table's slot protocol, as a model for spin (issue 26). One slot of a FLOWS bucket:
 * `meta` (its state word, with the ports) and `addrs` (its addresses word; FLOW_ADDRS6 is
 * written and read at the same points). Two writers each claim the slot, fill it with their
 * flow and publish it (lb-ebpf/src/table.rs `claim`, lb-userspace/src/flow_table.rs `merge`);
 * a refresher moves the published flow's age (`set_state`); a reader looks the slot up twice
 * (`find_in`, and the controller's `read`): state, addresses, state again, accepting the
 * addresses only when the state read again is the same flow. It must never accept addresses
 * that were not written together with the state it accepted.
 *
 * The ordering edges the protocol relies on, each a switch: 1 is the protocol's ordering, 0
 * weakens it to relaxed, and the accesses it orders may then happen in either order, as a
 * weakly ordered CPU (arm64) may perform them. Spin runs every interleaving, so with a switch at
 * 0 it also runs the reorderings. The claim is a BPF atomic compare-and-swap (BPF_CMPXCHG),
 * fully ordered in the kernel's BPF memory model: its BUSY is visible before anything the
 * writer stores after it, as modelled here.
 *
 * tests/tests/model.rs checks that spin finds no violation as written, and finds one with each
 * edge weakened.
 *
 * What the model leaves out: a state word that reads the same around another flow (ABA).
 * The re-read ignores age and kind (a refresh changes those), so two states with the same ports
 * and real read as the same. A reader between whose two state loads the slot's flow is
 * replaced by a flow with the addresses it looks up, then by one with the first state's ports
 * and real again, matches those addresses against a state that was never written with them:
 * let a writer publish one flow twice and spin finds exactly that. It needs two whole
 * replacements of a slot within a reader's three loads. The frame would go by the other
 * flow's real; this CPU's flow cache would keep that for the rest of the clock's unit, and the
 * segment's step (a confirmation, a closing mark) would be written into the other flow's slot.
 * The protocol does not prevent it, on x86 either: the state word has no room for a version.
 * Here every publish is of another flow.
 */

#ifndef ACQ_STATE
#define ACQ_STATE 1     /* reader: the first state load is an acquire (the addresses after it) */
#endif
#ifndef ACQ_ADDRS
#define ACQ_ADDRS 1     /* reader: the addresses load is an acquire (the state read again after it) */
#endif
#ifndef REL_PUBLISH
#define REL_PUBLISH 1   /* writer: the publishing state store is a release (after the addresses) */
#endif

#define EMPTY 0
#define BUSY 1
/* A published state: flow f (2 to 5) and its age (0 to 3). */
#define PUB(f, age) ((f) * 4 + (age))
#define FLOW(m) ((m) / 4)
#define LIVE(m) ((m) >= 8)

byte meta = EMPTY;
byte addrs = 0;

inline cas(old, new, ok) {
    atomic {
        if
        :: meta == old -> meta = new; ok = 1
        :: else -> ok = 0
        fi
    }
}

proctype Writer(byte f) {
    byte old;
    bit ok;
    byte round = 0;
again:
    old = meta;
    if
    :: old == BUSY -> goto next
    :: else -> skip
    fi;
    cas(old, BUSY, ok);
    if
    :: !ok -> goto next
    :: else -> skip
    fi;
    /* Each publish is of another flow: writer 2 writes flows 2 and 4, writer 3 flows 3 and 5
       (see "What the model leaves out" above). */
#if REL_PUBLISH
    addrs = f + 2 * round;
    meta = PUB(f + 2 * round, 0);
#else
    if
    :: addrs = f + 2 * round; meta = PUB(f + 2 * round, 0)
    :: meta = PUB(f + 2 * round, 0); addrs = f + 2 * round
    fi;
#endif
next:
    round++;
    if
    :: round < 2 -> goto again
    :: else -> skip
    fi
}

proctype Refresher() {
    byte m;
    bit ok;
    m = meta;
    if
    :: LIVE(m) && m % 4 < 3 -> cas(m, m + 1, ok)
    :: else -> skip
    fi
}

proctype Reader() {
    byte s1, a, s2;
    byte round = 0;
again:
    /* The three loads, in an order the switches allow. Loads of one address stay in program
       order on any CPU (coherence): the first state load is always before the second. */
#if ACQ_STATE && ACQ_ADDRS
    s1 = meta; a = addrs; s2 = meta;
#elif ACQ_STATE
    s1 = meta;
    if
    :: a = addrs; s2 = meta
    :: s2 = meta; a = addrs
    fi;
#elif ACQ_ADDRS
    if
    :: s1 = meta; a = addrs
    :: a = addrs; s1 = meta
    fi;
    s2 = meta;
#else
    if
    :: a = addrs; s1 = meta; s2 = meta
    :: s1 = meta; a = addrs; s2 = meta
    :: s1 = meta; s2 = meta; a = addrs
    fi;
#endif
    if
    :: LIVE(s1) && LIVE(s2) && FLOW(s1) == FLOW(s2) -> assert(a == FLOW(s1))
    :: else -> skip
    fi;
    round++;
    if
    :: round < 2 -> goto again
    :: else -> skip
    fi
}

init {
    atomic {
        run Writer(2);
        run Writer(3);
        run Refresher();
        run Reader()
    }
}
