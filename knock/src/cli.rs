//! `portcullis knock`: the command-line client.

use std::{
    io::Read as _,
    net::{IpAddr, SocketAddr, ToSocketAddrs as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use base64::Engine as _;

use crate::{
    client::{KnockOptions, PopKey, knock},
    wire::DEFAULT_KNOCK_PORT,
};
use portcullis_trail::time::format_utc;

/// Largest file read for a token or a key.
const MAX_INPUT_FILE: u64 = 64 * 1024;

/// Knock: ask a node's agent to admit this host to a service.
#[derive(Debug, Clone, clap::Args)]
pub struct KnockArgs {
    /// File holding the access token (JWT); `-` reads standard input.
    #[arg(long, value_name = "FILE", required_unless_present = "print_jkt")]
    pub token_file: Option<PathBuf>,
    /// The service to be admitted to.
    #[arg(long, value_name = "NAME", required_unless_present = "print_jkt")]
    pub service: Option<String>,
    /// The node: a name or address, optionally with `:PORT`; IPv6 literals
    /// with a port go in brackets (`[2001:db8::1]:62201`).
    #[arg(value_name = "HOST", required_unless_present = "print_jkt")]
    pub host: Option<String>,
    /// Print the RFC 7638 thumbprint of --pop-key (the value your identity
    /// provider puts in the token's `cnf.jkt`) and exit.
    #[arg(long, requires = "pop_key", conflicts_with_all = ["token_file", "service", "host"])]
    pub print_jkt: bool,
    /// The node's knock port (default 62201) when HOST gives none.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Admit only TCP connections from this source port (one flow).
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    pub source_port: u16,
    /// Ask for this address to be admitted instead of the knock's source
    /// (behind NAT); needs --pop-key.
    #[arg(long, value_name = "IP", requires = "pop_key")]
    pub client_addr: Option<IpAddr>,
    /// Proof-of-possession private key (Ed25519 or P-256 PKCS#8, PEM or DER):
    /// the key whose thumbprint is the token's `cnf.jkt`.
    #[arg(long, value_name = "FILE")]
    pub pop_key: Option<PathBuf>,
    /// The node's public key (32 bytes base64url, or its JWK) to verify the
    /// reply with.
    #[arg(long, value_name = "FILE")]
    pub node_key_pub: Option<PathBuf>,
    /// How long to wait for a reply after each knock, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub timeout_ms: u64,
    /// How many more knocks (each with a new nonce) to send without a reply.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    pub retries: u32,
}

/// Runs `portcullis knock`: prints the admission on success; an error
/// (exit status 1) on refusal, timeout or bad input.
pub fn run_cli(args: KnockArgs) -> anyhow::Result<()> {
    let pop_key = match &args.pop_key {
        Some(path) => {
            let bytes = read_small(path)?;
            Some(
                PopKey::from_pkcs8(&bytes)
                    .map_err(|e| anyhow::anyhow!("--pop-key {}: {e}", path.display()))?,
            )
        }
        None => None,
    };
    if args.print_jkt {
        let key = pop_key.context("--print-jkt needs --pop-key FILE")?;
        println!("{}", key.thumbprint());
        return Ok(());
    }
    let (Some(token_file), Some(service), Some(host)) =
        (&args.token_file, args.service, &args.host)
    else {
        bail!("give --token-file FILE, --service NAME and the node's HOST");
    };
    let token = read_token(token_file)?;
    let server = resolve_host(host, args.port)?;
    let node_public_key = match &args.node_key_pub {
        Some(path) => Some(
            parse_node_public_key(&read_small(path)?)
                .with_context(|| format!("--node-key-pub {}", path.display()))?,
        ),
        None => None,
    };
    let opts = KnockOptions {
        server,
        token,
        service,
        source_port: args.source_port,
        client_addr: args.client_addr,
        pop_key,
        node_public_key,
        timeout: Duration::from_millis(args.timeout_ms),
        retries: args.retries,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let outcome = rt.block_on(knock(&opts))?;
    let now = SystemTime::now();
    let left = outcome
        .expires_at
        .duration_since(now)
        .unwrap_or(Duration::ZERO);
    println!(
        "admitted to {} until {} (in {}s)",
        outcome.service,
        format_utc(outcome.expires_at),
        left.as_secs()
    );
    if !outcome.verified_reply {
        eprintln!("note: the reply's signature was not checked (give --node-key-pub FILE)");
    }
    Ok(())
}

fn read_small(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    if path == Path::new("-") {
        std::io::stdin()
            .take(MAX_INPUT_FILE + 1)
            .read_to_end(&mut bytes)
            .context("reading standard input")?;
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_INPUT_FILE + 1).read_to_end(&mut bytes))
            .with_context(|| format!("reading {}", path.display()))?;
    }
    if bytes.len() as u64 > MAX_INPUT_FILE {
        bail!("{}: larger than {MAX_INPUT_FILE} bytes", path.display());
    }
    Ok(bytes)
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let bytes = read_small(path)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("token file {}: not UTF-8 text", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!("token file {}: empty", path.display());
    }
    if token.chars().any(char::is_whitespace) {
        bail!(
            "token file {}: holds more than one word; expected one compact JWT",
            path.display()
        );
    }
    Ok(token.to_owned())
}

/// Splits HOST into (host, port) and resolves it. Accepts `name`,
/// `name:port`, `1.2.3.4`, `1.2.3.4:port`, `2001:db8::1`, `[2001:db8::1]`
/// and `[2001:db8::1]:port`.
pub(crate) fn resolve_host(host: &str, port: Option<u16>) -> anyhow::Result<SocketAddr> {
    let (name, host_port) = split_host(host)?;
    let port = match (host_port, port) {
        (Some(a), Some(b)) if a != b => {
            bail!("HOST {host} names port {a} but --port says {b}")
        }
        (Some(p), _) | (None, Some(p)) => p,
        (None, None) => DEFAULT_KNOCK_PORT,
    };
    if port == 0 {
        bail!("port 0 is not a knock port");
    }
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let mut addrs = (name, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {name}"))?;
    addrs
        .next()
        .ok_or_else(|| anyhow::anyhow!("resolving {name}: no addresses"))
}

fn split_host(host: &str) -> anyhow::Result<(&str, Option<u16>)> {
    let bad_port = |p: &str| anyhow::anyhow!("HOST {host}: bad port {p:?}");
    if host.is_empty() {
        bail!("HOST is empty");
    }
    if let Some(rest) = host.strip_prefix('[') {
        let (inner, after) = rest
            .split_once(']')
            .ok_or_else(|| anyhow::anyhow!("HOST {host}: missing `]`"))?;
        if inner.parse::<std::net::Ipv6Addr>().is_err() {
            bail!("HOST {host}: {inner:?} is not an IPv6 address");
        }
        return match after {
            "" => Ok((inner, None)),
            _ => {
                let p = after
                    .strip_prefix(':')
                    .ok_or_else(|| anyhow::anyhow!("HOST {host}: expected `:PORT` after `]`"))?;
                Ok((inner, Some(p.parse().map_err(|_| bad_port(p))?)))
            }
        };
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok((host, None)); // includes bare IPv6 literals
    }
    match host.split_once(':') {
        None => Ok((host, None)),
        Some((name, p)) if !p.contains(':') && !name.is_empty() => {
            Ok((name, Some(p.parse().map_err(|_| bad_port(p))?)))
        }
        Some(_) => bail!("HOST {host}: put IPv6 addresses with a port in brackets"),
    }
}

/// A node public key: 32 raw bytes, 32 bytes in base64url (padding and the
/// standard alphabet tolerated), or an Ed25519 JWK (`{"kty":"OKP",...}`).
pub(crate) fn parse_node_public_key(bytes: &[u8]) -> anyhow::Result<[u8; 32]> {
    let text = std::str::from_utf8(bytes).map(str::trim);
    let decoded = match text {
        Ok(t) if t.starts_with('{') => {
            let jwk: serde_json::Value = serde_json::from_str(t).context("not valid JSON")?;
            if jwk["kty"] != "OKP" || jwk["crv"] != "Ed25519" {
                bail!("JWK is not an Ed25519 key (kty OKP, crv Ed25519)");
            }
            let x = jwk["x"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("JWK has no `x`"))?;
            decode_b64(x).context("JWK `x` is not base64url")?
        }
        // As `portcullis agent status` and `ctl status` print it.
        Ok(t) if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) => {
            return portcullis_trail::hex::parse_hex::<32>(t)
                .ok_or_else(|| anyhow::anyhow!("not 64 hex digits"));
        }
        Ok(t) if bytes.len() != 32 => {
            decode_b64(t).context("not hex, not base64url and not a JWK")?
        }
        _ => bytes.to_vec(),
    };
    <[u8; 32]>::try_from(decoded.as_slice())
        .map_err(|_| anyhow::anyhow!("an Ed25519 public key is 32 bytes, got {}", decoded.len()))
}

fn decode_b64(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let normalized: String = s
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(normalized)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;
    use std::time::UNIX_EPOCH;

    #[test]
    fn hosts() {
        let r = |h: &str, p: Option<u16>| resolve_host(h, p).map(|a| a.to_string());
        assert_eq!(r("127.0.0.1", None).unwrap(), "127.0.0.1:62201");
        assert_eq!(r("127.0.0.1:9", None).unwrap(), "127.0.0.1:9");
        assert_eq!(r("127.0.0.1", Some(9)).unwrap(), "127.0.0.1:9");
        assert_eq!(r("127.0.0.1:9", Some(9)).unwrap(), "127.0.0.1:9");
        assert!(r("127.0.0.1:9", Some(10)).is_err());
        assert_eq!(r("::1", None).unwrap(), "[::1]:62201");
        assert_eq!(r("[::1]", None).unwrap(), "[::1]:62201");
        assert_eq!(r("[::1]:7", None).unwrap(), "[::1]:7");
        assert_eq!(r("[::1]", Some(7)).unwrap(), "[::1]:7");
        assert!(r("[::1", None).is_err());
        assert!(r("[::1]x", None).is_err());
        assert!(r("[nope]:1", None).is_err());
        assert!(r("1.2.3.4:99999", None).is_err());
        assert!(r("1.2.3.4:0", None).is_err());
        assert!(r("", None).is_err());
        assert!(r("2001:db8::1:x", None).is_err());
        assert!(r("localhost", None).unwrap().ends_with(":62201"));
        assert!(r("localhost:5", None).unwrap().ends_with(":5"));
    }

    #[test]
    fn node_public_keys() {
        let pk = [7u8; 32];
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pk);
        assert_eq!(parse_node_public_key(b64.as_bytes()).unwrap(), pk);
        assert_eq!(
            parse_node_public_key(format!("  {b64}\n").as_bytes()).unwrap(),
            pk
        );
        let std = base64::engine::general_purpose::STANDARD.encode(pk);
        assert_eq!(parse_node_public_key(std.as_bytes()).unwrap(), pk);
        assert_eq!(parse_node_public_key(&pk).unwrap(), pk);
        let hex = format!("{}\n", portcullis_trail::hex::hex(&pk));
        assert_eq!(parse_node_public_key(hex.as_bytes()).unwrap(), pk);
        let jwk = format!(r#"{{"kty":"OKP","crv":"Ed25519","x":"{b64}"}}"#);
        assert_eq!(parse_node_public_key(jwk.as_bytes()).unwrap(), pk);
        assert!(parse_node_public_key(br#"{"kty":"EC","crv":"P-256","x":"AA"}"#).is_err());
        assert!(parse_node_public_key(b"AAAA").is_err());
        assert!(parse_node_public_key(b"{nope").is_err());
    }

    #[test]
    fn utc_format() {
        assert_eq!(format_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // leap day
        assert_eq!(format_utc(t), "2000-02-29T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_735_689_599);
        assert_eq!(format_utc(t), "2024-12-31T23:59:59Z");
    }

    #[derive(clap::Parser)]
    struct Wrap {
        #[command(flatten)]
        k: KnockArgs,
    }

    #[test]
    fn args_parse() {
        let w = Wrap::try_parse_from(["x", "--token-file", "t", "--service", "llm", "[::1]:5"])
            .unwrap();
        assert_eq!(w.k.timeout_ms, 2000);
        assert_eq!(w.k.retries, 2);
        assert_eq!(w.k.source_port, 0);
        assert_eq!(w.k.host.as_deref(), Some("[::1]:5"));
        // --client-addr needs --pop-key.
        assert!(
            Wrap::try_parse_from([
                "x",
                "--token-file",
                "t",
                "--service",
                "llm",
                "--client-addr",
                "192.0.2.1",
                "h"
            ])
            .is_err()
        );
    }

    #[test]
    fn token_file_checks() {
        let dir = std::env::temp_dir().join(format!("portcullis-knock-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("tok");
        std::fs::write(&p, "a.b.c\n").unwrap();
        assert_eq!(read_token(&p).unwrap(), "a.b.c");
        std::fs::write(&p, "  \n").unwrap();
        assert!(read_token(&p).unwrap_err().to_string().contains("empty"));
        std::fs::write(&p, "a.b.c d.e.f").unwrap();
        assert!(read_token(&p).is_err());
        assert!(read_token(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
