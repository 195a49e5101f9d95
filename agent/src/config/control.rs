//! `[control]`: where the control API listens and who may call what.
//!
//! The file's shape (`RawControl`) and its validation live together here:
//! one section, one file.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

use super::ConfigError;

/// Default Unix socket of the control API.
pub const DEFAULT_SOCKET: &str = "/run/portcullis/control.sock";

/// A caller's role. Each role includes the calls of the ones before it
/// except that `admitter` is for gateways and model servers (admit, report
/// usage, status) and `viewer` for dashboards (reads only); `operator` may
/// do everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Viewer,
    Admitter,
    Operator,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Admitter, Role::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Admitter => "admitter",
            Role::Operator => "operator",
        }
    }
}

/// Who a role is granted to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Grantee {
    /// A Unix socket peer's uid.
    Uid(u32),
    /// A Unix socket peer's primary gid.
    Gid(u32),
    /// A TLS client certificate's subject, as RFC 4514 text
    /// (`CN=gateway,O=acme`).
    Subject(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlSection {
    /// The Unix socket; `None`: no socket (`socket = ""`).
    pub socket: Option<PathBuf>,
    /// Group owning the socket (mode 0660): a name or a numeric gid.
    /// `None`: root's group.
    pub socket_group: Option<String>,
    /// Who holds which role. uid 0 is always `operator`.
    pub roles: Vec<(Grantee, Role)>,
    /// Largest page `ListAdmissions`/`ListFlows` return.
    pub max_page_size: u32,
    /// Calls per second and burst allowed to one caller.
    pub calls_per_sec: u32,
    pub calls_burst: u32,
    /// Events buffered for one `Watch` client before it is disconnected.
    pub watch_buffer: usize,
    /// The API on TCP too, with mutual TLS only.
    pub tcp: Option<ControlTcp>,
}

/// `control.listen` with its TLS files: the server's certificate and key,
/// and the CA that signs the clients' certificates (required: a client
/// without a certificate that chains to it is refused in the handshake).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlTcp {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl Default for ControlSection {
    fn default() -> Self {
        ControlSection {
            socket: Some(PathBuf::from(DEFAULT_SOCKET)),
            socket_group: None,
            roles: Vec::new(),
            max_page_size: 1000,
            calls_per_sec: 50,
            calls_burst: 100,
            watch_buffer: 1024,
            tcp: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawControl {
    pub socket: Option<String>,
    pub socket_group: Option<String>,
    pub viewers: Option<Vec<String>>,
    pub admitters: Option<Vec<String>>,
    pub operators: Option<Vec<String>>,
    pub max_page_size: Option<i64>,
    pub calls_per_sec: Option<i64>,
    pub calls_burst: Option<i64>,
    pub watch_buffer: Option<i64>,
    pub listen: Option<String>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub client_ca: Option<String>,
}

pub(super) fn validate(raw: &RawControl) -> Result<ControlSection, ConfigError> {
    let d = ControlSection::default();
    let socket = match raw.socket.as_deref() {
        None => d.socket,
        Some("") => None,
        Some(p) if p.starts_with('/') && p.len() < 108 => Some(PathBuf::from(p)),
        Some(p) => {
            return Err(invalid(
                "control.socket",
                format!(
                    "{p:?} is not usable; give an absolute path under 108 bytes (a Unix socket's limit), or \"\" for no socket"
                ),
            ));
        }
    };
    let socket_group = match raw.socket_group.as_deref() {
        None => None,
        Some(g) if is_group(g) => Some(g.to_string()),
        Some(g) => {
            return Err(invalid(
                "control.socket_group",
                format!("{g:?} is not a group name or number; use e.g. \"portcullis\" or \"997\""),
            ));
        }
    };
    let mut roles = Vec::new();
    for (key, role, list) in [
        ("viewers", Role::Viewer, &raw.viewers),
        ("admitters", Role::Admitter, &raw.admitters),
        ("operators", Role::Operator, &raw.operators),
    ] {
        for (i, entry) in list.iter().flatten().enumerate() {
            let grantee = grantee(entry).ok_or_else(|| {
                invalid(
                    format!("control.{key}[{i}]"),
                    format!(
                        "{entry:?} names nobody; use \"uid:1000\", \"gid:997\" or \"cert:CN=gateway,O=acme\""
                    ),
                )
            })?;
            roles.push((grantee, role));
        }
    }
    let bounded = |field: &str, v: Option<i64>, default: u32, max: i64| {
        let v = v.unwrap_or(i64::from(default));
        if !(1..=max).contains(&v) {
            return Err(invalid(
                format!("control.{field}"),
                format!("{v} is out of range; use 1 to {max}"),
            ));
        }
        Ok(v as u32)
    };
    let tcp = tcp(raw)?;
    Ok(ControlSection {
        tcp,
        socket,
        socket_group,
        roles,
        max_page_size: bounded("max_page_size", raw.max_page_size, d.max_page_size, 100_000)?,
        calls_per_sec: bounded("calls_per_sec", raw.calls_per_sec, d.calls_per_sec, 100_000)?,
        calls_burst: bounded("calls_burst", raw.calls_burst, d.calls_burst, 100_000)?,
        watch_buffer: bounded(
            "watch_buffer",
            raw.watch_buffer,
            d.watch_buffer as u32,
            1_000_000,
        )? as usize,
    })
}

/// TCP only with mutual TLS: the address and all three files, or none.
fn tcp(raw: &RawControl) -> Result<Option<ControlTcp>, ConfigError> {
    let Some(listen) = raw.listen.as_deref() else {
        for (key, v) in [
            ("tls_cert", &raw.tls_cert),
            ("tls_key", &raw.tls_key),
            ("client_ca", &raw.client_ca),
        ] {
            if v.is_some() {
                return Err(invalid(
                    format!("control.{key}"),
                    "is set but control.listen is not; set listen (\"ADDR:PORT\") for the API on TCP, or remove it",
                ));
            }
        }
        return Ok(None);
    };
    let listen: SocketAddr = listen.parse().map_err(|_| {
        invalid(
            "control.listen",
            format!("{listen:?} is not an address and port; use e.g. \"10.0.0.5:7444\""),
        )
    })?;
    let file = |key: &str, v: &Option<String>| -> Result<PathBuf, ConfigError> {
        match v.as_deref() {
            Some(p) if p.starts_with('/') => Ok(PathBuf::from(p)),
            Some(p) => Err(invalid(
                format!("control.{key}"),
                format!("{p:?} is not an absolute path"),
            )),
            None => Err(invalid(
                format!("control.{key}"),
                "missing; the API is served on TCP only with mutual TLS: give tls_cert, tls_key and client_ca (PEM files)",
            )),
        }
    };
    Ok(Some(ControlTcp {
        listen,
        cert: file("tls_cert", &raw.tls_cert)?,
        key: file("tls_key", &raw.tls_key)?,
        client_ca: file("client_ca", &raw.client_ca)?,
    }))
}

fn grantee(entry: &str) -> Option<Grantee> {
    let (kind, value) = entry.split_once(':')?;
    match kind {
        "uid" => value.parse().ok().map(Grantee::Uid),
        "gid" => value.parse().ok().map(Grantee::Gid),
        "cert" if !value.trim().is_empty() && !value.chars().any(char::is_control) => {
            Some(Grantee::Subject(value.trim().to_string()))
        }
        _ => None,
    }
}

fn is_group(g: &str) -> bool {
    !g.is_empty()
        && g.len() <= 32
        && g.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> RawControl {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_serve_a_root_only_socket() {
        let c = validate(&RawControl::default()).unwrap();
        assert_eq!(
            c.socket.as_deref(),
            Some(std::path::Path::new(DEFAULT_SOCKET))
        );
        assert!(c.roles.is_empty());
    }

    #[test]
    fn grantees_parse_and_bad_ones_name_the_entry() {
        let c = validate(&raw(
            "viewers = [\"uid:1000\", \"gid:5\"]\nadmitters = [\"cert:CN=gw, O=acme\"]\nsocket = \"\"",
        ))
        .unwrap();
        assert_eq!(c.socket, None);
        assert_eq!(
            c.roles,
            vec![
                (Grantee::Uid(1000), Role::Viewer),
                (Grantee::Gid(5), Role::Viewer),
                (Grantee::Subject("CN=gw, O=acme".into()), Role::Admitter),
            ]
        );
        let e = validate(&raw("operators = [\"uid:0\", \"alice\"]")).unwrap_err();
        assert_eq!(e.field(), Some("control.operators[1]"));
        let e = validate(&raw("viewers = [\"uid:-1\"]")).unwrap_err();
        assert_eq!(e.field(), Some("control.viewers[0]"));
        let e = validate(&raw("socket = \"run/x.sock\"")).unwrap_err();
        assert_eq!(e.field(), Some("control.socket"));
        let e = validate(&raw("max_page_size = 0")).unwrap_err();
        assert_eq!(e.field(), Some("control.max_page_size"));
        let e = validate(&raw("socket_group = \"a b\"")).unwrap_err();
        assert_eq!(e.field(), Some("control.socket_group"));
    }

    #[test]
    fn tcp_needs_every_tls_file() {
        let full = "listen = \"10.0.0.5:7444\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\nclient_ca = \"/ca.pem\"";
        let t = validate(&raw(full)).unwrap().tcp.unwrap();
        assert_eq!(t.listen, "10.0.0.5:7444".parse().unwrap());
        let e = validate(&raw(
            "listen = \"10.0.0.5:7444\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"",
        ))
        .unwrap_err();
        assert_eq!(e.field(), Some("control.client_ca"));
        assert!(e.to_string().contains("mutual TLS"), "{e}");
        let e = validate(&raw("tls_cert = \"/c.pem\"")).unwrap_err();
        assert_eq!(e.field(), Some("control.tls_cert"));
        let e = validate(&raw("listen = \"nowhere\"")).unwrap_err();
        assert_eq!(e.field(), Some("control.listen"));
    }
}
