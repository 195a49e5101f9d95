//! The agent's identity index (agent/src/loader/maps.rs): a knock from a
//! new identity must not cost a scan of every identity slot (one syscall
//! each). A key missing from the index is answered without a rebuild
//! while `Meta::identity_gen` is unchanged; a slot written by another
//! process (which changes the generation, as every writer's
//! `upsert_identity` does) is found after one rebuild. Real kernel maps,
//! programs loaded but attached nowhere; needs root.

use portcullis_agent::loader::Unattached;
use portcullis_common::{IDENTITY_FREE, IDENTITY_LIVE, Identity};

fn ident(key: u64) -> Identity {
    Identity {
        key,
        ..Identity::default()
    }
}

#[test]
fn new_identities_cost_no_rebuild_and_another_writers_slots_are_found() {
    let mut k = Unattached::load().expect("load the eBPF object (root needed)");
    let (a, _) = k.maps.upsert_identity(ident(1), "a").unwrap();
    let base = k.maps.index_rebuilds();
    assert!(base >= 1, "the index is built once");

    // Keys nobody wrote: answered from the index.
    for key in 100..300 {
        assert_eq!(k.maps.find_identity(key).unwrap(), None);
    }
    // Our own new identities: found, and still no rebuild.
    for key in 2..50 {
        let (slot, _) = k.maps.upsert_identity(ident(key), "n").unwrap();
        assert_eq!(k.maps.find_identity(key).unwrap(), Some(slot));
    }
    assert_eq!(k.maps.find_identity(1).unwrap(), Some(a));
    assert_eq!(
        k.maps.index_rebuilds(),
        base,
        "no scan for new or known keys"
    );

    // Another process (`agent admit`) takes a free slot for key 7777 and
    // changes the generation, as its own upsert_identity does.
    let free = (1..4095)
        .find(|s| k.maps.identity(*s).unwrap().state == IDENTITY_FREE)
        .unwrap();
    let theirs = Identity {
        state: IDENTITY_LIVE,
        ..ident(7777)
    };
    k.maps.identities.set(free, theirs, 0).unwrap();
    let mut meta = k.maps.read_meta().unwrap();
    meta.identity_gen = meta.identity_gen.wrapping_add(1);
    k.maps.write_meta(meta).unwrap();
    assert_eq!(k.maps.find_identity(7777).unwrap(), Some(free));
    assert_eq!(k.maps.index_rebuilds(), base + 1, "one rebuild finds it");
    // And the next new identity does not pick their slot.
    let (next, _) = k.maps.upsert_identity(ident(8888), "m").unwrap();
    assert_ne!(next, free);
    assert_eq!(k.maps.find_identity(9999).unwrap(), None);
    assert_eq!(k.maps.index_rebuilds(), base + 1);

    // Slots freed (reclaimed) change the generation too: a key whose slot
    // another process freed is no longer found.
    let mut freed = k.maps.identity(free).unwrap();
    freed.state = IDENTITY_FREE;
    k.maps.identities.set(free, freed, 0).unwrap();
    let mut meta = k.maps.read_meta().unwrap();
    meta.identity_gen = meta.identity_gen.wrapping_add(1);
    k.maps.write_meta(meta).unwrap();
    assert_eq!(k.maps.find_identity(7777).unwrap(), None);
}
