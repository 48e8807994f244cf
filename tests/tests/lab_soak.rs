//! The soak's smoke runs: the same code as `cargo xtask soak` (`bench soak`), small and short:
//! 3,000 sessions over 3 client processes for 2 minutes, pinging every 5 to 10 s, while b7 is
//! added, b2 drained, b3 stopped and started, the controller restarted (SIGTERM) and killed
//! (`kill -9`), 600 of the sessions vanish without a FIN, and reloads run every 30 s; once with
//! one balancer, once with two nodes and `[cluster]` behind a router (ECMP over BGP), where
//! node 2 also fails and comes back. Each fails when any check of the soak fails (see
//! `tests/src/bin/bench/soak.rs`): a session lost to the balancer, a session that does not
//! answer at the end, live flows more than 1% off the clients' own count, the vanished clients'
//! flows not going at their timeout, and the rest. (Their windows for the controllers' memory
//! are short: about 40 s, and 20 s for node 2's last controller.)

use std::process::Command;

use tests::{built_bin, require_root};

/// `bench soak` for 2 minutes with `nodes` balancer nodes in a lab named `lab`; its report.
fn smoke(nodes: &str, lab: &str) -> String {
    let out = Command::new(built_bin("bench"))
        .args(["soak", "--sessions", "3000", "--minutes", "2", "--processes", "3", "--ping-secs", "5-10"])
        // A lab of its own name: `cargo xtask soak`'s (`dsrlbk`) may be running beside it.
        .args(["--sample-secs", "5", "--reload-minutes", "0.5", "--vanish", "600", "--lab", lab, "--nodes", nodes])
        .output()
        .expect("starting bench soak");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the soak did not hold:\n{report}\n{log}");
    for must in [
        "- Lost to the balancer: **0** (",
        "(0 failed to open)",
        "| stop b3 |",
        "| kill -9 controller |",
        "- Vanished clients: 600 sessions",
        "**Verdict: everything held.**",
    ] {
        assert!(report.contains(must), "the report lacks {must:?}:\n{report}");
    }
    report
}

#[test]
fn a_two_minute_soak_loses_no_session_to_the_balancer() {
    require_root!();
    smoke("1", "dsrlbq");
}

#[test]
fn a_two_minute_soak_on_two_nodes_loses_no_session_to_a_node_failure() {
    require_root!();
    let report = smoke("2", "dsrlbn");
    for must in
        ["2 nodes with `[cluster]`", "node 2 fails (router on 1 node after", "node 2 back (routed to after", "Node 2's last controller"]
    {
        assert!(report.contains(must), "the report lacks {must:?}:\n{report}");
    }
}
