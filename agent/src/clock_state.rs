//! How far this machine's clock can be trusted (issue #18 item 3): the kernel's clock
//! discipline, read-only, and the time since boot. Every batch carries the latest reading
//! (`vantage_proto::ClockHealth`, filled in by the `Outbox`).
//!
//! On Linux, `adjtimex(2)` with `modes = 0` changes nothing and returns the kernel's state:
//! the `STA_UNSYNC` status bit (set until an NTP daemon disciplines the clock, and again when
//! the maximum error passes 16 s) or the return value `TIME_ERROR` mean "not synchronised";
//! `maxerror` and `esterror` are in microseconds (the kernel grows `maxerror` by 500 µs per
//! second between NTP updates and caps it at 16 s). The time since boot is `CLOCK_BOOTTIME`,
//! which counts suspend too. Elsewhere there is no reading (`None`): the rows say "unknown".

/// One reading of the clock's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// The kernel considers its clock synchronised.
    pub synced: bool,
    /// The kernel's maximum and estimated error, microseconds (never negative).
    pub max_error_us: u64,
    pub est_error_us: u64,
    /// Time since the machine booted, milliseconds.
    pub boot_age_ms: u64,
    /// The wall clock when it was read, unix milliseconds.
    pub wall_ms: u64,
}

impl Reading {
    /// Maximum error in whole milliseconds, rounded up (an error is never understated).
    pub fn max_error_ms(&self) -> u32 {
        us_to_ms(self.max_error_us)
    }

    pub fn est_error_ms(&self) -> u32 {
        us_to_ms(self.est_error_us)
    }

    pub fn boot_age_s(&self) -> u32 {
        u32::try_from(self.boot_age_ms / 1000).unwrap_or(u32::MAX)
    }
}

fn us_to_ms(us: u64) -> u32 {
    u32::try_from(us.div_ceil(1000)).unwrap_or(u32::MAX)
}

/// Reads the kernel's clock state now; None where there is none (not Linux, or the calls
/// failed).
#[cfg(target_os = "linux")]
pub fn read() -> Option<Reading> {
    // SAFETY: `timex` is plain data, all-zero is a valid value, and `modes = 0` makes
    // adjtimex a pure read of the kernel's state into it.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    tx.modes = 0;
    // SAFETY: a valid, exclusively borrowed `timex` for the duration of the call.
    let state = unsafe { libc::adjtimex(&mut tx) };
    if state < 0 {
        return None;
    }
    let mut boot = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid, exclusively borrowed `timespec` for the duration of the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut boot) } != 0 {
        return None;
    }
    // The fields are `c_long` (32 bits on armv7, 64 on aarch64 and x86_64) and `c_int`:
    // widened to i64 first, where `i64::from` is a no-op that clippy calls useless on 64-bit
    // targets (it is needed on 32-bit ones).
    #[allow(clippy::useless_conversion)]
    let (max_error, est_error, secs, nanos) = (
        i64::from(tx.maxerror),
        i64::from(tx.esterror),
        i64::from(boot.tv_sec),
        i64::from(boot.tv_nsec),
    );
    let unsync = tx.status & libc::STA_UNSYNC != 0;
    Some(Reading {
        synced: state != libc::TIME_ERROR && !unsync,
        max_error_us: u64::try_from(max_error).unwrap_or(0),
        est_error_us: u64::try_from(est_error).unwrap_or(0),
        boot_age_ms: u64::try_from(secs.saturating_mul(1000).saturating_add(nanos / 1_000_000))
            .unwrap_or(0),
        wall_ms: vantage_common::time::now_ms(),
    })
}

/// Reads the kernel's clock state now; None where there is none (not Linux, or the calls
/// failed).
#[cfg(not(target_os = "linux"))]
pub fn read() -> Option<Reading> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_round_up_and_saturate() {
        let r = Reading {
            synced: true,
            max_error_us: 16_000_000,
            est_error_us: 1,
            boot_age_ms: 42_999,
            wall_ms: 0,
        };
        assert_eq!(r.max_error_ms(), 16_000);
        assert_eq!(r.est_error_ms(), 1, "1 µs is not 0 ms");
        assert_eq!(r.boot_age_s(), 42);
        let huge = Reading {
            max_error_us: u64::MAX,
            boot_age_ms: u64::MAX,
            ..r
        };
        assert_eq!(huge.max_error_ms(), u32::MAX);
        assert_eq!(huge.boot_age_s(), u32::MAX);
    }

    /// The kernel answers on Linux (whatever its state: this only reads it).
    #[cfg(target_os = "linux")]
    #[test]
    fn the_kernel_answers() {
        let r = read().expect("adjtimex and CLOCK_BOOTTIME work on Linux");
        assert!(r.boot_age_ms > 0);
        assert!(r.wall_ms > 1_600_000_000_000);
        assert!(r.max_error_us <= 16_000_000 || !r.synced);
        println!("{r:?}");
    }
}
