//! The DICOM listener (SCP): associations through dicom-ul, one thread each, up to
//! `--dicom-max-associations`; C-ECHO, and C-STORE of the image storage SOP classes in the
//! transfer syntaxes the input layer decodes (others are refused per presentation context).
//! A C-STORE is answered Success only once the instance is in the spool (written, fsynced,
//! renamed); an instance over `--dicom-max-instance-bytes`, one that does not parse, or one the
//! spool cannot keep gets a failure status the sender can act on.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use dicom_ul::association::server::AccessControl;
use dicom_ul::association::{Association, CloseSocket, ServerAssociationOptions};
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJServiceUserReason, AssociationRJSource, PDataValue, PDataValueType,
    PresentationContextResultReason, UserIdentity,
};
use dicom_ul::{Pdu, ServerAssociation};
use serde_json::json;
use tracing::{debug, info, warn};

use super::callers::Callers;
use super::dimse::{self, status, Request};
use super::spool::Spool;
use super::{Events, NodeConfig};

/// What every association thread shares.
#[derive(Debug)]
struct Ctx {
    cfg: Arc<NodeConfig>,
    spool: Arc<Spool>,
    received: Sender<std::path::PathBuf>,
    events: Arc<dyn Events>,
    active: AtomicUsize,
}

/// Binds `cfg.listen` and accepts associations on a thread of its own; returns the bound
/// address.
pub fn start(
    cfg: Arc<NodeConfig>,
    spool: Arc<Spool>,
    received: Sender<std::path::PathBuf>,
    events: Arc<dyn Events>,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(cfg.listen)
        .with_context(|| format!("cannot listen for DICOM on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let ctx = Arc::new(Ctx {
        cfg,
        spool,
        received,
        events,
        active: AtomicUsize::new(0),
    });
    std::thread::Builder::new()
        .name("dicom-listener".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => accept(&ctx, s),
                    Err(e) => {
                        warn!("DICOM listener: accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })?;
    Ok(addr)
}

fn accept(ctx: &Arc<Ctx>, stream: TcpStream) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "unknown".to_string(), |a| a.to_string());
    // Answers go out without waiting on the caller's delayed acknowledgements.
    if let Err(e) = stream.set_nodelay(true) {
        debug!("DICOM {peer}: cannot set TCP_NODELAY: {e}");
    }
    let max = ctx.cfg.limits.max_associations;
    if ctx.active.fetch_add(1, Ordering::SeqCst) >= max {
        ctx.active.fetch_sub(1, Ordering::SeqCst);
        warn!(
            "DICOM association from {peer} rejected: {max} associations open \
             (--dicom-max-associations)"
        );
        ctx.events.record(json!({
            "event": "dicom-rejected", "client": peer,
            "reason": format!("{max} associations open (--dicom-max-associations)"),
        }));
        // Over TLS the request is only readable after a handshake: close instead.
        if ctx.cfg.tls.is_none() {
            let _ = reject_busy(stream, &ctx.cfg);
        }
        return;
    }
    let ctx = ctx.clone();
    let spawned = std::thread::Builder::new()
        .name("dicom-association".into())
        .spawn(move || {
            if let Err(e) = association(&ctx, stream, &peer) {
                warn!("DICOM association from {peer}: {e:#}");
            }
            ctx.active.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        warn!("DICOM listener: cannot start a thread: {e}");
    }
}

/// Reads the association request of a caller over the limit and rejects it, transiently,
/// with "local limit exceeded" (PS3.8 9.3.4), so that it tries again later.
fn reject_busy(mut stream: TcpStream, cfg: &NodeConfig) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = BytesMut::new();
    let _ =
        dicom_ul::association::read_pdu_from_wire(&mut stream, &mut buf, cfg.limits.max_pdu, false);
    let rj = Pdu::AssociationRJ(AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    });
    let mut out = Vec::new();
    dicom_ul::write_pdu(&mut out, &rj)?;
    stream.write_all(&out)?;
    Ok(())
}

/// The access rule of one connection: the called AE title must be ours, and the calling one
/// (from this address) in `--dicom-callers` when it is given.
#[derive(Debug)]
struct Gate {
    callers: Option<Arc<Callers>>,
    ip: Option<IpAddr>,
}

impl AccessControl for Gate {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if called_ae_title.trim() != this_ae_title.trim() {
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        match &self.callers {
            Some(c) if !c.allows(calling_ae_title.trim(), self.ip) => {
                Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
            }
            _ => Ok(()),
        }
    }
}

