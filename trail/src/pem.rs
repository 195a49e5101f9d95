//! PKCS#8 private keys as PEM (RFC 7468 §10, label `PRIVATE KEY`): the one
//! encoder and decoder for the node key, knock proof keys and development
//! issuer keys.

use base64::Engine as _;

const BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const END: &str = "-----END PRIVATE KEY-----";

/// PKCS#8 DER as PEM, 64 base64 characters a line (RFC 7468 §2).
pub fn encode_private_key(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + 64);
    out.push_str(BEGIN);
    out.push('\n');
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(END);
    out.push('\n');
    out
}

/// True when `bytes` start, after white space, with a `PRIVATE KEY` block.
pub fn is_private_key_pem(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok_and(|t| t.trim_start().starts_with(BEGIN))
}

/// Extracts the DER from a PEM `PRIVATE KEY` block, or returns the input
/// unchanged when it is not PEM (DER). Another PEM label (an encrypted or
/// a PKCS#1 key) is an error naming what is expected.
pub fn pkcs8_der(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Ok(bytes.to_vec());
    };
    let Some(start) = text.find(BEGIN) else {
        if text.contains("-----BEGIN") {
            return Err("PEM block is not an unencrypted PKCS#8 `PRIVATE KEY`".into());
        }
        return Ok(bytes.to_vec());
    };
    let rest = &text[start + BEGIN.len()..];
    let end = rest
        .find(END)
        .ok_or_else(|| format!("PEM block has no `{END}` line"))?;
    let b64: String = rest[..end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("PEM body is not base64: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_other_blocks() {
        let der: Vec<u8> = (0..=200u8).collect();
        let pem = encode_private_key(&der);
        assert!(pem.lines().all(|l| l.len() <= 64 || l.starts_with("-----")));
        assert!(is_private_key_pem(pem.as_bytes()));
        assert_eq!(pkcs8_der(pem.as_bytes()).unwrap(), der);
        assert_eq!(pkcs8_der(&der).unwrap(), der);
        let e = pkcs8_der(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAA==\n").unwrap_err();
        assert!(e.contains("PKCS#8"), "{e}");
        let e = pkcs8_der(format!("{BEGIN}\nAAAA\n").as_bytes()).unwrap_err();
        assert!(e.contains(END), "{e}");
    }
}
