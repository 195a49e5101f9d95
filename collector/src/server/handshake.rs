//! The handshake of a collector stream: Hello, Welcome (a challenge and
//! nothing else), Proof, the trust decision, Accepted. Nothing about a node
//! is said before it has proved a key the collector trusts; every failure
//! is counted against the peer by the guard.

use std::time::Duration;

use tonic::Status;

use super::{PROTOCOL, Session, Shared, invalid};
use crate::options::TrustMode;
use portcullis_proto::v1::{agent_message::Msg, collector_message};
use portcullis_trail::{
    chain,
    keys::Provenance,
    verify::{Finding, FindingKind, valid_node_id},
};
use ring::rand::SecureRandom as _;

impl Shared {
    /// Whether `key` is the key on record for `node` (trusting it on first
    /// use under `--trust tofu`); if so the node's writer slot is taken.
    /// The refusal says why, for the finding and the status.
    fn admit_key(
        &self,
        node: &str,
        key: [u8; 32],
        trust: TrustMode,
    ) -> Result<(u64, u64, Provenance), (FindingKind, String)> {
        let mut inner = self.lock();
        let on_record = inner.keys.get(node);
        let provenance = match on_record {
            Some((k, prov)) if k != key => {
                return Err((
                    if prov == Provenance::Tofu {
                        FindingKind::KeyChanged
                    } else {
                        FindingKind::KeyMismatch
                    },
                    format!(
                        "node {node} proved key {} but its {} key is {}",
                        chain::key_id(&key),
                        prov.as_str(),
                        chain::key_id(&k)
                    ),
                ));
            }
            Some((_, Provenance::Pinned)) => Provenance::Pinned,
            Some((_, Provenance::Enrolled)) if trust != TrustMode::Pinned => Provenance::Enrolled,
            Some((_, Provenance::Tofu)) if trust == TrustMode::Tofu => Provenance::Tofu,
            None if trust == TrustMode::Tofu => {
                if let Err(e) = inner.keys.record(node, key, Provenance::Tofu) {
                    return Err((
                        FindingKind::KeyMismatch,
                        format!("cannot record the node key: {e}"),
                    ));
                }
                tracing::warn!(node, key_id = %chain::key_id(&key), "trusting the node key on first use (--trust tofu); enroll it");
                Provenance::Tofu
            }
            other => {
                let had = match other {
                    Some((_, p)) => format!(
                        " (its key is on record as {}, which --trust {} does not accept)",
                        p.as_str(),
                        trust.as_str()
                    ),
                    None => String::new(),
                };
                return Err((
                    FindingKind::KeyMismatch,
                    format!(
                        "node {node} is not enrolled{had}: enroll it with `portcullis collector enroll {node} {}` (or pin it with --keys)",
                        portcullis_trail::hex::hex(&key)
                    ),
                ));
            }
        };
        inner.verifier.set_key(node, key);
        inner.provenance.insert(node.to_owned(), provenance);
        inner.next_generation += 1;
        let g = inner.next_generation;
        inner.sessions.insert(node.to_owned(), g);
        let epoch = inner.epochs.get(node).copied().unwrap_or(0);
        Ok((g, epoch, provenance))
    }

    pub(crate) fn guard_window(&self) -> Duration {
        self.guard_window
    }
}

