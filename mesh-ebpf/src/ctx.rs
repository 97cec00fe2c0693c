//! IPv6 address fields of a program's context (`user_ip6` of `bpf_sock_addr`,
//! `local_ip6`/`remote_ip6` of `sk_msg_md`): the verifier allows them only as
//! 4-byte loads and stores, one word at a time.

/// # Safety
/// `words` must point to a 4-word address field of the running program's
/// context.
#[inline(always)]
pub unsafe fn read_ip6(words: *const [u32; 4]) -> [u32; 4] {
    let w = words.cast::<u32>();
    // SAFETY: four words of a context field (the caller's contract).
    unsafe {
        [
            core::ptr::read_volatile(w),
            core::ptr::read_volatile(w.add(1)),
            core::ptr::read_volatile(w.add(2)),
            core::ptr::read_volatile(w.add(3)),
        ]
    }
}

/// # Safety
/// `words` must point to a 4-word address field of the running program's
/// context that this program type may write.
#[inline(always)]
pub unsafe fn write_ip6(words: *mut [u32; 4], ip: &[u32; 4]) {
    let w = words.cast::<u32>();
    // SAFETY: four writable words of a context field (the caller's contract).
    unsafe {
        core::ptr::write_volatile(w, ip[0]);
        core::ptr::write_volatile(w.add(1), ip[1]);
        core::ptr::write_volatile(w.add(2), ip[2]);
        core::ptr::write_volatile(w.add(3), ip[3]);
    }
}
