//! Training stops loudly instead of silently wasting hours: on a non-finite loss, and when a
//! trainable parameter got no gradient (a detached branch or an unused layer, which would
//! otherwise just never learn).

use anyhow::bail;
use candle_core::{Tensor, Var};

use super::grads::Gradients;

/// The loss as an `f32`, or an error if it is NaN or infinite.
pub fn finite_loss(loss: &Tensor, step: u64) -> anyhow::Result<f32> {
    let value = loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
    if !value.is_finite() {
        bail!("loss became {value} at step {step}; training stopped (the last good checkpoint is kept). Try a lower learning rate.");
    }
    Ok(value)
}

/// Fails, naming the parameters, unless every one of `params` has a gradient in `grads`.
pub fn all_have_gradients(grads: &Gradients, params: &[(String, Var)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = params
        .iter()
        .filter(|(_, var)| grads.get(var.as_tensor()).is_none())
        .map(|(name, _)| name.as_str())
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} trainable parameter(s) received no gradient: {}",
            missing.len(),
            missing.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn non_finite_loss_is_refused() {
        let dev = Device::Cpu;
        assert_eq!(
            finite_loss(&Tensor::new(1.5f32, &dev).unwrap(), 0).unwrap(),
            1.5
        );
        let err = finite_loss(&Tensor::new(f32::NAN, &dev).unwrap(), 12).unwrap_err();
        assert!(err.to_string().contains("NaN at step 12"), "{err}");
        assert!(finite_loss(&Tensor::new(f32::INFINITY, &dev).unwrap(), 0).is_err());
    }

    #[test]
    fn missing_gradient_names_the_parameter() {
        let dev = Device::Cpu;
        let used = Var::new(&[1f32, 2.], &dev).unwrap();
        let unused = Var::new(&[3f32], &dev).unwrap();
        let loss = used.as_tensor().sqr().unwrap().sum_all().unwrap();
        let grads = Gradients::backward(&loss, &[]).unwrap();
        let params = vec![("enc.w".to_string(), used), ("head.b".to_string(), unused)];
        let err = all_have_gradients(&grads, &params).unwrap_err().to_string();
        assert!(err.contains("head.b") && !err.contains("enc.w"), "{err}");
        assert!(all_have_gradients(&grads, &params[..1]).is_ok());
    }
}
