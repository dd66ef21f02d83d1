//! Execution-provider choices, decided without a GPU: which provider runs each graph with which options,
//! which graph file a stage opens, which folders cannot run where, and the errors of a build without
//! the GPU providers. The GPU itself is checked by scripts/gpu_check.sh.

mod common;

use common::*;
use internvl::manifest::{Dtype, Manifest};
use internvl::runtime::providers::{self, Fit, ProviderPlan};
use internvl::runtime::{Device, GpuOptions, Stage};

fn manifest(name: &str) -> Manifest {
    Manifest::load(&fixtures().join(name)).unwrap()
}

#[test]
fn tensorrt_takes_the_vision_graph_and_cuda_the_decoder() {
    let m = manifest("model-float16");
    let gpu = GpuOptions { device_id: 1, memory_limit: Some(4 << 30), tf32: false, trt_cache: None };
    let cuda = ProviderPlan::Cuda { device_id: 1, memory_limit: Some(4 << 30), tf32: false };
    assert_eq!(providers::plan(&m, Device::Tensorrt, Stage::Decoder, &gpu), vec![cuda.clone()]);
    assert_eq!(providers::plan(&m, Device::Cuda, Stage::Vision, &gpu), vec![cuda.clone()]);
    assert!(providers::plan(&m, Device::Cpu, Stage::Vision, &gpu).is_empty());
    let vision = providers::plan(&m, Device::Tensorrt, Stage::Vision, &gpu);
    assert_eq!(vision.len(), 2, "TensorRT first, CUDA after it for what TensorRT leaves");
    assert_eq!(vision[1], cuda);
    let ProviderPlan::TensorRt { device_id, fp16, bf16, cache_dir, profile } = &vision[0] else {
        panic!("vision under tensorrt is not on TensorRT: {vision:?}")
    };
    assert_eq!((*device_id, *fp16, *bf16), (1, true, false));
    assert_eq!(cache_dir, &m.dir.join("trt-cache"));
    // 1 tile up to the model's limit plus the thumbnail (12 + 1): no engine rebuild for any image.
    assert_eq!(m.image.max_tiles, 12);
    assert_eq!(
        profile,
        &[
            "pixel_values:1x3x448x448".to_string(),
            "pixel_values:7x3x448x448".into(),
            "pixel_values:13x3x448x448".into()
        ]
    );
    assert_eq!(providers::graph_file(&m, Device::Tensorrt, Stage::Vision), Some("vision-trt.onnx"));
    assert_eq!(providers::graph_file(&m, Device::Cuda, Stage::Vision), None);
    assert_eq!(providers::graph_file(&m, Device::Tensorrt, Stage::Decoder), None);

    let bf = manifest("model-bfloat16");
    let ProviderPlan::TensorRt { fp16, bf16, cache_dir, .. } = &providers::plan(
        &bf,
        Device::Tensorrt,
        Stage::Vision,
        &GpuOptions { trt_cache: Some("/tmp/engines".into()), ..Default::default() },
    )[0] else {
        panic!("bfloat16 vision not on TensorRT")
    };
    assert_eq!((*fp16, *bf16), (false, true));
    assert_eq!(cache_dir, std::path::Path::new("/tmp/engines"));
}

#[test]
fn folders_say_where_they_run() {
    let cpu_int8 = manifest("models/qwen2-amx-int8");
    assert!(matches!(providers::fit(&cpu_int8, Device::Cuda), Fit::Slow(w) if w.contains("float16")));
    assert_eq!(providers::fit(&cpu_int8, Device::Cpu), Fit::Yes);
    assert!(
        matches!(providers::fit(&manifest("model"), Device::Cuda), Fit::Slow(w) if w.contains("GroupQueryAttention"))
    );
    assert_eq!(providers::fit(&manifest("model-float16"), Device::Cuda), Fit::Yes);
    assert!(matches!(providers::fit(&manifest("model-bfloat16"), Device::Cpu), Fit::No(_)));
    assert_eq!(providers::devices_for(Dtype::Bfloat16), ["tensorrt", "cuda"]);
    // GPU int4 (float16 / bfloat16 activations): the float16 one runs on the CPU, slowly; bfloat16 not.
    let mut int4 = manifest("model-float16");
    int4.dtype = Dtype::Int4Float16;
    assert_eq!(providers::fit(&int4, Device::Cuda), Fit::Yes);
    assert!(matches!(providers::fit(&int4, Device::Cpu), Fit::Slow(w) if w.contains("--dtype int4")));
    int4.dtype = Dtype::Int4Bfloat16;
    assert!(matches!(providers::fit(&int4, Device::Cpu), Fit::No(w) if w.contains("int4-bfloat16")));
    assert_eq!(providers::fit(&int4, Device::Tensorrt), Fit::Yes);
    assert_eq!(providers::devices_for(Dtype::Int4Bfloat16), ["tensorrt", "cuda"]);
    let info = run(&["info", "--model", fixtures().join("model-bfloat16").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&info.stdout).contains("devices: tensorrt, cuda (best first)"));
}

#[test]
fn bfloat16_on_the_cpu_is_a_usage_error_before_loading() {
    let out = run_model(&fixtures().join("model-bfloat16"), None, &["--device", "cpu"]);
    assert_clean_error(&out, "no bfloat16 kernels");
    assert_eq!(out.status.code(), Some(2));
    // auto on a machine without a GPU provider: said, and then the same refusal.
    let out = run_model(&fixtures().join("model-bfloat16"), None, &["--device", "auto"]);
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains("--device auto: using cpu") && err.contains("no bfloat16 kernels"),
        "{err}"
    );
}

#[test]
fn auto_uses_the_cpu_where_no_gpu_provider_is_built_in_and_says_so() {
    let plain = run_model(&fixtures().join("model-float16"), None, &["--json", "--max-new-tokens", "6"]);
    let auto =
        run_model(&fixtures().join("model-float16"), None, &["--json", "--max-new-tokens", "6", "--device", "auto"]);
    assert!(auto.status.success(), "{}", stderr(&auto));
    assert!(stderr(&auto).contains("--device auto: using cpu (tensorrt: the tensorrt execution provider is not in"));
    let ids =
        |o: &std::process::Output| serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["token_ids"].clone();
    assert_eq!(ids(&auto), ids(&plain));
}

#[test]
fn gpu_devices_in_a_cpu_build_are_one_line_errors() {
    for device in ["cuda", "tensorrt"] {
        let out = run_model(&fixtures().join("model-float16"), None, &["--device", device]);
        assert_clean_error(
            &out,
            &format!("--device {device}: the {device} execution provider is not in the ONNX Runtime"),
        );
    }
    let out = run(&["devices"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cpu: available") && text.contains("cuda: not available"), "{text}");
    assert_clean_error(&run(&["devices", "--bundle-check"]), "--bundle-check: cuda, tensorrt cannot start");
}
