//! DestinationRule `loadBalancer.localityLbSetting`: which localities of a
//! destination's endpoints take its traffic, seen from this node's locality
//! (its Node's `topology.kubernetes.io/region`, `.../zone` and
//! `topology.istio.io/subzone` labels). An endpoint's locality is its node's
//! (the Node in the index), else the zone its EndpointSlice gives.
//!
//! Istio's two modes:
//! - `distribute`: the first rule whose `from` matches this node splits each
//!   destination's weight over the localities in its `to`, by their weights
//!   (localities not named get nothing; a destination with no endpoint in any
//!   named locality keeps all of its endpoints).
//! - failover (the default once `outlierDetection` is set, as Istio enables
//!   it only then): only the closest endpoints serve: same region, zone and
//!   subzone; else same region and zone; else same region; else the region
//!   `failover` names for this one; else any. Envoy spills to the next tier
//!   when a tier is unhealthy; here outlier detection removes unhealthy
//!   endpoints, and a tier with none left gives way to the next.
//! - `failoverPriority` (with outlier detection too): tiers by how many of
//!   the listed labels, in order, an endpoint shares with the client. The
//!   client is this node: its locality for the topology labels (region,
//!   zone, subzone), one network and one cluster for Istio's
//!   `topology.istio.io/network`/`cluster`; `key=value` items compare the
//!   endpoint with the value given. A label of the client's pod cannot be
//!   known for a whole node: the list is honoured up to the first such item
//!   (reported).

use std::collections::BTreeMap;

use serde_json::Value;

use super::{Group, endpoints::Endpoint};
use crate::{index::Index, model::node};

/// A locality; an unknown part is empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    /// The locality of node `name`, from its labels in the index.
    pub fn of_node(index: &Index, name: &str) -> Option<Self> {
        let node = &index.node(name)?.object;
        let get = |key| node::label(node, key).unwrap_or_default().to_owned();
        Some(Self {
            region: get(node::REGION_LABEL),
            zone: get(node::ZONE_LABEL),
            subzone: get(node::SUBZONE_LABEL),
        })
    }

    /// An endpoint's: its node's, else its slice's zone.
    pub fn of_endpoint(index: &Index, e: &Endpoint) -> Self {
        e.node
            .as_deref()
            .and_then(|n| Self::of_node(index, n))
            .unwrap_or_else(|| Self {
                zone: e.zone.clone().unwrap_or_default(),
                ..Self::default()
            })
    }

    /// Whether `pattern` (`region/zone/subzone`, `*` for any, a missing
    /// part for any) names this locality.
    pub fn matches(&self, pattern: &str) -> bool {
        let parts = [&self.region, &self.zone, &self.subzone];
        pattern
            .split('/')
            .zip(parts)
            .all(|(want, have)| want == "*" || want == have)
    }
}

/// What a DestinationRule asks of a service port's localities.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Setting {
    /// `distribute`: (`from`, [(`to` pattern, weight)]).
    Distribute(Vec<(String, Vec<(String, u64)>)>),
    /// Closest endpoints first; `failover` pairs (from region, to region).
    Failover(Vec<(String, String)>),
    /// `failoverPriority`: the endpoints sharing the longest prefix of these
    /// labels with the client first.
    Priority(Vec<Priority>),
}

/// One item of `failoverPriority`, as far as a node can honour it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Priority {
    /// A part of the locality: the endpoint's equals this node's, or the
    /// value written (`topology.kubernetes.io/zone=z1`).
    Region(Option<String>),
    Zone(Option<String>),
    Subzone(Option<String>),
    /// `topology.istio.io/network` or `cluster` without a value: one network
    /// and one cluster here, every endpoint matches.
    Everywhere,
    /// `key=value`: the endpoint's pod has this label value.
    Label {
        key: String,
        value: String,
    },
}

/// The labels of Istio's that name the client's network and cluster.
const NETWORK_LABELS: [&str; 2] = ["topology.istio.io/network", "topology.istio.io/cluster"];

impl Priority {
    /// An item of the list; `None`: a label of the client's pod (no value),
    /// which a node cannot know.
    pub fn parse(item: &str) -> Option<Self> {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim().to_owned())),
            None => (item.trim(), None),
        };
        Some(match key {
            node::REGION_LABEL => Self::Region(value),
            node::ZONE_LABEL => Self::Zone(value),
            node::SUBZONE_LABEL => Self::Subzone(value),
            _ if NETWORK_LABELS.contains(&key) && value.is_none() => Self::Everywhere,
            _ => Self::Label {
                key: key.to_owned(),
                value: value?,
            },
        })
    }

    fn matches(&self, here: &Locality, there: &Locality, e: &Endpoint) -> bool {
        let part = |want: &Option<String>, mine: &str, theirs: &str| {
            want.as_deref().unwrap_or(mine) == theirs
        };
        match self {
            Self::Region(v) => part(v, &here.region, &there.region),
            Self::Zone(v) => part(v, &here.zone, &there.zone),
            Self::Subzone(v) => part(v, &here.subzone, &there.subzone),
            Self::Everywhere => true,
            Self::Label { key, value } => e.labels.get(key) == Some(value),
        }
    }
}

