//! The node's Ed25519 signing key: signs knock replies (and, later, audit
//! checkpoints). Stored as a PKCS#8 document (PEM `PRIVATE KEY`; a DER file or
//! an OpenSSL `genpkey -algorithm ed25519` key also loads), created on first
//! use with mode 0600, and never used when group or others can access it.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use crate::pem;
use base64::Engine as _;
use ring::{
    rand::SystemRandom,
    signature::{self, Ed25519KeyPair, KeyPair as _},
};

const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// A PKCS#8 Ed25519 key is under 100 bytes (PEM under 200); anything much
/// larger is not a key file, so it is refused before it is read whole.
const MAX_KEY_FILE: u64 = 16 * 1024;

/// Why the node key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum NodeKeyError {
    #[error("node key {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "node key {path} is accessible by group or others (mode {mode:04o}); \
         refusing to use it: run `chmod 600 {path}` (and check who may have read it)"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("node key {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("node key {path}: not an Ed25519 PKCS#8 key ({reason})")]
    Invalid { path: PathBuf, reason: String },
    #[error("generating a node key: the system random generator failed")]
    Random,
}

/// The node's Ed25519 key pair.
pub struct NodeKey {
    pair: Ed25519KeyPair,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey")
            .field("public_key", &B64URL.encode(self.public_key()))
            .finish_non_exhaustive()
    }
}

impl NodeKey {
    /// Loads the key at `path`, or creates it (and its parent directories,
    /// mode 0700) when the file does not exist. A new key is written to a
    /// temporary file (O_EXCL, mode 0600), synced, and linked into place
    /// without replacing anything, so a crash never leaves a half-written key
    /// and two agents starting at once end up with the same key.
    pub fn load_or_create(path: impl AsRef<Path>) -> Result<NodeKey, NodeKeyError> {
        let path = path.as_ref();
        match Self::load(path) {
            Err(NodeKeyError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Self::create(path)
            }
            other => other,
        }
    }

    /// A new key that lives only in memory (tests, tools).
    pub fn generate() -> Result<NodeKey, NodeKeyError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| NodeKeyError::Random)?;
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|_| NodeKeyError::Random)?;
        Ok(NodeKey { pair })
    }

    /// Loads an existing key; refuses it when group or others can access it.
    pub fn load(path: impl AsRef<Path>) -> Result<NodeKey, NodeKeyError> {
        let path = path.as_ref();
        let io_err = |source| NodeKeyError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .or_else(|e| {
                // O_NOFOLLOW refuses symlinks with ELOOP; secrets mounted by
                // Kubernetes are symlinks, so follow them, but check the
                // mode of what was opened (fstat below), not of the link.
                if e.raw_os_error() == Some(libc::ELOOP) {
                    OpenOptions::new().read(true).open(path)
                } else {
                    Err(e)
                }
            })
            .map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(NodeKeyError::NotAFile {
                path: path.to_owned(),
            });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(NodeKeyError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let mut bytes = Vec::new();
        (&mut file)
            .take(MAX_KEY_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err)?;
        if bytes.len() as u64 > MAX_KEY_FILE {
            return Err(NodeKeyError::Invalid {
                path: path.to_owned(),
                reason: format!("larger than {MAX_KEY_FILE} bytes"),
            });
        }
        let pair = parse_ed25519_pkcs8(&bytes).map_err(|reason| NodeKeyError::Invalid {
            path: path.to_owned(),
            reason,
        })?;
        Ok(NodeKey { pair })
    }

    fn create(path: &Path) -> Result<NodeKey, NodeKeyError> {
        let io_err = |source| NodeKeyError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err)?;
        }
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| NodeKeyError::Random)?;
        let text = pem::encode_private_key(doc.as_ref());

        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(format!(".tmp.{}", std::process::id()));
        let tmp = PathBuf::from(tmp_name);
        let write_tmp = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true) // O_CREAT | O_EXCL
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()
        };
        if let Err(e) = write_tmp() {
            // Only remove what this call created (AlreadyExists: not ours).
            if e.kind() != io::ErrorKind::AlreadyExists {
                let _ = fs::remove_file(&tmp);
            }
            return Err(io_err(e));
        }
        // link(2) never replaces an existing file: if another process won
        // the race, use its key.
        let linked = fs::hard_link(&tmp, path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
                    && let Ok(d) = fs::File::open(dir)
                {
                    let _ = d.sync_all();
                }
                let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|e| {
                    NodeKeyError::Invalid {
                        path: path.to_owned(),
                        reason: e.to_string(),
                    }
                })?;
                Ok(NodeKey { pair })
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Self::load(path),
            Err(e) => Err(io_err(e)),
        }
    }

    /// Ed25519 signature over `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        let sig = self.pair.sign(msg);
        let mut out = [0u8; 64];
        out.copy_from_slice(sig.as_ref());
        out
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// The public key as a JWK (RFC 8037 OKP), with `kid` set to its RFC 7638
    /// thumbprint: `{"alg":"EdDSA","crv":"Ed25519","kid":..,"kty":"OKP","use":"sig","x":..}`.
    pub fn public_jwk_json(&self) -> String {
        let x = B64URL.encode(self.public_key());
        format!(
            r#"{{"alg":"EdDSA","crv":"Ed25519","kid":"{}","kty":"OKP","use":"sig","x":"{x}"}}"#,
            self.thumbprint()
        )
    }

    /// RFC 7638 JWK thumbprint (SHA-256, base64url) of the public key.
    pub fn thumbprint(&self) -> String {
        ed25519_thumbprint(&self.public_key())
    }

    /// Verifies an Ed25519 signature made by the holder of `public_key`.
    pub fn verify_with(public_key: &[u8; 32], msg: &[u8], sig: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(&signature::ED25519, public_key)
            .verify(msg, sig)
            .is_ok()
    }
}

