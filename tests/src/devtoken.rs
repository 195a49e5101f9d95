//! # DEVELOPMENT ONLY — NOT AN IDENTITY PROVIDER — NEVER USE IN PRODUCTION
//!
//! A toy token issuer for demos, tests and local development: it makes an
//! Ed25519 key pair ([`keygen`]) and signs RFC 9068-shaped access tokens with
//! it ([`mint`]). It has no user authentication, no consent, no audit, no key
//! rotation and no protection of the private key beyond file permissions.
//! **Whoever can read `issuer.key` can mint any token for any subject,
//! tenant and scope.** In production, tokens come from the organisation's
//! identity provider and portcullis only ever sees its public JWKS.
//!
//! The `portcullis-devtoken keygen` / `portcullis-devtoken mint` commands
//! are thin wrappers around these functions; neither is part of a release.

use std::{
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use ring::{
    rand::{SecureRandom, SystemRandom},
    signature::{Ed25519KeyPair, KeyPair},
};
use serde_json::{Map, Value, json};

use portcullis_agent::admission::jwk::{self, Jwk};
use portcullis_trail::pem;

/// The private key file [`keygen`] writes (PKCS#8, PEM, mode 0600).
pub const KEY_FILE: &str = "issuer.key";
/// The public key set [`keygen`] writes.
pub const JWKS_FILE: &str = "jwks.json";
/// Largest key file [`mint`] reads.
const MAX_KEY_FILE_BYTES: u64 = 16 * 1024;

/// What went wrong in the development issuer.
#[derive(Debug, thiserror::Error)]
pub enum DevTokenError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} already exists; keygen never overwrites a key (move it away first if you really mean to)", .0.display())]
    Exists(PathBuf),
    #[error("{}: not an Ed25519 PKCS#8 private key ({detail})", path.display())]
    BadKey { path: PathBuf, detail: String },
    #[error("cannot mint: {0}")]
    Invalid(String),
    #[error("the system random number generator failed")]
    Rng,
}

/// Result type of this module.
pub type Result<T, E = DevTokenError> = std::result::Result<T, E>;

/// What [`keygen`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeygenOutput {
    /// The private key (`<dir>/issuer.key`).
    pub key_path: PathBuf,
    /// The public JWKS (`<dir>/jwks.json`), for the agent's `jwks` setting.
    pub jwks_path: PathBuf,
    /// The key's kid: its RFC 7638 thumbprint.
    pub kid: String,
}

/// The `client_id` of development tokens unless one is given.
pub const DEV_CLIENT_ID: &str = "portcullis-dev";

/// What [`mint`] puts in a token (also the flags of `portcullis-devtoken
/// mint`).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct MintClaims {
    /// `iss`.
    #[arg(long)]
    pub issuer: String,
    /// `aud`.
    #[arg(long)]
    pub audience: String,
    /// `sub`.
    #[arg(long)]
    pub subject: String,
    /// `tenant`, if any.
    #[arg(long)]
    pub tenant: Option<String>,
    /// `client_id` (RFC 9068 §2.2, required); default portcullis-dev.
    #[arg(long)]
    pub client_id: Option<String>,
    /// `roles` (omitted when empty); repeatable, e.g. --role analyst.
    #[arg(long = "role")]
    pub roles: Vec<String>,
    /// Scopes, joined with spaces into `scope` (omitted when empty);
    /// repeatable, e.g. --scope model:llm:invoke.
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// Lifetime: `exp` = `iat` + `ttl` (1 to 86400 seconds).
    #[arg(long = "ttl-secs", value_name = "SECS", default_value = "300", value_parser = ttl_secs)]
    pub ttl: Duration,
    /// `cnf.jkt`: bind the token to the key with this RFC 7638 thumbprint.
    #[arg(long)]
    pub cnf_jkt: Option<String>,
}

/// `--ttl-secs`: whole seconds, 1 to 86400.
fn ttl_secs(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(n @ 1..=86_400) => Ok(Duration::from_secs(n)),
        _ => Err(format!(
            "{s:?} is not a whole number of seconds from 1 to 86400"
        )),
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DevTokenError + '_ {
    move |source| DevTokenError::Io {
        path: path.to_owned(),
        source,
    }
}

