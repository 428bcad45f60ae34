//! Where deliveries may go: the guard against server-side request forgery.
//! An endpoint's URL is checked when it is registered, and every address
//! its host resolves to is checked again at each connection (by the HTTP
//! client's resolver, [`GuardedResolver`]), so a name that later resolves
//! to an internal address (DNS rebinding) is refused too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use url::{Host, Url};

/// The variable that lets endpoints be internal and plain `http`.
pub const ALLOW_PRIVATE_ENV: &str = "INTEGRATIONS_WEBHOOK_ALLOW_PRIVATE";

/// Longest endpoint URL accepted.
pub const MAX_URL_LEN: usize = 2048;

/// Whether an address is internal: loopback, private, link-local,
/// unspecified, shared (carrier-grade NAT), multicast or broadcast, also
/// as an IPv4-mapped or IPv4-compatible IPv6 address. Such addresses reach this
/// host or its network, never an application's public endpoint.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => internal_v4(v4),
            None => internal_v6(v6),
        },
    }
}

fn internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        // 0.0.0.0/8 ("this network"), 100.64.0.0/10 (shared address
        // space), 192.0.0.0/24 (protocol assignments), 198.18.0.0/15
        // (benchmarking) and 240.0.0.0/4 (reserved): none is a public
        // endpoint, several reach the local network on some systems.
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && ip.octets()[2] == 0)
        || (a == 198 && (b == 18 || b == 19))
        || a >= 240
}

fn internal_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    // An IPv4 address inside: NAT64 (64:ff9b::/96 and the local-use
    // 64:ff9b:1::/48) and 6to4 (2002::/16) reach it through a gateway.
    let embedded = if s[0] == 0x64 && s[1] == 0xff9b {
        Some(Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32))
    } else if s[0] == 0x2002 {
        Some(Ipv4Addr::from(((s[1] as u32) << 16) | s[2] as u32))
    } else {
        None
    };
    if embedded.is_some_and(internal_v4) {
        return true;
    }
    ip.is_loopback()
        // Site-local (fec0::/10, deprecated) and Teredo (2001::/32).
        || (s[0] & 0xffc0) == 0xfec0
        || (s[0] == 0x2001 && s[1] == 0)
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_unique_local()
        || ip.is_unicast_link_local()
        // IPv4-compatible (deprecated) ::a.b.c.d
        || (ip.segments()[..6] == [0; 6])
}

/// Why an endpoint URL is refused; the text names what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Not an absolute http(s) URL, too long, or with credentials.
    #[error("{0}")]
    Malformed(String),
    /// `http` where `https` is required.
    #[error("the URL must use https (plain http only with {ALLOW_PRIVATE_ENV}=true, for tests and local development)")]
    NotHttps,
    /// The host is, or resolves to, an internal address.
    #[error("the host {0} is or resolves to a loopback, private or link-local address, which webhooks may not reach (set {ALLOW_PRIVATE_ENV}=true to allow it, for tests and local development)")]
    Internal(String),
}

