//! Where the connect flow may send a user's browser back: the
//! application's own origins (`INTEGRATIONS_REDIRECT_ORIGINS`), and in the
//! embedded development mode any loopback origin. Anything else would let
//! whoever holds a write key send users (and their completion codes) to a
//! site of their choosing.

use url::{Host, Origin, Url};

use crate::domain::InvalidInput;

/// The variable listing the allowed origins, comma-separated.
pub const REDIRECT_ORIGINS_ENV: &str = "INTEGRATIONS_REDIRECT_ORIGINS";

/// The origins a `redirect_uri` may have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedirectOrigins {
    origins: Vec<Origin>,
    loopback: bool,
}

impl RedirectOrigins {
    /// Parses `https://app.example.com, http://localhost:3000`: each entry
    /// an http(s) origin (scheme, host, optional port; no path, query,
    /// user name or password). The error names the entry and why.
    pub fn parse(list: &str) -> Result<RedirectOrigins, String> {
        let mut origins = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let url = Url::parse(entry).map_err(|e| format!("'{entry}' is not a URL ({e})"))?;
            let problem = if url.scheme() != "https" && url.scheme() != "http" {
                Some("its scheme must be http or https")
            } else if url.host().is_none() {
                Some("it has no host")
            } else if !url.username().is_empty() || url.password().is_some() {
                Some("it must not contain a user name or password")
            } else if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
                Some("it must be an origin only, without a path, query or fragment")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(format!("'{entry}': {problem}"));
            }
            origins.push(url.origin());
        }
        Ok(RedirectOrigins {
            origins,
            loopback: false,
        })
    }

    /// These origins, and also every http(s) origin on `localhost`,
    /// `127.0.0.1` or `[::1]` (any port): the embedded development mode.
    pub fn with_loopback(mut self) -> RedirectOrigins {
        self.loopback = true;
        self
    }

    /// Whether no origin at all is allowed.
    pub fn is_empty(&self) -> bool {
        self.origins.is_empty() && !self.loopback
    }

    /// The allowed origins, for messages.
    pub fn describe(&self) -> String {
        let mut list: Vec<String> = self
            .origins
            .iter()
            .map(Origin::ascii_serialization)
            .collect();
        if self.loopback {
            list.push(
                "http(s)://localhost, 127.0.0.1 or [::1] on any port (development mode)".into(),
            );
        }
        if list.is_empty() {
            return "none".into();
        }
        list.join(", ")
    }

    /// Whether the application's `redirect_uri` may be used: an absolute
    /// http(s) URL without userinfo, whose origin is allowed.
    pub fn check(&self, uri: &str) -> Result<(), InvalidInput> {
        let url = match Url::parse(uri) {
            Ok(u) if (u.scheme() == "https" || u.scheme() == "http") && u.host().is_some() => u,
            _ => {
                return Err(InvalidInput::new(
                    "redirect_uri",
                    "it must be an absolute http:// or https:// URL",
                ))
            }
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(InvalidInput::new(
                "redirect_uri",
                "it must not contain a user name or password (user:pass@)",
            ));
        }
        let origin = url.origin();
        let loopback = match url.host() {
            Some(Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            Some(Host::Ipv4(ip)) => ip.is_loopback(),
            Some(Host::Ipv6(ip)) => ip.is_loopback(),
            None => false,
        };
        if self.origins.contains(&origin) || (self.loopback && loopback) {
            return Ok(());
        }
        Err(InvalidInput::new(
            "redirect_uri",
            format!(
                "its origin {} is not allowed; allowed origins: {} (set {REDIRECT_ORIGINS_ENV})",
                origin.ascii_serialization(),
                self.describe()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_origins_and_refuses_what_is_not_one() {
        let o = RedirectOrigins::parse(" https://app.example , http://localhost:3000,").unwrap();
        assert_eq!(o.describe(), "https://app.example, http://localhost:3000");
        for bad in [
            "app.example",
            "ftp://app.example",
            "https://u:p@app.example",
            "https://app.example/done",
            "https://app.example?x=1",
        ] {
            let e = RedirectOrigins::parse(bad).unwrap_err();
            assert!(e.contains(bad.trim_end_matches('/')), "{e}");
        }
    }

    #[test]
    fn checks_origin_userinfo_and_loopback() {
        let o = RedirectOrigins::parse("https://app.example").unwrap();
        assert!(o.check("https://app.example/done?x=1").is_ok());
        assert!(o.check("https://app.example:443/done").is_ok());
        for bad in [
            "https://app.example:8443/done",
            "http://app.example/done",
            "https://evil.example/done",
            "https://app.example.evil.example/",
            "https://user:pass@app.example/done",
            "http://localhost:3000/done",
            "javascript:alert(1)",
        ] {
            let e = o.check(bad).unwrap_err();
            assert_eq!(e.field, "redirect_uri", "{bad}");
        }
        let e = o.check("https://evil.example/").unwrap_err();
        assert!(
            e.reason.contains("https://app.example") && e.reason.contains(REDIRECT_ORIGINS_ENV)
        );
        let dev = RedirectOrigins::default().with_loopback();
        assert!(dev.check("http://localhost:3000/done").is_ok());
        assert!(dev.check("http://127.0.0.1:5173/").is_ok());
        assert!(dev.check("http://[::1]/x").is_ok());
        assert!(dev.check("https://app.example/").is_err());
        assert!(RedirectOrigins::default().is_empty());
    }
}
