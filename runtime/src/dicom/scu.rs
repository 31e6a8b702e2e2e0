//! mae-run as a DICOM client (SCU): C-ECHO and C-STORE to `AE@HOST:PORT`, over dicom-ul's
//! association. The outbox (`queue.rs`) and `mae-run dicom-echo` / `dicom-send` use it.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context};
use dicom_ul::association::ClientAssociationOptions;
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use dicom_ul::{ClientAssociation, Pdu};

use super::dimse::{self, VERIFICATION};

/// A remote application entity: `AE@HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub ae: String,
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}:{}", self.ae, self.host, self.port)
    }
}

/// Checks an AE title: 1 to 16 characters, no backslash or control character, not only
/// spaces (PS3.5 6.2).
pub fn check_ae_title(ae: &str) -> anyhow::Result<()> {
    if ae.trim().is_empty()
        || ae.len() > 16
        || !ae.is_ascii()
        || ae.chars().any(|c| c == '\\' || c.is_control())
    {
        bail!("{ae:?} is not an AE title (1 to 16 ASCII characters, no backslash)");
    }
    Ok(())
}

impl FromStr for Peer {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (ae, addr) = s
            .split_once('@')
            .with_context(|| format!("{s:?} is not AE@HOST:PORT"))?;
        check_ae_title(ae)?;
        let (host, port) = addr
            .rsplit_once(':')
            .with_context(|| format!("{s:?} is not AE@HOST:PORT (no port)"))?;
        let port: u16 = port
            .parse()
            .with_context(|| format!("{s:?}: port {port:?} is not a number"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            bail!("{s:?} is not AE@HOST:PORT");
        }
        Ok(Self {
            ae: ae.to_string(),
            host: host.to_string(),
            port,
        })
    }
}

/// Time limits of a client association.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub io: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            io: Duration::from_secs(60),
        }
    }
}

/// An open association to a peer.
#[derive(Debug)]
pub struct Client {
    assoc: ClientAssociation<TcpStream>,
    next_id: u16,
    pub peer: Peer,
}

/// One instance to send: SOP Class and Instance UIDs, transfer syntax, and the data set
/// encoded in it (the file without its preamble and meta group).
#[derive(Debug, Clone)]
pub struct Instance {
    pub sop_class: String,
    pub sop_instance: String,
    pub transfer_syntax: String,
    pub data: Vec<u8>,
}

impl Instance {
    /// Splits a DICOM file (preamble, `DICM`, meta group) into what a C-STORE sends.
    pub fn from_file(bytes: &[u8]) -> anyhow::Result<Self> {
        let body = bytes
            .get(128..)
            .filter(|b| b.starts_with(b"DICM"))
            .context("not a DICOM file (no DICM magic after the preamble)")?;
        let mut cursor = std::io::Cursor::new(body);
        let meta = dicom_object::meta::FileMetaTable::from_reader(&mut cursor)
            .context("cannot read the file meta group")?;
        let start = 128 + cursor.position() as usize;
        let trim = |s: &str| s.trim_end_matches(['\0', ' ']).to_string();
        Ok(Self {
            sop_class: trim(meta.media_storage_sop_class_uid()),
            sop_instance: trim(meta.media_storage_sop_instance_uid()),
            transfer_syntax: trim(meta.transfer_syntax()),
            data: bytes[start..].to_vec(),
        })
    }
}

