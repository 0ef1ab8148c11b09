//! Which devices a worker trains on (`--devices`): the value parsed and checked against what
//! libtorch sees and what this binary was built with. [`parse`] is pure (the facts are an
//! argument); [`resolve`] asks libtorch for them.

/// A device, as the list holds it (libtorch's).
pub use tch::Device;

/// What a device list is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Support {
    /// CUDA devices libtorch sees (0 without a GPU, or in a build without the `cuda` feature,
    /// where libtorch's CUDA library is not linked).
    pub cuda_devices: usize,
    /// Built with the `cuda` feature.
    pub cuda: bool,
    /// Built with the `nccl` feature: several CUDA replicas can sum their gradients.
    pub nccl: bool,
}

impl Support {
    /// This process: the binary's features and libtorch's CUDA device count.
    pub fn here() -> Self {
        Self {
            cuda_devices: usize::try_from(tch::Cuda::device_count()).unwrap_or(0),
            cuda: cfg!(feature = "cuda"),
            nccl: cfg!(feature = "nccl"),
        }
    }
}

/// A `--devices` value that cannot be used; each names the value or the entry at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DevicesError {
    #[error("`{0}` is not a device list: use cpu, cuda:N (N = 0, 1, ...), a comma-separated list of them, or auto")]
    Syntax(String),
    #[error("{device} is not available: {}", seen(*.cuda_devices, *.cuda))]
    Unavailable {
        device: String,
        cuda_devices: usize,
        cuda: bool,
    },
    #[error("{0} appears twice in the device list: NCCL runs one rank per GPU")]
    Duplicate(String),
    #[error("`{0}` mixes the CPU and CUDA devices: the replicas of one worker sum their gradients with one collective, so list devices of one kind")]
    Mixed(String),
    #[error("`{list}` means {count} CUDA replicas, which sum their gradients with NCCL, and this binary was built without the `nccl` feature: build it with `--features nccl`, or name one device")]
    NoNccl { list: String, count: usize },
}

fn seen(cuda_devices: usize, cuda: bool) -> String {
    match cuda_devices {
        0 if !cuda => "libtorch sees no CUDA device: this binary was built without the `cuda` feature (build it with `--features cuda` or `--features nccl`)".into(),
        0 => "libtorch sees no CUDA device on this machine".into(),
        1 => "libtorch sees 1 CUDA device (cuda:0)".into(),
        n => format!("libtorch sees {n} CUDA devices (cuda:0 to cuda:{})", n - 1),
    }
}

/// The devices `spec` names, one model replica each, in rank order: `cpu` (one CPU replica),
/// a comma-separated list such as `cuda:0,cuda:1` or `cpu,cpu`, or `auto` (every CUDA device
/// libtorch sees, else the CPU).
///
/// # Errors
/// An unknown entry, a CUDA device that is not there, a CUDA device listed twice (NCCL runs
/// one rank per GPU; CPU replicas may repeat), CPU and CUDA mixed, or several CUDA devices in
/// a build without NCCL.
pub fn parse(spec: &str, support: Support) -> Result<Vec<Device>, DevicesError> {
    let spec = spec.trim();
    let devices = if spec == "auto" {
        match support.cuda_devices {
            0 => vec![Device::Cpu],
            n => (0..n).map(Device::Cuda).collect(),
        }
    } else {
        let mut devices = Vec::new();
        for entry in spec.split(',').map(str::trim) {
            let device = match entry {
                "cpu" => Device::Cpu,
                _ => match entry.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
                    Some(i) if i < support.cuda_devices => Device::Cuda(i),
                    Some(_) => {
                        return Err(DevicesError::Unavailable {
                            device: entry.into(),
                            cuda_devices: support.cuda_devices,
                            cuda: support.cuda,
                        })
                    }
                    None => return Err(DevicesError::Syntax(spec.into())),
                },
            };
            if device != Device::Cpu && devices.contains(&device) {
                return Err(DevicesError::Duplicate(entry.into()));
            }
            devices.push(device);
        }
        devices
    };
    let cuda = devices.iter().filter(|d| d.is_cuda()).count();
    if cuda > 0 && cuda < devices.len() {
        return Err(DevicesError::Mixed(spec.into()));
    }
    if cuda > 1 && !support.nccl {
        return Err(DevicesError::NoNccl {
            list: spec.into(),
            count: cuda,
        });
    }
    Ok(devices)
}