/// DEVELOPMENT ONLY. Creates `dir` if needed (mode 0700) and writes a new
/// Ed25519 key pair: `issuer.key` (PKCS#8 from ring, PEM, mode 0600) and
/// `jwks.json` (the public key; kid = its RFC 7638 thumbprint, alg EdDSA, use
/// sig). Refuses to overwrite either file (both are created with `O_EXCL`).
pub fn keygen(dir: &Path) -> Result<KeygenOutput> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    let rng = SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| DevTokenError::Rng)?;
    let key_path = dir.join(KEY_FILE);
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| DevTokenError::BadKey {
        path: key_path.clone(),
        detail: e.to_string(),
    })?;
    let public = public_jwk(&pair)?;
    let kid = public.thumbprint();
    let mut entry = public
        .to_public_json()
        .ok_or_else(|| DevTokenError::Invalid("no public form of the key".into()))?;
    if let Value::Object(map) = &mut entry {
        map.insert("kid".into(), kid.clone().into());
    }
    let jwks = serde_json::to_string_pretty(&json!({ "keys": [entry] }))
        .map_err(|e| DevTokenError::Invalid(e.to_string()))?;

    let jwks_path = dir.join(JWKS_FILE);
    let mut key_file = create_new(&key_path, 0o600)?;
    let written = create_new(&jwks_path, 0o644).and_then(|mut jwks_file| {
        write_synced(
            &mut key_file,
            &key_path,
            pem::encode_private_key(pkcs8.as_ref()).as_bytes(),
        )?;
        write_synced(&mut jwks_file, &jwks_path, format!("{jwks}\n").as_bytes())
    });
    if let Err(e) = written {
        // Leave nothing half-made behind (these are files we just created).
        let _ = fs::remove_file(&key_path);
        if !matches!(&e, DevTokenError::Exists(p) if *p == jwks_path) {
            let _ = fs::remove_file(&jwks_path);
        }
        return Err(e);
    }
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(KeygenOutput {
        key_path,
        jwks_path,
        kid,
    })
}

/// DEVELOPMENT ONLY. Signs an access token with the key in `key_file` (as
/// written by [`keygen`]), issued now. See [`mint_at`].
pub fn mint(key_file: &Path, claims: MintClaims) -> Result<String> {
    mint_at(key_file, claims, SystemTime::now())
}

/// DEVELOPMENT ONLY. Signs a compact JWS access token issued at `now`: header
/// `{"alg":"EdDSA","typ":"at+jwt","kid":<thumbprint>}`, claims `iss`, `aud`,
/// `sub`, `iat` = `nbf` = `now`, `exp` = `now + ttl`, `jti` (128 random
/// bits, base64url), `scope` (space-joined), `roles`, `tenant`, `cnf.jkt`.
pub fn mint_at(key_file: &Path, claims: MintClaims, now: SystemTime) -> Result<String> {
    check_claims(&claims)?;
    let pair = read_key(key_file)?;
    let kid = public_jwk(&pair)?.thumbprint();
    let rng = SystemRandom::new();
    let mut jti = [0u8; 16];
    rng.fill(&mut jti).map_err(|_| DevTokenError::Rng)?;
    let iat = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| DevTokenError::Invalid("the clock is before 1970".into()))?
        .as_secs();
    let exp = iat
        .checked_add(claims.ttl.as_secs().max(1))
        .ok_or_else(|| DevTokenError::Invalid("ttl too large".into()))?;

    let header = json!({ "alg": "EdDSA", "typ": "at+jwt", "kid": kid });
    let mut payload = Map::new();
    payload.insert("iss".into(), claims.issuer.into());
    payload.insert("aud".into(), claims.audience.into());
    payload.insert("sub".into(), claims.subject.into());
    payload.insert("iat".into(), iat.into());
    payload.insert("nbf".into(), iat.into());
    payload.insert("exp".into(), exp.into());
    payload.insert("jti".into(), jwk::b64url_encode(&jti).into());
    payload.insert(
        "client_id".into(),
        claims
            .client_id
            .clone()
            .unwrap_or_else(|| DEV_CLIENT_ID.to_owned())
            .into(),
    );
    if !claims.scopes.is_empty() {
        payload.insert("scope".into(), claims.scopes.join(" ").into());
    }
    if !claims.roles.is_empty() {
        payload.insert("roles".into(), claims.roles.into());
    }
    if let Some(tenant) = claims.tenant {
        payload.insert("tenant".into(), tenant.into());
    }
    if let Some(jkt) = claims.cnf_jkt {
        payload.insert("cnf".into(), json!({ "jkt": jkt }));
    }
    let signing_input = format!(
        "{}.{}",
        jwk::b64url_encode(header.to_string().as_bytes()),
        jwk::b64url_encode(Value::Object(payload).to_string().as_bytes())
    );
    let signature = pair.sign(signing_input.as_bytes());
    Ok(format!(
        "{signing_input}.{}",
        jwk::b64url_encode(signature.as_ref())
    ))
}

