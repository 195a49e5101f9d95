//! The hash chain: sealing events on the agent and checking them anywhere
//! (collector, `portcullis audit verify`).
//!
//! An event's canonical encoding is the protobuf bytes the agent produced
//! when it sealed the event (see `proto/portcullis/v1/audit.proto`). Each
//! event carries the SHA-256 (FIPS 180-4) of the previous event's canonical
//! encoding; every so often a checkpoint event carries an Ed25519 (RFC 8032)
//! signature by the node key over the chain head, so everything before it is
//! covered by one signature. Verifiers hash the bytes they received; they
//! never re-encode.

use std::time::SystemTime;

use portcullis_proto::v1::{Event, event::Body};
use prost::Message as _;

use crate::{hex::hex, node_key::NodeKey};

/// `prev_hash` of a node's first event.
pub const GENESIS: [u8; 32] = [0u8; 32];

/// Domain separation for the two things the node key signs here, so a
/// signature made for one can never be replayed as the other.
const CHECKPOINT_DOMAIN: &[u8] = b"portcullis.v1.checkpoint\0";
const HELLO_DOMAIN: &[u8] = b"portcullis.v1.hello\0";

/// SHA-256 of an event's canonical encoding.
pub fn event_hash(canonical: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, canonical);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Key id published with the key: hex of the first 8 bytes of SHA-256(key).
pub fn key_id(public_key: &[u8; 32]) -> String {
    hex(&event_hash(public_key)[..8])
}

fn framed(domain: &[u8], node_id: &str, tail: &[&[u8]]) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + 4 + node_id.len() + 40);
    m.extend_from_slice(domain);
    m.extend_from_slice(&(node_id.len() as u32).to_be_bytes());
    m.extend_from_slice(node_id.as_bytes());
    for t in tail {
        m.extend_from_slice(t);
    }
    m
}

/// What a checkpoint's signature covers (see `Checkpoint` in audit.proto):
/// the node, the checkpoint's own sequence number and its `prev_hash`.
pub fn checkpoint_message(node_id: &str, seq: u64, prev_hash: &[u8]) -> Vec<u8> {
    framed(CHECKPOINT_DOMAIN, node_id, &[&seq.to_be_bytes(), prev_hash])
}

/// What an agent signs to prove to a collector that it holds the node key.
pub fn hello_message(node_id: &str, challenge: &[u8]) -> Vec<u8> {
    framed(HELLO_DOMAIN, node_id, &[challenge])
}

/// Verifies an Ed25519 signature (RFC 8032 §5.1.7) by `public_key`.
pub fn verify_signature(public_key: &[u8; 32], msg: &[u8], sig: &[u8]) -> bool {
    NodeKey::verify_with(public_key, msg, sig)
}

/// One sealed event: its sequence number, canonical encoding and hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    pub seq: u64,
    pub bytes: Vec<u8>,
    pub hash: [u8; 32],
}

/// Where a node's chain stands: the last sealed event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// 0 before the first event.
    pub seq: u64,
    pub hash: [u8; 32],
}

impl Head {
    pub const EMPTY: Head = Head {
        seq: 0,
        hash: GENESIS,
    };

    /// The head after `canonical` (an event this node sealed).
    pub fn of(canonical: &[u8]) -> Result<Head, prost::DecodeError> {
        let ev = Event::decode(canonical)?;
        Ok(Head {
            seq: ev.seq,
            hash: event_hash(canonical),
        })
    }
}

/// Seals events for one node: assigns the next sequence number, the time and
/// the previous hash, and encodes. Not thread-safe by design: one writer owns
/// the chain.
pub struct Sealer {
    node_id: String,
    head: Head,
}