fn options(
    cfg: &NodeConfig,
    gate: Gate,
) -> ServerAssociationOptions<'static, Gate, dicom_ul::association::server::DefaultNegotiation> {
    let mut o = ServerAssociationOptions::new()
        .ae_access_control(gate)
        .ae_title(cfg.ae_title.clone())
        .max_pdu_length(cfg.limits.max_pdu)
        .strict(true)
        .read_timeout(cfg.limits.idle)
        .write_timeout(cfg.limits.idle)
        .with_abstract_syntax(dimse::VERIFICATION);
    for (uid, _) in dimse::STORAGE_CLASSES {
        o = o.with_abstract_syntax(*uid);
    }
    for (uid, _) in dimse::TRANSFER_SYNTAXES {
        o = o.with_transfer_syntax(*uid);
    }
    o
}

/// Whether an association error is the idle limit passing (a read timing out).
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            );
        }
        cur = err.source();
    }
    false
}

/// One association, from request (after the TLS handshake with `--dicom-tls-cert`) to
/// release.
fn association(ctx: &Ctx, stream: TcpStream, peer: &str) -> anyhow::Result<()> {
    let gate = Gate {
        callers: ctx.cfg.callers.clone(),
        ip: stream.peer_addr().ok().map(|a| a.ip()),
    };
    let options = options(&ctx.cfg, gate);
    match &ctx.cfg.tls {
        None => converse(ctx, options.establish(stream), peer, ""),
        Some(tls) => {
            let established = options.tls_config(tls.clone()).establish_tls(stream);
            if let Err(e) = &established {
                if tls_failed(e) {
                    let why = chain(e);
                    warn!("DICOM TLS handshake with {peer} failed: {why}");
                    ctx.events.record(json!({
                        "event": "dicom-rejected", "client": peer,
                        "reason": format!("TLS handshake failed: {why}"),
                    }));
                    return Ok(());
                }
            }
            converse(ctx, established, peer, " over TLS")
        }
    }
}

/// Whether an association failed in its TLS handshake: before the ClientHello was taken, or
/// later, when rustls finishes the handshake on the first read (a missing or untrusted client
/// certificate shows there, as a rustls error inside an I/O error).
fn tls_failed(e: &dicom_ul::association::Error) -> bool {
    use dicom_ul::association::Error;
    if matches!(e, Error::TlsConnection { .. } | Error::TlsHandshake { .. }) {
        return true;
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// An error and its causes on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        // An I/O error's source() skips the error it wraps; its text already holds it.
        cur = c.source();
    }
    out
}

/// The association once established (or refused): its P-DATA until release or abort.
fn converse<S>(
    ctx: &Ctx,
    established: Result<ServerAssociation<S>, dicom_ul::association::Error>,
    peer: &str,
    over: &str,
) -> anyhow::Result<()>
where
    S: std::io::Read + std::io::Write + CloseSocket,
{
    let mut assoc = match established {
        Ok(a) => a,
        Err(dicom_ul::association::Error::Rejected { association_rj, .. }) => {
            warn!(
                "DICOM association from {peer} rejected: {}",
                association_rj.source
            );
            ctx.events.record(json!({
                "event": "dicom-rejected", "client": peer,
                "reason": association_rj.source.to_string(),
            }));
            return Ok(());
        }
        Err(e) => return Err(e).context("association not established"),
    };
    let calling = assoc.peer_ae_title().trim().to_string();
    let mut accepted = 0;
    for pc in assoc.presentation_contexts() {
        if pc.reason == PresentationContextResultReason::Acceptance {
            accepted += 1;
        } else {
            debug!(
                "DICOM association {calling} ({peer}): presentation context {} ({}) refused: {:?}",
                pc.id, pc.abstract_syntax, pc.reason
            );
        }
    }
    let refused = assoc.presentation_contexts().len() - accepted;
    info!(
        "DICOM association from {calling} ({peer}){over} accepted: {accepted} presentation \
         context(s), {refused} refused (SOP class or transfer syntax not taken), PDU up to {} \
         bytes",
        assoc.requestor_max_pdu_length()
    );
    ctx.events.association(true);
    let _ended = Ended(&*ctx.events);
    let mut conv = Conversation {
        ctx,
        calling: &calling,
        peer,
        command: Vec::new(),
        store: None,
    };
    loop {
        match assoc.receive() {
            Ok(Pdu::PData { data }) => {
                for value in data {
                    if let Some(reply) = conv.on_value(&assoc, value)? {
                        assoc.send(&reply)?;
                    }
                }
            }
            Ok(Pdu::ReleaseRQ) => {
                let _ = assoc.send(&Pdu::ReleaseRP);
                info!("DICOM association with {calling} ({peer}) released");
                return Ok(());
            }
            Ok(Pdu::AbortRQ { source }) => {
                info!(
                    "DICOM association with {calling} ({peer}) aborted by the caller: {source:?}"
                );
                return Ok(());
            }
            Ok(other) => {
                warn!(
                    "DICOM association with {calling} ({peer}): unexpected {}; aborting",
                    other.short_description()
                );
                let _ = assoc.abort();
                return Ok(());
            }
            Err(e) if timed_out(&e) => {
                warn!(
                    "DICOM association with {calling} ({peer}) idle for {}s \
                     (--dicom-idle-timeout-s); aborting",
                    ctx.cfg.limits.idle.as_secs()
                );
                let _ = assoc.abort();
                return Ok(());
            }
            Err(e) => {
                let _ = assoc.abort();
                return Err(e).context(format!("association with {calling} broken"));
            }
        }
    }
}

