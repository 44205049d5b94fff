//! The instruction set the fused CPU kernels run at, chosen once per process.
//!
//! Every hot loop is plain Rust written so that it vectorises, compiled three times: for the
//! x86-64 baseline (SSE2, the portable path), for AVX2 + FMA, and for AVX-512. The copies run
//! the same operations in the same order (Rust never contracts `a * b + c` into an FMA, and
//! lane-wise sums keep their lanes), so the paths give bit-identical results; the kernels'
//! tests run every path the CPU has on the same inputs to hold them to that.
//!
//! `SPIKECLIP_SIMD=avx512|avx2|portable` forces a narrower path than the CPU's best (to compare
//! paths in a benchmark); a path the CPU lacks, or an unknown name, falls back to the best with
//! a warning.

use std::fmt;
use std::sync::OnceLock;

/// An instruction set the kernels are compiled for, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The target's baseline (SSE2 on x86-64); every CPU runs it.
    Portable,
    /// AVX2, FMA, BMI and hardware popcount (x86-64-v3).
    Avx2,
    /// AVX-512 F/BW/DQ/VL on top of AVX2 (x86-64-v4).
    Avx512,
}

/// The environment variable that forces a level.
pub const ENV: &str = "SPIKECLIP_SIMD";

impl Level {
    /// Every level, widest first.
    pub const ALL: [Level; 3] = [Level::Avx512, Level::Avx2, Level::Portable];

    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    fn parse(name: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == name)
    }

    /// Whether this CPU runs the level's instructions.
    pub fn supported(self) -> bool {
        match self {
            Level::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                    && std::is_x86_feature_detected!("bmi1")
                    && std::is_x86_feature_detected!("bmi2")
                    && std::is_x86_feature_detected!("lzcnt")
                    && std::is_x86_feature_detected!("popcnt")
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => {
                Level::Avx2.supported()
                    && std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512dq")
                    && std::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widest level this CPU runs.
    pub fn best() -> Level {
        Level::ALL
            .into_iter()
            .find(|l| l.supported())
            .unwrap_or(Level::Portable)
    }

    /// The levels this CPU runs, widest first: the paths the kernels' tests compare.
    pub fn supported_levels() -> Vec<Level> {
        Level::ALL.into_iter().filter(|l| l.supported()).collect()
    }

    /// The level every kernel runs at in this process: the CPU's best, or the one [`ENV`]
    /// names. Read once.
    pub fn active() -> Level {
        static ACTIVE: OnceLock<Level> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let best = Level::best();
            let Ok(name) = std::env::var(ENV) else {
                return best;
            };
            match Level::parse(name.trim()) {
                Some(level) if level.supported() => level,
                Some(level) => {
                    tracing::warn!("{ENV}={name}: this CPU lacks {level}; using {best}");
                    best
                }
                None => {
                    tracing::warn!("{ENV}={name}: not one of avx512, avx2, portable; using {best}");
                    best
                }
            }
        })
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A hot kernel and the widest level it has a faster copy for: a kernel whose AVX-512 copy
/// measured no faster than its AVX2 one stops at AVX2.
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    pub name: &'static str,
    pub widest: Level,
}

impl Kernel {
    /// The level this kernel runs at in this process.
    pub fn level(self) -> Level {
        Level::active().min(self.widest)
    }
}

/// The LIF neuron's forward (dense and bit-packed) and backward loops.
pub const LIF: Kernel = Kernel {
    name: "lif",
    widest: Level::Avx512,
};
/// Packing 0/1 spikes into bits.
pub const SPIKE_PACK: Kernel = Kernel {
    name: "spike_pack",
    widest: Level::Avx512,
};
/// The accumulate-only gather of spike-driven layers and of spike-fed weight gradients.
pub const SPIKE_GATHER: Kernel = Kernel {
    name: "spike_gather",
    widest: Level::Avx512,
};
/// Spiking self-attention over packed spikes (popcounts, integer adds).
pub const SPIKE_ATTENTION: Kernel = Kernel {
    name: "spike_attention",
    widest: Level::Avx512,
};
/// BatchNorm's channel sums and per-channel maps, forward and backward.
pub const BATCH_NORM: Kernel = Kernel {
    name: "batch_norm",
    widest: Level::Avx512,
};
/// The scatter-add of a convolution's input gradient (im2col itself is memcpys).
pub const COL2IM: Kernel = Kernel {
    name: "col2im",
    widest: Level::Avx512,
};
/// Adam's element loop.
pub const ADAM: Kernel = Kernel {
    name: "adam",
    widest: Level::Avx512,
};

/// Every hot kernel, for `bench` to print which path each took.
pub const KERNELS: [Kernel; 7] = [
    LIF,
    SPIKE_PACK,
    SPIKE_GATHER,
    SPIKE_ATTENTION,
    BATCH_NORM,
    COL2IM,
    ADAM,
];

/// The path candle's and our matrix products take: gemm's micro-kernels, chosen by gemm itself
/// at its first product (AVX-512 where the CPU has AVX-512 F, built in by gemm's `x86-v4`
/// feature; AVX2 + FMA where it has FMA; scalar otherwise). [`ENV`] does not reach it.
pub fn matmul_level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return Level::Avx512;
        }
        if std::is_x86_feature_detected!("fma") {
            return Level::Avx2;
        }
    }
    Level::Portable
}

