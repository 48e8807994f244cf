//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016).
//!
//! The table depends only on the backends' names and weights: they are sorted by name before
//! the fill, and names are hashed with a fixed function, so two balancers given the same
//! backends build the same table whatever order their config files list them in.
//!
//! Weights follow the smooth scheme: in round `r` a backend of weight `w` takes a turn when
//! `r * w` has reached its target, and each turn raises the target by the largest weight. A
//! backend therefore gets slots in proportion to its weight, interleaved with the others.

use lb_common::mix64;

/// Slot value for "no backend" in the table returned by [`build`].
pub const EMPTY: u32 = u32::MAX;

fn name_hash(name: &str, seed: u64) -> u64 {
    // FNV-1a over the bytes, then the finaliser: stable across builds and platforms, unlike
    // std's hasher.
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ seed;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix64(h)
}

/// Builds a table of `size` slots (a prime) over `backends` (name, weight). Each slot holds the
/// index into `backends` of its owner, or [`EMPTY`] when no backend has a weight above zero.
#[must_use]
pub fn build(backends: &[(&str, u32)], size: u32) -> Vec<u32> {
    let m = u64::from(size);
    let mut table = vec![EMPTY; size as usize];
    let mut order: Vec<usize> = (0..backends.len()).filter(|&i| backends[i].1 > 0).collect();
    if order.is_empty() || size < 2 {
        return table;
    }
    order.sort_by(|&a, &b| backends[a].0.cmp(backends[b].0));

    struct Perm {
        index: u32,
        weight: u64,
        offset: u64,
        skip: u64,
        next: u64,
        target: u64,
    }
    let mut perms: Vec<Perm> = order
        .iter()
        .map(|&i| {
            let (name, weight) = backends[i];
            Perm {
                index: u32::try_from(i).expect("fewer than 2^32 backends"),
                weight: u64::from(weight),
                offset: name_hash(name, 0x6d61_676c_6576_3031) % m,
                skip: name_hash(name, 0x736b_6970_7365_6564) % (m - 1) + 1,
                next: 0,
                target: 0,
            }
        })
        .collect();
    let max_weight = perms.iter().map(|p| p.weight).max().unwrap_or(1);

    let mut filled = 0u64;
    let mut round = 1u64;
    while filled < m {
        for p in &mut perms {
            if round * p.weight < p.target {
                continue;
            }
            p.target += max_weight;
            // Take this backend's next preferred slot that is still free. `m` is prime and
            // `skip` in 1..m, so the sequence visits every slot and the loop ends.
            loop {
                let slot = usize::try_from((p.offset + p.next * p.skip) % m).expect("slot < size, a u32");
                p.next += 1;
                if table[slot] == EMPTY {
                    table[slot] = p.index;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
        round += 1;
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = 65_537;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("broker-{i}")).collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<f64> {
        let mut counts = vec![0usize; n];
        for &s in table {
            counts[s as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / table.len() as f64).collect()
    }

    #[test]
    fn every_slot_is_owned_and_shares_follow_equal_weights() {
        for n in 2..=100 {
            let names = names(n);
            let backends: Vec<(&str, u32)> = names.iter().map(|s| (s.as_str(), 100)).collect();
            let table = build(&backends, M);
            assert!(table.iter().all(|&s| (s as usize) < n), "n={n}: a slot is empty");
            let want = 1.0 / n as f64;
            for (i, share) in shares(&table, n).into_iter().enumerate() {
                assert!((share - want).abs() <= 0.01, "n={n} backend {i}: share {share:.4} vs {want:.4}");
            }
        }
    }

    #[test]
    fn shares_follow_unequal_weights() {
        for n in 2..=100 {
            let names = names(n);
            // Weights 1..=7 in a fixed pattern, so ratios up to 7:1 appear at every size.
            let backends: Vec<(&str, u32)> = names.iter().zip(0u32..).map(|(s, i)| (s.as_str(), (i * 5) % 7 + 1)).collect();
            let total: u32 = backends.iter().map(|b| b.1).sum();
            let table = build(&backends, M);
            for (i, share) in shares(&table, n).into_iter().enumerate() {
                let want = f64::from(backends[i].1) / f64::from(total);
                assert!((share - want).abs() <= 0.01, "n={n} backend {i}: share {share:.4} vs {want:.4}");
            }
        }
        let table = build(&[("a", 3), ("b", 1)], M);
        let a = shares(&table, 2)[0];
        assert!((a - 0.75).abs() < 0.001, "3:1 gave {a}");
    }

    #[test]
    fn zero_weight_and_empty_sets() {
        assert!(build(&[], M).iter().all(|&s| s == EMPTY));
        assert!(build(&[("a", 0), ("b", 0)], M).iter().all(|&s| s == EMPTY));
        assert!(build(&[("a", 0), ("b", 5)], M).iter().all(|&s| s == 1));
    }

    #[test]
    fn removing_one_of_ten_moves_few_other_slots() {
        let names = names(10);
        let all: Vec<(&str, u32)> = names.iter().map(|s| (s.as_str(), 100)).collect();
        let before = build(&all, M);
        for removed in 0..10 {
            let rest: Vec<(&str, u32)> = all.iter().enumerate().filter(|&(i, _)| i != removed).map(|(_, b)| *b).collect();
            let after = build(&rest, M);
            // Map the indices of `rest` back to those of `all`.
            let back = |i: u32| if (i as usize) < removed { i } else { i + 1 };
            let (mut owned, mut moved) = (0usize, 0usize);
            for (b, a) in before.iter().zip(&after) {
                if *b as usize != removed {
                    owned += 1;
                    if back(*a) != *b {
                        moved += 1;
                    }
                }
            }
            let frac = moved as f64 / owned as f64;
            assert!(frac <= 0.02, "removing {removed}: {:.2}% of the others' slots moved", frac * 100.0);
        }
    }

    #[test]
    fn order_of_backends_does_not_matter() {
        let names = names(17);
        let fwd: Vec<(&str, u32)> = names.iter().zip(10u32..).map(|(s, w)| (s.as_str(), w)).collect();
        let mut rev = fwd.clone();
        rev.reverse();
        let a = build(&fwd, M);
        let b = build(&rev, M);
        // Compare by owner name, since the indices refer to different orders.
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(fwd[*x as usize].0, rev[*y as usize].0);
        }
    }
}
