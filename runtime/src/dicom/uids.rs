//! UIDs of the results, derived from what they are about: the same source instance classified
//! by the same model (SHA-256) always gets the same SR and Secondary Capture UIDs, so an image
//! sent twice never gives a second result in the PACS.
//!
//! A UID is `ROOT.N`, with `N` the decimal form of the first 128 bits of a SHA-256 over the
//! parts, cut to fit 64 characters. Under the default root `2.25` (PS3.5 B.2, no registration
//! needed) those bits are made a version-8 UUID, as that root asks for a UUID.

use anyhow::bail;
use sha2::{Digest, Sha256};

/// The default UID root: UUID-derived UIDs.
pub const UUID_ROOT: &str = "2.25";

/// Checks a `--uid-root`: numbers separated by dots, none with a leading zero, leaving room
/// for at least 20 digits of the derived part.
pub fn check_root(root: &str) -> anyhow::Result<()> {
    let ok_part = |p: &str| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && (p == "0" || !p.starts_with('0'))
    };
    if !root.split('.').all(ok_part) {
        bail!(
            "--uid-root {root:?} is not a UID root (numbers separated by dots, no leading zeros)"
        );
    }
    if root.len() > 43 {
        bail!(
            "--uid-root {root:?} is {} characters: at most 43, so that derived UIDs fit in 64",
            root.len()
        );
    }
    Ok(())
}

/// The UID under `root` derived from `parts`.
pub fn derive(root: &str, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    if root == UUID_ROOT {
        b[6] = (b[6] & 0x0f) | 0x80;
        b[8] = (b[8] & 0x3f) | 0x80;
    }
    let digits = u128::from_be_bytes(b).to_string();
    let room = 64 - root.len() - 1;
    format!("{root}.{}", &digits[..digits.len().min(room)])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::dicom::dimse::is_uid;

    #[test]
    fn derived_uids_are_stable_valid_and_distinct() {
        let a = derive(UUID_ROOT, &["1.2.3", "abc", "sr"]);
        assert_eq!(a, derive(UUID_ROOT, &["1.2.3", "abc", "sr"]));
        assert_ne!(a, derive(UUID_ROOT, &["1.2.3", "abc", "sc"]));
        assert_ne!(a, derive(UUID_ROOT, &["1.2.3a", "bc", "sr"]));
        let long = "1.2.826.0.1.3680043.10.543.123456789.11";
        check_root(long).unwrap();
        for uid in [a, derive(long, &["x"])] {
            assert!(is_uid(&uid) && uid.len() <= 64, "{uid}");
            assert!(
                !uid.split('.').any(|p| p.len() > 1 && p.starts_with('0')),
                "{uid}"
            );
        }
        for bad in ["", "1..2", "1.02", "1.2.", "a.b", &"1.".repeat(30)] {
            assert!(check_root(bad).is_err(), "{bad}");
        }
    }
}