/// Runs `f` compiled for `level`: its body, and every `#[inline(always)]` function it calls,
/// are inlined into a function with that level's target features. Call it through
/// [`on_level!`], inside a parallel loop's work item, not around the loop: rayon's workers run
/// their closures elsewhere. A level the CPU lacks runs the portable copy.
///
/// `f` is called from three arms, so LLVM inlines it into them only when it judges it cheap; a
/// kernel loop left to that judgement is compiled once, for the baseline CPU (SSE2), and runs
/// that copy at every level. [`on_level!`] marks the closure `#[inline(always)]`, which makes
/// every level's copy real.
#[inline(always)]
pub fn dispatch<R>(level: Level, f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    match level {
        // SAFETY: the CPU has the level's features (checked; the detection is cached).
        Level::Avx512 if level.supported() => return unsafe { x86::avx512(f) },
        // SAFETY: as above.
        Level::Avx2 if level.supported() => return unsafe { x86::avx2(f) },
        _ => {}
    }
    let _ = level;
    f()
}

/// `simd::on_level!(level, body)`: `body` run by [`dispatch`] compiled for `level`, as an
/// `#[inline(always)]` closure (the form every kernel uses; see [`dispatch`] for why).
macro_rules! on_level {
    ($level:expr, $body:expr) => {
        $crate::kernels::simd::dispatch(
            $level,
            #[inline(always)]
            || $body,
        )
    };
}
pub(crate) use on_level;

#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
    pub(super) unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
        f()
    }

    #[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
    pub(super) unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
}

/// The CPU's model name (Linux; "unknown" elsewhere), for reports beside [`KERNELS`]' levels.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_and_named_as_the_environment_takes_them() {
        assert!(Level::Portable < Level::Avx2 && Level::Avx2 < Level::Avx512);
        for level in Level::ALL {
            assert_eq!(Level::parse(level.name()), Some(level));
        }
        assert_eq!(Level::parse("sse9"), None);
        assert_eq!(Level::supported_levels()[0], Level::best());
        assert!(Level::supported_levels().contains(&Level::Portable));
        assert!(Level::active().supported());
    }

    #[test]
    fn a_kernel_never_runs_wider_than_its_widest() {
        let narrow = Kernel {
            name: "t",
            widest: Level::Avx2,
        };
        assert!(narrow.level() <= Level::Avx2);
        assert!(narrow.level() <= Level::active());
    }

    #[test]
    fn dispatch_runs_the_closure_on_every_level() {
        for level in Level::ALL {
            assert_eq!(on_level!(level, 6 * 7), 42, "{level}");
        }
    }
}
