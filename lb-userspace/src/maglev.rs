//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016).
//!
//! The table depends only on the backends' names and weights and the ring seed: they are sorted
//! by name before the fill, and names are hashed with a fixed function (keyed by the seed when
//! there is one), so two balancers given the same backends and seed build the same table
//! whatever order their config files list them in.
//!
//! Unseeded, where each backend's permutation starts and how it steps follow from its name
//! alone, so anyone who knows the names can compute the table, and with the public flow hash
//! pick client ports that all land on one broker. A [`RingSeed`] keys those two hashes
//! (HMAC-SHA256): without the seed the table cannot be computed.
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

/// `ring_seed_file`'s secret: keys the backends' permutations. Never shown (`Debug` prints its
/// length only).
#[derive(Clone, PartialEq, Eq)]
pub struct RingSeed(std::sync::Arc<[u8]>);

impl std::fmt::Debug for RingSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RingSeed({} bytes)", self.0.len())
    }
}

impl RingSeed {
    #[must_use]
    pub fn new(secret: &[u8]) -> Self {
        Self(std::sync::Arc::from(secret))
    }

    fn key(&self) -> ring::hmac::Key {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0)
    }

    /// A digest that tells seeds apart without giving them away (an HMAC under the seed of a
    /// fixed text, distinct from what the permutations use): nodes compare it, `dsrlb check`
    /// prints it.
    #[must_use]
    pub fn digest(&self) -> u64 {
        let tag = ring::hmac::sign(&self.key(), b"dsrlb ring seed digest");
        u64::from_be_bytes(tag.as_ref()[..8].try_into().expect("a SHA-256 tag has 32 bytes"))
    }
}

/// A backend's permutation, before reduction modulo the table size: where it starts and how
/// it steps. Unseeded: the fixed hashes of the name, as every dsrlb before `ring_seed_file`.
fn permutation(name: &str, key: Option<&ring::hmac::Key>) -> (u64, u64) {
    match key {
        None => (name_hash(name, 0x6d61_676c_6576_3031), name_hash(name, 0x736b_6970_7365_6564)),
        Some(key) => {
            let mut ctx = ring::hmac::Context::with_key(key);
            ctx.update(b"dsrlb maglev permutation\0");
            ctx.update(name.as_bytes());
            let tag = ctx.sign();
            let word = |at: usize| u64::from_be_bytes(tag.as_ref()[at..at + 8].try_into().expect("a SHA-256 tag has 32 bytes"));
            (word(0), word(8))
        }
    }
}

