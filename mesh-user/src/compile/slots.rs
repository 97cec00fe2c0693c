//! Weights to slot tables.
//!
//! A route's destinations are *groups* (a subset's endpoints) with a weight. Each
//! endpoint of group `i` should receive `w_i / (W * n_i)` of the connections, `W`
//! being the sum of weights (Istio: a destination receives `weight / sum(weights)`).
//! The kernel draws `random % len` into the table, so the table must hold each
//! endpoint in proportion to its share.
//!
//! We use the smallest table that is exact: `S = lcm_i(W * n_i / gcd(w_i, W * n_i))`
//! (80/20 over 3 + 1 endpoints is 15 slots: 4 + 4 + 4 and 3). When that exceeds
//! `max` slots, the table has `max` slots apportioned by largest remainder, so no
//! endpoint is off by more than one slot (1/4096 of the traffic by default).

/// One weighted destination: its weight and its members (endpoints). A group with
/// weight but no member keeps its share as "no backend" (`None`) slots: connections
/// drawn there fail, as Envoy answers 503 for a weighted cluster with no host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group<T> {
    pub weight: u64,
    pub members: Vec<T>,
}

/// Builds the table. Members listed twice count twice. An empty result means no
/// group has weight: the service has nothing to offer.
pub fn build<T: Clone>(groups: &[Group<T>], max: usize) -> Vec<Option<T>> {
    // (weight, members) with the empty ones stood in for by one "no backend" member.
    let live: Vec<(u64, Vec<Option<T>>)> = groups
        .iter()
        .filter(|g| g.weight > 0)
        .map(|g| {
            let members = if g.members.is_empty() {
                vec![None]
            } else {
                g.members.iter().cloned().map(Some).collect()
            };
            (g.weight, members)
        })
        .collect();
    if live.is_empty() || max == 0 {
        return Vec::new();
    }
    let total: u128 = live.iter().map(|(w, _)| u128::from(*w)).sum();

    match exact_size(&live, total, max) {
        Some(size) => {
            let mut out = Vec::with_capacity(size as usize);
            for (weight, members) in &live {
                let per_member = size * u128::from(*weight) / (total * members.len() as u128);
                for member in members {
                    out.extend(std::iter::repeat_n(member.clone(), per_member as usize));
                }
            }
            out
        }
        None => apportion(&live, total, max),
    }
}

/// The exact table size, if it fits in `max`.
fn exact_size<T>(live: &[(u64, Vec<T>)], total: u128, max: usize) -> Option<u128> {
    let mut size: u128 = 1;
    for (weight, members) in live {
        let denom = total * members.len() as u128;
        let need = denom / gcd(u128::from(*weight), denom);
        size = lcm(size, need);
        if size > max as u128 {
            return None;
        }
    }
    Some(size)
}

/// Largest-remainder apportionment of `max` slots.
fn apportion<T: Clone>(live: &[(u64, Vec<Option<T>>)], total: u128, max: usize) -> Vec<Option<T>> {
    let max_u = max as u128;
    // (member, floor count, remainder numerator) with a common denominator per group;
    // compare remainders as fractions exactly.
    let mut rows: Vec<(Option<T>, u128, u128, u128)> = Vec::new();
    for (weight, members) in live {
        let denom = total * members.len() as u128;
        let num = max_u * u128::from(*weight);
        for member in members {
            rows.push((member.clone(), num / denom, num % denom, denom));
        }
    }
    let assigned: u128 = rows.iter().map(|r| r.1).sum();
    let mut left = max_u.saturating_sub(assigned);
    let mut order: Vec<usize> = (0..rows.len()).collect();
    // Largest remainder first; a stable sort keeps earlier members first on ties.
    order.sort_by(|&a, &b| {
        let (ra, da) = (rows[a].2, rows[a].3);
        let (rb, db) = (rows[b].2, rows[b].3);
        cmp_fractions(rb, db, ra, da)
    });
    for i in order {
        if left == 0 {
            break;
        }
        if rows[i].2 > 0 {
            rows[i].1 += 1;
            left -= 1;
        }
    }
    let mut out = Vec::with_capacity(max);
    for (member, count, _, _) in rows {
        out.extend(std::iter::repeat_n(member, count as usize));
    }
    out
}