fn resolve(peer: &Peer) -> anyhow::Result<SocketAddr> {
    (peer.host.as_str(), peer.port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {}", peer.host))?
        .next()
        .with_context(|| format!("{} has no address", peer.host))
}

impl Client {
    /// Opens an association from `calling` to `peer`, proposing each (abstract syntax,
    /// transfer syntax) pair of `contexts` as its own presentation context.
    pub fn open(
        peer: &Peer,
        calling: &str,
        contexts: &[(String, String)],
        t: Timeouts,
    ) -> anyhow::Result<Self> {
        let addr = resolve(peer)?;
        let mut options = ClientAssociationOptions::new()
            .calling_ae_title(calling)
            .called_ae_title(peer.ae.as_str())
            .connection_timeout(t.connect)
            .read_timeout(t.io)
            .write_timeout(t.io);
        for (abs, ts) in contexts {
            options = options.with_presentation_context(abs.as_str(), vec![ts.as_str()]);
        }
        let mut assoc = options
            .establish(addr)
            .with_context(|| format!("cannot open an association with {peer}"))?;
        // A PDU goes out in more than one write; without this, each small write after the
        // first waits for the peer's delayed acknowledgement (tens of milliseconds a message).
        assoc
            .inner_stream()
            .set_nodelay(true)
            .with_context(|| format!("cannot set TCP_NODELAY towards {peer}"))?;
        Ok(Self {
            assoc,
            next_id: 1,
            peer: peer.clone(),
        })
    }

    fn context_for(&self, abs: &str, ts: &str) -> Option<u8> {
        self.assoc
            .presentation_contexts()
            .iter()
            .find(|pc| {
                pc.reason == PresentationContextResultReason::Acceptance
                    && pc.abstract_syntax.trim_end_matches('\0') == abs
                    && pc.transfer_syntax.trim_end_matches('\0') == ts
            })
            .map(|pc| pc.id)
    }

    /// Waits for a command set on the association (its fragments joined).
    fn receive_command(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut command = Vec::new();
        loop {
            match self.assoc.receive().context("no response")? {
                Pdu::PData { data } => {
                    for v in data {
                        if v.value_type == PDataValueType::Command {
                            command.extend_from_slice(&v.data);
                            if v.is_last {
                                return Ok(command);
                            }
                        }
                    }
                }
                Pdu::AbortRQ { source } => {
                    bail!("{} aborted the association: {source:?}", self.peer)
                }
                other => bail!(
                    "unexpected {} from {}",
                    other.short_description(),
                    self.peer
                ),
            }
        }
    }

    fn message_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    /// C-ECHO: the status the peer answers.
    pub fn echo(&mut self) -> anyhow::Result<u16> {
        let pc = self
            .context_for(VERIFICATION, dimse::EXPLICIT_VR_LE)
            .or_else(|| self.context_for(VERIFICATION, "1.2.840.10008.1.2"))
            .with_context(|| format!("{} refused the Verification SOP class", self.peer))?;
        let id = self.message_id();
        self.assoc.send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc,
                value_type: PDataValueType::Command,
                is_last: true,
                data: dimse::echo_rq(id),
            }],
        })?;
        let rsp = dimse::expect_response(&self.receive_command()?, dimse::ECHO)?;
        Ok(rsp.status)
    }

    /// C-STORE of one instance: the peer's status and error comment.
    pub fn store(&mut self, inst: &Instance) -> anyhow::Result<dimse::Response> {
        let pc = self
            .context_for(&inst.sop_class, &inst.transfer_syntax)
            .with_context(|| {
                format!(
                    "{} accepted no presentation context for SOP class {} in transfer syntax {}",
                    self.peer, inst.sop_class, inst.transfer_syntax
                )
            })?;
        let id = self.message_id();
        self.assoc.send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc,
                value_type: PDataValueType::Command,
                is_last: true,
                data: dimse::store_rq(id, &inst.sop_class, &inst.sop_instance),
            }],
        })?;
        {
            let mut w = self.assoc.send_pdata(pc);
            w.write_all(&inst.data)
                .with_context(|| format!("cannot send the data set to {}", self.peer))?;
            w.finish()
                .with_context(|| format!("cannot send the data set to {}", self.peer))?;
        }
        dimse::expect_response(&self.receive_command()?, dimse::STORE)
    }

    /// Releases the association.
    pub fn release(self) -> anyhow::Result<()> {
        self.assoc
            .release()
            .with_context(|| format!("release of the association with {}", self.peer))
    }
}

/// The presentation contexts to propose for `instances`: one per (SOP class, transfer syntax).
pub fn contexts_for<'a>(
    instances: impl IntoIterator<Item = &'a Instance>,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for i in instances {
        let pair = (i.sop_class.clone(), i.transfer_syntax.clone());
        if !out.contains(&pair) {
            out.push(pair);
        }
    }
    out
}

/// C-ECHO to `peer` on its own association: the status.
pub fn echo(peer: &Peer, calling: &str, t: Timeouts) -> anyhow::Result<u16> {
    let contexts = [
        (VERIFICATION.to_string(), dimse::EXPLICIT_VR_LE.to_string()),
        (VERIFICATION.to_string(), "1.2.840.10008.1.2".to_string()),
    ];
    let mut c = Client::open(peer, calling, &contexts, t)?;
    let status = c.echo()?;
    c.release()?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn peers_parse() {
        let p: Peer = "ORTHANC@localhost:4242".parse().unwrap();
        assert_eq!(
            (p.ae.as_str(), p.host.as_str(), p.port),
            ("ORTHANC", "localhost", 4242)
        );
        let p: Peer = "PACS@[::1]:104".parse().unwrap();
        assert_eq!(p.host, "::1");
        for bad in [
            "x",
            "AE@host",
            "@h:1",
            "AE@h:0",
            "AE@h:x",
            "A\\B@h:1",
            "ABCDEFGHIJKLMNOPQ@h:1",
        ] {
            assert!(bad.parse::<Peer>().is_err(), "{bad}");
        }
    }
}