/// The setting `dr` asks for on service port `port`, given whether it has
/// outlier detection there (failover needs it, as in Istio).
pub fn setting(lb: Option<&Value>, outlier: bool) -> Option<Setting> {
    let lls = lb.and_then(|lb| lb.get("localityLbSetting"));
    if lls.and_then(|l| l.get("enabled")).and_then(Value::as_bool) == Some(false) {
        return None;
    }
    let distribute: Vec<(String, Vec<(String, u64)>)> = lls
        .and_then(|l| l.get("distribute"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|rule| {
            let from = rule.get("from")?.as_str()?.to_owned();
            let to = rule
                .get("to")?
                .as_object()?
                .iter()
                .filter_map(|(k, w)| Some((k.clone(), w.as_u64()?)))
                .collect();
            Some((from, to))
        })
        .collect();
    if !distribute.is_empty() {
        return Some(Setting::Distribute(distribute));
    }
    if !outlier {
        return None;
    }
    // Honoured up to the first item a node cannot know (reported).
    let priority: Vec<Priority> = lls
        .and_then(|l| l.get("failoverPriority"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map_while(|item| Priority::parse(item.as_str()?))
        .collect();
    if !priority.is_empty() {
        return Some(Setting::Priority(priority));
    }
    let failover = lls
        .and_then(|l| l.get("failover"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|f| {
            Some((
                f.get("from")?.as_str()?.to_owned(),
                f.get("to")?.as_str()?.to_owned(),
            ))
        })
        .collect();
    Some(Setting::Failover(failover))
}

/// Applies `setting` to a route's destinations, from locality `here`.
pub fn apply(
    groups: Vec<(String, Group)>,
    setting: &Setting,
    here: &Locality,
    locality: impl Fn(&Endpoint) -> Locality,
) -> Vec<(String, Group)> {
    match setting {
        Setting::Distribute(rules) => {
            let Some((_, to)) = rules.iter().find(|(from, _)| here.matches(from)) else {
                return groups;
            };
            groups
                .into_iter()
                .flat_map(|(name, group)| distribute(name, group, to, &locality))
                .collect()
        }
        Setting::Failover(failover) => closest(groups, |e| tier(here, &locality(e), failover)),
        Setting::Priority(labels) => closest(groups, |e| {
            let there = locality(e);
            let shared = labels
                .iter()
                .take_while(|l| l.matches(here, &there, e))
                .count();
            u8::try_from(labels.len() - shared).unwrap_or(u8::MAX)
        }),
    }
}

/// Keeps each group's endpoints of the lowest tier.
fn closest(groups: Vec<(String, Group)>, tier: impl Fn(&Endpoint) -> u8) -> Vec<(String, Group)> {
    groups
        .into_iter()
        .map(|(name, mut group)| {
            if let Some(best) = group.members.iter().map(&tier).min() {
                group.members.retain(|e| tier(e) == best);
            }
            (name, group)
        })
        .collect()
}

/// One destination's weight over the localities of `to` that have endpoints.
fn distribute(
    name: String,
    group: Group,
    to: &[(String, u64)],
    locality: &impl Fn(&Endpoint) -> Locality,
) -> Vec<(String, Group)> {
    // Each endpoint goes to the first `to` entry naming its locality.
    let mut by_entry: BTreeMap<usize, Vec<Endpoint>> = BTreeMap::new();
    for e in &group.members {
        let l = locality(e);
        if let Some(i) = to.iter().position(|(pattern, _)| l.matches(pattern)) {
            by_entry.entry(i).or_default().push(e.clone());
        }
    }
    let total: u64 = by_entry.keys().map(|&i| to[i].1).sum();
    if total == 0 {
        return vec![(name, group)];
    }
    // Weights scaled so that integer shares keep their proportions.
    const SCALE: u64 = 10_000;
    by_entry
        .into_iter()
        .map(|(i, members)| {
            let (pattern, w) = &to[i];
            let weight = group.weight.saturating_mul(SCALE).saturating_mul(*w) / total;
            (
                format!("{name} locality {pattern}"),
                Group { weight, members },
            )
        })
        .collect()
}

/// How far `there` is from `here`: 0 the same subzone, 1 zone, 2 region,
/// 3 the region `failover` names for this one, 4 elsewhere.
fn tier(here: &Locality, there: &Locality, failover: &[(String, String)]) -> u8 {
    if here.region != there.region {
        let named = failover
            .iter()
            .any(|(from, to)| *from == here.region && *to == there.region);
        return if named { 3 } else { 4 };
    }
    if here.zone != there.zone {
        return 2;
    }
    if here.subzone != there.subzone {
        return 1;
    }
    0
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn at(region: &str, zone: &str) -> Locality {
        Locality {
            region: region.to_owned(),
            zone: zone.to_owned(),
            subzone: String::new(),
        }
    }

    /// An endpoint `10.244.0.<n>` whose zone (and region, by its first
    /// letter) is `zone`.
    fn ep(n: u8, zone: &str) -> Endpoint {
        Endpoint {
            ip: IpAddr::from([10, 244, 0, n]),
            port: 80,
            pod: None,
            labels: Default::default(),
            node: None,
            zone: Some(zone.to_owned()),
        }
    }

    fn locality(e: &Endpoint) -> Locality {
        let zone = e.zone.clone().unwrap_or_default();
        at(&zone[..1], &zone)
    }

    fn one_group(members: Vec<Endpoint>) -> Vec<(String, Group)> {
        vec![("web".to_owned(), Group { weight: 1, members })]
    }

    #[test]
    fn patterns_match_by_part_with_stars_and_missing_parts() {
        let l = at("r1", "z1");
        for yes in ["r1/z1/*", "r1/*", "r1", "*", "r1/z1/"] {
            assert!(l.matches(yes), "{yes}");
        }
        for no in ["r2/*", "r1/z2/*", "r1/z1/s1"] {
            assert!(!l.matches(no), "{no}");
        }
    }

    #[test]
    fn distribute_splits_each_destination_by_the_first_matching_rule() {
        let setting = Setting::Distribute(vec![
            ("b/*".to_owned(), vec![("b/*".to_owned(), 100)]),
            (
                "a/*".to_owned(),
                vec![("a/a1/*".to_owned(), 80), ("a/a2/*".to_owned(), 20)],
            ),
        ]);
        let groups = one_group(vec![ep(1, "a1"), ep(2, "a2"), ep(3, "a2"), ep(4, "b1")]);
        let out = apply(groups, &setting, &at("a", "a1"), locality);
        let shares: Vec<(String, u64, usize)> = out
            .iter()
            .map(|(n, g)| (n.clone(), g.weight, g.members.len()))
            .collect();
        assert_eq!(
            shares,
            [
                ("web locality a/a1/*".to_owned(), 8000, 1),
                ("web locality a/a2/*".to_owned(), 2000, 2),
            ],
            "b1 is named by no `to`: no traffic"
        );
        // A named locality without endpoints: its share goes to the others.
        let out = apply(
            one_group(vec![ep(2, "a2")]),
            &setting,
            &at("a", "a1"),
            locality,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1.weight, 10_000);
    }

    /// The last octets of the first group's endpoints.
    fn members(out: Vec<(String, Group)>) -> Vec<u8> {
        out[0]
            .1
            .members
            .iter()
            .map(|e| match e.ip {
                IpAddr::V4(v4) => v4.octets()[3],
                IpAddr::V6(_) => 0,
            })
            .collect()
    }

    #[test]
    fn failover_priority_keeps_the_endpoints_sharing_the_longest_prefix_of_labels() {
        // Region, then a pod label value, then zone.
        let setting = Setting::Priority(vec![
            Priority::Region(None),
            Priority::Label {
                key: "version".to_owned(),
                value: "v2".to_owned(),
            },
            Priority::Zone(None),
        ]);
        let here = at("a", "a1");
        let v2 = |mut e: Endpoint| {
            std::sync::Arc::make_mut(&mut e.labels).insert("version".to_owned(), "v2".to_owned());
            e
        };
        let all = vec![
            ep(1, "a1"),
            v2(ep(2, "a2")),
            v2(ep(3, "a1")),
            v2(ep(4, "b1")),
        ];
        let apply_to = |v| members(apply(one_group(v), &setting, &here, locality));
        assert_eq!(apply_to(all), [3], "all three shared");
        let no_zone = vec![ep(1, "a1"), v2(ep(2, "a2")), v2(ep(4, "b1"))];
        assert_eq!(apply_to(no_zone), [2], "region and label");
        // The zone counts only after the label: a1 without v2 is as far as
        // a2 without it.
        let no_label = vec![ep(1, "a1"), ep(5, "a2"), v2(ep(4, "b1"))];
        assert_eq!(apply_to(no_label), [1, 5], "region only");
        assert_eq!(apply_to(vec![v2(ep(4, "b1")), ep(6, "c1")]), [4, 6]);
    }

    #[test]
    fn failover_keeps_the_closest_tier_and_follows_the_failover_region() {
        let setting = Setting::Failover(vec![("a".to_owned(), "c".to_owned())]);
        let here = at("a", "a1");
        let all = vec![ep(1, "a1"), ep(2, "a2"), ep(3, "b1"), ep(4, "c1")];
        assert_eq!(
            members(apply(one_group(all), &setting, &here, locality)),
            [1]
        );
        let no_zone = vec![ep(2, "a2"), ep(3, "b1"), ep(4, "c1")];
        assert_eq!(
            members(apply(one_group(no_zone), &setting, &here, locality)),
            [2]
        );
        let other_regions = vec![ep(3, "b1"), ep(4, "c1")];
        assert_eq!(
            members(apply(one_group(other_regions), &setting, &here, locality)),
            [4],
            "c is the failover region of a"
        );
    }
}
