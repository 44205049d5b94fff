//! SpikeCLIP's encoders and their ANN twin, ScratchCLIP, as trainable dual-encoder students.
//!
//! Each student owns one [`VarMap`]: image weights under `image.`, text weights under `text.`,
//! with the authors' parameter names below those prefixes.

pub mod block;
pub mod checkpoint;
pub mod config;
pub mod import;
pub mod layers;
pub mod readout;
pub mod scratch;
pub mod spikingformer;
pub mod summary;
pub mod text;
pub mod text_transformer;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::energy::{EncoderOps, MonitorSet};
use crate::kernels::grad_slot::GradSlot;
use crate::ops::Ops;
use crate::recipe::Student;
use crate::train::init::seeded_var_builder;
use block::NamedLif;
use config::SpikeClipConfig;
use readout::{tdw_init, TDW_NAME};
use scratch::{ScratchImageEncoder, ScratchTextEncoder};
use spikingformer::{ImageEncoder, SparseWeights};
use text::TextTower;

/// Side of the square images the students read.
pub const INPUT_SIDE: usize = 32;

/// Sets every TDW weight of a freshly built VarMap to the paper's initialisation.
fn init_tdw(varmap: &VarMap) -> Result<()> {
    for (name, var) in varmap.data().lock().expect("VarMap lock").iter() {
        if name.ends_with(TDW_NAME) {
            let steps = var.as_tensor().dim(1)?;
            var.set(&Tensor::from_vec(
                tdw_init(steps),
                (1, steps, 1),
                var.device(),
            )?)?;
        }
    }
    Ok(())
}

/// The spiking student: Spikingformer image encoder and a spiking text encoder (MLP or
/// transformer, by `config.text.kind`).
pub struct SpikeClip {
    pub image: ImageEncoder,
    pub text: TextTower,
    pub config: SpikeClipConfig,
    varmap: VarMap,
}

/// The constructor of an encoder: its parameters under a VarBuilder, its ops run by [`Ops`].
type Build<E> = fn(VarBuilder, &SpikeClipConfig, Ops) -> Result<E>;

/// A fresh VarMap with both towers built in it from `seed` (`image.`, `text.`), TDW weights
/// initialised.
fn build_towers<I, T>(
    config: &SpikeClipConfig,
    (seed, device, ops): (u64, &Device, Ops),
    image: Build<I>,
    text: Build<T>,
) -> Result<(I, T, VarMap)> {
    let ((i, t), varmap) = build_in(seed, device, |vb| {
        Ok((
            image(vb.pp("image"), config, ops)?,
            text(vb.pp("text"), config, ops)?,
        ))
    })?;
    Ok((i, t, varmap))
}

/// What `build` makes in a fresh VarMap seeded by `seed`, TDW weights initialised.
fn build_in<E>(
    seed: u64,
    device: &Device,
    build: impl FnOnce(&VarBuilder) -> Result<E>,
) -> Result<(E, VarMap)> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, seed, DType::F32, device);
    let built = build(&vb)?;
    init_tdw(&varmap)?;
    Ok((built, varmap))
}

/// One tower of [`SpikeClip::new`]'s model built alone, in a VarMap of its own (parameters
/// under `image.` or `text.`): what timing one tower's training step needs to hold, as the
/// reference builds one tower for it.
pub struct Tower<E> {
    pub encoder: E,
    pub varmap: VarMap,
}

impl<E> Tower<E> {
    /// `build` under `prefix` in a VarMap of its own, the ops run as chosen for `device`.
    fn build(
        config: &SpikeClipConfig,
        (seed, device): (u64, &Device),
        prefix: &str,
        build: Build<E>,
    ) -> Result<Self> {
        let ops = Ops::for_device(device);
        let (encoder, varmap) = build_in(seed, device, |vb| build(vb.pp(prefix), config, ops))?;
        Ok(Self { encoder, varmap })
    }
}

