//! apply's logic against in-memory maps with the kernel's capacity behaviour:
//! what a connect could read at each step, without a kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use mesh_common::{ServiceValue, SlotKey};

use super::{Applier, GRACE, Hold};
use crate::{
    compile::{BackendAddr, Proto, ServiceAddr, ServicePlan},
    kernel::{
        codec::{backend_addr, service_key},
        maps::fake::FakeMaps,
    },
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

fn addr(vip: &str) -> ServiceAddr {
    ServiceAddr {
        destination: None,
        vip: ip(vip),
        port: 80,
        proto: Proto::Tcp,
    }
}

fn plan(name: &str, backends: &[u8]) -> ServicePlan {
    ServicePlan::even_over(name, backends)
}

fn desired(plans: &[(&str, ServicePlan)]) -> BTreeMap<ServiceAddr, ServicePlan> {
    plans
        .iter()
        .map(|(vip, p)| (addr(vip), p.clone()))
        .collect()
}

/// What a connect to `vip` reads now: the service entry, and the table it names.
fn table(maps: &FakeMaps, vip: &str) -> Option<(ServiceValue, Vec<Option<BackendAddr>>)> {
    let value = *maps.services.state().entries.get(&service_key(addr(vip)))?;
    let slots = maps.slots.state();
    let table = (0..value.slot_count)
        .map(|slot| {
            let key = SlotKey {
                service_id: value.service_id,
                revision: value.revision,
                slot,
            };
            slots.entries.get(&key).and_then(backend_addr)
        })
        .collect();
    Some((value, table))
}

/// [`table`], for a service that must have one (an empty table otherwise).
fn live(maps: &FakeMaps, vip: &str) -> (ServiceValue, Vec<Option<BackendAddr>>) {
    table(maps, vip).unwrap_or_else(|| (bytemuck::Zeroable::zeroed(), Vec::new()))
}

/// The (service id, revision) pairs the slot map holds tables of.
fn revisions(maps: &FakeMaps) -> BTreeSet<(u32, u32)> {
    maps.slots
        .state()
        .entries
        .keys()
        .map(|k| (k.service_id, k.revision))
        .collect()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn a_change_is_a_new_revision_flipped_in_one_write_and_the_old_one_freed_after_the_grace() {
    let maps = FakeMaps::new(16, 64);
    let mut applier = Applier::new(maps.maps());
    let t0 = Instant::now();
    let report = applier.apply(
        &desired(&[("10.96.0.1", plan("web", &[1, 2]))]),
        None,
        Hold::NONE,
        t0,
    );
    assert_eq!((report.written, report.errors.len()), (1, 0));
    let (v1, slots) = live(&maps, "10.96.0.1");
    assert_eq!((v1.revision, slots.len()), (1, 2));

    let entry_writes = maps.services.state().inserts;
    let changed = desired(&[("10.96.0.1", plan("web", &[1, 2, 3]))]);
    applier.apply(&changed, None, Hold::NONE, t0 + ms(1));
    assert_eq!(maps.services.state().inserts, entry_writes + 1, "one flip");
    let (v2, slots) = live(&maps, "10.96.0.1");
    assert_eq!((v2.service_id, v2.revision), (v1.service_id, 2));
    assert_eq!(slots.iter().flatten().count(), 3, "the new table, whole");
    // A connect that read the old entry just before the flip still finds its table.
    assert_eq!(
        revisions(&maps),
        BTreeSet::from([(v1.service_id, 1), (v1.service_id, 2)])
    );
    applier.collect_garbage(t0 + ms(1) + GRACE - ms(1));
    assert_eq!(revisions(&maps).len(), 2, "still within the grace period");
    applier.collect_garbage(t0 + ms(1) + GRACE);
    assert_eq!(revisions(&maps), BTreeSet::from([(v1.service_id, 2)]));

    // The same table again writes nothing.
    let (slot_writes, entry_writes) = (maps.slots.state().inserts, maps.services.state().inserts);
    let report = applier.apply(&changed, None, Hold::NONE, t0 + ms(2) + GRACE);
    assert_eq!((report.written, report.unchanged), (0, 1));
    assert_eq!(
        (maps.slots.state().inserts, maps.services.state().inserts),
        (slot_writes, entry_writes)
    );
}

#[test]
fn a_failed_write_leaves_the_live_table_and_its_partial_revision_is_freed() {
    let maps = FakeMaps::new(16, 64);
    let mut applier = Applier::new(maps.maps());
    let t0 = Instant::now();
    applier.apply(
        &desired(&[("10.96.0.1", plan("web", &[1, 2]))]),
        None,
        Hold::NONE,
        t0,
    );
    let before = table(&maps, "10.96.0.1");

    maps.slots.state().fail_after = Some(1); // the second slot of the new table fails
    let report = applier.apply(
        &desired(&[("10.96.0.1", plan("web", &[3, 4, 5]))]),
        None,
        Hold::NONE,
        t0,
    );
    assert_eq!(report.errors.len(), 1);
    let message = report.errors[0].to_string();
    assert!(
        message.contains("prod/web") && message.contains("10.96.0.1:80/TCP"),
        "{message}"
    );
    assert_eq!(
        table(&maps, "10.96.0.1"),
        before,
        "connects still read the old table"
    );
    // The partial table was freed in the same pass: nothing points to it.
    assert_eq!(revisions(&maps).len(), 1);

    maps.slots.state().fail_after = None;
    let report = applier.apply(
        &desired(&[("10.96.0.1", plan("web", &[3, 4, 5]))]),
        None,
        Hold::NONE,
        t0,
    );
    assert!(report.errors.is_empty());
    let (value, slots) = live(&maps, "10.96.0.1");
    assert_eq!((value.revision, slots.iter().flatten().count()), (2, 3));
}

#[test]
fn a_new_service_that_fails_gives_its_id_back() {
    let maps = FakeMaps::new(16, 64);
    let mut applier = Applier::new(maps.maps());
    let t0 = Instant::now();
    maps.slots.state().fail_after = Some(0);
    let report = applier.apply(
        &desired(&[("10.96.0.1", plan("web", &[1]))]),
        None,
        Hold::NONE,
        t0,
    );
    assert_eq!(report.errors.len(), 1);
    assert!(table(&maps, "10.96.0.1").is_none(), "no entry was flipped");
    maps.slots.state().fail_after = None;
    applier.apply(
        &desired(&[("10.96.0.2", plan("db", &[1]))]),
        None,
        Hold::NONE,
        t0 + ms(1),
    );
    let (value, _) = live(&maps, "10.96.0.2");
    assert_eq!(value.service_id, 0, "the failed service's id was reused");
}

#[test]
fn a_removed_services_id_is_reused_only_after_its_table_is_freed_and_counts_from_zero() {
    let maps = FakeMaps::new(16, 64);
    let mut applier = Applier::new(maps.maps());
    let t0 = Instant::now();
    applier.apply(
        &desired(&[
            ("10.96.0.1", plan("a", &[1])),
            ("10.96.0.2", plan("b", &[2])),
        ]),
        None,
        Hold::NONE,
        t0,
    );
    let id_a = table(&maps, "10.96.0.1").map(|(v, _)| v.service_id);
    assert_eq!(id_a, Some(0));
    maps.service_stats.state().entries.insert(0, 42); // a's connections

    let report = applier.apply(
        &desired(&[("10.96.0.2", plan("b", &[2]))]),
        None,
        Hold::NONE,
        t0 + ms(1),
    );
    assert_eq!(report.removed, 1);
    assert!(table(&maps, "10.96.0.1").is_none());
    applier.apply(
        &desired(&[
            ("10.96.0.2", plan("b", &[2])),
            ("10.96.0.3", plan("c", &[3])),
        ]),
        None,
        Hold::NONE,
        t0 + ms(2),
    );
    assert_eq!(
        table(&maps, "10.96.0.3").map(|(v, _)| v.service_id),
        Some(2),
        "a's id is not reused while its table may still be read"
    );

    applier.collect_garbage(t0 + ms(1) + GRACE);
    assert_eq!(
        maps.service_stats.state().entries.get(&0),
        None,
        "a's counter goes with its id"
    );
    // A connect that read a's table just before it was freed counts after that
    // (the kernel creates the entry anew).
    maps.service_stats.state().entries.insert(0, 1);
    applier.apply(
        &desired(&[
            ("10.96.0.2", plan("b", &[2])),
            ("10.96.0.3", plan("c", &[3])),
            ("10.96.0.4", plan("d", &[4])),
        ]),
        None,
        Hold::NONE,
        t0 + ms(3) + GRACE,
    );
    assert_eq!(
        table(&maps, "10.96.0.4").map(|(v, _)| v.service_id),
        Some(0)
    );
    assert_eq!(
        maps.service_stats.state().entries.get(&0),
        None,
        "d does not inherit a's connection count"
    );
}

#[test]
fn a_restarted_applier_adopts_the_kernels_tables_without_rewriting_them() {
    let maps = FakeMaps::new(16, 64);
    let t0 = Instant::now();
    let config = desired(&[
        ("10.96.0.1", plan("a", &[1, 2])),
        ("10.96.0.2", plan("b", &[2, 3])),
    ]);
    Applier::new(maps.maps()).apply(&config, None, Hold::NONE, t0);
    let before: Vec<_> = ["10.96.0.1", "10.96.0.2"]
        .iter()
        .map(|vip| table(&maps, vip))
        .collect();

    let mut restarted = Applier::new(maps.maps());
    let adopted = restarted.adopt(t0 + ms(5));
    assert_eq!(
        (adopted.services, adopted.backends, adopted.stray_slots),
        (2, 3, 0)
    );
    let writes = (maps.slots.state().inserts, maps.services.state().inserts);
    let report = restarted.apply(&config, None, Hold::NONE, t0 + ms(5));
    assert_eq!((report.written, report.unchanged), (0, 2));
    assert_eq!(
        (maps.slots.state().inserts, maps.services.state().inserts),
        writes,
        "nothing rewritten"
    );
    let after: Vec<_> = ["10.96.0.1", "10.96.0.2"]
        .iter()
        .map(|vip| table(&maps, vip))
        .collect();
    assert_eq!(after, before);
    // Labels come back with the first apply.
    let view = restarted.view();
    assert_eq!(view.services.len(), 2);
    assert_eq!(
        view.services.values().next().map(|s| s.service.to_string()),
        Some("prod/a".to_owned())
    );
}

#[test]
fn apply_writes_no_counter_and_a_reused_backend_id_does_not_inherit_a_count() {
    let maps = FakeMaps::new(16, 64);
    let mut applier = Applier::new(maps.maps());
    let t0 = Instant::now();
    applier.apply(
        &desired(&[("10.96.0.1", plan("a", &[1, 2]))]),
        None,
        Hold::NONE,
        t0,
    );
    // The kernel creates counters at their first connect, not the agent.
    assert!(maps.backend_stats.state().entries.is_empty());
    assert!(maps.service_stats.state().entries.is_empty());
    let id_of = |applier: &Applier, host: u8| {
        applier
            .view()
            .backends
            .iter()
            .find(|b| b.addr.ip == IpAddr::from([10, 244, 0, host]))
            .map(|b| b.id)
    };
    let (Some(one), Some(two)) = (id_of(&applier, 1), id_of(&applier, 2)) else {
        panic!("both backends have ids: {:?}", applier.view().backends);
    };
    maps.backend_stats
        .state()
        .entries
        .extend([(one, 5), (two, 7)]);

    applier.apply(
        &desired(&[("10.96.0.1", plan("a", &[1]))]),
        None,
        Hold::NONE,
        t0 + ms(1),
    );
    applier.collect_garbage(t0 + ms(1) + GRACE);
    assert_eq!(
        maps.backend_stats.state().entries,
        BTreeMap::from([(one, 5)]),
        "2's counter goes with its id"
    );
    // A connect that drew 2 from the freed table counts after that.
    maps.backend_stats.state().entries.insert(two, 1);
    applier.apply(
        &desired(&[("10.96.0.1", plan("a", &[1, 3]))]),
        None,
        Hold::NONE,
        t0 + ms(2) + GRACE,
    );
    assert_eq!(id_of(&applier, 3), Some(two), "2's id is reused");
    assert_eq!(
        maps.backend_stats.state().entries,
        BTreeMap::from([(one, 5)]),
        "3 does not inherit 2's count; 1 keeps its own"
    );
}

#[test]
fn adopt_frees_a_table_written_but_never_flipped_and_never_reuses_its_revision() {
    let maps = FakeMaps::new(16, 64);
    let t0 = Instant::now();
    let mut first = Applier::new(maps.maps());
    first.apply(
        &desired(&[("10.96.0.1", plan("web", &[1, 2]))]),
        None,
        Hold::NONE,
        t0,
    );
    // The agent dies between writing a new revision and flipping the entry to it.
    maps.services.state().fail_after = Some(0);
    first.apply(
        &desired(&[("10.96.0.1", plan("web", &[3, 4, 5]))]),
        None,
        Hold::NONE,
        t0,
    );
    drop(first);
    maps.services.state().fail_after = None;
    // (In this simulation the dying agent freed its partial table; a real death
    // leaves it. Put it back as the kernel would hold it.)
    let id = table(&maps, "10.96.0.1").map_or(0, |(v, _)| v.service_id);
    for slot in 0..3 {
        let key = SlotKey {
            service_id: id,
            revision: 2,
            slot,
        };
        maps.slots
            .state()
            .entries
            .insert(key, bytemuck::Zeroable::zeroed());
    }

    let mut restarted = Applier::new(maps.maps());
    let t1 = t0 + ms(10);
    let adopted = restarted.adopt(t1);
    assert_eq!((adopted.services, adopted.stray_slots), (1, 3));
    // The change arrives again at once: it must not land on the stray revision,
    // which is freed a grace period later.
    restarted.apply(
        &desired(&[("10.96.0.1", plan("web", &[3, 4, 5]))]),
        None,
        Hold::NONE,
        t1,
    );
    let (value, _) = live(&maps, "10.96.0.1");
    assert_ne!(value.revision, 2, "the stray revision is not reused");
    restarted.collect_garbage(t1 + GRACE + GRACE);
    let (value, slots) = live(&maps, "10.96.0.1");
    assert_eq!(
        slots.iter().flatten().count(),
        3,
        "the live table survives the stray one's clean-up (revision {})",
        value.revision
    );
    assert_eq!(revisions(&maps), BTreeSet::from([(id, value.revision)]));
}

#[test]
fn a_table_that_does_not_fit_is_not_written_at_all_and_the_previous_one_routes_on() {
    // Room for 6 slots: two tables of 2, and a change that needs 4 more while
    // the old table is still held.
    let maps = FakeMaps::new(16, 6);
    let mut applier = Applier::new(maps.maps());
    let t0 = Instant::now();
    applier.apply(
        &desired(&[
            ("10.96.0.1", plan("a", &[1, 2])),
            ("10.96.0.2", plan("b", &[3, 4])),
        ]),
        None,
        Hold::NONE,
        t0,
    );
    let (a, b) = (table(&maps, "10.96.0.1"), table(&maps, "10.96.0.2"));
    let slot_writes = maps.slots.state().inserts;
    let report = applier.apply(
        &desired(&[
            ("10.96.0.1", plan("a", &[1, 2, 5, 6])),
            ("10.96.0.2", plan("b", &[3, 4])),
        ]),
        None,
        Hold::NONE,
        t0 + ms(1),
    );
    assert_eq!(
        (report.written, report.unchanged, report.errors.len()),
        (0, 1, 1)
    );
    assert_eq!(report.errors[0].reason(), "slots_full");
    let message = report.errors[0].to_string();
    assert!(
        message.contains("prod/a")
            && message.contains("4 slots")
            && message.contains("previous table"),
        "{message}"
    );
    assert_eq!(
        maps.slots.state().inserts,
        slot_writes,
        "not one slot written"
    );
    assert_eq!(table(&maps, "10.96.0.1"), a);
    assert_eq!(table(&maps, "10.96.0.2"), b);
    let view = applier.view();
    let slots = view
        .occupancy
        .iter()
        .find(|o| o.map == mesh_common::map_names::SLOTS);
    assert_eq!(slots.map(|o| (o.entries, o.capacity)), Some((4, 6)));
}

#[test]
fn a_service_that_does_not_fit_never_starves_those_after_it() {
    let maps = FakeMaps::new(16, 4);
    let mut applier = Applier::new(maps.maps());
    let report = applier.apply(
        &desired(&[
            ("10.96.0.1", plan("big", &[1, 2, 3, 4, 5])),
            ("10.96.0.2", plan("small", &[6, 7])),
        ]),
        None,
        Hold::NONE,
        Instant::now(),
    );
    assert_eq!((report.written, report.errors.len()), (1, 1));
    assert_eq!(live(&maps, "10.96.0.2").1.iter().flatten().count(), 2);
    // The new service that does not fit has an entry with no slots: the kernel
    // refuses its connects instead of letting them reach the bare VIP.
    let (value, slots) = live(&maps, "10.96.0.1");
    assert_eq!((value.slot_count, slots.len()), (0, 0));
    assert!(
        report.errors[0]
            .to_string()
            .contains("refused until it fits")
    );
}

#[test]
fn a_refused_service_gets_its_table_once_there_is_room() {
    let maps = FakeMaps::new(16, 5);
    let mut applier = Applier::new(maps.maps());
    let t0 = Instant::now();
    applier.apply(
        &desired(&[("10.96.0.1", plan("a", &[1, 2, 3]))]),
        None,
        Hold::NONE,
        t0,
    );
    let both = desired(&[
        ("10.96.0.1", plan("a", &[1, 2, 3])),
        ("10.96.0.2", plan("c", &[4, 5, 6])),
    ]);
    assert_eq!(applier.apply(&both, None, Hold::NONE, t0).errors.len(), 1);
    assert_eq!(live(&maps, "10.96.0.2").0.slot_count, 0);
    // a goes away; its table is freed after the grace period, then c fits.
    let only_c = desired(&[("10.96.0.2", plan("c", &[4, 5, 6]))]);
    assert_eq!(
        applier
            .apply(&only_c, None, Hold::NONE, t0 + ms(1))
            .errors
            .len(),
        1,
        "a's table is still held"
    );
    applier.collect_garbage(t0 + ms(1) + GRACE);
    let report = applier.apply(&only_c, None, Hold::NONE, t0 + ms(2) + GRACE);
    assert_eq!((report.written, report.errors.len()), (1, 0));
    let (value, slots) = live(&maps, "10.96.0.2");
    assert_eq!((value.revision, slots.iter().flatten().count()), (1, 3));
}

#[test]
fn new_backends_beyond_the_counters_capacity_are_not_admitted() {
    let maps = FakeMaps::with_backends(16, 64, 2);
    let mut applier = Applier::new(maps.maps());
    let report = applier.apply(
        &desired(&[("10.96.0.1", plan("a", &[1, 2, 3]))]),
        None,
        Hold::NONE,
        Instant::now(),
    );
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.errors[0].reason(), "backends_full");
    assert_eq!(maps.slots.state().inserts, 0);
    assert_eq!(
        live(&maps, "10.96.0.1").0.slot_count,
        0,
        "refused, not bare"
    );
}

#[test]
fn a_full_service_map_is_reported_by_name() {
    let maps = FakeMaps::new(1, 64);
    let mut applier = Applier::new(maps.maps());
    let report = applier.apply(
        &desired(&[
            ("10.96.0.1", plan("a", &[1])),
            ("10.96.0.2", plan("b", &[2])),
        ]),
        None,
        Hold::NONE,
        Instant::now(),
    );
    assert_eq!((report.written, report.errors.len()), (1, 1));
    assert_eq!(report.errors[0].reason(), "services_full");
    assert!(report.errors[0].to_string().contains("prod/b"));
}

#[test]
fn tables_held_from_the_start_stay_until_the_source_can_say_what_replaces_them() {
    let maps = FakeMaps::new(16, 64);
    let t0 = Instant::now();
    Applier::new(maps.maps()).apply(
        &desired(&[
            ("10.96.0.1", plan("a", &[1, 2])),
            ("10.96.0.2", plan("b", &[3])),
        ]),
        None,
        Hold::NONE,
        t0,
    );
    let (a, b) = (table(&maps, "10.96.0.1"), table(&maps, "10.96.0.2"));
    let mut restarted = Applier::new(maps.maps());
    restarted.adopt(t0);
    // a's VirtualService was never accepted (its plan is even balancing, which
    // differs), and b's objects are unreadable (absent from the desired state).
    let undecided = BTreeSet::from([addr("10.96.0.1")]);
    let hold = Hold {
        undecided: &undecided,
        absent: true,
    };
    let even_a = desired(&[("10.96.0.1", plan("a", &[1, 2, 3]))]);
    let report = restarted.apply(&even_a, None, hold, t0);
    assert_eq!((report.held, report.written, report.removed), (2, 0, 0));
    assert_eq!(
        (table(&maps, "10.96.0.1"), table(&maps, "10.96.0.2")),
        (a, b)
    );

    // Once the source is whole, the desired state applies.
    let report = restarted.apply(&even_a, None, Hold::NONE, t0);
    assert_eq!((report.held, report.written, report.removed), (0, 1, 1));
    // A table this agent wrote itself is never held.
    let report = restarted.apply(&desired(&[("10.96.0.1", plan("a", &[1]))]), None, hold, t0);
    assert_eq!((report.held, report.written), (0, 1));
}

#[test]
fn session_affinity_members_follow_the_live_table_and_the_timeout_needs_no_rewrite() {
    let maps = FakeMaps::new(16, 64);
    let mut applier = Applier::new(maps.maps());
    let t0 = Instant::now();
    let sticky = |backends: &[u8], timeout| ServicePlan {
        affinity_timeout_s: Some(timeout),
        ..plan("web", backends)
    };
    // (service id, last address byte) -> timeout, as the kernel map holds them.
    let members = || -> BTreeMap<(u32, u8), u32> {
        maps.affinity_match
            .state()
            .entries
            .iter()
            .map(|(k, t)| ((k.service_id, u32::from_be(k.addr[0]).to_be_bytes()[3]), *t))
            .collect()
    };
    let report = applier.apply(
        &desired(&[("10.96.0.1", sticky(&[1, 2], 60))]),
        None,
        Hold::NONE,
        t0,
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let (value, _) = live(&maps, "10.96.0.1");
    assert_eq!(
        value.flags & mesh_common::SERVICE_FLAG_AFFINITY,
        mesh_common::SERVICE_FLAG_AFFINITY
    );
    let id = value.service_id;
    assert_eq!(members(), BTreeMap::from([((id, 1), 60), ((id, 2), 60)]));

    // Another timeout: the members' values change, the table is not rewritten.
    let report = applier.apply(
        &desired(&[("10.96.0.1", sticky(&[1, 2], 5))]),
        None,
        Hold::NONE,
        t0,
    );
    assert_eq!((report.written, report.unchanged), (0, 1));
    assert_eq!(members(), BTreeMap::from([((id, 1), 5), ((id, 2), 5)]));

    // A backend leaves: it is no member any more (its clients draw again).
    applier.apply(
        &desired(&[("10.96.0.1", sticky(&[2], 5))]),
        None,
        Hold::NONE,
        t0,
    );
    assert_eq!(members(), BTreeMap::from([((id, 2), 5)]));

    // Affinity off, then the service gone: nothing left.
    applier.apply(
        &desired(&[("10.96.0.1", plan("web", &[2]))]),
        None,
        Hold::NONE,
        t0,
    );
    assert_eq!(members(), BTreeMap::new());
    assert_eq!(live(&maps, "10.96.0.1").0.flags, 0);
    applier.apply(
        &desired(&[("10.96.0.1", sticky(&[2], 5))]),
        None,
        Hold::NONE,
        t0,
    );
    applier.apply(&BTreeMap::new(), None, Hold::NONE, t0);
    assert_eq!(members(), BTreeMap::new());
}

#[test]
fn a_restarted_applier_adopts_affinity_members_and_drops_the_stale_ones() {
    let maps = FakeMaps::new(16, 64);
    let t0 = Instant::now();
    let sticky = |backends: &[u8]| ServicePlan {
        affinity_timeout_s: Some(30),
        ..plan("web", backends)
    };
    Applier::new(maps.maps()).apply(
        &desired(&[("10.96.0.1", sticky(&[1, 2]))]),
        None,
        Hold::NONE,
        t0,
    );
    let mut next = Applier::new(maps.maps());
    next.adopt(t0);
    let report = next.apply(
        &desired(&[("10.96.0.1", sticky(&[1]))]),
        None,
        Hold::NONE,
        t0,
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(maps.affinity_match.state().entries.len(), 1);
}

/// A port whose two destinations have tables of their own: the port's table
/// picks destination 0 three times in four.
fn picking(vip: &str) -> BTreeMap<ServiceAddr, ServicePlan> {
    let own = ServicePlan {
        slots: std::sync::Arc::new([]),
        to_destinations: vec![0, 0, 0, 1],
        ..plan("web", &[])
    };
    BTreeMap::from([
        (addr(vip), own),
        (addr(vip).destination(0), plan("web", &[1, 2])),
        (addr(vip).destination(1), plan("web", &[3])),
    ])
}

#[test]
fn a_port_that_picks_destinations_names_their_tables_and_a_restart_adopts_all_three() {
    let maps = FakeMaps::new(16, 64);
    let mut applier = Applier::new(maps.maps());
    let t0 = Instant::now();
    let report = applier.apply(&picking("10.96.0.1"), None, Hold::NONE, t0);
    assert_eq!((report.written, report.errors.len()), (3, 0));
    let services = maps.services.state().entries.clone();
    let port = services[&service_key(addr("10.96.0.1"))];
    assert_eq!(port.slot_count, 4);
    assert_ne!(port.flags & mesh_common::SERVICE_FLAG_DESTINATIONS, 0);
    let slots = maps.slots.state().entries.clone();
    let picks: Vec<Option<u8>> = (0..4)
        .map(|slot| {
            let key = SlotKey {
                service_id: port.service_id,
                revision: port.revision,
                slot,
            };
            slots
                .get(&key)
                .and_then(crate::kernel::codec::slot_destination)
        })
        .collect();
    assert_eq!(picks, [Some(0), Some(0), Some(0), Some(1)]);
    // What the kernel reads for destination 1: its own table, by the key
    // the port's own key and the index make.
    let port_key = service_key(addr("10.96.0.1"));
    let second = services[&mesh_common::destination_key(&port_key, 1)];
    assert_eq!(second.slot_count, 1);
    assert_ne!(second.service_id, port.service_id);

    // A restarted agent adopts the three tables and rewrites none.
    let mut restarted = Applier::new(maps.maps());
    assert_eq!(restarted.adopt(t0 + ms(5)).services, 3);
    let report = restarted.apply(&picking("10.96.0.1"), None, Hold::NONE, t0 + ms(6));
    assert_eq!((report.written, report.unchanged), (0, 3));

    // Back to one table: the destinations' tables go, their slots after the
    // grace period.
    let one = desired(&[("10.96.0.1", plan("web", &[1, 2, 3]))]);
    let report = restarted.apply(&one, None, Hold::NONE, t0 + ms(7));
    assert_eq!((report.written, report.removed), (1, 2));
    assert_eq!(maps.services.state().entries.len(), 1);
    restarted.collect_garbage(t0 + ms(7) + GRACE);
    let (value, table) = live(&maps, "10.96.0.1");
    assert_eq!(
        revisions(&maps),
        BTreeSet::from([(value.service_id, value.revision)])
    );
    assert_eq!(table.iter().flatten().count(), 3);
}

/// One step of [`bookkeeping_kept_by_change_is_the_whole_sweeps`]: the
/// desired tables (vip host part, backends' host parts), a slot write that
/// fails after so many, and the time until the next collection.
type Step = (Vec<(u8, Vec<u8>)>, Option<usize>, u64);

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::{collection::vec, option};
    (
        vec((1u8..5, vec(1u8..7, 0..4)), 0..4),
        option::weighted(0.2, 0usize..3),
        0u64..1500,
    )
}

proptest::proptest! {
    /// What the applier keeps by change (which backends a table names, the
    /// live service ids, the metrics' view) is what a sweep over the whole
    /// state makes, through writes that fail, tables that do not fit
    /// (three service ports, 12 slots) and collections at any time.
    #[test]
    fn bookkeeping_kept_by_change_is_the_whole_sweeps(
        steps in proptest::collection::vec(step(), 1..25),
    ) {
        let maps = FakeMaps::new(3, 12);
        let mut applier = Applier::new(maps.maps());
        let mut view = applier.view();
        let mut now = Instant::now();
        for (tables, fail_after, wait) in steps {
            let wanted: BTreeMap<ServiceAddr, ServicePlan> = tables
                .iter()
                .map(|(vip, backends)| {
                    (addr(&format!("10.96.0.{vip}")), plan(&format!("s{vip}"), backends))
                })
                .collect();
            maps.slots.state().fail_after = fail_after;
            applier.apply(&wanted, None, Hold::NONE, now);
            maps.slots.state().fail_after = None;
            now += ms(wait);
            applier.collect_garbage(now);

            applier.refresh_view(&mut view);
            proptest::prop_assert_eq!(&view, &applier.view());
            let live_ids: BTreeSet<u32> = applier.live.values().map(|l| l.service_id).collect();
            proptest::prop_assert_eq!(&applier.live_ids, &live_ids);
            // Every backend some table names has its id, counted once per
            // slot naming it; after a collection no other does.
            let mut named: BTreeMap<(BackendAddr, Proto), u32> = BTreeMap::new();
            for (b, proto) in applier
                .live
                .iter()
                .flat_map(|(a, l)| l.slots.iter().flatten().map(move |b| (*b, a.proto)))
                .chain(
                    applier
                        .retired
                        .iter()
                        .flat_map(|r| r.slots.iter().flatten().map(move |b| (*b, r.proto))),
                )
            {
                *named.entry((b, proto)).or_default() += 1;
            }
            let with_ids: BTreeMap<(BackendAddr, Proto), u32> =
                applier.backends.iter().map(|(k, b)| (*k, b.refs)).collect();
            proptest::prop_assert_eq!(with_ids, named);
        }
    }
}
