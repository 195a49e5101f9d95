//! `ListAdmissions` and `ListFlows`: the kernel's tables as rows, filtered
//! and paged. A page token is the last row's sort key (hex): pages stay
//! consistent while admissions come and go, and a token this API did not
//! issue is refused rather than guessed at.

use std::{collections::HashMap, net::IpAddr};

use portcullis_common::{ADMIT_ONE_USE, Admission, AdmissionKey, Flow, FlowKey, PROTO_TCP};
use portcullis_proto::v1;
use portcullis_trail::hex::hex;
use tonic::Status;

use crate::{config::Config, loader::maps::bytes_addr};

/// Rows per page when the request names no size.
pub const DEFAULT_PAGE: u32 = 100;

/// Filters common to both lists; empty fields match everything.
pub struct Filter {
    pub identity: String,
    pub service: Option<u32>,
    pub source: Option<IpAddr>,
}

impl Filter {
    /// Checks the request's filter fields against the configuration.
    pub fn parse(
        cfg: &Config,
        identity: &str,
        service: &str,
        source: &str,
    ) -> Result<Filter, Status> {
        let service = match service {
            "" => None,
            name => Some(
                cfg.service(name)
                    .ok_or_else(|| unknown_service(cfg, name))?
                    .id,
            ),
        };
        let source = match source {
            "" => None,
            text => Some(
                text.parse::<IpAddr>()
                    .map_err(|_| {
                        Status::invalid_argument(format!(
                            "source {text:?} is not an IP address; give e.g. 10.0.0.7 or 2001:db8::7"
                        ))
                    })?
                    .to_canonical(),
            ),
        };
        Ok(Filter {
            identity: identity.to_string(),
            service,
            source,
        })
    }

    fn keeps(&self, identity: &str, service: u32, source: IpAddr) -> bool {
        (self.identity.is_empty() || self.identity == identity)
            && self.service.is_none_or(|s| s == service)
            && self.source.is_none_or(|s| s == source)
    }
}

pub fn unknown_service(cfg: &Config, name: &str) -> Status {
    Status::not_found(format!(
        "service {name:?} is not protected on this node; known: {}",
        cfg.services
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// The page size a request may have: 0 is the default, beyond the
/// configured maximum is an error.
pub fn page_size(asked: u32, max: u32) -> Result<usize, Status> {
    match asked {
        0 => Ok(DEFAULT_PAGE.min(max) as usize),
        n if n <= max => Ok(n as usize),
        n => Err(Status::invalid_argument(format!(
            "page_size {n} is over control.max_page_size {max}; ask for at most {max} and follow next_page_token"
        ))),
    }
}

/// One page of `rows` (sort key, row) after `token`.
pub fn page<T>(
    mut rows: Vec<(String, T)>,
    size: usize,
    token: &str,
) -> Result<(Vec<T>, String, u32), Status> {
    let after = match token {
        "" => None,
        t => Some(decode_token(t).ok_or_else(|| {
            Status::invalid_argument(
                "page_token is not one this API issued; start again with an empty page_token",
            )
        })?),
    };
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let total = u32::try_from(rows.len()).unwrap_or(u32::MAX);
    let start = match &after {
        Some(k) => rows.partition_point(|(key, _)| key <= k),
        None => 0,
    };
    let mut out: Vec<(String, T)> = rows.into_iter().skip(start).take(size + 1).collect();
    let next = if out.len() > size {
        out.truncate(size);
        out.last()
            .map(|(k, _)| hex(k.as_bytes()))
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok((out.into_iter().map(|(_, r)| r).collect(), next, total))
}

fn decode_token(t: &str) -> Option<String> {
    if !t.len().is_multiple_of(2) || t.len() > 1024 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..t.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(t.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// What the tables need to be named: identity slot → name, service id →
/// name.
pub struct Names {
    pub identities: HashMap<u32, String>,
    pub services: HashMap<u32, String>,
}

impl Names {
    fn identity(&self, slot: u32) -> String {
        self.identities
            .get(&slot)
            .cloned()
            .unwrap_or_else(|| format!("#{slot}"))
    }

    fn service(&self, id: u32) -> String {
        self.services
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("#{id}"))
    }
}

/// The admission rows `f` keeps, keyed for paging.
pub fn admissions(
    rows: Vec<(AdmissionKey, Admission)>,
    names: &Names,
    f: &Filter,
    now_ns: u64,
) -> Vec<(String, v1::AdmissionInfo)> {
    rows.into_iter()
        .filter(|(_, v)| v.expires_ns > now_ns)
        .filter_map(|(k, v)| {
            let identity = names.identity(v.identity);
            let source = bytes_addr(k.addr);
            f.keeps(&identity, k.service, source).then(|| {
                let service = names.service(k.service);
                (
                    format!("{source}\u{0}{service}\u{0}{:05}", k.src_port),
                    v1::AdmissionInfo {
                        identity,
                        service,
                        source: source.to_string(),
                        source_port: u32::from(k.src_port),
                        expires_in_ms: (v.expires_ns - now_ns) / 1_000_000,
                        one_use: v.flags & ADMIT_ONE_USE != 0,
                    },
                )
            })
        })
        .collect()
}

/// The flow rows `f` keeps, keyed for paging.
pub fn flows(rows: Vec<(FlowKey, Flow)>, names: &Names, f: &Filter) -> Vec<(String, v1::FlowInfo)> {
    rows.into_iter()
        .filter_map(|(k, v)| {
            let identity = names.identity(v.identity);
            let source = bytes_addr(k.src);
            f.keeps(&identity, v.service, source).then(|| {
                let destination = bytes_addr(k.dst);
                let protocol = if k.proto == PROTO_TCP { "tcp" } else { "udp" };
                (
                    format!(
                        "{source}\u{0}{:05}\u{0}{destination}\u{0}{:05}\u{0}{protocol}",
                        k.sport, k.dport
                    ),
                    v1::FlowInfo {
                        identity,
                        service: names.service(v.service),
                        source: source.to_string(),
                        source_port: u32::from(k.sport),
                        destination: destination.to_string(),
                        destination_port: u32::from(k.dport),
                        protocol: protocol.to_string(),
                    },
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize) -> Vec<(String, usize)> {
        (0..n).map(|i| (format!("k{i:03}"), i)).collect()
    }

    #[test]
    fn pages_cover_every_row_once_in_order() {
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let (items, next, total) = page(rows(25), 10, &token).unwrap();
            assert_eq!(total, 25);
            seen.extend(items);
            pages += 1;
            if next.is_empty() {
                break;
            }
            token = next;
            assert!(pages < 10, "paging does not end");
        }
        assert_eq!(pages, 3);
        assert_eq!(seen, (0..25).collect::<Vec<_>>());
    }

    #[test]
    fn a_row_removed_between_pages_does_not_shift_the_next_page() {
        let (first, next, _) = page(rows(6), 3, "").unwrap();
        assert_eq!(first, vec![0, 1, 2]);
        let mut fewer = rows(6);
        fewer.remove(1);
        let (second, _, _) = page(fewer, 3, &next).unwrap();
        assert_eq!(second, vec![3, 4, 5]);
    }

    #[test]
    fn bad_tokens_and_sizes_are_invalid_arguments() {
        for t in ["zz", "abc", "ff"] {
            let e = page(rows(3), 2, t).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{t}");
        }
        assert_eq!(page_size(0, 1000).unwrap(), 100);
        assert_eq!(page_size(0, 10).unwrap(), 10);
        assert_eq!(page_size(1000, 1000).unwrap(), 1000);
        let e = page_size(1001, 1000).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("max_page_size"));
    }
}
