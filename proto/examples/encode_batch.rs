//! `vantage-proto` on a microcontroller: a `no_std`, allocation-free program that fills a
//! [`Batch`], encodes it into a fixed buffer and reports the frame's length and hash.
//!
//! On a bare-metal target (`target_os = "none"`) it is a complete firmware image: a vector table,
//! a reset handler that initialises RAM, and output and exit through ARM semihosting, so it runs
//! under `qemu-system-arm` (`make embedded-run`: `microbit`, a Cortex-M0, for
//! `thumbv6m-none-eabi`; `mps2-an386`, a Cortex-M4, for `thumbv7em-none-eabihf`). With the
//! `defmt` feature it also logs the batch through `defmt::Format`. It links with the memory
//! layout in `examples/cortex-m.ld`:
//!
//! ```sh
//! cargo rustc -p vantage-proto --example encode_batch --target thumbv6m-none-eabi --release \
//!     -- -C link-arg=-Tproto/examples/cortex-m.ld
//! cargo rustc -p vantage-proto --example encode_batch --target thumbv7em-none-eabihf --release \
//!     --features defmt -- -C link-arg=-Tproto/examples/cortex-m.ld -C link-arg=-Tdefmt.x
//! ```
//!
//! On the host the same logic is an ordinary program (`cargo run -p vantage-proto --example
//! encode_batch`), which is also what keeps it compiling in `cargo test` and clippy.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
use vantage_proto::decode;

use vantage_proto::{
    encode, Batch, Error, Gap, IpAddress, Outcome, Phase, ProbeResult, RegexOutcome, MAX_FRAME_LEN,
};

/// Fills `batch` with two results (one up, one timed out) and one gap record, as an agent would
/// send them. In place, because a `Batch` is 3.7 KiB and a Cortex-M0 may have 16 KiB of RAM.
fn fill(batch: &mut Batch) {
    let up = ProbeResult {
        seq: 41,
        target_id: 7,
        started_at_ms: 1_767_225_600_000,
        status: 200,
        outcome: Outcome::Up,
        failed_phase: None,
        regex: RegexOutcome::Matched,
        total_us: 48_210,
        dns_us: Some(1_204),
        connect_us: Some(9_870),
        tls_us: Some(21_433),
        ttfb_us: Some(14_002),
        transfer_us: Some(1_701),
        body_bytes: 1_256,
        body_truncated: false,
        redirects: 0,
        cert_not_after_s: Some(1_798_761_600),
        remote_ip: Some(IpAddress::V4([192, 0, 2, 10])),
        kind: vantage_proto::ProbeKind::Http,
        tls_version: None,
        dns: None,
    };
    let timed_out = ProbeResult {
        seq: 42,
        outcome: Outcome::Timeout,
        failed_phase: Some(Phase::FirstByte),
        status: 0,
        regex: RegexOutcome::NotConfigured,
        total_us: 10_000_000,
        ttfb_us: None,
        transfer_us: None,
        body_bytes: 0,
        ..up
    };
    batch.boot_id = 0x5eed_cafe_f00d_0001;
    batch.results.clear();
    batch.gaps.clear();
    // Capacity is 32 results and 4 gaps; three pushes cannot fail.
    let _ = batch.results.push(up);
    let _ = batch.results.push(timed_out);
    let _ = batch.gaps.push(Gap {
        first_seq: 30,
        count: 11,
        first_started_at_ms: 1_767_225_000_000,
        last_started_at_ms: 1_767_225_590_000,
    });
}

/// An empty batch; `const` so the bare-metal build can keep one in `.bss`.
const EMPTY: Batch = Batch {
    boot_id: 0,
    results: heapless::Vec::new(),
    gaps: heapless::Vec::new(),
    clock: None,
};

