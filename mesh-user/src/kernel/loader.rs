//! Loads the kernel object with its maps pinned in our bpffs directory (adopting
//! the ones a previous agent left), and attaches its programs to a cgroup v2
//! through pinned links: attached once, swapped in place (`BPF_LINK_UPDATE`) when
//! an upgrade brings other code, left alone when the code is the same.

use std::{
    fs::File,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuHashMap, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, ProgramInfo, SchedClassifier, SkMsg, SockOps,
        TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{NlOptions, TcAttachOptions},
    },
};
use mesh_common::{
    Backend, BackendStats, ConnKey, GatewayVip, MaglevKey, ServiceKey, map_names, program_names,
};
use tracing::{info, warn};

use super::{
    carry::Carry,
    counters::SockStats,
    maps::{Capacity, Counter, Maps, PerCpuCounters},
    pin::{MapSpec, PinDir, PinError},
    sys,
};

/// The kernel object, built by `build.rs` (aya-build) from `mesh-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// cgroup2's filesystem magic (`CGROUP2_SUPER_MAGIC`).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a cgroup v2 directory (on hybrid systems cgroup2 is often at /sys/fs/cgroup/unified)"
    )]
    NotCgroup2 { path: PathBuf },
    #[error("loading the kernel object failed (needs root or CAP_BPF + CAP_NET_ADMIN): {0}")]
    Object(#[from] aya::EbpfError),
    #[error("kernel object has no program {0} (built from another version?)")]
    MissingProgram(&'static str),
    #[error("kernel object has no map {0} (built from another version?)")]
    MissingMap(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("reading the kernel object: {0}")]
    Parse(#[from] aya_obj::ParseError),
    #[error("reading {path}: {source}")]
    ObjectFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("link of {name} at {path}: {source}")]
    Link {
        name: &'static str,
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The loaded object and where it is pinned.
pub struct Loaded {
    ebpf: Ebpf,
    pins: PinDir,
    /// Replaced maps whose entries go over to their successors around the swap.
    carry: Option<Carry>,
}

impl Loaded {
    /// Names the agent's cgroup to the connect hooks (`AGENT_CGROUP_V1`), which
    /// then leave its connects alone.
    pub fn set_agent_cgroup(&mut self, id: u64) -> Result<(), LoadError> {
        self.set_first(map_names::AGENT_CGROUP, id)
    }

    /// Says which sockets are meshed (`MESH_SCOPE_V1`), before the programs
    /// are attached.
    pub fn set_mesh_scope(&mut self, scope: mesh_common::MeshScope) -> Result<(), LoadError> {
        self.set_first(map_names::MESH_SCOPE, scope)
    }

    /// Names the node's network namespace (its cookie) to the gateway's
    /// connect hooks (`GATEWAY_NETNS_V1`); 0 turns them off.
    pub fn set_gateway_netns(&mut self, cookie: u64) -> Result<(), LoadError> {
        self.set_first(map_names::GATEWAY_NETNS, cookie)
    }

    /// Names the router's socket mark to its sockops (`ROUTER_MARK_V1`); 0
    /// adds none of the agent's sockets.
    pub fn set_router_mark(&mut self, mark: u32) -> Result<(), LoadError> {
        self.set_first(map_names::ROUTER_MARK, mark)
    }

    /// `MESHED_PODS_V1`, for its only writer ([`super::scope::PodScope`]).
    pub fn take_meshed_pods(&mut self) -> Result<HashMap<MapData, u64, u32>, LoadError> {
        take(&mut self.ebpf, map_names::MESHED_PODS)
    }

    // --- gateway-tc: the gateway for clients outside the node ---

    /// `GATEWAY_VIPS_V1` and `MAGLEV_V1`, for their only writer
    /// ([`super::ingress::Outside`]).
    #[allow(clippy::type_complexity, reason = "two map types, named once")]
    pub fn take_gateway_maps(
        &mut self,
    ) -> Result<
        (
            HashMap<MapData, ServiceKey, GatewayVip>,
            HashMap<MapData, MaglevKey, Backend>,
        ),
        LoadError,
    > {
        Ok((
            take(&mut self.ebpf, map_names::GATEWAY_VIPS)?,
            take(&mut self.ebpf, map_names::MAGLEV)?,
        ))
    }

    /// Sets entry 0 of a one-entry array map.
    fn set_first<T: aya::Pod>(&mut self, name: &'static str, value: T) -> Result<(), LoadError> {
        let map = self.ebpf.map_mut(name).ok_or(LoadError::MissingMap(name))?;
        let mut array = aya::maps::Array::<_, T>::try_from(map)
            .map_err(|source| LoadError::Map { name, source })?;
        array
            .set(0, value, 0)
            .map_err(|source| LoadError::Map { name, source })
    }
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("pins", &self.pins)
            .finish_non_exhaustive()
    }
}

/// In the order they are swapped: each family's connect, then at once its
/// getpeername. A new connect writes `REVNAT` records the old getpeername of that
/// family cannot read (when `REVNAT` is replaced): one swap apart, that window is
/// as short as it gets (see `carry`).
const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    program_names::CONNECT4,
    program_names::GETPEERNAME4,
    program_names::CONNECT6,
    program_names::GETPEERNAME6,
];

/// The gateway's connect hooks, attached to the gateway's cgroup (with the
/// getpeername hooks when that is not the mesh's cgroup).
const GATEWAY_PROGRAMS: [&str; 2] = [
    program_names::GATEWAY_CONNECT4,
    program_names::GATEWAY_CONNECT6,
];

/// gateway-tc: the gateway devices' programs and where each goes.
const TC_PROGRAMS: [(&str, TcAttachType); 2] = [
    (program_names::GATEWAY_INGRESS, TcAttachType::Ingress),
    (program_names::GATEWAY_EGRESS, TcAttachType::Egress),
];

/// What became of one program's attachment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Linked {
    /// First attach: a new pinned link.
    Attached,
    /// The pinned link already runs this very code on these very maps.
    Unchanged,
    /// The pinned link now runs the new code (program tags, as hex).
    Swapped { from: u64, to: u64 },
    /// Detached (`--no-redirect` after a run with it).
    Detached,
}