/// [`parse`] against this process ([`Support::here`]).
///
/// # Errors
/// As [`parse`].
pub fn resolve(spec: &str) -> Result<Vec<Device>, DevicesError> {
    parse(spec, Support::here())
}

/// A device as `--devices` writes it.
pub fn name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_GPUS: Support = Support {
        cuda_devices: 2,
        cuda: true,
        nccl: true,
    };
    const CPU_ONLY: Support = Support {
        cuda_devices: 0,
        cuda: false,
        nccl: false,
    };

    #[test]
    fn lists_and_auto() {
        assert_eq!(parse("cpu", CPU_ONLY), Ok(vec![Device::Cpu]));
        assert_eq!(parse("cpu,cpu", CPU_ONLY), Ok(vec![Device::Cpu, Device::Cpu]));
        assert_eq!(parse(" cpu , cpu ", CPU_ONLY), Ok(vec![Device::Cpu, Device::Cpu]));
        assert_eq!(parse("auto", CPU_ONLY), Ok(vec![Device::Cpu]));
        assert_eq!(parse("auto", TWO_GPUS), Ok(vec![Device::Cuda(0), Device::Cuda(1)]));
        assert_eq!(
            parse("cuda:1,cuda:0", TWO_GPUS),
            Ok(vec![Device::Cuda(1), Device::Cuda(0)])
        );
        let one_gpu_no_nccl = Support {
            cuda_devices: 1,
            cuda: true,
            nccl: false,
        };
        assert_eq!(parse("cuda:0", one_gpu_no_nccl), Ok(vec![Device::Cuda(0)]));
        assert_eq!(parse("auto", one_gpu_no_nccl), Ok(vec![Device::Cuda(0)]));
        assert_eq!(name(Device::Cuda(3)), "cuda:3");
        assert_eq!(name(Device::Cpu), "cpu");
    }

    #[test]
    fn bad_values_are_named_in_the_error() {
        let err = |spec: &str, s: Support| parse(spec, s).expect_err(spec).to_string();
        for bad in ["", "gpu", "cuda", "cuda:x", "cuda:-1", "cpu,", "auto,cpu", "CPU"] {
            let e = err(bad, TWO_GPUS);
            assert!(e.contains(&format!("`{bad}` is not a device list")), "{bad}: {e}");
        }
        assert_eq!(
            err("cuda:3", TWO_GPUS),
            "cuda:3 is not available: libtorch sees 2 CUDA devices (cuda:0 to cuda:1)"
        );
        let e = err("cuda:0", CPU_ONLY);
        assert!(
            e.starts_with("cuda:0 is not available: libtorch sees no CUDA device"),
            "{e}"
        );
        assert!(e.contains("without the `cuda` feature"), "{e}");
        let e = err("cuda:0", Support { cuda: true, ..CPU_ONLY });
        assert!(!e.contains("feature"), "{e}");
        assert!(err("cuda:0,cuda:0", TWO_GPUS).starts_with("cuda:0 appears twice"));
        assert!(err("cpu,cuda:0", TWO_GPUS).contains("`cpu,cuda:0` mixes the CPU and CUDA devices"));
        let no_nccl = Support {
            nccl: false,
            ..TWO_GPUS
        };
        assert!(err("cuda:0,cuda:1", no_nccl).contains("`cuda:0,cuda:1` means 2 CUDA replicas"));
        assert!(err("auto", no_nccl).contains("built without the `nccl` feature"));
    }
}
