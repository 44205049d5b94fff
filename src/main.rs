// Candle's backward allocates and frees multi-megabyte buffers at a high rate; glibc malloc is
// 4-5x slower at that than mimalloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (mimalloc.h, v2).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // Keep freed memory instead of returning it to the OS after 10 ms: otherwise every training
    // step faults its buffers back in and the kernel spends a third of the time zeroing pages.
    // SAFETY: sets a documented mimalloc option; called before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    spikeclip::cli::main()
}
