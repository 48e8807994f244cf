//! The model check of the flow table's slot protocol (`tests/model/flow_slot.pml`, issue 26):
//! spin explores every interleaving of two writers, a refresher and a reader on one slot and
//! finds no reader that accepts addresses written with another state; with any one of the
//! protocol's ordering edges weakened to relaxed (the accesses it orders then also run
//! reordered, as a weakly ordered CPU may), it finds one. Needs `spin` and `gcc`, which
//! `cargo xtask setup` installs; without them the test fails.

use std::{path::Path, process::Command};

/// What spin's verifier said of the model with `defines`: (errors, states stored, its output).
fn verify(name: &str, defines: &[&str]) -> (u64, u64, String) {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("model/flow_slot.pml");
    let dir = std::env::temp_dir().join(format!("dsrlb-model-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a directory for the verifier");
    let run = |cmd: &mut Command, what: &str| {
        let out =
            cmd.current_dir(&dir).output().unwrap_or_else(|e| panic!("{what}: {e} (run `cargo xtask setup`: it installs spin and gcc)"));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    };
    let (ok, text) = run(Command::new("spin").arg("-a").args(defines).arg(&model), "spin");
    assert!(ok, "spin -a failed:\n{text}");
    let (ok, text) = run(Command::new("gcc").args(["-O2", "-DSAFETY", "-o", "pan", "pan.c"]), "gcc");
    assert!(ok, "building the verifier failed:\n{text}");
    // -m: a search depth far beyond the model's (it reaches about 70), so the search is whole.
    let (_, text) = run(Command::new(dir.join("pan")).arg("-m100000"), "the verifier");
    let _ = std::fs::remove_dir_all(&dir);
    let number = |after: &str| -> u64 {
        text.lines()
            .find_map(|l| l.split_once(after).and_then(|(_, rest)| rest.split_whitespace().next().unwrap_or("").parse().ok()))
            .unwrap_or_else(|| panic!("no {after:?} in the verifier's output:\n{text}"))
    };
    let errors = number("errors:");
    let states = text
        .lines()
        .find(|l| l.contains("states, stored"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no states count in the verifier's output:\n{text}"));
    assert!(!text.contains("max search depth too small"), "the search was cut short:\n{text}");
    (errors, states, text)
}

#[test]
fn the_slot_protocol_holds_with_its_orderings() {
    let (errors, states, text) = verify("as-written", &[]);
    assert_eq!(errors, 0, "spin found a reader accepting another flow's addresses:\n{text}");
    assert!(states > 100_000, "only {states} states: the model did not run its processes?\n{text}");
}

#[test]
fn each_ordering_edge_is_needed() {
    for edge in ["REL_PUBLISH", "ACQ_STATE", "ACQ_ADDRS"] {
        let define = format!("-D{edge}=0");
        let (errors, _, text) = verify(edge, &[&define]);
        assert!(errors > 0, "with {edge} weakened spin found no violation: the model does not test that edge\n{text}");
        assert!(text.contains("assertion violated"), "{edge}: {text}");
    }
}
