//! `--dicom-callers FILE`: the calling AE titles let in, one a line, each optionally with the
//! addresses it may call from (`AE [ADDRESS...]`); `#` starts a comment. Any other caller's
//! association is rejected with "calling AE title not recognized" (PS3.8 9.3.4).
//!
//! ```text
//! # the PACS, from its two nodes
//! ORTHANC 10.0.0.5 10.0.0.6
//! CT_SCANNER_1
//! ```

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use anyhow::Context;

use super::scu::check_ae_title;

/// The callers allowed in: AE title to its addresses (empty: any address).
#[derive(Debug, Clone, Default)]
pub struct Callers {
    allowed: BTreeMap<String, Vec<IpAddr>>,
}

impl Callers {
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<Self> {
        let mut allowed: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            let mut words = line.split_whitespace();
            let Some(ae) = words.next() else { continue };
            let at = || format!("{origin}:{}", i + 1);
            check_ae_title(ae).with_context(at)?;
            let addrs = words
                .map(|w| {
                    w.parse::<IpAddr>()
                        .with_context(|| format!("{}: {w:?} is not an IP address", at()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            allowed.entry(ae.to_string()).or_default().extend(addrs);
        }
        if allowed.is_empty() {
            anyhow::bail!(
                "{origin} lists no calling AE title: every association would be rejected"
            );
        }
        Ok(Self { allowed })
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --dicom-callers {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Whether `ae` may call from `ip`.
    pub fn allows(&self, ae: &str, ip: Option<IpAddr>) -> bool {
        match self.allowed.get(ae) {
            None => false,
            Some(addrs) if addrs.is_empty() => true,
            Some(addrs) => ip.is_some_and(|ip| {
                let ip = match ip {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                    v4 => v4,
                };
                addrs.contains(&ip)
            }),
        }
    }

    pub fn len(&self) -> usize {
        self.allowed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.allowed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn titles_and_addresses() {
        let c = Callers::parse("# pacs\nORTHANC 10.0.0.5\nCT1\n\n", "f").unwrap();
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert!(c.allows("ORTHANC", ip("10.0.0.5")));
        assert!(c.allows("ORTHANC", ip("::ffff:10.0.0.5")));
        assert!(!c.allows("ORTHANC", ip("10.0.0.6")));
        assert!(c.allows("CT1", ip("192.168.1.1")));
        assert!(!c.allows("OTHER", ip("10.0.0.5")));
        assert!(Callers::parse("# nothing\n", "f").is_err());
        let err = Callers::parse("A 1.2.3\n", "f").unwrap_err();
        assert!(format!("{err:#}").contains("f:1"), "{err:#}");
    }
}