/// Builds a table of `size` slots (a prime) over `backends` (name, weight), their permutations
/// keyed by `seed` when there is one. Each slot holds the index into `backends` of its owner,
/// or [`EMPTY`] when no backend has a weight above zero.
#[must_use]
pub fn build(backends: &[(&str, u32)], size: u32, seed: Option<&RingSeed>) -> Vec<u32> {
    let m = u64::from(size);
    let mut table = vec![EMPTY; size as usize];
    let mut order: Vec<usize> = (0..backends.len()).filter(|&i| backends[i].1 > 0).collect();
    if order.is_empty() || size < 2 {
        return table;
    }
    order.sort_by(|&a, &b| backends[a].0.cmp(backends[b].0));
    let key = seed.map(RingSeed::key);

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
            let (offset, skip) = permutation(name, key.as_ref());
            Perm {
                index: u32::try_from(i).expect("fewer than 2^32 backends"),
                weight: u64::from(weight),
                offset: offset % m,
                skip: skip % (m - 1) + 1,
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
            let table = build(&backends, M, None);
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
            let table = build(&backends, M, None);
            for (i, share) in shares(&table, n).into_iter().enumerate() {
                let want = f64::from(backends[i].1) / f64::from(total);
                assert!((share - want).abs() <= 0.01, "n={n} backend {i}: share {share:.4} vs {want:.4}");
            }
        }
        let table = build(&[("a", 3), ("b", 1)], M, None);
        let a = shares(&table, 2)[0];
        assert!((a - 0.75).abs() < 0.001, "3:1 gave {a}");
    }

    #[test]
    fn zero_weight_and_empty_sets() {
        assert!(build(&[], M, None).iter().all(|&s| s == EMPTY));
        assert!(build(&[("a", 0), ("b", 0)], M, None).iter().all(|&s| s == EMPTY));
        assert!(build(&[("a", 0), ("b", 5)], M, None).iter().all(|&s| s == 1));
    }

    #[test]
    fn removing_one_of_ten_moves_few_other_slots() {
        let names = names(10);
        let all: Vec<(&str, u32)> = names.iter().map(|s| (s.as_str(), 100)).collect();
        let before = build(&all, M, None);
        for removed in 0..10 {
            let rest: Vec<(&str, u32)> = all.iter().enumerate().filter(|&(i, _)| i != removed).map(|(_, b)| *b).collect();
            let after = build(&rest, M, None);
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
        let a = build(&fwd, M, None);
        let b = build(&rev, M, None);
        // Compare by owner name, since the indices refer to different orders.
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(fwd[*x as usize].0, rev[*y as usize].0);
        }
    }

    /// A table's contents as one number.
    fn checksum(table: &[u32]) -> u64 {
        let bytes: Vec<u8> = table.iter().flat_map(|s| s.to_le_bytes()).collect();
        lb_common::control_checksum(&bytes)
    }

    /// Without a seed the tables are the ones dsrlb built before `ring_seed_file` existed
    /// (checksums of that code's tables): an upgrade moves no flow.
    #[test]
    fn an_unseeded_ring_is_the_one_built_before_seeds() {
        let names = names(10);
        let equal: Vec<(&str, u32)> = names.iter().map(|s| (s.as_str(), 100)).collect();
        let unequal: Vec<(&str, u32)> = names.iter().zip(0u32..).map(|(s, i)| (s.as_str(), (i * 5) % 7 + 1)).collect();
        assert_eq!(checksum(&build(&equal, M, None)), 0x2555_ba46_bf7a_4013);
        assert_eq!(checksum(&build(&unequal, M, None)), 0xde80_a87c_12f3_fc06);
        assert_eq!(checksum(&build(&equal[..3], 1009, None)), 0x91a2_27df_38ce_00a5);
    }

    #[test]
    fn the_same_seed_builds_the_same_ring_and_another_seed_another() {
        let names = names(5);
        let backends: Vec<(&str, u32)> = names.iter().zip(1u32..).map(|(s, w)| (s.as_str(), w * 10)).collect();
        let seed = RingSeed::new(b"0123456789abcdef0123456789abcdef");
        let a = build(&backends, M, Some(&seed));
        assert_eq!(a, build(&backends, M, Some(&RingSeed::new(b"0123456789abcdef0123456789abcdef"))), "same seed, same ring");
        // And in any order, as unseeded.
        let mut rev = backends.clone();
        rev.reverse();
        let b = build(&rev, M, Some(&seed));
        assert!(a.iter().zip(&b).all(|(x, y)| backends[*x as usize].0 == rev[*y as usize].0), "the order of backends mattered");
        // Another seed, or none: most slots have another owner (about 1 - sum of the squared
        // shares, 0.73 here, when the two rings are unrelated).
        let differ = |x: &[u32], y: &[u32]| x.iter().zip(y).filter(|(p, q)| p != q).count() as f64 / x.len() as f64;
        let other = build(&backends, M, Some(&RingSeed::new(b"0123456789abcdef0123456789abcdeg")));
        assert!(differ(&a, &other) > 0.6, "another seed moved only {:.3} of the slots", differ(&a, &other));
        let unseeded = build(&backends, M, None);
        assert!(differ(&a, &unseeded) > 0.6, "the seed moved only {:.3} of the slots", differ(&a, &unseeded));
        assert_ne!(seed.digest(), RingSeed::new(b"0123456789abcdef0123456789abcdeg").digest());
        assert!(!format!("{seed:?}").contains("0123"), "the seed is shown: {seed:?}");
    }

    #[test]
    fn a_seeded_ring_keeps_the_shares_and_the_few_moves() {
        let seed = RingSeed::new(b"a seed of some length, 32 bytes.");
        for n in [2, 3, 10, 50] {
            let names = names(n);
            let backends: Vec<(&str, u32)> = names.iter().zip(0u32..).map(|(s, i)| (s.as_str(), (i * 5) % 7 + 1)).collect();
            let total: u32 = backends.iter().map(|b| b.1).sum();
            let table = build(&backends, M, Some(&seed));
            for (i, share) in shares(&table, n).into_iter().enumerate() {
                let want = f64::from(backends[i].1) / f64::from(total);
                assert!((share - want).abs() <= 0.01, "n={n} backend {i}: share {share:.4} vs {want:.4}");
            }
            // One more backend takes its share from the others and moves little else.
            let more = format!("broker-{n}");
            let mut grown = backends.clone();
            grown.push((more.as_str(), 4));
            let after = build(&grown, M, Some(&seed));
            let moved = table.iter().zip(&after).filter(|(b, a)| *a != *b && **a as usize != n).count();
            assert!(moved as f64 / table.len() as f64 <= 0.03, "n={n}: {moved} slots moved between the old backends");
        }
    }

    /// Client ports picked, with the public flow hash and the unseeded ring, to all land on
    /// one broker spread over every broker once the ring is seeded.
    #[test]
    fn ports_aimed_at_one_broker_spread_once_the_ring_is_seeded() {
        let names = names(3);
        let backends: Vec<(&str, u32)> = names.iter().map(|s| (s.as_str(), 100)).collect();
        let (client, vip) = (u32::from_ne_bytes([198, 51, 100, 7]), u32::from_ne_bytes([192, 0, 2, 100]));
        let wire = |p: u16| u16::from_ne_bytes(p.to_be_bytes());
        let pick =
            |table: &[u32], port: u16| table[lb_common::ring_slot(lb_common::flow_hash(client, vip, wire(port), wire(1883)), M) as usize];
        let unseeded = build(&backends, M, None);
        let target = unseeded[0];
        let aimed: Vec<u16> = (1024..=u16::MAX).filter(|&p| pick(&unseeded, p) == target).take(3000).collect();
        assert_eq!(aimed.len(), 3000);
        assert!(aimed.iter().all(|&p| pick(&unseeded, p) == target), "unseeded, every aimed port lands on {}", names[target as usize]);
        let seeded = build(&backends, M, Some(&RingSeed::new(b"0123456789abcdef0123456789abcdef")));
        let mut landed = [0usize; 3];
        for &p in &aimed {
            landed[pick(&seeded, p) as usize] += 1;
        }
        for (b, n) in landed.iter().enumerate() {
            assert!((800..=1200).contains(n), "seeded, broker-{b} took {n} of the 3000 aimed ports: {landed:?}");
        }
    }
}