/// `--map-capacity`: `max_entries` of some maps, instead of the object's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapCapacities(pub std::collections::BTreeMap<&'static str, u32>);

/// The maps whose capacity can be set: the hash maps (arrays are indexed by
/// counter, the socket map and the others by what the kernel holds).
pub const SIZABLE_MAPS: [&str; 10] = [
    map_names::SERVICES,
    map_names::SLOTS,
    map_names::REVNAT,
    map_names::BACKEND_STATS,
    map_names::SERVICE_STATS,
    map_names::SOCKETS,
    map_names::SOCK_CONN,
    map_names::REDIRECT_EXCLUDED,
    map_names::AFFINITY,
    map_names::AFFINITY_MATCH,
];

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapCapacityError {
    #[error("--map-capacity {0:?}: expected NAME=ENTRIES, e.g. SLOTS_V1=4194304")]
    Syntax(String),
    #[error("--map-capacity: {0:?} is not a map whose capacity can be set ({list})", list = SIZABLE_MAPS.join(", "))]
    UnknownMap(String),
    #[error("--map-capacity {name}: {entries:?} is not a number of entries (1 or more)")]
    Entries { name: String, entries: String },
}

impl std::str::FromStr for MapCapacities {
    type Err = MapCapacityError;

    /// `NAME=N[,NAME=N...]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = std::collections::BTreeMap::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (name, entries) = item
                .split_once('=')
                .ok_or_else(|| MapCapacityError::Syntax(item.to_owned()))?;
            let name = SIZABLE_MAPS
                .iter()
                .find(|m| **m == name.trim())
                .ok_or_else(|| MapCapacityError::UnknownMap(name.to_owned()))?;
            let n = entries
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| MapCapacityError::Entries {
                    name: (*name).to_owned(),
                    entries: entries.to_owned(),
                })?;
            out.insert(*name, n);
        }
        Ok(Self(out))
    }
}