/// `a/b` against `c/d`, exactly and without overflow (cross products of large
/// weights times many endpoints can exceed u128): integer parts first, then the
/// inverses of what remains, as in Euclid's algorithm. A zero denominator
/// (never built here) compares equal.
fn cmp_fractions(mut a: u128, mut b: u128, mut c: u128, mut d: u128) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    loop {
        if b == 0 || d == 0 {
            return Ordering::Equal;
        }
        match (a / b).cmp(&(c / d)) {
            Ordering::Equal => {}
            other => return other,
        }
        (a, c) = (a % b, c % d);
        match (a == 0, c == 0) {
            (true, true) => return Ordering::Equal,
            (true, false) => return Ordering::Less,
            (false, true) => return Ordering::Greater,
            // a/b against c/d is d/c against b/a.
            (false, false) => (a, b, c, d) = (d, c, b, a),
        }
    }
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn lcm(a: u128, b: u128) -> u128 {
    a / gcd(a, b) * b
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn g(weight: u64, members: &[&'static str]) -> Group<&'static str> {
        Group {
            weight,
            members: members.to_vec(),
        }
    }

    fn counts(table: &[Option<&'static str>]) -> BTreeMap<Option<&'static str>, usize> {
        let mut out = BTreeMap::new();
        for slot in table {
            *out.entry(*slot).or_default() += 1;
        }
        out
    }

    #[test]
    fn canary_80_20_over_three_and_one() {
        let table = build(&[g(80, &["a", "b", "c"]), g(20, &["d"])], 4096);
        assert_eq!(table.len(), 15);
        let c = counts(&table);
        assert_eq!(c[&Some("a")], 4);
        assert_eq!(c[&Some("b")], 4);
        assert_eq!(c[&Some("c")], 4);
        assert_eq!(c[&Some("d")], 3);
    }

    #[test]
    fn even_balancing_is_one_slot_each() {
        let table = build(&[g(1, &["a", "b", "c"])], 4096);
        assert_eq!(table, vec![Some("a"), Some("b"), Some("c")]);
    }

    #[test]
    fn weights_need_not_sum_to_100() {
        // 1:3 is 25%/75%, exactly as 25/75 would be.
        let c = counts(&build(&[g(1, &["a"]), g(3, &["b"])], 4096));
        assert_eq!((c[&Some("a")], c[&Some("b")]), (1, 3));
    }

    #[test]
    fn zero_weight_destination_gets_nothing() {
        let table = build(&[g(100, &["a"]), g(0, &["b"])], 4096);
        assert_eq!(table, vec![Some("a")]);
    }

    #[test]
    fn all_zero_weights_mean_no_backend() {
        assert!(build(&[g(0, &["a"]), g(0, &["b"])], 4096).is_empty());
        assert!(build::<&str>(&[], 4096).is_empty());
    }

    #[test]
    fn a_destination_without_endpoints_keeps_its_share_as_no_backend() {
        let c = counts(&build(&[g(80, &["a"]), g(20, &[])], 4096));
        assert_eq!((c[&Some("a")], c[&None]), (4, 1));
    }

    #[test]
    fn remainders_go_to_the_largest_fractions_when_exact_is_too_big() {
        // 1/3 each over 2 slots cannot be exact: two endpoints get one slot, one none.
        let table = build(&[g(1, &["a", "b", "c"])], 2);
        assert_eq!(table.len(), 2);
        // 7 coprime-sized groups: the exact table is huge; 64 slots apportioned.
        let groups: Vec<Group<&'static str>> = [
            ("a", 13),
            ("b", 17),
            ("c", 19),
            ("d", 23),
            ("e", 29),
            ("f", 31),
            ("g", 37),
        ]
        .iter()
        .map(|(m, w)| g(*w, &[*m]))
        .collect();
        let table = build(&groups, 64);
        assert_eq!(table.len(), 64);
    }

    #[test]
    fn fractions_compare_exactly_where_cross_products_overflow() {
        use std::cmp::Ordering;
        let m = u128::MAX;
        // (m-2)/(m-1) < (m-1)/m; the cross products are near 2^256.
        assert_eq!(cmp_fractions(m - 2, m - 1, m - 1, m), Ordering::Less);
        assert_eq!(cmp_fractions(m - 1, m, m - 2, m - 1), Ordering::Greater);
        assert_eq!(cmp_fractions(m / 2, m - 1, m / 2, m - 1), Ordering::Equal);
        assert_eq!(cmp_fractions(3, m, 0, 7), Ordering::Greater);
    }

    proptest! {
        #[test]
        fn fractions_compare_as_cross_products(a in 0u64.., b in 1u64.., c in 0u64.., d in 1u64..) {
            let (a, b, c, d) = (u128::from(a), u128::from(b), u128::from(c), u128::from(d));
            prop_assert_eq!(cmp_fractions(a, b, c, d), (a * d).cmp(&(c * b)));
        }
    }

    proptest! {
        /// Whatever the weights and sizes, every endpoint's share of the table is
        /// within one slot of its ideal share, and the table never exceeds `max`.
        #[test]
        fn shares_are_within_one_slot_of_ideal(
            weights in prop::collection::vec((0u64..1000, 0usize..6), 1..6),
            max in 1usize..5000,
        ) {
            let names = ["m0", "m1", "m2", "m3", "m4", "m5"];
            let groups: Vec<Group<(usize, &str)>> = weights
                .iter()
                .enumerate()
                .map(|(i, (w, n))| Group { weight: *w, members: names[..*n].iter().map(|m| (i, *m)).collect() })
                .collect();
            let table = build(&groups, max);
            prop_assert!(table.len() <= max);
            let total: u64 = groups.iter().filter(|g| g.weight > 0).map(|g| g.weight).sum();
            if total == 0 {
                prop_assert!(table.is_empty());
                return Ok(());
            }
            prop_assert!(!table.is_empty());
            let len = table.len() as f64;
            for (i, group) in groups.iter().enumerate() {
                let n = group.members.len().max(1);
                let ideal = group.weight as f64 / total as f64 / n as f64 * len;
                let keys: Vec<Option<(usize, &str)>> = if group.members.is_empty() {
                    vec![None]
                } else {
                    group.members.iter().cloned().map(Some).collect()
                };
                for key in keys {
                    let got = table.iter().filter(|s| match (s, &key) {
                        (Some(a), Some(b)) => a == b,
                        (None, None) => true,
                        _ => false,
                    }).count() as f64;
                    // `None` slots of different groups are indistinguishable: a
                    // group of weight 0 has none of its own, and several empty
                    // groups share theirs.
                    if key.is_none() && (group.weight == 0 || groups.iter().filter(|g| g.weight > 0 && g.members.is_empty()).count() > 1) {
                        continue;
                    }
                    prop_assert!((got - ideal).abs() < 1.0 + 1e-9, "group {i} {key:?}: got {got}, ideal {ideal}");
                }
            }
        }
    }
}
