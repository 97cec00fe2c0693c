//! One clock for the soak and its storm client, which is another process: both
//! stamp events with CLOCK_MONOTONIC, so a connect can be placed between two
//! readiness changes. (`Instant` reads the same clock but cannot be sent.)

/// Microseconds on CLOCK_MONOTONIC.
pub fn now_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec that we own; CLOCK_MONOTONIC
    // always exists on Linux, so it cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}
