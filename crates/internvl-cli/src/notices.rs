//! What the library reports besides errors ([`internvl::notice::Notice`]), rendered on stderr as the
//! command line always has, and the spinners shown while something long runs without output.

use std::sync::Mutex;
use std::time::Duration;

use internvl::notice::{self, Notice};

/// The spinner shown while TensorRT builds engines (minutes on a first start).
static BUILDING: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// Sends the library's notices to stderr for the rest of the process.
pub fn install() {
    notice::set_handler(render);
}

fn render(n: &Notice) {
    match n {
        Notice::DeviceChosen { device, passed_over } => {
            let reason = if passed_over.is_empty() { String::new() } else { format!(" ({})", passed_over.join("; ")) };
            eprintln!("--device auto: using {}{reason}", device.name());
        }
        Notice::DeviceFailed { device, error, next } => {
            eprintln!("--device auto: {} did not start ({error}); trying {}", device.name(), next.name());
        }
        Notice::Slow(why) => eprintln!("warning: {why}"),
        Notice::NoTensorRtVariant { model_dir, file } => eprintln!(
            "warning: {} has no TensorRT variant of {file} (export again): its attention runs on CUDA",
            model_dir.display()
        ),
        Notice::RuntimeLog { level, location, message } => eprintln!("onnxruntime: {level} {location}: {message}"),
        Notice::BuildingEngines { graph, cache } => {
            let bar = indicatif::ProgressBar::new_spinner().with_message(format!(
                "building TensorRT engines for {graph} (first start on this GPU; kept in {})",
                cache.display()
            ));
            if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(250));
            *BUILDING.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar);
        }
        Notice::EnginesBuilt => {
            if let Some(bar) = BUILDING.lock().unwrap_or_else(|p| p.into_inner()).take() {
                bar.finish_and_clear();
            }
        }
    }
}

/// A spinner with `msg` on a terminal (`enabled`), else nothing.
pub fn spinner(enabled: bool, msg: &'static str) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner().with_message(msg);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}