impl Sealer {
    /// Continues the chain after `head` (`Head::EMPTY` for a new node).
    pub fn resume(node_id: impl Into<String>, head: Head) -> Sealer {
        Sealer {
            node_id: node_id.into(),
            head,
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn head(&self) -> Head {
        self.head
    }

    /// Seals `body` as the next event.
    pub fn seal(&mut self, body: Body, wall: SystemTime, monotonic_ns: u64) -> Sealed {
        let seq = self.head.seq + 1;
        let time_unix_ns = crate::time::unix_ns(wall);
        let ev = Event {
            seq,
            time_unix_ns,
            node_id: self.node_id.clone(),
            prev_hash: self.head.hash.to_vec(),
            monotonic_ns,
            body: Some(body),
        };
        let bytes = ev.encode_to_vec();
        let hash = event_hash(&bytes);
        self.head = Head { seq, hash };
        Sealed { seq, bytes, hash }
    }

    /// Seals a checkpoint signed by `key` over the current head.
    pub fn seal_checkpoint(
        &mut self,
        key: &NodeKey,
        events_since_last: u64,
        wall: SystemTime,
        monotonic_ns: u64,
    ) -> Sealed {
        let seq = self.head.seq + 1;
        let sig = key.sign(&checkpoint_message(&self.node_id, seq, &self.head.hash));
        let body = Body::Checkpoint(portcullis_proto::v1::Checkpoint {
            signature: sig.to_vec(),
            key_id: key_id(&key.public_key()),
            events_since_last,
        });
        self.seal(body, wall, monotonic_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_proto::v1::Gap;
    use std::time::UNIX_EPOCH;

    fn gap() -> Body {
        Body::Gap(Gap {
            first_seq: 1,
            last_seq: 2,
            reason: "t".into(),
        })
    }

    #[test]
    fn seal_links_each_event_to_the_previous_bytes() {
        let mut s = Sealer::resume("n1", Head::EMPTY);
        let a = s.seal(gap(), SystemTime::now(), 1);
        let b = s.seal(gap(), SystemTime::now(), 2);
        assert_eq!((a.seq, b.seq), (1, 2));
        let ea = Event::decode(a.bytes.as_slice()).unwrap();
        let eb = Event::decode(b.bytes.as_slice()).unwrap();
        assert_eq!(ea.prev_hash, GENESIS.to_vec());
        assert_eq!(eb.prev_hash, event_hash(&a.bytes).to_vec());
        assert_eq!(Head::of(&b.bytes).unwrap(), s.head());
    }

    #[test]
    fn checkpoint_signature_covers_node_seq_and_head() {
        let key = NodeKey::generate().unwrap();
        let mut s = Sealer::resume("n1", Head::EMPTY);
        s.seal(gap(), SystemTime::now(), 1);
        let head = s.head();
        let c = s.seal_checkpoint(&key, 1, SystemTime::now(), 2);
        let ev = Event::decode(c.bytes.as_slice()).unwrap();
        let Some(Body::Checkpoint(cp)) = ev.body else {
            panic!("not a checkpoint")
        };
        let pk = key.public_key();
        assert!(verify_signature(
            &pk,
            &checkpoint_message("n1", 2, &head.hash),
            &cp.signature
        ));
        assert!(!verify_signature(
            &pk,
            &checkpoint_message("n2", 2, &head.hash),
            &cp.signature
        ));
        assert!(!verify_signature(
            &pk,
            &checkpoint_message("n1", 3, &head.hash),
            &cp.signature
        ));
        // A hello signature over the same bytes is not a checkpoint signature.
        let hello = key.sign(&hello_message("n1", &head.hash));
        assert!(!verify_signature(
            &pk,
            &checkpoint_message("n1", 2, &head.hash),
            &hello
        ));
        assert_eq!(cp.key_id, key_id(&pk));
    }

    #[test]
    fn wall_clock_before_the_epoch_is_negative_not_a_panic() {
        let mut s = Sealer::resume("n1", Head::EMPTY);
        let past = UNIX_EPOCH - std::time::Duration::from_secs(1);
        let e = Event::decode(s.seal(gap(), past, 0).bytes.as_slice()).unwrap();
        assert_eq!(e.time_unix_ns, -1_000_000_000);
    }
}