/// The object: the embedded one, or `path` (an upgrade staged by hand, or a test).
pub fn object_bytes(path: Option<&Path>) -> Result<std::borrow::Cow<'static, [u8]>, LoadError> {
    match path {
        None => Ok(std::borrow::Cow::Borrowed(EBPF_OBJECT)),
        Some(path) => std::fs::read(path)
            .map(std::borrow::Cow::Owned)
            .map_err(|source| LoadError::ObjectFile {
                path: path.to_owned(),
                source,
            }),
    }
}

/// The layout the object declares for each of our maps.
pub fn map_specs(object: &[u8]) -> Result<Vec<(&'static str, MapSpec)>, LoadError> {
    let obj = aya_obj::Object::parse(object)?;
    map_names::ALL
        .iter()
        .map(|&name| {
            let map = obj.maps.get(name).ok_or(LoadError::MissingMap(name))?;
            Ok((
                name,
                MapSpec {
                    map_type: map.map_type(),
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries: map.max_entries(),
                    flags: map.map_flags(),
                },
            ))
        })
        .collect()
}

/// Loads the object with every map pinned under `pins` (adopting pinned maps of
/// the same layout, replacing the others) and loads its programs; attaches
/// nothing yet (see [`attach`]): the agent fills the maps first.
pub fn load(
    pins: &PinDir,
    object: &[u8],
    capacities: &MapCapacities,
) -> Result<(Loaded, Maps, SockStats), LoadError> {
    pins.prepare()?;
    let mut specs = map_specs(object)?;
    for (name, spec) in &mut specs {
        if let Some(&n) = capacities.0.get(name) {
            spec.max_entries = n;
        }
    }
    // A pinned map of another capacity is replaced, as one of another layout;
    // the entries only the kernel writes are carried over (see `carry`).
    let mut carry = Carry::open(pins, &specs);
    pins.drop_mismatched_maps(&specs);
    let capacity = |name: &str| {
        specs
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, spec)| spec.max_entries)
    };
    let capacity = Capacity {
        services: capacity(map_names::SERVICES).min(capacity(map_names::SERVICE_STATS)),
        slots: capacity(map_names::SLOTS),
        backends: capacity(map_names::BACKEND_STATS),
        redirect_excluded: capacity(map_names::REDIRECT_EXCLUDED),
    };
    let mut loader = EbpfLoader::new();
    for name in map_names::ALL {
        loader.map_pin_path(name, pins.map(name));
    }
    for (name, &n) in &capacities.0 {
        loader.map_max_entries(name, n);
    }
    let mut ebpf = loader.load(object)?;
    carry.at_load(pins);
    for name in SOCK_ADDR_PROGRAMS.into_iter().chain(GATEWAY_PROGRAMS) {
        load_program::<CgroupSockAddr>(&mut ebpf, name)?;
    }
    for name in [program_names::SOCKOPS, program_names::ROUTER_SOCKOPS] {
        load_program::<SockOps>(&mut ebpf, name)?;
    }
    // gateway-tc: the gateway devices' programs (attached by `attach_devices`).
    for name in TC_PROGRAMS.map(|(name, _)| name) {
        load_program::<SchedClassifier>(&mut ebpf, name)?;
    }
    load_program::<SkMsg>(&mut ebpf, program_names::SK_MSG)?;
    let maps = Maps {
        capacity,
        services: Box::new(take::<HashMap<_, _, _>>(&mut ebpf, map_names::SERVICES)?),
        slots: Box::new(take::<HashMap<_, _, _>>(&mut ebpf, map_names::SLOTS)?),
        service_stats: Box::new(counters::<u64>(&mut ebpf, map_names::SERVICE_STATS)?),
        backend_stats: Box::new(counters::<BackendStats>(
            &mut ebpf,
            map_names::BACKEND_STATS,
        )?),
        redirect_excluded: Box::new(take::<HashMap<_, _, _>>(
            &mut ebpf,
            map_names::REDIRECT_EXCLUDED,
        )?),
        affinity_match: Box::new(take::<HashMap<_, _, _>>(
            &mut ebpf,
            map_names::AFFINITY_MATCH,
        )?),
        socket_policy: Box::new(take::<HashMap<_, _, _>>(
            &mut ebpf,
            map_names::SOCKET_POLICY,
        )?),
    };
    let sock_stats = SockStats::new(
        take(&mut ebpf, map_names::SOCK_STATS)?,
        take(&mut ebpf, map_names::SOCKETS)?,
        aya::maps::MapInfo::from_pin(pins.map(map_names::SOCKETS)).map_err(|source| {
            LoadError::Map {
                name: map_names::SOCKETS,
                source,
            }
        })?,
    );
    Ok((
        Loaded {
            ebpf,
            pins: pins.clone(),
            carry: Some(carry),
        },
        maps,
        sock_stats,
    ))
}