fn check_claims(claims: &MintClaims) -> Result<()> {
    let invalid = |what: &str| Err(DevTokenError::Invalid(what.into()));
    for (name, value) in [
        ("issuer", &claims.issuer),
        ("audience", &claims.audience),
        ("subject", &claims.subject),
    ] {
        if value.is_empty() {
            return invalid(&format!("the {name} is empty"));
        }
    }
    if claims.tenant.as_deref() == Some("") {
        return invalid("the tenant is empty");
    }
    if claims.ttl.as_secs() == 0 {
        return invalid("the ttl must be at least one second");
    }
    if claims.roles.iter().any(String::is_empty) {
        return invalid("a role is empty");
    }
    // RFC 6749 §3.3 scope-token: printable ASCII without space, '"' or '\'.
    let token_ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| (0x21..=0x7E).contains(&b) && b != b'"' && b != b'\\')
    };
    if let Some(bad) = claims.scopes.iter().find(|s| !token_ok(s)) {
        return invalid(&format!("{bad:?} is not a scope-token (RFC 6749 §3.3)"));
    }
    if let Some(jkt) = &claims.cnf_jkt
        && jwk::b64url_decode(jkt).map(|b| b.len()) != Ok(32)
    {
        return invalid("cnf_jkt is not a base64url SHA-256 thumbprint (RFC 9449 §6.1)");
    }
    Ok(())
}

fn public_jwk(pair: &Ed25519KeyPair) -> Result<Jwk> {
    let text = json!({
        "kty": "OKP",
        "crv": "Ed25519",
        "x": jwk::b64url_encode(pair.public_key().as_ref()),
    })
    .to_string();
    Jwk::from_json(text.as_bytes()).map_err(|e| DevTokenError::Invalid(e.to_string()))
}

fn create_new(path: &Path, mode: u32) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true) // O_CREAT | O_EXCL: never overwrite, never follow a symlink
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => DevTokenError::Exists(path.to_owned()),
            _ => DevTokenError::Io {
                path: path.to_owned(),
                source: e,
            },
        })
}

fn write_synced(file: &mut File, path: &Path, bytes: &[u8]) -> Result<()> {
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_err(path))
}