/// RFC 7638 thumbprint of an Ed25519 public key (OKP members crv, kty, x).
pub fn ed25519_thumbprint(public_key: &[u8; 32]) -> String {
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        B64URL.encode(public_key)
    );
    B64URL.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

/// Parses an Ed25519 PKCS#8 key (v1 or v2, PEM or DER).
pub fn parse_ed25519_pkcs8(bytes: &[u8]) -> Result<Ed25519KeyPair, String> {
    let der = pem::pkcs8_der(bytes)?;
    Ed25519KeyPair::from_pkcs8(&der)
        .or_else(|_| Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "portcullis-nodekey-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn creates_with_0600_and_reloads_same_key() {
        let dir = tmpdir("create");
        let path = dir.join("sub/node.key");
        let k1 = NodeKey::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        let k2 = NodeKey::load_or_create(&path).unwrap();
        assert_eq!(k1.public_key(), k2.public_key());
        // No temporary file left behind.
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_group_or_world_readable_key() {
        let dir = tmpdir("perm");
        let path = dir.join("node.key");
        NodeKey::load_or_create(&path).unwrap();
        for mode in [0o640, 0o604, 0o660, 0o602] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = NodeKey::load_or_create(&path).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, NodeKeyError::Permissions { .. }), "{msg}");
            assert!(msg.contains("chmod 600"), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        NodeKey::load(&path).unwrap();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_garbage_and_accepts_der() {
        let dir = tmpdir("garbage");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.key");
        fs::write(&path, b"not a key").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = NodeKey::load_or_create(&path).unwrap_err();
        assert!(matches!(err, NodeKeyError::Invalid { .. }), "{err}");
        // Raw DER PKCS#8 loads too.
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        fs::write(&path, doc.as_ref()).unwrap();
        let k = NodeKey::load(&path).unwrap();
        let expect = Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
        assert_eq!(&k.public_key()[..], expect.public_key().as_ref());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn loads_openssl_v1_pem() {
        // `openssl genpkey -algorithm ed25519` (PKCS#8 v1, no public key);
        // the RFC 8032 test 1 secret key.
        let pem = "-----BEGIN PRIVATE KEY-----\n\
                   MC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n\
                   -----END PRIVATE KEY-----\n";
        let pair = parse_ed25519_pkcs8(pem.as_bytes()).unwrap();
        let expect_pk = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
        let got: String = pair
            .public_key()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(got, expect_pk);
    }

    #[test]
    fn sign_verify_and_jwk() {
        let dir = tmpdir("sign");
        let k = NodeKey::load_or_create(dir.join("k")).unwrap();
        let sig = k.sign(b"hello");
        assert!(NodeKey::verify_with(&k.public_key(), b"hello", &sig));
        assert!(!NodeKey::verify_with(&k.public_key(), b"hellp", &sig));
        assert!(!NodeKey::verify_with(&k.public_key(), b"hello", &sig[..63]));
        let jwk: serde_json::Value = serde_json::from_str(&k.public_jwk_json()).unwrap();
        assert_eq!(jwk["kty"], "OKP");
        assert_eq!(jwk["crv"], "Ed25519");
        assert_eq!(jwk["kid"], k.thumbprint().as_str());
        let x = B64URL.decode(jwk["x"].as_str().unwrap()).unwrap();
        assert_eq!(x, k.public_key());
        assert!(!format!("{k:?}").contains("pair"));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn thumbprint_matches_rfc8037_example() {
        // RFC 8037 appendix A.3.
        let x = B64URL
            .decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            .unwrap();
        let pk: [u8; 32] = x.try_into().unwrap();
        assert_eq!(
            ed25519_thumbprint(&pk),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }
}
