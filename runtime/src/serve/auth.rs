//! `mae-run serve --api-keys FILE`: bearer tokens, of which the server keeps only SHA-256 hashes.
//!
//! The file holds one key a line, `HASH NAME`: the lowercase or uppercase hex SHA-256 of the
//! token, then a name for the audit log (`#` starts a comment). A token is made and hashed with
//! e.g. `tok=$(openssl rand -hex 32); printf %s "$tok" | sha256sum`. A request presents the token
//! as `Authorization: Bearer TOKEN`; its hash is compared with every stored hash in constant
//! time, so neither the match nor its position shows in the answer time.

use std::path::Path;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The accepted keys.
#[derive(Debug, Clone)]
pub struct ApiKeys {
    keys: Vec<([u8; 32], String)>,
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl ApiKeys {
    /// Reads `path`; refuses a file with no key or with a malformed line, naming the line.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read API keys {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("API keys {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (hash, name) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let name = name.trim();
            let Some(hash) = hex32(hash) else {
                bail!(
                    "line {}: '{hash}' is not a SHA-256 in hex (64 digits); each line is \
                     'SHA256HEX NAME'",
                    n + 1
                );
            };
            if name.is_empty() {
                bail!(
                    "line {}: the key has no name (each line is 'SHA256HEX NAME')",
                    n + 1
                );
            }
            keys.push((hash, name.to_string()));
        }
        if keys.is_empty() {
            bail!("no keys (each line is 'SHA256HEX NAME')");
        }
        Ok(Self { keys })
    }

    /// The name of the key whose token is `token`.
    pub fn check(&self, token: &str) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        // Look at every key, whatever matched, so that the time does not depend on the match.
        for (hash, name) in &self.keys {
            if bool::from(hash[..].ct_eq(&digest[..])) {
                found = Some(name.as_str());
            }
        }
        found
    }

    /// The key named by an `Authorization` header value (`Bearer TOKEN`).
    pub fn check_header(&self, value: Option<&str>) -> Option<&str> {
        let v = value?.trim();
        let (scheme, token) = v.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        self.check(token.trim())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_by_hash() {
        let h = mae_models::digest::sha256_hex(b"s3cret");
        let keys = ApiKeys::parse(&format!("# keys\n{h} radiology-pacs\n\n")).unwrap();
        assert_eq!(keys.check("s3cret"), Some("radiology-pacs"));
        assert_eq!(keys.check("s3cre"), None);
        assert_eq!(
            keys.check_header(Some("Bearer s3cret")),
            Some("radiology-pacs")
        );
        assert_eq!(keys.check_header(Some("Basic s3cret")), None);
        assert_eq!(keys.check_header(None), None);
        let e = ApiKeys::parse("abc name").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        assert!(ApiKeys::parse(&h).is_err());
        assert!(ApiKeys::parse("# nothing\n").is_err());
    }
}