impl SpikeClip {
    /// The image tower alone.
    pub fn image_tower(
        config: &SpikeClipConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Tower<ImageEncoder>> {
        Tower::build(config, (seed, device), "image", ImageEncoder::new)
    }

    /// The text tower alone.
    pub fn text_tower(
        config: &SpikeClipConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Tower<TextTower>> {
        Tower::build(config, (seed, device), "text", TextTower::new)
    }

    /// Fresh weights drawn from `seed`, the ops run as this run chose for `device`
    /// ([`Ops::for_device`]).
    pub fn new(config: &SpikeClipConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::with_ops(config, seed, device, Ops::for_device(device))
    }

    /// [`Self::new`] with its ops run by `ops`.
    pub fn with_ops(
        config: &SpikeClipConfig,
        seed: u64,
        device: &Device,
        ops: Ops,
    ) -> Result<Self> {
        let run = (seed, device, ops);
        let (image, text, varmap) = build_towers(config, run, ImageEncoder::new, TextTower::new)?;
        Ok(Self {
            image,
            text,
            config: config.clone(),
            varmap,
        })
    }
}

fn monitors(lifs: &[&NamedLif]) -> MonitorSet {
    let mut set = MonitorSet::new();
    for l in lifs {
        set.push(l.name.clone(), &l.lif);
    }
    set
}

impl Student for SpikeClip {
    fn image_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.image.forward(x, train)
    }
    fn text_features(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        self.text.forward(ids, train)
    }
    fn varmap(&self) -> &VarMap {
        &self.varmap
    }
    fn grad_slots(&self) -> Vec<GradSlot> {
        self.text.grad_slots()
    }
    fn energy_ops(&self) -> Option<Vec<EncoderOps>> {
        let (snn, ann) = self.image.ops(INPUT_SIDE);
        let (tsnn, tann) = self.text.ops();
        Some(vec![
            EncoderOps {
                name: "image".into(),
                snn,
                ann,
                monitors: monitors(&self.image.lif_layers()),
            },
            EncoderOps {
                name: "text".into(),
                snn: tsnn,
                ann: tann,
                monitors: monitors(&self.text.lif_layers()),
            },
        ])
    }
    fn layer_spikes(&self, image: &Tensor) -> Option<Result<Vec<(String, Tensor)>>> {
        Some(self.image.tokenizer_spikes(image))
    }
    fn time_steps(&self) -> usize {
        self.config.time_steps
    }
    /// The spike-driven kernels are CPU kernels: with the portable ops the dense path serves.
    fn spike_driven(&self) -> Option<Result<Box<dyn Student + '_>>> {
        if self.image.op_impl() == Ops::Portable {
            return None;
        }
        Some(self.image.sparse_weights().map(|weights| {
            Box::new(SpikeDriven {
                model: self,
                weights,
            }) as Box<dyn Student>
        }))
    }
}

/// SpikeCLIP whose eval-mode image features run the spike-driven path, with BatchNorm folded
/// from the weights at the time the view was made.
struct SpikeDriven<'a> {
    model: &'a SpikeClip,
    weights: SparseWeights,
}

impl Student for SpikeDriven<'_> {
    fn image_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            candle_core::bail!("the spike-driven path is for inference; train the model itself")
        }
        self.model.image.forward_sparse(x, &self.weights)
    }
    fn text_features(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        self.model.text_features(ids, train)
    }
    fn varmap(&self) -> &VarMap {
        self.model.varmap()
    }
    fn grad_slots(&self) -> Vec<GradSlot> {
        self.model.grad_slots()
    }
    fn energy_ops(&self) -> Option<Vec<EncoderOps>> {
        self.model.energy_ops()
    }
    fn layer_spikes(&self, image: &Tensor) -> Option<Result<Vec<(String, Tensor)>>> {
        self.model.layer_spikes(image)
    }
    fn time_steps(&self) -> usize {
        self.model.time_steps()
    }
}

/// The ANN twin: same tokenizer and width, a standard transformer, ReLU for LIF.
pub struct ScratchClip {
    pub image: ScratchImageEncoder,
    pub text: ScratchTextEncoder,
    pub config: SpikeClipConfig,
    varmap: VarMap,
}

impl ScratchClip {
    /// Fresh weights drawn from `seed`, the ops as [`SpikeClip::new`] chooses them.
    pub fn new(config: &SpikeClipConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::with_ops(config, seed, device, Ops::for_device(device))
    }

    /// [`Self::new`] with its ops run by `ops`.
    pub fn with_ops(
        config: &SpikeClipConfig,
        seed: u64,
        device: &Device,
        ops: Ops,
    ) -> Result<Self> {
        let (image, text, varmap) = build_towers(
            config,
            (seed, device, ops),
            ScratchImageEncoder::new,
            ScratchTextEncoder::new,
        )?;
        Ok(Self {
            image,
            text,
            config: config.clone(),
            varmap,
        })
    }
}

impl Student for ScratchClip {
    fn image_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.image.forward(x, train)
    }
    fn text_features(&self, ids: &Tensor, _train: bool) -> Result<Tensor> {
        self.text.forward(ids)
    }
    fn varmap(&self) -> &VarMap {
        &self.varmap
    }
    fn grad_slots(&self) -> Vec<GradSlot> {
        self.text.grad_slots()
    }
}
