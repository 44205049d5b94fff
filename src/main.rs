// Candle's backward allocates and frees multi-megabyte buffers at a high rate; glibc malloc is
// 4-5x slower at that than mimalloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (mimalloc.h, v2).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Spins of candle's elementwise worker before it parks (candle's default: 25 000).
const CANDLE_SPIN_LIMIT: &str = "100";

fn main() -> std::process::ExitCode {
    // candle's elementwise ops run on a pool of their own whose idle worker spins for up to
    // 25 000 rounds after every op; on a machine with as many cores as threads it then steals a
    // core from our rayon kernels and the matmuls that follow (about 15 % of a training step on
    // 2 cores). Parking almost at once costs a wake-up per op, far less. A user's setting wins.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT);
    }
    // Keep freed memory instead of returning it to the OS after 10 ms: otherwise every training
    // step faults its buffers back in and the kernel spends a third of the time zeroing pages.
    // SAFETY: sets a documented mimalloc option; called before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    spikeclip::cli::main()
}
