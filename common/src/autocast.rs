//! bf16 autocast for a model's forward pass (`[inner] autocast = "bf16"`), as
//! `torch.autocast(device_type, dtype=torch.bfloat16)` around the forward in PyTorch: matrix
//! products run in bf16 while the parameters, their gradients, the optimizer state and every
//! delta stay f32; ops autocast keeps in f32 (softmax, layer norm, losses) stay f32, and so do the
//! logits a model returns.
//!
//! tch 0.24 can only switch CUDA's autocast on, at its default dtype (f16). The per-device switch
//! and dtype are exported by libtorch (`at::autocast::set_autocast_enabled(DeviceType, bool)`,
//! `set_autocast_dtype(DeviceType, ScalarType)`, ATen's `autocast_mode.h`); this module declares
//! them directly (Itanium C++ names; both enums are `int8_t`) so the same setting works on CUDA
//! and on the CPU, where the tests exercise it. The state is per thread: [`Region`] sets it for
//! one forward call and restores what was there, clearing autocast's cache of cast weights when
//! the outermost region ends, so a weight updated in place is never seen through a stale bf16 copy.

// The only unsafe code here: calls into libtorch's autocast state, which tch does not wrap.
#![allow(unsafe_code)]

use crate::model::{Inputs, Model};
use tch::{Device, Kind, Tensor};

// libtorch's c10::DeviceType and c10::ScalarType values (c10/core/DeviceType.h, ScalarType.h).
const DEVICE_CPU: i8 = 0;
const DEVICE_CUDA: i8 = 1;
const SCALAR_BFLOAT16: i8 = 15;

#[allow(improper_ctypes)]
unsafe extern "C" {
    #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
    fn is_autocast_enabled(device: i8) -> bool;
    #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
    fn set_autocast_enabled(device: i8, enabled: bool);
    #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
    fn get_autocast_dtype(device: i8) -> i8;
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn set_autocast_dtype(device: i8, dtype: i8);
    #[link_name = "_ZN2at8autocast17increment_nestingEv"]
    fn increment_nesting() -> i32;
    #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
    fn decrement_nesting() -> i32;
    #[link_name = "_ZN2at8autocast11clear_cacheEv"]
    fn clear_cache();
}

fn device_type(device: Device) -> i8 {
    match device {
        Device::Cuda(_) => DEVICE_CUDA,
        // Autocast exists for CPU and CUDA only; the other backends tch knows are not used here.
        _ => DEVICE_CPU,
    }
}

/// bf16 autocast on `device`'s type for this thread while the value lives.
#[derive(Debug)]
pub struct Region {
    device: i8,
    was_enabled: bool,
    was_dtype: i8,
}

impl Region {
    /// Enters a bf16 autocast region for `device`.
    pub fn bf16(device: Device) -> Self {
        let device = device_type(device);
        // SAFETY: plain setters/getters of libtorch's thread-local autocast state; CPU and CUDA
        // both accept bf16, so none of them throws.
        unsafe {
            let region = Region {
                device,
                was_enabled: is_autocast_enabled(device),
                was_dtype: get_autocast_dtype(device),
            };
            set_autocast_dtype(device, SCALAR_BFLOAT16);
            set_autocast_enabled(device, true);
            increment_nesting();
            region
        }
    }

    /// Whether bf16 autocast is on for `device`'s type on this thread.
    pub fn active(device: Device) -> bool {
        let device = device_type(device);
        // SAFETY: as in `bf16`.
        unsafe { is_autocast_enabled(device) && get_autocast_dtype(device) == SCALAR_BFLOAT16 }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: as in `bf16`.
        unsafe {
            if decrement_nesting() == 0 {
                clear_cache();
            }
            set_autocast_enabled(self.device, self.was_enabled);
            set_autocast_dtype(self.device, self.was_dtype);
        }
    }
}

/// A model whose forward passes run under bf16 autocast; logits come back as f32.
pub struct Bf16 {
    inner: Box<dyn Model>,
    device: Device,
}

impl Bf16 {
    /// Wraps `inner`, whose parameters live on `device`.
    pub fn new(inner: Box<dyn Model>, device: Device) -> Self {
        Self { inner, device }
    }
}

