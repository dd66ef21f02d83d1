//! `internvl devices`: which execution providers this binary's ONNX Runtime has.

use anyhow::Result;
use clap::Args;
use internvl::error::{ErrorKind, WithKind};
use internvl::runtime::Device;

#[derive(Args)]
pub struct DevicesArgs {
    /// Exit non-zero unless ONNX Runtime is a GPU build with every provider library beside it (the GPU
    /// bundle's layout check; needs no GPU).
    #[arg(long)]
    pub bundle_check: bool,
}

pub fn devices(a: DevicesArgs) -> Result<()> {
    let lib = internvl::runtime::library()?;
    println!("onnxruntime: {}", lib.display());
    let mut bad = Vec::new();
    for device in [Device::Cpu, Device::Cuda, Device::Tensorrt] {
        match internvl::runtime::device_status(device) {
            Ok(()) => println!("{}: available", device.name()),
            Err(why) => {
                println!("{}: not available: {why}", device.name());
                bad.push(device.name());
            }
        }
    }
    if a.bundle_check && !bad.is_empty() {
        return Err(anyhow::anyhow!("--bundle-check: {} cannot start from {}", bad.join(", "), lib.display()))
            .kind(ErrorKind::Usage);
    }
    Ok(())
}
