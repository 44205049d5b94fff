//! The device a run computes on, from `--device cpu|cuda[:N]|auto`: parsed and opened here so
//! every command gets the same answer and the same errors, and named here so every report
//! says it the same way.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context};
use candle_core::{Device, DeviceLocation};

/// The `--device` a user asked for, before it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceArg {
    #[default]
    Cpu,
    /// The CUDA GPU of this ordinal.
    Cuda(usize),
    /// The first CUDA GPU when the build has `cuda` and one opens, else the CPU.
    Auto,
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" => Ok(DeviceArg::Cuda(0)),
            "auto" => Ok(DeviceArg::Auto),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceArg::Cuda)
                .ok_or_else(|| {
                    format!("{s:?}: expected cpu, cuda, cuda:N (N a GPU ordinal) or auto")
                }),
        }
    }
}

impl fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            DeviceArg::Cpu => f.write_str("cpu"),
            DeviceArg::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceArg::Auto => f.write_str("auto"),
        }
    }
}

impl DeviceArg {
    /// Opens the device. A CUDA device on a build without the `cuda` feature is an error that
    /// says so, rather than candle's generic one from deep inside the first tensor.
    pub fn open(self) -> anyhow::Result<Device> {
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    bail!(
                        "--device {self}: this build lacks the `cuda` feature; rebuild with \
                         `cargo build --release --features cuda` (needs a CUDA toolkit, see \
                         scripts/cuda_toolkit.sh)"
                    )
                }
                Device::new_cuda(n).with_context(|| format!("--device {self}: opening GPU {n}"))
            }
            DeviceArg::Auto => Ok(if candle_core::utils::cuda_is_available() {
                Device::new_cuda(0).unwrap_or_else(|err| {
                    tracing::info!("--device auto: no usable GPU ({err}), running on the CPU");
                    Device::Cpu
                })
            } else {
                Device::Cpu
            }),
        }
    }
}

/// The name reports give `device`: `cpu`, `cuda:N`.
pub fn name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_names_what_it_parsed() {
        for (text, arg) in [
            ("cpu", DeviceArg::Cpu),
            ("cuda", DeviceArg::Cuda(0)),
            ("cuda:3", DeviceArg::Cuda(3)),
            ("auto", DeviceArg::Auto),
        ] {
            assert_eq!(text.parse::<DeviceArg>().unwrap(), arg);
        }
        assert_eq!(DeviceArg::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", ""] {
            let err = bad.parse::<DeviceArg>().unwrap_err();
            assert!(err.contains("expected cpu, cuda"), "{bad:?}: {err}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_feature_cuda_is_refused_by_name_and_auto_is_the_cpu() {
        let err = DeviceArg::Cuda(1).open().unwrap_err().to_string();
        assert!(
            err.contains("cuda:1") && err.contains("lacks the `cuda` feature"),
            "{err}"
        );
        assert_eq!(name(&DeviceArg::Auto.open().unwrap()), "cpu");
        assert_eq!(name(&DeviceArg::Cpu.open().unwrap()), "cpu");
    }
}