/// Fills `batch` and encodes it into `buf`. Returns the frame length and its FNV-1a hash, which
/// the host and the microcontroller print so `make embedded-run` can check they wrote the same
/// bytes.
fn encode_sample(batch: &mut Batch, buf: &mut [u8; MAX_FRAME_LEN]) -> Result<(usize, u32), Error> {
    fill(batch);
    let frame = encode(batch, buf)?;
    let hash = frame.iter().fold(0x811c_9dc5_u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    #[cfg(all(target_os = "none", feature = "defmt"))]
    defmt::println!("encoded {=usize} bytes: {}", frame.len(), batch);
    Ok((frame.len(), hash))
}

// Only the host decodes the frame back: `decode` keeps a version-1 and a version-2 batch on
// its stack (about 11 KiB on a Cortex-M0), more than this example's 16 KiB board has left.
#[cfg(not(target_os = "none"))]
fn main() -> Result<(), Error> {
    let (mut batch, mut buf) = (EMPTY, [0u8; MAX_FRAME_LEN]);
    let (len, hash) = encode_sample(&mut batch, &mut buf)?;
    assert_eq!(
        decode(&buf[..len])?,
        batch,
        "the frame decodes to the same batch"
    );
    println!("encode_batch: ok, {len}-byte frame, fnv1a {hash:08x}");
    Ok(())
}

/// The bare-metal half: start-up code, semihosting, panic handler, and a defmt logger.
#[cfg(target_os = "none")]
mod bare {
    use core::fmt::Write;

    use vantage_proto::{Batch, MAX_FRAME_LEN};

    // Start-up follows the shape of the `cortex-m-rt` crate (vector table in `.vector_table`,
    // `.data` copied from flash and `.bss` zeroed before `main`), cut down to what this example
    // needs so it has no dependency outside `vantage-proto`.
    /// The reset vector and the 14 exception vectors after it (the initial stack pointer is the
    /// first word of the table, written by the linker script).
    #[link_section = ".vector_table.exceptions"]
    #[no_mangle]
    #[used]
    static EXCEPTIONS: [unsafe extern "C" fn() -> !; 15] = {
        let mut v: [unsafe extern "C" fn() -> !; 15] = [fault; 15];
        v[0] = reset;
        v
    };

    #[no_mangle]
    unsafe extern "C" fn reset() -> ! {
        // SAFETY: runs once, before any Rust code reads a static. The bounds come from
        // cortex-m.ld and are word-aligned. They are read through `asm!` so the compiler sees
        // plain addresses, not the one-word objects the `extern` declarations would suggest
        // (walking past those would be undefined behaviour; cortex-m-rt does this in assembly
        // for the same reason).
        unsafe {
            let (sbss, ebss, sdata, edata, sidata): (usize, usize, usize, usize, usize);
            core::arch::asm!(
                "ldr {0}, =__sbss", "ldr {1}, =__ebss", "ldr {2}, =__sdata",
                "ldr {3}, =__edata", "ldr {4}, =__sidata",
                // The literal pool right here, jumped over: the function's end is out of reach.
                "b 1f", ".ltorg", "1:",
                out(reg) sbss, out(reg) ebss, out(reg) sdata, out(reg) edata, out(reg) sidata,
                options(nomem, nostack, preserves_flags),
            );
            for a in (sbss..ebss).step_by(4) {
                (a as *mut u32).write_volatile(0);
            }
            for (i, a) in (sdata..edata).step_by(4).enumerate() {
                (a as *mut u32).write_volatile(((sidata + 4 * i) as *const u32).read_volatile());
            }
        }
        // The Cortex-M4F's FPU is off at reset; eabihf code may use its registers (CPACR: full
        // access for CP10 and CP11).
        #[cfg(target_abi = "eabihf")]
        // SAFETY: CPACR is a documented System Control Block register on every Cortex-M4F/M7F.
        unsafe {
            const CPACR: *mut u32 = 0xE000_ED88 as *mut u32;
            CPACR.write_volatile(CPACR.read_volatile() | (0xF << 20));
            core::arch::asm!("dsb", "isb");
        }
        let mut line = Line::new();
        // The batch and the frame buffer live in .bss, not on the stack.
        static mut BATCH: Batch = super::EMPTY;
        static mut BUF: [u8; MAX_FRAME_LEN] = [0; MAX_FRAME_LEN];
        let (batch, buf) = (&raw mut BATCH, &raw mut BUF);
        // SAFETY: the only references to BATCH and BUF, taken once, single-threaded.
        let (batch, buf) = unsafe { (&mut *batch, &mut *buf) };
        let code = match super::encode_sample(batch, buf) {
            Ok((len, hash)) => {
                let _ = write!(line, "encode_batch: ok, {len}-byte frame, fnv1a {hash:08x}");
                0
            }
            Err(e) => {
                let _ = write!(line, "encode_batch: failed: {e}");
                1
            }
        };
        #[cfg(feature = "defmt")]
        {
            let _ = write!(line, ", {} defmt bytes", logger::bytes());
        }
        line.print();
        exit(code)
    }

    unsafe extern "C" fn fault() -> ! {
        exit(2)
    }

    #[panic_handler]
    fn panic(_: &core::panic::PanicInfo) -> ! {
        exit(3)
    }

    /// A semihosting request (`bkpt 0xAB`). With no debugger or emulator attached this traps,
    /// which is the end of the program either way.
    fn semihost(op: u32, arg: usize) {
        // SAFETY: the ARM semihosting calling convention: r0 = operation, r1 = argument.
        unsafe {
            core::arch::asm!("bkpt 0xAB", inout("r0") op => _, in("r1") arg, options(nostack));
        }
    }

    fn exit(code: u32) -> ! {
        const SYS_EXIT: u32 = 0x18;
        const APPLICATION_EXIT: usize = 0x20026;
        const RUNTIME_ERROR: usize = 0x20023;
        semihost(
            SYS_EXIT,
            if code == 0 {
                APPLICATION_EXIT
            } else {
                RUNTIME_ERROR
            },
        );
        // Reached only without a debugger or emulator to take the exit request.
        loop {
            core::hint::spin_loop();
        }
    }

    /// One line of output in a fixed buffer, printed with SYS_WRITE0 (NUL-terminated).
    struct Line {
        buf: [u8; 96],
        len: usize,
    }

    impl Line {
        fn new() -> Line {
            Line {
                buf: [0; 96],
                len: 0,
            }
        }
        fn print(mut self) {
            const SYS_WRITE0: u32 = 0x04;
            let end = self.len.min(self.buf.len() - 2);
            self.buf[end] = b'\n';
            self.buf[end + 1] = 0;
            semihost(SYS_WRITE0, self.buf.as_ptr() as usize);
        }
    }

    impl Write for Line {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            let room = self.buf.len() - 2 - self.len;
            let n = s.len().min(room);
            self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
            self.len += n;
            Ok(())
        }
    }

    /// defmt's global logger: counts the encoded log bytes (a real board would send them over
    /// RTT or a UART to `defmt-print`).
    #[cfg(feature = "defmt")]
    mod logger {
        use core::sync::atomic::{AtomicUsize, Ordering};

        static BYTES: AtomicUsize = AtomicUsize::new(0);

        pub fn bytes() -> usize {
            BYTES.load(Ordering::Relaxed)
        }

        #[defmt::global_logger]
        struct Logger;

        // SAFETY: single core, no interrupts enabled: acquire/release need no critical section.
        unsafe impl defmt::Logger for Logger {
            fn acquire() {}
            unsafe fn flush() {}
            unsafe fn release() {}
            unsafe fn write(bytes: &[u8]) {
                BYTES.fetch_add(bytes.len(), Ordering::Relaxed);
            }
        }

        defmt::timestamp!("{=u32}", 0);
    }
}
