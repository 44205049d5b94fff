//! Energy per operation. The paper quotes 45 nm fp32 figures (Horowitz, ISSCC 2014); the
//! lower-precision presets show how the SNN's advantage changes when MACs get cheaper too.

use serde::Serialize;
use std::str::FromStr;

/// Energy of one multiply-accumulate and of one accumulate, in picojoules.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnergyConstants {
    pub preset: String,
    pub e_mac_pj: f64,
    pub e_ac_pj: f64,
}

impl EnergyConstants {
    pub fn fp32() -> Self {
        Self::preset("fp32", 4.6, 0.9)
    }

    pub fn fp16() -> Self {
        Self::preset("fp16", 1.5, 0.4)
    }

    pub fn int8() -> Self {
        Self::preset("int8", 0.23, 0.03)
    }

    /// Custom figures, for hardware other than the presets'.
    pub fn custom(e_mac_pj: f64, e_ac_pj: f64) -> anyhow::Result<Self> {
        if !(e_mac_pj.is_finite() && e_ac_pj.is_finite() && e_mac_pj >= 0.0 && e_ac_pj >= 0.0) {
            anyhow::bail!(
                "energy constants must be finite and non-negative, got E_MAC {e_mac_pj} pJ, \
                 E_AC {e_ac_pj} pJ"
            )
        }
        Ok(Self::preset("custom", e_mac_pj, e_ac_pj))
    }

    fn preset(name: &str, e_mac_pj: f64, e_ac_pj: f64) -> Self {
        Self {
            preset: name.to_string(),
            e_mac_pj,
            e_ac_pj,
        }
    }

    /// Energy in millijoules of `macs` multiply-accumulates and `sops` accumulates.
    pub fn energy_mj(&self, macs: f64, sops: f64) -> f64 {
        (self.e_mac_pj * macs + self.e_ac_pj * sops) * 1e-9
    }
}

impl Default for EnergyConstants {
    fn default() -> Self {
        Self::fp32()
    }
}

/// Parses a preset name (`fp32`, `fp16`, `int8`) or `MAC,AC` in picojoules, for a CLI flag.
impl FromStr for EnergyConstants {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "fp32" => Ok(Self::fp32()),
            "fp16" => Ok(Self::fp16()),
            "int8" => Ok(Self::int8()),
            _ => {
                let parse = |v: &str| {
                    v.trim().parse::<f64>().map_err(|e| {
                        anyhow::anyhow!(
                            "energy constants {s:?}: expected fp32, fp16, int8 or MAC_PJ,AC_PJ \
                             ({v:?}: {e})"
                        )
                    })
                };
                let (mac, ac) = s.split_once(',').ok_or_else(|| {
                    anyhow::anyhow!(
                        "energy constants {s:?}: expected fp32, fp16, int8 or MAC_PJ,AC_PJ"
                    )
                })?;
                Self::custom(parse(mac)?, parse(ac)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_custom_values_parse() {
        assert_eq!("fp32".parse::<EnergyConstants>().unwrap().e_mac_pj, 4.6);
        assert_eq!("int8".parse::<EnergyConstants>().unwrap().e_ac_pj, 0.03);
        let c: EnergyConstants = "2.0, 0.5".parse().unwrap();
        assert_eq!((c.e_mac_pj, c.e_ac_pj), (2.0, 0.5));
        assert!("fp64".parse::<EnergyConstants>().is_err());
        assert!("1,-1".parse::<EnergyConstants>().is_err());
    }

    #[test]
    fn energy_is_mac_and_ac_energy_in_millijoules() {
        let c = EnergyConstants::fp32();
        // 1e9 MACs at 4.6 pJ = 4.6 mJ; 1e9 ACs at 0.9 pJ = 0.9 mJ.
        assert!((c.energy_mj(1e9, 1e9) - 5.5).abs() < 1e-12);
    }
}
