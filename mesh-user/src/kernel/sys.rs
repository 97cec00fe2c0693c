//! The bpf(2) commands aya 0.14 keeps to itself: open a pinned object, replace the
//! program of a link in place (`BPF_LINK_UPDATE`, atomic: every hook invocation
//! runs the old program or the new one), walk a map's keys without reading
//! its values (a socket map's values are sockets), and write many entries in
//! one call (`BPF_MAP_UPDATE_BATCH`, kernel 5.6+).
//!
//! As aya's `sys/bpf.rs`: one attribute type per command, tied to it by the
//! [`Attr`] trait, and the raw call an `unsafe fn`; each safe wrapper builds its
//! attribute itself, so the pointers it holds are valid for the call.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

/// A member of `union bpf_attr`, as one command reads it.
///
/// # Safety
/// The type must be `#[repr(C)]` with exactly the layout the kernel expects for
/// [`Attr::CMD`] (a prefix of the member is fine: the kernel zero-extends).
unsafe trait Attr {
    const CMD: libc::c_long;
}

/// A command that returns a new file descriptor on success.
///
/// # Safety
/// Only for commands whose non-negative result is a descriptor the caller owns.
unsafe trait ReturnsFd: Attr {}

/// `BPF_OBJ_GET`.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

// SAFETY: the layout of `bpf_attr` for BPF_OBJ_GET (7).
unsafe impl Attr for ObjGetAttr {
    const CMD: libc::c_long = 7;
}
// SAFETY: BPF_OBJ_GET returns a new descriptor of the pinned object.
unsafe impl ReturnsFd for ObjGetAttr {}

/// `BPF_LINK_UPDATE`.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

// SAFETY: the layout of `bpf_attr` for BPF_LINK_UPDATE (29).
unsafe impl Attr for LinkUpdateAttr {
    const CMD: libc::c_long = 29;
}

/// `BPF_MAP_GET_NEXT_KEY`.
#[repr(C)]
#[derive(Default)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

// SAFETY: the layout of `bpf_attr` for BPF_MAP_GET_NEXT_KEY (4).
unsafe impl Attr for NextKeyAttr {
    const CMD: libc::c_long = 4;
}

/// `BPF_MAP_UPDATE_BATCH` (the `batch` member of `bpf_attr`).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: the number of entries; out: how many were written.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

// SAFETY: the layout of `bpf_attr` for BPF_MAP_UPDATE_BATCH (26).
unsafe impl Attr for BatchAttr {
    const CMD: libc::c_long = 26;
}

/// Writes `keys[i] -> values[i]` into the hash map `map` in one call, in
/// order. `value_bytes` is the byte length of one value as the kernel reads
/// it (a per-CPU map's value is one rounded-up value per possible CPU).
/// On failure: how many were written before it, and the error
/// (`InvalidInput` for lengths that are not whole keys and values).
pub fn map_update_batch(
    map: BorrowedFd<'_>,
    keys: &[u8],
    key_bytes: usize,
    values: &[u8],
    value_bytes: usize,
) -> Result<(), (usize, io::Error)> {
    let count = keys.len().checked_div(key_bytes).unwrap_or(0);
    let consistent =
        key_bytes > 0 && keys.len() == count * key_bytes && values.len() == count * value_bytes;
    if !consistent {
        return Err((0, io::Error::from(io::ErrorKind::InvalidInput)));
    }
    if count == 0 {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(count)
            .map_err(|_| (0, io::Error::from(io::ErrorKind::InvalidInput)))?,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `keys` and `values` hold exactly `count` keys and values of the
    // sizes the caller says the map has (checked above), alive for the call.
    match unsafe { sys_bpf(&mut attr) } {
        Ok(_) => Ok(()),
        Err(e) => Err((attr.count as usize, e)),
    }
}

/// The raw call.
///
/// # Safety
/// Every pointer in `attr` must be valid, for the length the kernel derives from
/// the command and the descriptors in `attr`, for the duration of the call.
unsafe fn sys_bpf<A: Attr>(attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live `bpf_attr` member for `A::CMD` (the `Attr`
    // contract); the pointers inside it are the caller's to vouch for.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            A::CMD,
            std::ptr::from_mut(attr),
            std::mem::size_of::<A>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The raw call, for a command that returns a new descriptor.
///
/// # Safety
/// As [`sys_bpf`].
unsafe fn fd_sys_bpf<A: ReturnsFd>(attr: &mut A) -> io::Result<OwnedFd> {
    // SAFETY: forwarded from the caller.
    let fd = unsafe { sys_bpf(attr) }?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: `ReturnsFd`: the kernel just returned this descriptor to us, and
    // nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: `pathname` points to `c`, a NUL-terminated string alive until the
    // end of this function.
    unsafe { fd_sys_bpf(&mut attr) }
}

/// Makes `link` run `program` from now on.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: no pointers; the descriptors are borrowed for the call.
    unsafe { sys_bpf(&mut attr) }.map(drop)
}

/// The distinct keys of the map `info` describes, right now, up to `limit` steps:
/// a key deleted mid-walk restarts the kernel's walk from the first bucket, so
/// keys are collected in a set, and the walk is bounded.
pub fn count_keys(info: &aya::maps::MapInfo, limit: usize) -> io::Result<usize> {
    let fd = info
        .fd()
        .map_err(|e| io::Error::other(format!("opening map {}: {e}", info.id())))?;
    // The key size comes from the same map as the descriptor: the kernel reads
    // and writes exactly this many bytes through the pointers below.
    let key_size = info.key_size() as usize;
    let mut seen = std::collections::HashSet::new();
    let mut key: Option<Vec<u8>> = None;
    let mut next = vec![0u8; key_size];
    for _ in 0..limit {
        let mut attr = NextKeyAttr {
            map_fd: std::os::fd::AsFd::as_fd(&fd).as_raw_fd() as u32,
            key: key.as_ref().map_or(0, |k| k.as_ptr() as u64),
            next_key: next.as_mut_ptr() as u64,
            ..Default::default()
        };
        // SAFETY: `key` (when set) and `next` are the map's key size, alive
        // across the call; `fd` is open until the end of this function.
        match unsafe { sys_bpf(&mut attr) } {
            Ok(_) => {
                seen.insert(next.clone());
                key = Some(next.clone());
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(seen.len())
}
