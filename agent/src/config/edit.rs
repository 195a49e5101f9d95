//! Run-time edits of the protected services (the control API's `Services`
//! add and remove): a new [`Config`] validated exactly as a file's
//! `[[services]]` are, or an error naming the field and the fix. Decisions
//! only; the enforcer puts the result in force
//! (`agent/src/enforce/mod.rs`).

use serde::{Deserialize, de::IntoDeserializer};

use portcullis_common::{MAX_SERVICES, MAX_USAGE_SERVICES};

use super::{
    Config, ConfigError,
    raw::{RawPrice, RawService},
    validate::{check_not_knock_port, check_service_is_new, invalid, service},
};

/// A service to add, in the keys of a `[[services]]` table; empty text
/// and `None` mean "the table's default".
#[derive(Debug, Clone, Default)]
pub struct ServiceSpec {
    pub name: String,
    pub protocol: String,
    pub port: i64,
    pub address: String,
    pub action: String,
    pub mode: String,
    pub tenant: String,
    pub version: String,
    pub sensitivity: String,
    pub cost_tier: String,
    pub max_sources_per_identity: Option<i64>,
    /// `(key, micro-units)` of the `price` table, e.g.
    /// `("per_mtok_out_micros", 15000000)`.
    pub price: Vec<(String, i64)>,
}

