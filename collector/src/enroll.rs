//! `portcullis collector enroll`: records a node's key as enrolled in the
//! collector's key record (`trail/src/keys.rs` holds the record's format).

use std::{io, path::Path};

use portcullis_trail::{
    chain::key_id,
    keys::{Provenance, private_dir, read_key_file, write_key_file},
    verify::valid_node_id,
};

/// `portcullis collector enroll`: records `node`'s key as enrolled in the
/// collector's key directory. An existing different key is kept unless
/// `replace`. Returns what was there before.
pub fn enroll(
    keys_dir: &Path,
    node: &str,
    key: [u8; 32],
    replace: bool,
) -> anyhow::Result<Option<([u8; 32], Provenance)>> {
    if !valid_node_id(node) {
        anyhow::bail!("{node:?} is not a valid node id (1-64 of A-Z a-z 0-9 . _ -)");
    }
    private_dir(keys_dir)?;
    let path = keys_dir.join(format!("{node}.pub"));
    let before = match read_key_file(&path) {
        Ok(k) => Some(k),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    if let Some((old, _)) = before
        && old != key
        && !replace
    {
        anyhow::bail!(
            "node {node} already has key {} on record; give --replace to enroll key {} instead",
            key_id(&old),
            key_id(&key)
        );
    }
    write_key_file(keys_dir, node, key, Provenance::Enrolled)?;
    Ok(before)
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_testkit::TempDir;
    use portcullis_trail::keys::NodeKeys;

    #[test]
    fn enrolling_upgrades_the_same_key_and_needs_replace_for_another() {
        let dir = TempDir::new("enroll").unwrap();
        let kd = dir.path().join("record");
        let key = [7u8; 32];
        let mut s = NodeKeys::open(Some(&kd)).unwrap();
        s.record("n1", key, Provenance::Tofu).unwrap();
        // Enrolling the same key upgrades it; another key needs --replace.
        enroll(&kd, "n1", key, false).unwrap();
        assert_eq!(s.get("n1"), Some((key, Provenance::Enrolled)));
        let e = enroll(&kd, "n1", [9; 32], false).unwrap_err().to_string();
        assert!(e.contains("--replace"), "{e}");
        enroll(&kd, "n1", [9; 32], true).unwrap();
        assert_eq!(s.get("n1"), Some(([9; 32], Provenance::Enrolled)));
    }
}
