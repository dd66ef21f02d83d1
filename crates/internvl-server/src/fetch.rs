//! http(s) image URLs, fetched only when the server was started with `--allow-remote-media`.
//!
//! A URL a client sends makes this server open a connection, so each hop is checked before it is made:
//! http or https only, the host on the allow-list when there is one, every address the name resolves to
//! public (no loopback, private, link-local, ...) unless `--allow-private-media`, and the connection made
//! to exactly the addresses checked (so a second DNS answer cannot swap in another). Redirects are followed
//! by hand (at most 3, each hop checked the same way); the body is read with a byte cap and the whole
//! fetch has a deadline. Every failure is a 400 or 403 naming `image_url`, never a 5xx.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use crate::error::ApiError;

#[derive(Debug, Clone)]
pub struct RemoteMedia {
    /// Hosts that may be fetched from; empty: any (public) host.
    pub hosts: Vec<String>,
    /// Also addresses on loopback, private and link-local networks (a LAN's image server, tests).
    pub private: bool,
    pub timeout: Duration,
    pub max_bytes: usize,
}

const MAX_REDIRECTS: usize = 3;

fn refused(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "permission_error", message).param("image_url")
}

fn failed(message: String) -> ApiError {
    ApiError::invalid(message).param("image_url").code("invalid_image")
}

/// Whether an address is one a server on the internet could have: not this machine, not a private or
/// link-local network, not multicast or reserved.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space (carrier NAT)
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || first == 0x2001 && v6.segments()[1] == 0x0db8) // documentation
        }
    }
}

/// The image at `url`, within the policy's limits.
pub async fn get(url: &str, policy: &RemoteMedia) -> Result<Vec<u8>, ApiError> {
    let deadline = Instant::now() + policy.timeout;
    let mut url = reqwest::Url::parse(url).map_err(|e| failed(format!("image_url: {e}")))?;
    for _ in 0..=MAX_REDIRECTS {
        let (host, addrs) = check(&url, policy).await?;
        let left = deadline.saturating_duration_since(Instant::now());
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .resolve_to_addrs(&host, &addrs)
            .timeout(left)
            .user_agent(concat!("internvl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| failed(format!("image_url: {e}")))?;
        let shown = format!("{}://{host}{}", url.scheme(), url.path());
        let timeout = |_| failed(format!("image_url: fetching {shown} took more than {} s", policy.timeout.as_secs()));
        let mut response = tokio::time::timeout(left, client.get(url.clone()).send())
            .await
            .map_err(timeout)?
            .map_err(|e| failed(format!("image_url: fetching {shown}: {}", without_url(e))))?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| failed(format!("image_url: {shown} redirected without a Location")))?;
            url = url.join(location).map_err(|e| failed(format!("image_url: redirect from {shown}: {e}")))?;
            continue;
        }
        if !status.is_success() {
            return Err(failed(format!("image_url: {shown} answered {status}")));
        }
        if response.content_length().is_some_and(|n| n > policy.max_bytes as u64) {
            return Err(failed(format!("image_url: {shown} is more than {} bytes", policy.max_bytes)));
        }
        let mut body = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(left, response.chunk())
                .await
                .map_err(timeout)?
                .map_err(|e| failed(format!("image_url: reading {shown}: {}", without_url(e))))?;
            let Some(chunk) = chunk else { break };
            if body.len() + chunk.len() > policy.max_bytes {
                return Err(failed(format!("image_url: {shown} is more than {} bytes", policy.max_bytes)));
            }
            body.extend_from_slice(&chunk);
        }
        return Ok(body);
    }
    Err(failed(format!("image_url: more than {MAX_REDIRECTS} redirects")))
}

/// The hop's host and the addresses to connect to, after the policy's checks.
async fn check(url: &reqwest::Url, policy: &RemoteMedia) -> Result<(String, Vec<SocketAddr>), ApiError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(refused(format!("image_url: {}:// URLs are not fetched", url.scheme())));
    }
    let host = url.host_str().ok_or_else(|| failed("image_url: the URL has no host".into()))?.to_string();
    if !policy.hosts.is_empty() && !policy.hosts.iter().any(|h| h.eq_ignore_ascii_case(&host)) {
        return Err(refused(format!("image_url: host {host} is not on the server's --allow-media-host list")));
    }
    let port = url.port_or_known_default().unwrap_or(80);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
        .await
        .map_err(|e| failed(format!("image_url: cannot resolve {host}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(failed(format!("image_url: {host} has no address")));
    }
    if !policy.private {
        if let Some(a) = addrs.iter().find(|a| !is_public(a.ip())) {
            return Err(refused(format!(
                "image_url: {host} is {} on a private or local network; not fetched (--allow-private-media)",
                a.ip()
            )));
        }
    }
    Ok((host, addrs))
}

/// reqwest's message without the URL it repeats (it may carry credentials), with its causes.
fn without_url(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::is_public;

    #[test]
    fn private_and_local_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }
}