/// Attaches (or adopts, or swaps) every program on `cgroup`; with `redirect`,
/// also `sockops` there and `sk_msg` on the socket map; with `gateway`, the
/// gateway's connect hooks on that cgroup (and getpeername there too when it is
/// another one); with `router` (the agent's own cgroup) and `redirect`, the
/// router's sockops there. Then unpins what the previous agent attached
/// elsewhere and maps of older layouts.
pub fn attach(
    loaded: &mut Loaded,
    cgroup: &Path,
    redirect: bool,
    sockets: &SockHash<MapData, ConnKey>,
    gateway: Option<&Path>,
    router: Option<&Path>,
) -> Result<Vec<(&'static str, Linked)>, LoadError> {
    let fd = open_cgroup2(cgroup)?;
    let links = loaded.pins.cgroup_links(super::pin::inode(cgroup)?);
    make_dir(&links)?;
    let mut report = Vec::new();
    // sk_msg first: a socket takes the map's programs when it is added, so one
    // added before would never be redirected. BPF_PROG_ATTACH on a map replaces
    // the program it had (the map holds it, not us: it outlives the agent).
    if redirect {
        let name = program_names::SK_MSG;
        let sk_msg = program::<SkMsg>(&mut loaded.ebpf, name)?;
        let id = sk_msg
            .attach(sockets.fd())
            .map_err(|source| LoadError::Program { name, source })?;
        let link = sk_msg
            .take_link(id)
            .map_err(|source| LoadError::Program { name, source })?;
        // Dropping the link would detach the program from the map.
        std::mem::forget(link);
    }
    // The gateway's cgroup: the mesh's own, or another one (then its links
    // live apart, and it needs getpeername too).
    let gateway = gateway
        .map(|path| other_cgroup(loaded, path, &links))
        .transpose()?;
    // A replaced REVNAT is copied just before the connect and getpeername
    // programs are swapped, and again just after (see `carry`).
    if let Some(carry) = &loaded.carry {
        carry.before_swap(&loaded.pins);
    }
    for name in SOCK_ADDR_PROGRAMS {
        let linked = attach_linked::<CgroupSockAddr>(loaded, name, &links, &fd)?;
        report.push((name, linked));
    }
    let mut keep = vec![links.clone()];
    match &gateway {
        Some((gw_links, gw_fd)) => {
            let peer = [program_names::GETPEERNAME4, program_names::GETPEERNAME6];
            let extra: &[&'static str] = if gw_fd.is_some() { &peer } else { &[] };
            for name in GATEWAY_PROGRAMS.iter().chain(extra) {
                let linked = attach_linked::<CgroupSockAddr>(
                    loaded,
                    name,
                    gw_links,
                    gw_fd.as_ref().unwrap_or(&fd),
                )?;
                report.push((name, linked));
            }
            if gw_fd.is_some() {
                keep.push(gw_links.clone());
                unpin(&links, &GATEWAY_PROGRAMS, &mut report)?;
            }
        }
        None => unpin(&links, &GATEWAY_PROGRAMS, &mut report)?,
    }
    if let Some(carry) = loaded.carry.take() {
        carry.after_swap(&loaded.pins);
    }
    let name = program_names::SOCKOPS;
    if redirect {
        let linked = attach_linked::<SockOps>(loaded, name, &links, &fd)?;
        report.push((name, linked));
    } else {
        unpin(&links, &[name], &mut report)?;
    }
    // The router's sockops, on the agent's own cgroup: only with the shortcut.
    let name = program_names::ROUTER_SOCKOPS;
    let router = match router.filter(|_| redirect) {
        Some(path) => {
            let (r_links, r_fd) = other_cgroup(loaded, path, &links)?;
            let linked =
                attach_linked::<SockOps>(loaded, name, &r_links, r_fd.as_ref().unwrap_or(&fd))?;
            report.push((name, linked));
            keep.push(r_links.clone());
            Some(r_links)
        }
        None => None,
    };
    // Never a second copy where the agent's cgroup used to be.
    for dir in keep.iter().filter(|d| Some(*d) != router.as_ref()) {
        unpin(dir, &[name], &mut report)?;
    }
    for stale in loaded.pins.unpin_other_cgroups(&keep) {
        info!(links = %stale.display(), "detached programs of a cgroup this agent no longer serves");
    }
    loaded.pins.remove_stray_maps(&map_names::ALL);
    Ok(report)
}

/// gateway-tc: attaches (or adopts, or swaps) the gateway's tc programs on
/// each of `devices`, ingress and egress, by TCX links pinned under
/// `links/tc-<device>/` (kernel 6.6+), so they outlive the agent; then unpins
/// those of devices no longer listed. Without TCX, falls back to a clsact
/// qdisc filter (not pinned: it stays until the qdisc goes; `cleanup` does
/// not remove it). Returns (device, program, what happened).
pub fn attach_devices(
    loaded: &mut Loaded,
    devices: &[String],
) -> Result<Vec<(String, &'static str, Linked)>, LoadError> {
    let mut report = Vec::new();
    let mut keep = Vec::new();
    for device in devices {
        let links = loaded.pins.device_links(device);
        make_dir(&links)?;
        keep.push(links.clone());
        for (name, attach_type) in TC_PROGRAMS {
            let program = program::<SchedClassifier>(&mut loaded.ebpf, name)?;
            let new_fd = program_fd(program.fd(), name)?;
            let info = program_info(program.info(), name)?;
            let path = links.join(name);
            let mut fallback = false;
            let linked = link_program(name, &path, info, new_fd.as_fd(), || {
                let err = |source| LoadError::Program { name, source };
                match program.attach_with_options(
                    device,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                ) {
                    Ok(id) => {
                        let link = program.take_link(id).map_err(err)?;
                        FdLink::try_from(link).map_err(|e| link_err(name, &path, e))
                    }
                    Err(tcx) => {
                        warn!(%device, program = name, "TCX attach failed ({tcx}); falling back to a clsact qdisc filter (not pinned)");
                        fallback = true;
                        let _ = aya::programs::tc::qdisc_add_clsact(device);
                        let id = program
                            .attach_with_options(
                                device,
                                attach_type,
                                TcAttachOptions::Netlink(NlOptions::default()),
                            )
                            .map_err(err)?;
                        let link = program.take_link(id).map_err(err)?;
                        // The filter stays attached when the agent exits.
                        std::mem::forget(link);
                        Err(LoadError::MissingProgram(
                            "(clsact fallback: nothing to pin)",
                        ))
                    }
                }
            });
            let linked = match linked {
                Err(LoadError::MissingProgram(_)) if fallback => Linked::Attached,
                other => other?,
            };
            report.push((device.clone(), name, linked));
        }
    }
    for stale in loaded.pins.unpin_other_devices(&keep) {
        info!(links = %stale.display(), "detached the gateway's tc programs from a device no longer listed");
    }
    Ok(report)
}

fn make_dir(dir: &Path) -> Result<(), LoadError> {
    std::fs::create_dir_all(dir).map_err(|source| {
        PinError::Io {
            path: dir.to_owned(),
            source,
        }
        .into()
    })
}

/// Unpins the links of `names` in `links` (which detaches those programs).
/// The links directory of a cgroup that may be the mesh's own (`links`): then
/// no descriptor (the mesh's serves); else its own, created, and one.
fn other_cgroup(
    loaded: &Loaded,
    path: &Path,
    links: &Path,
) -> Result<(PathBuf, Option<File>), LoadError> {
    let other = loaded.pins.cgroup_links(super::pin::inode(path)?);
    if other == links {
        return Ok((other, None));
    }
    make_dir(&other)?;
    let fd = open_cgroup2(path)?;
    Ok((other, Some(fd)))
}

fn unpin(
    links: &Path,
    names: &[&'static str],
    report: &mut Vec<(&'static str, Linked)>,
) -> Result<(), LoadError> {
    for &name in names {
        let path = links.join(name);
        if path.exists() {
            std::fs::remove_file(&path).map_err(|source| PinError::Io {
                path: path.clone(),
                source,
            })?;
            report.push((name, Linked::Detached));
        }
    }
    Ok(())
}

/// The kinds of program we load.
trait Load {
    fn load_program(&mut self) -> Result<(), aya::programs::ProgramError>;
}

macro_rules! load {
    ($($ty:ty),*) => {$(
        impl Load for $ty {
            fn load_program(&mut self) -> Result<(), aya::programs::ProgramError> {
                self.load()
            }
        }
    )*};
}
load!(CgroupSockAddr, SockOps, SkMsg, SchedClassifier);

fn load_program<P: Load>(ebpf: &mut Ebpf, name: &'static str) -> Result<(), LoadError>
where
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    program::<P>(ebpf, name)?
        .load_program()
        .map_err(|source| LoadError::Program { name, source })
}

/// The two kinds of cgroup program we attach with a link.
trait CgroupLinked {
    fn attach_link(&mut self, cgroup: &File, name: &'static str) -> Result<FdLink, LoadError>;
    fn loaded_fd(&self) -> Result<&aya::programs::ProgramFd, aya::programs::ProgramError>;
    fn loaded_info(&self) -> Result<ProgramInfo, aya::programs::ProgramError>;
}

macro_rules! cgroup_linked {
    ($($ty:ty),*) => {$(
        impl CgroupLinked for $ty {
            fn attach_link(&mut self, cgroup: &File, name: &'static str) -> Result<FdLink, LoadError> {
                let err = |source| LoadError::Program { name, source };
                let id = self.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
                let link = self.take_link(id).map_err(err)?;
                FdLink::try_from(link).map_err(|e| link_err(name, Path::new("(new link)"), e))
            }
            fn loaded_fd(&self) -> Result<&aya::programs::ProgramFd, aya::programs::ProgramError> {
                self.fd()
            }
            fn loaded_info(&self) -> Result<ProgramInfo, aya::programs::ProgramError> {
                self.info()
            }
        }
    )*};
}
cgroup_linked!(CgroupSockAddr, SockOps);

/// [`link_program`] for program `name` of the loaded object, on `cgroup`.
fn attach_linked<P>(
    loaded: &mut Loaded,
    name: &'static str,
    links: &Path,
    cgroup: &File,
) -> Result<Linked, LoadError>
where
    P: CgroupLinked,
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = program::<P>(&mut loaded.ebpf, name)?;
    let new_fd = program_fd(program.loaded_fd(), name)?;
    let info = program_info(program.loaded_info(), name)?;
    link_program(name, &links.join(name), info, new_fd.as_fd(), || {
        program.attach_link(cgroup, name)
    })
}

fn link_err(
    name: &'static str,
    path: &Path,
    e: impl std::error::Error + Send + Sync + 'static,
) -> LoadError {
    LoadError::Link {
        name,
        path: path.to_owned(),
        source: Box::new(e),
    }
}

/// An owned copy of a loaded program's descriptor (for the swap, while the
/// program itself is borrowed to attach).
fn program_fd(
    fd: Result<&aya::programs::ProgramFd, aya::programs::ProgramError>,
    name: &'static str,
) -> Result<aya::programs::ProgramFd, LoadError> {
    fd.map_err(|source| LoadError::Program { name, source })?
        .try_clone()
        .map_err(|e| LoadError::Program {
            name,
            source: aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                call: "dup",
                io_error: e,
            }),
        })
}

fn program_info(
    info: Result<ProgramInfo, aya::programs::ProgramError>,
    name: &'static str,
) -> Result<ProgramInfo, LoadError> {
    info.map_err(|source| LoadError::Program { name, source })
}

/// Makes the pinned link at `path` run `new`: adopts it as is when it already
/// runs the same code on the same maps, swaps the program in place otherwise, and
/// attaches (then pins) a new link when there is none.
fn link_program(
    name: &'static str,
    path: &Path,
    new: ProgramInfo,
    new_fd: std::os::fd::BorrowedFd<'_>,
    attach_new: impl FnOnce() -> Result<FdLink, LoadError>,
) -> Result<Linked, LoadError> {
    if path.exists() {
        match PinnedLink::from_pin(path) {
            Ok(pinned) => {
                let link = FdLink::from(pinned);
                let old_id = link
                    .info()
                    .map_err(|e| link_err(name, path, e))?
                    .program_id();
                let old = aya::programs::loaded_programs()
                    .flatten()
                    .find(|p| p.id() == old_id);
                let same = old.as_ref().is_some_and(|old| {
                    old.tag() == new.tag()
                        && old.map_ids().ok().flatten() == new.map_ids().ok().flatten()
                });
                if same {
                    return Ok(Linked::Unchanged);
                }
                drop(link);
                let link_fd = sys::obj_get(path).map_err(|e| link_err(name, path, e))?;
                sys::link_update(link_fd.as_fd(), new_fd).map_err(|e| link_err(name, path, e))?;
                return Ok(Linked::Swapped {
                    from: old.map_or(0, |o| o.tag()),
                    to: new.tag(),
                });
            }
            Err(e) => {
                warn!(
                    program = name,
                    "pinned link unreadable ({e}); attaching anew"
                );
                std::fs::remove_file(path).map_err(|source| PinError::Io {
                    path: path.to_owned(),
                    source,
                })?;
            }
        }
    }
    let link = attach_new()?;
    link.pin(path).map_err(|e| link_err(name, path, e))?;
    Ok(Linked::Attached)
}

fn open_cgroup2(cgroup: &Path) -> Result<File, LoadError> {
    let fd = File::open(cgroup).map_err(|source| LoadError::Cgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    let fs = nix::sys::statfs::fstatfs(&fd).map_err(|e| LoadError::Cgroup {
        path: cgroup.to_owned(),
        source: e.into(),
    })?;
    if fs.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
        return Err(LoadError::NotCgroup2 {
            path: cgroup.to_owned(),
        });
    }
    Ok(fd)
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, LoadError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })
}

fn counters<T: Counter>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<PerCpuCounters<T>, LoadError> {
    Ok(PerCpuCounters::new(take::<PerCpuHashMap<MapData, u32, T>>(
        ebpf, name,
    )?))
}

fn take<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, LoadError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    M::try_from(map).map_err(|source| LoadError::Map { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_capacities_parse_and_name_what_is_wrong() {
        let parsed: Result<MapCapacities, _> = "SLOTS_V1=64, SERVICES_V1=8".parse();
        assert_eq!(
            parsed.map(|c| c.0.into_iter().collect::<Vec<_>>()),
            Ok(vec![("SERVICES_V1", 8), ("SLOTS_V1", 64)])
        );
        assert_eq!(
            "GLOBAL_STATS_V1=4".parse::<MapCapacities>(),
            Err(MapCapacityError::UnknownMap("GLOBAL_STATS_V1".into()))
        );
        assert!(matches!(
            "SLOTS_V1=0".parse::<MapCapacities>(),
            Err(MapCapacityError::Entries { .. })
        ));
        assert!(matches!(
            "SLOTS_V1".parse::<MapCapacities>(),
            Err(MapCapacityError::Syntax(_))
        ));
    }
}
