//! `--device auto|cpu|cuda|cuda:N` to a libtorch device, refusing CUDA that is not there
//! instead of quietly training on the CPU.

use tch::{Cuda, Device};

use crate::error::{Result, WorkerError};

/// Resolves a device name.
pub fn resolve(name: &str) -> Result<Device> {
    let gpus = Cuda::device_count();
    let no_cuda = || {
        WorkerError::Device(format!(
            "`{name}` asks for CUDA, but libtorch sees no usable GPU (cuda available: {}, devices: {gpus})",
            Cuda::is_available()
        ))
    };
    match name {
        "auto" => Ok(if Cuda::is_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err(no_cuda())
            }
        }
        other => {
            let Some(index) = other.strip_prefix("cuda:") else {
                return Err(WorkerError::Device(format!(
                    "unknown device `{other}`: use auto, cpu, cuda or cuda:N"
                )));
            };
            let index: usize = index
                .parse()
                .map_err(|_| WorkerError::Device(format!("`{other}`: the GPU index must be a number")))?;
            if !Cuda::is_available() {
                return Err(no_cuda());
            }
            if index as i64 >= gpus {
                return Err(WorkerError::Device(format!("`{other}`: only {gpus} GPUs are visible")));
            }
            Ok(Device::Cuda(index))
        }
    }
}

/// The name a device goes by in logs and at Join.
pub fn describe(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_unknown_names() {
        assert_eq!(resolve("cpu").unwrap(), Device::Cpu);
        assert!(resolve("tpu").unwrap_err().to_string().contains("unknown device `tpu`"));
        assert!(resolve("cuda:x").unwrap_err().to_string().contains("must be a number"));
    }

    #[test]
    fn cuda_without_a_gpu_is_an_error_not_a_cpu_run() {
        if Cuda::is_available() {
            return;
        }
        let err = resolve("cuda").unwrap_err().to_string();
        assert!(err.contains("no usable GPU"), "{err}");
        assert!(resolve("cuda:0").is_err());
        assert_eq!(resolve("auto").unwrap(), Device::Cpu);
    }
}
