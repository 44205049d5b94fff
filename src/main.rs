// Candle's backward allocates and frees multi-megabyte buffers at a high rate; glibc malloc is
// 4-5x slower at that than mimalloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    spikeclip::cli::main()
}