impl Session {
    /// Hello, Welcome, Proof, trust; `None` when the client left. A failure
    /// comes with the finding to count against the peer.
    pub(super) async fn handshake(
        &mut self,
    ) -> Result<Option<(u64, u64, Provenance)>, (Status, Option<Finding>)> {
        let fail = |s: &Session, kind: FindingKind, status: Status| {
            let f = s.refuse_finding(kind, status.message().to_owned());
            (status, Some(f))
        };
        let hello = match self.next_in_time("Hello").await? {
            None => return Ok(None),
            Some(Msg::Hello(h)) => h,
            Some(_) => return Err(self.malformed(invalid("the first message must be Hello"))),
        };
        if hello.protocol != PROTOCOL {
            return Err(self.malformed(
                invalid(format!(
                    "Hello.protocol {} is not supported; this collector speaks {PROTOCOL} (upgrade the agent)",
                    hello.protocol
                )),
            ));
        }
        if !valid_node_id(&hello.node_id) {
            return Err(self.malformed(invalid(format!(
                "Hello.node_id {:?} is not a valid node id (1-64 of A-Z a-z 0-9 . _ -)",
                hello.node_id
            ))));
        }
        self.node = hello.node_id.clone();
        let Ok(key) = <[u8; 32]>::try_from(hello.public_key.as_slice()) else {
            return Err(self.malformed(invalid(format!(
                "Hello.public_key is {} bytes; an Ed25519 key is 32",
                hello.public_key.len()
            ))));
        };
        if self.shared.node_id_from_cert
            && let Err(why) = cert_names_node(self.peer_cert.as_deref(), &self.node)
        {
            return Err(fail(
                self,
                FindingKind::KeyMismatch,
                Status::permission_denied(why),
            ));
        }
        let mut challenge = [0u8; 32];
        self.shared
            .rng
            .fill(&mut challenge)
            .map_err(|_| (Status::internal("the system random generator failed"), None))?;
        // Nothing about the node before it has proved its key.
        self.send(collector_message::Msg::Welcome(
            portcullis_proto::v1::Welcome {
                challenge: challenge.to_vec(),
            },
        ))
        .await
        .map_err(|s| (s, None))?;
        let proof = match self.next_in_time("Proof").await? {
            None => return Ok(None),
            Some(Msg::Proof(p)) => p,
            Some(_) => {
                return Err(self.malformed(invalid("the message after Welcome must be Proof")));
            }
        };
        let msg = chain::hello_message(&self.node, &challenge);
        if !chain::verify_signature(&key, &msg, &proof.signature) {
            return Err(fail(
                self,
                FindingKind::BadSignature,
                Status::unauthenticated(format!(
                    "Proof is not a signature of the challenge by the Hello key {}",
                    chain::key_id(&key)
                )),
            ));
        }
        let node = self.node.clone();
        let trust = self.shared.trust;
        let decided = self
            .blocking(move |s| s.admit_key(&node, key, trust))
            .await
            .map_err(|e| (e, None))?;
        let (generation, epoch, provenance) = match decided {
            Ok(x) => x,
            Err((kind, why)) => {
                return Err(fail(self, kind, Status::permission_denied(why)));
            }
        };
        let node = self.node.clone();
        let resume_after = self
            .blocking(move |s| s.lock_output().store.head(&node).seq)
            .await
            .map_err(|e| (e, None))?;
        self.send(collector_message::Msg::Accepted(
            portcullis_proto::v1::Accepted {
                resume_after,
                trust: provenance.as_str().to_owned(),
            },
        ))
        .await
        .map_err(|s| (s, None))?;
        self.epoch = epoch;
        Ok(Some((generation, resume_after, provenance)))
    }

    /// The next handshake message in time; `None`: the client left.
    async fn next_in_time(
        &mut self,
        what: &'static str,
    ) -> Result<Option<Msg>, (Status, Option<Finding>)> {
        let timeout = self.shared.handshake_timeout;
        match tokio::time::timeout(timeout, self.next(what)).await {
            Err(_) => Err(self.malformed(Status::deadline_exceeded(format!("no {what} in time")))),
            Ok(Err(status)) => Err(self.malformed(status)),
            Ok(Ok(m)) => Ok(m),
        }
    }

    /// A handshake that does not follow the protocol: refused, and counted
    /// against the peer.
    fn malformed(&self, status: Status) -> (Status, Option<Finding>) {
        let f = self.refuse_finding(FindingKind::Undecodable, status.message().to_owned());
        (status, Some(f))
    }
}

/// With `--node-id-from-cert`: the client certificate must name the node
/// (a DNS subject alternative name equal to the node id), so a client with
/// a certificate for one node cannot write as another.
fn cert_names_node(cert: Option<&[u8]>, node: &str) -> Result<(), String> {
    let Some(der) = cert else {
        return Err(format!(
            "node {node}: no client certificate, but the collector binds node ids to certificates (--node-id-from-cert)"
        ));
    };
    let der = rustls_pki_types::CertificateDer::from(der);
    let cert = webpki::EndEntityCert::try_from(&der)
        .map_err(|e| format!("node {node}: unreadable client certificate: {e}"))?;
    let name = rustls_pki_types::DnsName::try_from(node)
        .map_err(|_| format!("node id {node:?} cannot be a certificate DNS name"))?;
    cert.verify_is_valid_for_subject_name(&rustls_pki_types::ServerName::DnsName(name))
        .map_err(|_| {
            format!("the client certificate does not name node {node} (a DNS subject alternative name must equal the node id)")
        })
}
