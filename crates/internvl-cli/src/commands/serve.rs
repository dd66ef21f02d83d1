//! `internvl serve`: the flags of the OpenAI-compatible server (the `internvl-server` crate).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use internvl::error::{ErrorKind, WithKind};
use internvl::files;
use internvl::manifest::Manifest;

use crate::args::{positive, EngineArgs};

#[derive(Args)]
pub struct ServeArgs {
    /// Model folder written by `python -m export`.
    #[arg(long)]
    pub model: PathBuf,
    /// Address to listen on (loopback by default: expose it deliberately).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Port (0 = any free one; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests answered at once (continuous batching; one KV-cache row each).
    #[arg(long, allow_negative_numbers = true, default_value_t = 4, value_parser = positive(256))]
    pub parallel: usize,
    /// Requests that may wait for a free row; more get 429 with Retry-After.
    #[arg(long, allow_negative_numbers = true, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=100_000))]
    pub queue: usize,
    /// Require `Authorization: Bearer KEY` on /v1 routes.
    #[arg(long, conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// Read the API key from this file (first line), so it stays out of the process list.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Largest request body in bytes (base64 images included); larger ones get 413.
    #[arg(long, allow_negative_numbers = true, default_value_t = internvl_server::DEFAULT_BODY_LIMIT, value_parser = positive(1 << 30))]
    pub body_limit: usize,
    /// Allow `file://` image URLs for files under this folder.
    #[arg(long)]
    pub media_root: Option<PathBuf>,
    /// Fetch http(s) image URLs (public addresses only, each redirect checked; off by default).
    #[arg(long)]
    pub allow_remote_media: bool,
    /// With --allow-remote-media: only from this host (repeat for several).
    #[arg(long, requires = "allow_remote_media")]
    pub allow_media_host: Vec<String>,
    /// With --allow-remote-media: also hosts on loopback, private and link-local networks.
    #[arg(long, requires = "allow_remote_media")]
    pub allow_private_media: bool,
    /// Seconds a remote image may take to fetch.
    #[arg(long, allow_negative_numbers = true, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub media_timeout: u64,
    /// Decoded image pixels all admitted requests may hold at once (3 bytes each; default: four images
    /// at Pillow's decompression-bomb limit, 2.1 GB); past it: 429.
    #[arg(long, allow_negative_numbers = true, default_value_t = 4 * internvl::media::image::MAX_IMAGE_PIXELS, value_parser = clap::value_parser!(u64).range(1..=(1u64 << 40)))]
    pub max_pixels_in_flight: u64,
    /// Largest remote image in bytes.
    #[arg(long, allow_negative_numbers = true, default_value_t = 32 << 20, value_parser = positive(internvl::files::MAX_IMAGE_FILE))]
    pub media_max_bytes: usize,
    /// Bytes of vision features kept for repeated images (0 = no cache).
    #[arg(long, allow_negative_numbers = true, default_value_t = internvl::model::DEFAULT_MEDIA_CACHE_BYTES, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=(1u64 << 40)))]
    pub vision_cache_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGTERM / SIGINT.
    #[arg(long, allow_negative_numbers = true, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub grace_period: u64,
    /// Seconds between SSE keep-alive comments (while an image encodes, for example).
    #[arg(long, allow_negative_numbers = true, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub keep_alive: u64,
    /// Connections open at once; more wait to be accepted (lowered to what the open-file limit allows).
    #[arg(long, allow_negative_numbers = true, default_value_t = 1024, value_parser = positive(1 << 20))]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers, and an idle keep-alive connection to start its
    /// next request; then the connection is closed.
    #[arg(long, allow_negative_numbers = true, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout: u64,
    /// Seconds a request body may take to arrive in full (silent or dripping); then 408.
    #[arg(long, allow_negative_numbers = true, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub body_timeout: u64,
    /// Seconds a stream may wait for its client to read; then it is cut and its request cancelled.
    #[arg(long, allow_negative_numbers = true, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub send_timeout: u64,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Quantised models: every answer equal to its solo `internvl run` (decode steps one request per call
    /// and no prompt reuse across requests; slower). fp32 answers are equal regardless.
    #[arg(long)]
    pub exact: bool,
    /// ONNX Runtime's own warnings on stderr.
    #[arg(long)]
    pub verbose: bool,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    internvl::runtime::show_runtime_logs(a.verbose);
    let api_key = match (&a.api_key, &a.api_key_file) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(path)) => {
            let text = files::read_text(path, 64 << 10, "--api-key-file").kind(ErrorKind::Usage)?;
            Some(text.lines().next().unwrap_or("").trim().to_string())
        }
        (None, None) => None,
    };
    if api_key.as_deref() == Some("") {
        return Err(anyhow::anyhow!("the API key is empty")).kind(ErrorKind::Usage);
    }
    // Fails now, not after the listener is up, for a folder that is not a model.
    Manifest::load(&a.model)?;
    if let Some(dir) = a.media_root.as_deref().filter(|d| !d.is_dir()) {
        return Err(anyhow::anyhow!("--media-root {}: not a folder", dir.display())).kind(ErrorKind::Usage);
    }
    let cfg = internvl_server::ServeConfig {
        model: a.model,
        runtime: a.engine.rt.options(),
        addr: std::net::SocketAddr::new(a.host, a.port),
        parallel: a.parallel,
        queue: a.queue,
        api_key,
        body_limit: a.body_limit,
        media_root: a.media_root,
        vision_batch: a.engine.vision_batch,
        prefill_chunk: a.engine.prefill_chunk,
        media_cache_bytes: a.vision_cache_bytes,
        grace_period: a.grace_period,
        keep_alive: a.keep_alive,
        max_connections: a.max_connections,
        timeouts: internvl_server::Timeouts {
            header: Duration::from_secs(a.header_timeout),
            body: Duration::from_secs(a.body_timeout),
            send: Duration::from_secs(a.send_timeout),
        },
        exact: a.exact,
        max_pixels_in_flight: a.max_pixels_in_flight,
        remote_media: a.allow_remote_media.then(|| internvl_server::fetch::RemoteMedia {
            hosts: a.allow_media_host,
            private: a.allow_private_media,
            timeout: std::time::Duration::from_secs(a.media_timeout),
            max_bytes: a.media_max_bytes,
        }),
    };
    internvl_server::serve(cfg, |addr| eprintln!("internvl serve: listening on http://{addr} (loading the model)"))
}
