//! `--device auto|cpu|cuda|cuda:N` to a libtorch device, refusing CUDA that is not there
//! instead of quietly training on the CPU; `--devices all|LIST` to the devices of a worker's
//! replicas.

use tch::{Cuda, Device};

use crate::error::{Result, WorkerError};

/// What libtorch can see of CUDA.
#[derive(Debug, Clone, Copy)]
struct Visible {
    available: bool,
    gpus: i64,
}

impl Visible {
    fn now() -> Visible {
        Visible {
            available: Cuda::is_available(),
            gpus: Cuda::device_count(),
        }
    }
}

/// Resolves a device name.
pub fn resolve(name: &str) -> Result<Device> {
    resolve_in(name, Visible::now())
}

/// Resolves `--devices`: `all` is one replica per GPU libtorch sees; otherwise a comma list of
/// names as [`resolve`] takes them (`cuda:0,cuda:1`, `cpu,cpu`). One GPU twice is an error: two
/// replicas on it would only compete for it.
pub fn resolve_list(list: &str) -> Result<Vec<Device>> {
    resolve_list_in(list, Visible::now())
}

fn resolve_list_in(list: &str, visible: Visible) -> Result<Vec<Device>> {
    if list.trim() == "all" {
        if !visible.available || visible.gpus < 1 {
            return Err(WorkerError::Device(format!(
                "`--devices all` found no GPU: libtorch sees {} CUDA devices (cuda available: {}). Check \
                 CUDA_VISIBLE_DEVICES and the driver, or train on the CPU with --device cpu",
                visible.gpus, visible.available
            )));
        }
        return Ok((0..visible.gpus as usize).map(Device::Cuda).collect());
    }
    let mut devices: Vec<Device> = Vec::new();
    for name in list.split(',').map(str::trim) {
        if name.is_empty() {
            return Err(WorkerError::Device(format!(
                "`--devices {list}` has an empty entry: write all, or names separated by commas (cuda:0,cuda:1)"
            )));
        }
        let device = resolve_in(name, visible)?;
        if matches!(device, Device::Cuda(_)) && devices.contains(&device) {
            return Err(WorkerError::Device(format!(
                "`--devices {list}` names {} twice: give each GPU one replica",
                describe(device)
            )));
        }
        devices.push(device);
    }
    Ok(devices)
}

fn resolve_in(name: &str, visible: Visible) -> Result<Device> {
    let Visible { available, gpus } = visible;
    let no_cuda = || {
        WorkerError::Device(format!(
            "`{name}` asks for CUDA, but libtorch sees no usable GPU (cuda available: {available}, devices: {gpus})"
        ))
    };
    match name {
        "auto" => Ok(if available { Device::Cuda(0) } else { Device::Cpu }),
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if available {
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
            if !available {
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

/// The names of several devices, as `--devices` takes them.
pub fn describe_all(devices: &[Device]) -> String {
    devices.iter().map(|&d| describe(d)).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_GPU: Visible = Visible {
        available: false,
        gpus: 0,
    };
    const TWO_GPUS: Visible = Visible {
        available: true,
        gpus: 2,
    };

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

    #[test]
    fn all_is_every_visible_gpu_and_without_one_says_where_to_look() {
        assert_eq!(
            resolve_list_in("all", TWO_GPUS).unwrap(),
            vec![Device::Cuda(0), Device::Cuda(1)]
        );
        let err = resolve_list_in("all", NO_GPU).unwrap_err().to_string();
        assert!(
            err.contains("CUDA_VISIBLE_DEVICES") && err.contains("--device cpu"),
            "{err}"
        );
        if !Cuda::is_available() {
            assert!(resolve_list("all").is_err(), "this machine's libtorch sees no GPU");
        }
    }

    #[test]
    fn lists_of_devices() {
        assert_eq!(
            resolve_list_in("cpu,cpu", NO_GPU).unwrap(),
            vec![Device::Cpu, Device::Cpu]
        );
        assert_eq!(
            resolve_list_in("cuda:1, cuda:0", TWO_GPUS).unwrap(),
            vec![Device::Cuda(1), Device::Cuda(0)]
        );
        assert_eq!(describe_all(&[Device::Cuda(1), Device::Cpu]), "cuda:1,cpu");
        let err = resolve_list_in("cuda:0,cuda:2", TWO_GPUS).unwrap_err().to_string();
        assert!(err.contains("only 2 GPUs"), "{err}");
        let err = resolve_list_in("cpu,,cpu", NO_GPU).unwrap_err().to_string();
        assert!(err.contains("empty entry"), "{err}");
        assert!(
            resolve_list_in("cuda:0,cpu", NO_GPU).is_err(),
            "no CUDA, no CUDA replica"
        );
    }

    #[test]
    fn one_gpu_twice_is_an_error_naming_it() {
        for list in ["cuda:1,cuda:1", "cuda,cuda:0", "cuda:0,cuda:1,cuda:0"] {
            let err = resolve_list_in(list, TWO_GPUS).unwrap_err().to_string();
            let named = if list.starts_with("cuda:1") { "cuda:1" } else { "cuda:0" };
            assert!(err.contains(&format!("names {named} twice")), "{list}: {err}");
        }
    }
}
