//! Learning-rate schedule of the paper's recipe: cosine annealing from the base rate to
//! `eta_min` over `t_max` epochs, the closed form of PyTorch's `CosineAnnealingLR` (which keeps
//! oscillating past `t_max` rather than clamping; so does this).

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CosineAnnealing {
    pub base_lr: f64,
    pub t_max: usize,
    pub eta_min: f64,
}

impl CosineAnnealing {
    /// The rate for epoch `epoch` (0-based: epoch 0 uses `base_lr`).
    pub fn lr_at(&self, epoch: usize) -> f64 {
        let phase = std::f64::consts::PI * epoch as f64 / self.t_max.max(1) as f64;
        self.eta_min + (self.base_lr - self.eta_min) * (1.0 + phase.cos()) / 2.0
    }
}