impl std::fmt::Debug for Bf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bf16")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl Model for Bf16 {
    fn forward(&self, x: &Inputs) -> Tensor {
        let _region = Region::bf16(self.device);
        self.inner.forward(x).to_kind(Kind::Float)
    }

    fn parameters(&self) -> &[Tensor] {
        self.inner.parameters()
    }

    fn names(&self) -> &[String] {
        self.inner.names()
    }

    fn set_train(&self, train: bool) {
        self.inner.set_train(train);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bert::Bert;
    use crate::classifier::{BertClassifier, Pooling};

    fn classifier(seed: u64) -> BertClassifier {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/tiny-bert");
        match Bert::load(&dir, Device::Cpu, Kind::Float) {
            Ok(b) => BertClassifier::new(b, Pooling::Mean, 2, seed),
            Err(e) => panic!("tiny BERT: {e}"),
        }
    }

    fn batch() -> Inputs {
        let ids = Tensor::from_slice(&[2i64, 10, 11, 12, 3, 2, 20, 3, 0, 0, 2, 31, 32, 33, 3]).reshape([3, 5]);
        let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1]).reshape([3, 5]);
        Inputs::Tokens { ids, mask }
    }

    fn grads(model: &dyn Model, create_graph: bool) -> (Tensor, Vec<Tensor>) {
        let y = Tensor::from_slice(&[0i64, 1, 1]);
        let loss = model.forward(&batch()).cross_entropy_for_logits(&y);
        let g = Tensor::run_backward(&[&loss], model.parameters(), create_graph, create_graph);
        (loss, g)
    }

    fn flat(ts: &[Tensor]) -> Tensor {
        Tensor::cat(
            &ts.iter().map(|t| t.to_kind(Kind::Double).view(-1)).collect::<Vec<_>>(),
            0,
        )
    }

    #[test]
    fn a_region_sets_bf16_and_restores_the_thread_state() {
        assert!(!Region::active(Device::Cpu));
        {
            let _outer = Region::bf16(Device::Cpu);
            assert!(Region::active(Device::Cpu));
            {
                let _inner = Region::bf16(Device::Cpu);
                assert!(Region::active(Device::Cpu));
            }
            assert!(Region::active(Device::Cpu), "an inner region restores the outer one");
            // Inside, a matrix product runs in bf16.
            let a = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
            assert_eq!(a.matmul(&a).kind(), Kind::BFloat16);
        }
        assert!(!Region::active(Device::Cpu));
        let a = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
    }

    #[test]
    fn bf16_forward_and_gradients_stay_close_to_f32_and_are_f32() {
        let f32_model: Box<dyn Model> = Box::new(classifier(5));
        let bf16_model = Bf16::new(Box::new(classifier(5)), Device::Cpu);
        let (a, b) = (f32_model.forward(&batch()), bf16_model.forward(&batch()));
        assert_eq!(b.kind(), Kind::Float);
        let gap = (&a - &b).abs().max().double_value(&[]);
        let scale = a.abs().max().double_value(&[]);
        // bf16 keeps 8 bits of mantissa: the logits move, but by about its precision only.
        assert!(
            gap > 0.0,
            "the bf16 forward computed exactly the f32 logits: autocast was not on"
        );
        assert!(
            gap < 0.05 * scale.max(1.0),
            "bf16 logits are {gap} away from f32 ({scale})"
        );

        let (_, g32) = grads(f32_model.as_ref(), false);
        let (_, g16) = grads(&bf16_model, false);
        assert!(
            g16.iter().all(|g| g.kind() == Kind::Float),
            "parameter gradients are f32"
        );
        let (x, y) = (flat(&g32), flat(&g16));
        let cosine = x.dot(&y).double_value(&[]) / (x.norm().double_value(&[]) * y.norm().double_value(&[]));
        assert!(cosine > 0.99, "bf16 gradient direction: cosine {cosine}");
    }

    #[test]
    fn second_order_gradients_work_under_bf16() {
        // Exact hypergradients differentiate ⟨∇θ L, v⟩ again: defined, finite, and near f32's.
        let hvp = |model: &dyn Model| {
            let (_, g) = grads(model, true);
            let dot = g
                .iter()
                .map(|g| g.square().sum(Kind::Float))
                .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
            flat(&Tensor::run_backward(&[&dot], model.parameters(), false, false))
        };
        let h32 = hvp(&classifier(9));
        let h16 = hvp(&Bf16::new(Box::new(classifier(9)), Device::Cpu));
        assert!(bool::try_from(h16.isfinite().all()).expect("bool"));
        let cosine = h32.dot(&h16).double_value(&[]) / (h32.norm().double_value(&[]) * h16.norm().double_value(&[]));
        assert!(cosine > 0.9, "bf16 Hessian-vector product direction: cosine {cosine}");
    }
}
