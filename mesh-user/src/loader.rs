//! Loads the embedded kernel object and attaches its programs to a cgroup v2.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, SkMsg, SockOps},
};
use mesh_common::{
    Backend, BackendStats, EndpointKey, ServiceKey, ServiceValue, SlotKey, SockKey, map_names,
    program_names,
};

use crate::counters::SockStats;

/// The kernel object, built by `build.rs` (aya-build) from `mesh-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

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
}

/// Handles to the maps the agent writes and reads.
pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub slots: HashMap<MapData, SlotKey, Backend>,
    pub backend_stats: PerCpuHashMap<MapData, u32, BackendStats>,
    pub global_stats: PerCpuArray<MapData, u64>,
    pub redirect_excluded: HashMap<MapData, EndpointKey, u32>,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maps").finish_non_exhaustive()
    }
}

/// The loaded object. Dropping it detaches the programs (links are owned here).
pub struct Loaded {
    pub ebpf: Ebpf,
    pub cgroup: PathBuf,
    pub redirect: bool,
}

const PROGRAMS: [&str; 4] = [
    program_names::CONNECT4,
    program_names::CONNECT6,
    program_names::GETPEERNAME4,
    program_names::GETPEERNAME6,
];

/// Loads the programs and attaches them to the cgroup v2 at `cgroup` (and so to
/// every process in it and below it); with `redirect`, also the same-node socket
/// redirection (`sockops` on the cgroup, `sk_msg` on the socket map). Returns the
/// object and its maps.
pub fn load_and_attach(
    cgroup: &Path,
    redirect: bool,
) -> Result<(Loaded, Maps, SockStats), LoadError> {
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
    let mut ebpf = Ebpf::load(EBPF_OBJECT)?;
    for name in PROGRAMS {
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram(name))?
            .try_into()
            .map_err(|source| LoadError::Program { name, source })?;
        program
            .load()
            .map_err(|source| LoadError::Program { name, source })?;
        // On kernels with bpf_link (5.7+) aya attaches through a link, which always
        // coexists with other programs on the cgroup; the mode must then be the
        // default (flags 0), or link_create answers EINVAL.
        program
            .attach(&fd, CgroupAttachMode::Single)
            .map_err(|source| LoadError::Program { name, source })?;
    }
    let maps = Maps {
        services: take(&mut ebpf, map_names::SERVICES)?,
        slots: take(&mut ebpf, map_names::SLOTS)?,
        backend_stats: take(&mut ebpf, map_names::BACKEND_STATS)?,
        global_stats: take(&mut ebpf, map_names::GLOBAL_STATS)?,
        redirect_excluded: take(&mut ebpf, map_names::REDIRECT_EXCLUDED)?,
    };
    let stats = take(&mut ebpf, map_names::SOCK_STATS)?;
    let sockets = if redirect {
        Some(attach_redirect(&mut ebpf, &fd)?)
    } else {
        None
    };
    // The collector holds the socket map (and so keeps sk_msg's map alive).
    let sock_stats = SockStats::new(stats, sockets);
    Ok((
        Loaded {
            ebpf,
            cgroup: cgroup.to_owned(),
            redirect,
        },
        maps,
        sock_stats,
    ))
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("cgroup", &self.cgroup)
            .field("redirect", &self.redirect)
            .finish_non_exhaustive()
    }
}

/// `sk_msg` goes on the map first: a socket takes the map's programs when it is
/// added, so one added before would never be redirected.
fn attach_redirect(
    ebpf: &mut Ebpf,
    cgroup: &File,
) -> Result<SockHash<MapData, SockKey>, LoadError> {
    let sockets: SockHash<MapData, SockKey> = take(ebpf, map_names::SOCKETS)?;
    let name = program_names::SK_MSG;
    let sk_msg: &mut SkMsg = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })?;
    sk_msg
        .load()
        .map_err(|source| LoadError::Program { name, source })?;
    sk_msg
        .attach(sockets.fd())
        .map_err(|source| LoadError::Program { name, source })?;
    let name = program_names::SOCKOPS;
    let sockops: &mut SockOps = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })?;
    sockops
        .load()
        .map_err(|source| LoadError::Program { name, source })?;
    sockops
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(|source| LoadError::Program { name, source })?;
    Ok(sockets)
}

fn take<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, LoadError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    M::try_from(map).map_err(|source| LoadError::Map { name, source })
}