fn some(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// An enum key from its text, the error naming the field.
fn word<'a, T: Deserialize<'a>>(field: &str, text: &'a str) -> Result<Option<T>, ConfigError> {
    if text.is_empty() {
        return Ok(None);
    }
    T::deserialize(IntoDeserializer::<serde::de::value::Error>::into_deserializer(text))
        .map(Some)
        .map_err(|e| invalid(field, e.to_string()))
}

fn raw_price(field: &str, keys: &[(String, i64)]) -> Result<Option<RawPrice>, ConfigError> {
    if keys.is_empty() {
        return Ok(None);
    }
    let mut p = RawPrice::default();
    for (k, v) in keys {
        let slot = match k.as_str() {
            "per_connection_micros" => &mut p.per_connection_micros,
            "per_mib_in_micros" => &mut p.per_mib_in_micros,
            "per_mib_out_micros" => &mut p.per_mib_out_micros,
            "per_request_micros" => &mut p.per_request_micros,
            "per_mtok_in_micros" => &mut p.per_mtok_in_micros,
            "per_mtok_out_micros" => &mut p.per_mtok_out_micros,
            "per_gpu_hour_micros" => &mut p.per_gpu_hour_micros,
            other => {
                return Err(invalid(
                    format!("{field}.{other}"),
                    "not a price key; use per_connection_micros, per_mib_in_micros, per_mib_out_micros, per_request_micros, per_mtok_in_micros, per_mtok_out_micros or per_gpu_hour_micros",
                ));
            }
        };
        if slot.replace(*v).is_some() {
            return Err(invalid(format!("{field}.{k}"), "given twice"));
        }
    }
    Ok(Some(p))
}

impl Config {
    /// This configuration with `spec` protected too. The new service is
    /// `services[N]` in errors, N the count of services now.
    pub fn with_service(&self, spec: &ServiceSpec) -> Result<Config, ConfigError> {
        let i = self.services.len();
        let field = |k: &str| format!("services[{i}].{k}");
        if i >= MAX_SERVICES as usize || i >= MAX_USAGE_SERVICES as usize {
            return Err(invalid(
                "services",
                format!(
                    "{i} services are protected, the most one node accounts for; remove one first"
                ),
            ));
        }
        let raw = RawService {
            name: some(&spec.name),
            protocol: word(&field("protocol"), &spec.protocol)?,
            port: (spec.port != 0).then_some(spec.port),
            address: some(&spec.address),
            action: word(&field("action"), &spec.action)?,
            tenant: some(&spec.tenant),
            version: some(&spec.version),
            sensitivity: some(&spec.sensitivity),
            cost_tier: some(&spec.cost_tier),
            price: raw_price(&field("price"), &spec.price)?,
            max_sources_per_identity: spec.max_sources_per_identity,
            mode: word(&field("mode"), &spec.mode)?,
        };
        let new = service(i, &raw)?;
        check_service_is_new(i, &new, &self.services)?;
        check_not_knock_port(i, &new, &self.knock)?;
        let mut next = self.clone();
        next.services.push(new);
        Ok(next)
    }

    /// This configuration without the service `name`, and without the
    /// static admissions to it. The last service cannot go: a node
    /// protects at least one (detach it instead).
    pub fn without_service(&self, name: &str) -> Result<Config, ConfigError> {
        if self.service(name).is_none() {
            return Err(invalid(
                "services",
                format!("no service named {name:?} is protected here"),
            ));
        }
        if self.services.len() == 1 {
            return Err(invalid(
                "services",
                format!(
                    "{name:?} is the only protected service; a node protects at least one (add another first, or detach the node)"
                ),
            ));
        }
        let mut next = self.clone();
        next.services.retain(|s| s.name != name);
        next.admissions.retain(|a| a.service != name);
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Protocol, ServiceMode};

    fn base() -> Config {
        Config::from_toml_str(
            "[kernel]\ninterfaces = [\"eth9\"]\n[knock]\nport = 9000\n[[services]]\nname = \"llm\"\nport = 8000\n",
        )
        .unwrap()
    }

    fn spec(name: &str, port: i64) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            port,
            ..ServiceSpec::default()
        }
    }

    #[test]
    fn an_added_service_is_validated_like_the_files() {
        let c = base();
        let next = c
            .with_service(&ServiceSpec {
                protocol: "udp".into(),
                mode: "shadow".into(),
                price: vec![("per_mtok_out_micros".into(), 7)],
                ..spec("embed", 8001)
            })
            .unwrap();
        let e = next.service("embed").unwrap();
        assert_eq!(
            (e.protocol, e.port, e.mode),
            (Protocol::Udp, 8001, ServiceMode::Shadow)
        );
        assert_eq!(e.price.per_mtok_out_micros, 7);
        assert_eq!(e.model.version, "1", "defaults as in a file");
        assert_eq!(c.services.len(), 1, "the running config is untouched");

        for (s, field, says) in [
            (spec("llm", 8001), "services[1].name", "already the name"),
            (spec("other", 8000), "services[1].port", "already protected"),
            (spec("", 8001), "services[1].name", ""),
            (spec("x", 0), "services[1].port", ""),
            (spec("x", 70_000), "services[1].port", ""),
            (
                ServiceSpec {
                    protocol: "sctp".into(),
                    ..spec("x", 1)
                },
                "services[1].protocol",
                "unknown variant",
            ),
            (
                ServiceSpec {
                    protocol: "udp".into(),
                    ..spec("x", 9000)
                },
                "services[1].port",
                "knock port",
            ),
            (
                ServiceSpec {
                    price: vec![("per_gib".into(), 1)],
                    ..spec("x", 1)
                },
                "services[1].price.per_gib",
                "not a price key",
            ),
            (
                ServiceSpec {
                    price: vec![("per_request_micros".into(), -1)],
                    ..spec("x", 1)
                },
                "services[1].price.per_request_micros",
                "",
            ),
            (
                ServiceSpec {
                    address: "10.0.0.300".into(),
                    ..spec("x", 1)
                },
                "services[1].address",
                "",
            ),
        ] {
            let err = c.with_service(&s).unwrap_err();
            assert_eq!(err.field(), Some(field), "{s:?}: {err}");
            assert!(err.to_string().contains(says), "{s:?}: {err}");
        }
    }

    #[test]
    fn removing_keeps_at_least_one_service_and_drops_its_static_admissions() {
        let c = base().with_service(&spec("embed", 8001)).unwrap();
        let next = c.without_service("embed").unwrap();
        assert!(next.service("embed").is_none());
        assert!(next.without_service("embed").is_err(), "already gone");
        let err = next.without_service("llm").unwrap_err();
        assert!(err.to_string().contains("only protected service"), "{err}");
    }
}