/// Tells the events an association ended, however it ends.
struct Ended<'a>(&'a dyn Events);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.association(false);
    }
}

/// A C-STORE being received.
struct Incoming {
    pc: u8,
    message_id: u16,
    sop_class: String,
    sop_instance: String,
    data: Vec<u8>,
    /// Set once the instance cannot be kept; its data are read and dropped.
    refused: Option<(u16, String)>,
    started: Instant,
}

/// The DIMSE state of one association.
struct Conversation<'a> {
    ctx: &'a Ctx,
    calling: &'a str,
    peer: &'a str,
    command: Vec<u8>,
    store: Option<Incoming>,
}

fn command_pdu(pc: u8, data: Vec<u8>) -> Pdu {
    Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: pc,
            value_type: PDataValueType::Command,
            is_last: true,
            data,
        }],
    }
}

impl Conversation<'_> {
    /// Takes one P-DATA value; returns the response to send, if one is due.
    fn on_value<S>(
        &mut self,
        assoc: &ServerAssociation<S>,
        v: PDataValue,
    ) -> anyhow::Result<Option<Pdu>> {
        match v.value_type {
            PDataValueType::Command => {
                self.command.extend_from_slice(&v.data);
                if !v.is_last {
                    return Ok(None);
                }
                let bytes = std::mem::take(&mut self.command);
                self.on_command(assoc, v.presentation_context_id, &bytes)
            }
            PDataValueType::Data => {
                let Some(inc) = self.store.as_mut() else {
                    anyhow::bail!("a data set arrived with no command before it");
                };
                if inc.refused.is_none() {
                    let limit = self.ctx.cfg.limits.max_instance_bytes;
                    if inc.data.len() + v.data.len() > limit {
                        warn!(
                            "DICOM C-STORE {} from {}: instance over {limit} bytes \
                             (--dicom-max-instance-bytes); refusing it",
                            inc.sop_instance, self.calling
                        );
                        inc.data = Vec::new();
                        inc.refused = Some((
                            status::OUT_OF_RESOURCES,
                            format!("instance over {limit} bytes"),
                        ));
                    } else {
                        inc.data.extend_from_slice(&v.data);
                    }
                }
                if !v.is_last {
                    return Ok(None);
                }
                let inc = self.store.take().context("no C-STORE in progress")?;
                Ok(Some(self.finish_store(assoc, inc)))
            }
        }
    }

    fn on_command<S>(
        &mut self,
        assoc: &ServerAssociation<S>,
        pc: u8,
        bytes: &[u8],
    ) -> anyhow::Result<Option<Pdu>> {
        let request = dimse::parse_request(bytes)?;
        match request {
            Request::Echo { message_id } => {
                info!("DICOM C-ECHO from {} ({})", self.calling, self.peer);
                Ok(Some(command_pdu(
                    pc,
                    dimse::echo_rsp(message_id, status::SUCCESS),
                )))
            }
            Request::Store {
                message_id,
                sop_class,
                sop_instance,
            } => {
                let context = assoc.presentation_contexts().iter().find(|c| c.id == pc);
                let refused = match context {
                    Some(c) if c.abstract_syntax.trim_end_matches('\0') != sop_class => Some((
                        status::SOP_CLASS_NOT_SUPPORTED,
                        format!(
                            "SOP class {sop_class} on a context of {}",
                            c.abstract_syntax
                        ),
                    )),
                    None => Some((
                        status::SOP_CLASS_NOT_SUPPORTED,
                        format!("no presentation context {pc}"),
                    )),
                    _ if !dimse::is_uid(&sop_instance) => Some((
                        status::DATA_SET_MISMATCH,
                        "the SOP Instance UID is not a UID".to_string(),
                    )),
                    _ => None,
                };
                self.store = Some(Incoming {
                    pc,
                    message_id,
                    sop_class,
                    sop_instance,
                    data: Vec::new(),
                    refused,
                    started: Instant::now(),
                });
                Ok(None)
            }
            Request::Other {
                field,
                message_id,
                has_data,
            } => {
                warn!(
                    "DICOM: {} sent command {field:#06x}, which mae-run does not provide",
                    self.calling
                );
                if has_data {
                    anyhow::bail!("command {field:#06x} with a data set is not supported");
                }
                Ok(Some(command_pdu(
                    pc,
                    dimse::response(
                        field,
                        message_id,
                        None,
                        status::UNRECOGNIZED_OPERATION,
                        Some("not supported"),
                    ),
                )))
            }
        }
    }

    /// Spools a complete instance; the C-STORE-RSP to send.
    fn finish_store<S>(&self, assoc: &ServerAssociation<S>, inc: Incoming) -> Pdu {
        let ts = assoc
            .presentation_contexts()
            .iter()
            .find(|c| c.id == inc.pc)
            .map(|c| c.transfer_syntax.trim_end_matches('\0').to_string())
            .unwrap_or_default();
        let (code, comment) = match inc.refused {
            Some((code, why)) => (code, Some(why)),
            None => match self.keep(&inc, &ts) {
                Ok(()) => (status::SUCCESS, None),
                Err((code, why)) => (code, Some(why)),
            },
        };
        let ms = inc.started.elapsed().as_millis();
        match &comment {
            None => info!(
                "DICOM C-STORE {} from {}: stored in the spool ({ms} ms)",
                inc.sop_instance, self.calling
            ),
            Some(why) => warn!(
                "DICOM C-STORE {} from {}: status {code:#06x}: {why}",
                inc.sop_instance, self.calling
            ),
        }
        command_pdu(
            inc.pc,
            dimse::store_rsp(
                inc.message_id,
                &inc.sop_class,
                &inc.sop_instance,
                code,
                comment.as_deref(),
            ),
        )
    }

    /// Checks the instance parses, writes it to the spool and hands it on.
    fn keep(&self, inc: &Incoming, ts: &str) -> Result<(), (u16, String)> {
        let file = file_bytes(inc, ts, self.calling)
            .map_err(|e| (status::OUT_OF_RESOURCES, format!("{e:#}")))?;
        let name = std::path::Path::new(&inc.sop_instance);
        if let Err(e) = mae_models::input::dicom::frame_count(&file, name) {
            return Err((status::CANNOT_UNDERSTAND, e.to_string()));
        }
        let path = self.ctx.spool.put(&inc.sop_instance, &file).map_err(|e| {
            warn!(
                "DICOM spool {}: cannot write: {e}",
                self.ctx.spool.dir.display()
            );
            (status::OUT_OF_RESOURCES, format!("cannot spool: {e}"))
        })?;
        self.ctx.events.record(json!({
            "event": "dicom-received",
            "calling_ae": self.calling,
            "client": self.peer,
            "sop_class_uid": inc.sop_class,
            "sop_instance_uid": inc.sop_instance,
            "transfer_syntax": ts,
            "bytes": file.len(),
        }));
        let _ = self.ctx.received.send(path);
        Ok(())
    }
}

/// The received data set as a DICOM file: preamble, `DICM`, meta group, data set as sent.
fn file_bytes(inc: &Incoming, ts: &str, calling: &str) -> anyhow::Result<Vec<u8>> {
    let meta = dicom_object::meta::FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(inc.sop_class.as_str())
        .media_storage_sop_instance_uid(inc.sop_instance.as_str())
        .transfer_syntax(ts)
        .source_application_entity_title(calling)
        .build()
        .context("cannot build the file meta group")?;
    let mut out = Vec::with_capacity(inc.data.len() + 512);
    out.extend_from_slice(&[0u8; 128]);
    out.extend_from_slice(b"DICM");
    meta.write(&mut out)
        .context("cannot write the file meta group")?;
    out.extend_from_slice(&inc.data);
    Ok(out)
}
