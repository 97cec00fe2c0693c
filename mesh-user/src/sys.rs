//! The two bpf(2) commands aya 0.14 keeps to itself: open a pinned object, and
//! replace the program of a link in place (`BPF_LINK_UPDATE`, atomic: every
//! hook invocation runs the old program or the new one).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `union bpf_attr` as `BPF_OBJ_GET` reads it.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` as `BPF_LINK_UPDATE` reads it.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a live, properly sized bpf_attr prefix for `cmd`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens the object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes `link` run `program` from now on.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// `union bpf_attr` as `BPF_MAP_GET_NEXT_KEY` reads it.
#[repr(C)]
#[derive(Default)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

/// The distinct keys of a map right now (`key_size` bytes each), up to `limit`
/// steps: a key deleted mid-walk restarts the kernel's walk from the first
/// bucket, so keys are collected in a set, and the walk is bounded.
pub fn count_keys(map: BorrowedFd<'_>, key_size: usize, limit: usize) -> io::Result<usize> {
    let mut seen = std::collections::HashSet::new();
    let mut key: Option<Vec<u8>> = None;
    let mut next = vec![0u8; key_size];
    for _ in 0..limit {
        let mut attr = NextKeyAttr {
            map_fd: map.as_raw_fd() as u32,
            key: key.as_ref().map_or(0, |k| k.as_ptr() as u64),
            next_key: next.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
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