/// Reads a PKCS#8 Ed25519 key, PEM or DER.
fn read_key(path: &Path) -> Result<Ed25519KeyPair> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|f| f.take(MAX_KEY_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(io_err(path))?;
    let bad = |detail: String| DevTokenError::BadKey {
        path: path.to_owned(),
        detail,
    };
    if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(bad("the file is too large".into()));
    }
    let der = pem::pkcs8_der(&bytes).map_err(bad)?;
    // PKCS#8 v2 (with the public key, as ring writes it) is checked for
    // consistency; v1 (as OpenSSL writes it) is accepted too.
    Ed25519KeyPair::from_pkcs8(&der)
        .or_else(|_| Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der))
        .map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt, sync::Arc};

    use super::*;
    use portcullis_agent::admission::{
        jwk::JwksFile,
        token::{Confirmation, TokenPolicy, Verifier},
    };

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("portcullis-devtoken-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn claims() -> MintClaims {
        MintClaims {
            issuer: "https://dev.example".into(),
            audience: "portcullis".into(),
            subject: "alice".into(),
            tenant: Some("acme".into()),
            client_id: None,
            roles: vec!["analyst".into()],
            scopes: vec!["model:llm:invoke".into(), "openid".into()],
            ttl: Duration::from_secs(300),
            cnf_jkt: Some(jwk::b64url_encode(&[7; 32])),
        }
    }

    #[test]
    fn keygen_then_mint_verifies() {
        let dir = temp_dir("roundtrip");
        let out = keygen(&dir).unwrap();
        let mode = fs::metadata(&out.key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            fs::read_to_string(&out.key_path)
                .unwrap()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );

        let keys = Arc::new(JwksFile::load(&out.jwks_path, false).unwrap());
        let set = keys.current();
        let key = set.get(&out.kid).unwrap();
        assert_eq!(key.thumbprint(), out.kid);
        assert_eq!(key.alg, jwk::Alg::EdDSA);

        let verifier = Verifier::new(TokenPolicy::new("https://dev.example", "portcullis"), keys);
        let now = SystemTime::now();
        let token = mint_at(&out.key_path, claims(), now).unwrap();
        let verified = verifier.verify(&token, now).unwrap();
        assert_eq!(verified.subject, "alice");
        assert_eq!(verified.tenant.as_deref(), Some("acme"));
        assert_eq!(verified.roles, ["analyst"]);
        assert!(verified.allows("llm", "invoke"));
        assert!(!verified.allows("llm", "retrain"));
        assert_eq!(
            verified.cnf,
            Some(Confirmation::Jkt(jwk::b64url_encode(&[7; 32])))
        );
        assert_eq!(
            verified
                .expires_at
                .duration_since(verified.issued_at)
                .unwrap(),
            Duration::from_secs(300)
        );
        // Two mints differ in jti.
        let again = mint_at(&out.key_path, claims(), now).unwrap();
        assert_ne!(verifier.verify(&again, now).unwrap().jti, verified.jti);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keygen_refuses_to_overwrite() {
        let dir = temp_dir("overwrite");
        let first = keygen(&dir).unwrap();
        let key_before = fs::read(&first.key_path).unwrap();
        let err = keygen(&dir).unwrap_err();
        assert!(
            matches!(err, DevTokenError::Exists(ref p) if *p == first.key_path),
            "{err}"
        );
        assert_eq!(fs::read(&first.key_path).unwrap(), key_before);

        // Only jwks.json present: refused too, and no key left behind.
        fs::remove_file(&first.key_path).unwrap();
        let err = keygen(&dir).unwrap_err();
        assert!(
            matches!(err, DevTokenError::Exists(ref p) if *p == first.jwks_path),
            "{err}"
        );
        assert!(!first.key_path.exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mint_refuses_bad_input() {
        let dir = temp_dir("bad");
        let out = keygen(&dir).unwrap();
        for edit in [
            (|c: &mut MintClaims| c.subject.clear()) as fn(&mut MintClaims),
            |c| c.ttl = Duration::ZERO,
            |c| c.scopes.push("two words".into()),
            |c| c.cnf_jkt = Some("short".into()),
            |c| c.tenant = Some(String::new()),
        ] {
            let mut c = claims();
            edit(&mut c);
            assert!(matches!(
                mint(&out.key_path, c),
                Err(DevTokenError::Invalid(_))
            ));
        }
        let garbage = dir.join("garbage.key");
        fs::write(&garbage, b"not a key").unwrap();
        assert!(matches!(
            mint(&garbage, claims()),
            Err(DevTokenError::BadKey { .. })
        ));
        assert!(matches!(
            mint(&dir.join("missing.key"), claims()),
            Err(DevTokenError::Io { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