/// Checks an endpoint URL as given by a client: absolute http(s), at most
/// [`MAX_URL_LEN`], no `user:pass@`, no fragment; https and public unless
/// `allow_private`. The host's current addresses, when it resolves, are
/// checked.
pub async fn check_endpoint_url(text: &str, allow_private: bool) -> Result<Url, AddressError> {
    if text.len() > MAX_URL_LEN {
        return Err(AddressError::Malformed(format!(
            "the URL is {} bytes; accepted: at most {MAX_URL_LEN}",
            text.len()
        )));
    }
    let url = Url::parse(text).map_err(|e| {
        AddressError::Malformed(format!(
            "not an absolute URL ({e}); accepted: https://host[:port]/path"
        ))
    })?;
    match url.scheme() {
        "https" => {}
        "http" if allow_private => {}
        "http" => return Err(AddressError::NotHttps),
        other => {
            return Err(AddressError::Malformed(format!(
                "the scheme '{other}' is not accepted; accepted: https"
            )))
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(AddressError::Malformed(
            "the URL carries a user name or password; accepted: a URL without user:pass@ (the signature authenticates deliveries)".into(),
        ));
    }
    if url.fragment().is_some() {
        return Err(AddressError::Malformed(
            "the URL has a #fragment, which is never sent; accepted: a URL without one".into(),
        ));
    }
    let Some(host) = url.host() else {
        return Err(AddressError::Malformed(
            "the URL has no host; accepted: https://host[:port]/path".into(),
        ));
    };
    if allow_private {
        return Ok(url);
    }
    match host {
        Host::Ipv4(ip) => refuse_internal(&url, [IpAddr::V4(ip)])?,
        Host::Ipv6(ip) => refuse_internal(&url, [IpAddr::V6(ip)])?,
        Host::Domain(name) => {
            // A name that does not resolve (yet) is accepted: the resolver
            // checks its addresses at every connection, and `test` shows
            // what deliveries get.
            let port = url.port_or_known_default().unwrap_or(443);
            if let Ok(addrs) = tokio::net::lookup_host((name, port)).await {
                refuse_internal(&url, addrs.map(|a| a.ip()))?;
            }
        }
    }
    Ok(url)
}

/// Refuses when any of `addrs` is internal (one internal address is
/// enough for a connection to land there).
fn refuse_internal(url: &Url, addrs: impl IntoIterator<Item = IpAddr>) -> Result<(), AddressError> {
    if addrs.into_iter().any(is_internal) {
        return Err(AddressError::Internal(
            url.host_str().unwrap_or_default().to_string(),
        ));
    }
    Ok(())
}

/// Whether a URL names an internal address literally (the resolver is not
/// asked for such hosts, so the sender checks them itself).
pub fn literal_internal(url: &Url) -> bool {
    match url.host() {
        Some(Host::Ipv4(ip)) => is_internal(IpAddr::V4(ip)),
        Some(Host::Ipv6(ip)) => is_internal(IpAddr::V6(ip)),
        _ => false,
    }
}

/// The delivery client's resolver: the system's, with internal addresses
/// removed; a name left with none fails to resolve, naming why.
#[derive(Debug, Default)]
pub struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| !is_internal(a.ip()))
                .collect();
            if public.is_empty() {
                let err: Box<dyn std::error::Error + Send + Sync> =
                    Box::new(AddressError::Internal(host));
                return Err(err);
            }
            let addrs: reqwest::dns::Addrs = Box::new(public.into_iter());
            Ok(addrs)
        })
    }
}

/// The resolver as the client builder takes it.
pub fn guarded_resolver() -> Arc<GuardedResolver> {
    Arc::new(GuardedResolver)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "fec0::1",
            "2001:0::1",
            "192.0.0.8",
            "198.18.0.1",
            "240.0.0.1",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::",
        ] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn endpoint_urls_are_checked() {
        let refused = [
            ("http://example.com/hook", "must use https"),
            ("https://127.0.0.1/hook", "loopback, private or link-local"),
            ("https://[::1]:8443/hook", "loopback, private or link-local"),
            ("https://169.254.169.254/latest", "loopback, private"),
            ("https://localhost/hook", "loopback, private"),
            ("https://10.0.0.8/", "loopback, private"),
            ("ftp://example.com/", "scheme 'ftp'"),
            ("https://user:pw@example.com/", "user name or password"),
            ("https://example.com/#x", "fragment"),
            ("/relative", "not an absolute URL"),
        ];
        for (url, says) in refused {
            let err = check_endpoint_url(url, false).await.unwrap_err();
            assert!(err.to_string().contains(says), "{url}: {err}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(check_endpoint_url(&long, true).await.is_err());
        // Public literal addresses need no resolution; a name that does not
        // resolve now is checked at each connection instead.
        check_endpoint_url("https://8.8.8.8/hook", false)
            .await
            .unwrap();
        check_endpoint_url("https://no-such-host.invalid/", false)
            .await
            .unwrap();
        // The flag allows internal hosts and plain http.
        for url in ["http://127.0.0.1:9/hook", "https://localhost/hook"] {
            check_endpoint_url(url, true).await.unwrap();
        }
    }

    #[test]
    fn literal_hosts_are_told_apart() {
        for (url, internal) in [
            ("http://127.0.0.1/", true),
            ("http://[::1]/", true),
            ("https://8.8.8.8/", false),
            ("https://example.com/", false),
        ] {
            assert_eq!(literal_internal(&Url::parse(url).unwrap()), internal);
        }
    }
}
