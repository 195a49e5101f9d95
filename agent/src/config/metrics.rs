//! `[metrics]`: the Prometheus endpoint. Off unless `listen` is set, and
//! then on a loopback address unless `allow_non_loopback` says otherwise:
//! the figures name tenants, services and table fill, which is nobody
//! else's business.

use std::net::SocketAddr;

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSection {
    /// Where `GET /metrics` is served; `None`: no endpoint.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub listen: Option<String>,
    pub allow_non_loopback: Option<bool>,
}

pub(super) fn validate(raw: &RawMetrics) -> Result<MetricsSection, ConfigError> {
    let Some(text) = raw.listen.as_deref() else {
        return Ok(MetricsSection::default());
    };
    let addr: SocketAddr = text.parse().map_err(|_| ConfigError::Invalid {
        field: "metrics.listen".into(),
        message: format!("{text:?} is not an address and port; use e.g. \"127.0.0.1:9477\""),
    })?;
    if !addr.ip().is_loopback() && raw.allow_non_loopback != Some(true) {
        return Err(ConfigError::Invalid {
            field: "metrics.listen".into(),
            message: format!(
                "{addr} is reachable from other hosts; use a loopback address (127.0.0.1, ::1), or set metrics.allow_non_loopback = true behind a firewall"
            ),
        });
    }
    Ok(MetricsSection { listen: Some(addr) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> RawMetrics {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn off_by_default_and_loopback_only_unless_allowed() {
        assert_eq!(validate(&raw("")).unwrap().listen, None);
        let ok = validate(&raw("listen = \"127.0.0.1:9477\"")).unwrap();
        assert_eq!(ok.listen, Some("127.0.0.1:9477".parse().unwrap()));
        assert!(validate(&raw("listen = \"[::1]:9477\"")).is_ok());
        let e = validate(&raw("listen = \"0.0.0.0:9477\"")).unwrap_err();
        assert_eq!(e.field(), Some("metrics.listen"));
        assert!(e.to_string().contains("allow_non_loopback"), "{e}");
        assert!(validate(&raw("listen = \"0.0.0.0:9477\"\nallow_non_loopback = true")).is_ok());
        let e = validate(&raw("listen = \"localhost\"")).unwrap_err();
        assert_eq!(e.field(), Some("metrics.listen"));
    }
}
