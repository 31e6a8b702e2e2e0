//! The DICOM node's flags on `mae-run serve`, checked and turned into a [`NodeConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;

use super::callers::Callers;
use super::codes::Codes;
use super::queue::{Destination, Retry};
use super::scu::{check_ae_title, Peer};
use super::stow::StowUrl;
use super::{uids, Limits, NodeConfig};

/// Flags of the DICOM node (`mae-run serve --dicom-listen`).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "DICOM node")]
pub struct DicomArgs {
    /// Also listen for DICOM associations on ADDR:PORT (C-ECHO; C-STORE of CR, DX, MG, CT, MR,
    /// US, XA and Secondary Capture images), classify every received image with the served
    /// model and write the results as DICOM (an SR and a Secondary Capture) into the source
    /// study. Needs --dicom-spool and --results-dir, --forward or --forward-stow. The HTTP server then
    /// also takes DICOMweb STOW-RS at POST /dicomweb/studies (same tokens as /v2).
    #[arg(long, value_name = "ADDR:PORT")]
    pub dicom_listen: Option<SocketAddr>,
    /// The node's AE title: callers must call it, and results are sent from it.
    #[arg(long, default_value = "MAE", requires = "dicom_listen")]
    pub ae_title: String,
    /// Calling AE titles let in, one a line, each optionally followed by the IP addresses it
    /// may call from; others are rejected ("calling AE title not recognized"). Without it
    /// any caller that calls --ae-title is let in.
    #[arg(long, value_name = "FILE", requires = "dicom_listen")]
    pub dicom_callers: Option<PathBuf>,
    /// Folder where received instances are kept (fsynced) before they are answered Success,
    /// and results wait to be sent; whatever a stop or crash left in it is taken up again.
    #[arg(long, value_name = "DIR", requires = "dicom_listen")]
    pub dicom_spool: Option<PathBuf>,
    /// Write each result (SR and Secondary Capture, `UID.dcm`) into DIR.
    #[arg(long, value_name = "DIR", requires = "dicom_listen")]
    pub results_dir: Option<PathBuf>,
    /// Send each result by C-STORE to AE@HOST:PORT (repeatable), from a queue in the spool,
    /// retried until it is stored.
    #[arg(long, value_name = "AE@HOST:PORT", requires = "dicom_listen")]
    pub forward: Vec<String>,
    /// Send each result by DICOMweb STOW-RS to URL/studies (repeatable; URL is the DICOMweb
    /// root, e.g. http://pacs:8042/dicom-web), from a queue in the spool, retried until stored.
    #[arg(long, value_name = "URL", requires = "dicom_listen")]
    pub forward_stow: Vec<String>,
    /// Associations open at once at most; more are rejected (transiently, "local limit
    /// exceeded").
    #[arg(long, default_value_t = 16)]
    pub dicom_max_associations: usize,
    /// Largest PDU the node receives, in bytes (told to callers; larger PDUs abort the
    /// association).
    #[arg(long, default_value_t = 65_536)]
    pub dicom_max_pdu: u32,
    /// Largest instance the node keeps, in bytes; larger ones are answered "out of
    /// resources" (0xA700).
    #[arg(long, default_value_t = 256 << 20)]
    pub dicom_max_instance_bytes: usize,
    /// Seconds an association may stay silent before it is aborted.
    #[arg(long, default_value_t = 60)]
    pub dicom_idle_timeout_s: u64,
    /// Threads that classify received images (each waits on the model's workers).
    #[arg(long, default_value_t = 2)]
    pub dicom_workers: usize,
    /// The first wait before a failed send is retried, in seconds (doubling each time).
    #[arg(long, default_value_t = 5)]
    pub forward_retry_first_s: u64,
    /// The longest wait between two tries of a send, in seconds.
    #[arg(long, default_value_t = 300)]
    pub forward_retry_max_s: u64,
    /// Give up on a result still unsent this many seconds after it was queued (it moves to
    /// the outbox's failed/ folder and the audit log says why).
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    pub forward_give_up_s: u64,
    /// Root of the UIDs of the results (each derived from the source SOP Instance UID and the
    /// model's SHA-256); the default, 2.25, makes UUID-derived UIDs.
    #[arg(long, default_value = uids::UUID_ROOT)]
    pub uid_root: String,
    /// Speak DICOM over TLS (PS3.15 Annex B) on --dicom-listen, with this certificate chain
    /// (PEM); needs --dicom-tls-key. Every association must then start with a TLS handshake
    /// (separate from the HTTP server's --tls-cert, which only makes HTTP into HTTPS).
    #[arg(long, value_name = "FILE", requires_all = ["dicom_listen", "dicom_tls_key"])]
    pub dicom_tls_cert: Option<PathBuf>,
    /// The private key of --dicom-tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "dicom_tls_cert")]
    pub dicom_tls_key: Option<PathBuf>,
    /// Require a client certificate issued by one of these CA certificates (PEM) from every
    /// caller; the handshake of a caller without one fails. Without it callers are not asked
    /// for a certificate.
    #[arg(long, value_name = "FILE", requires = "dicom_tls_cert")]
    pub dicom_tls_client_ca: Option<PathBuf>,
    /// Codes of the classes in the SR: a JSON object of class name to {"scheme", "value",
    /// "meaning"} (for example SNOMED CT); other classes get mae's private scheme 99MAE.
    #[arg(long, value_name = "FILE", requires = "dicom_listen")]
    pub dicom_codes: Option<PathBuf>,
    /// The heatmap beside the image in each Secondary Capture: `auto` takes the model's
    /// Grad-CAM output (for the predicted class) or else its rollout output, and none when the
    /// model was exported without `--explain`; `rollout` or `gradcam` require that output.
    #[arg(long, value_enum, default_value_t = Heatmap::Auto, requires = "dicom_listen")]
    pub dicom_heatmap: Heatmap,
}

/// `--dicom-heatmap` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Heatmap {
    Auto,
    None,
    Rollout,
    Gradcam,
}

impl DicomArgs {
    /// The node's configuration, or `None` without --dicom-listen.
    pub fn node_config(&self) -> anyhow::Result<Option<NodeConfig>> {
        let Some(listen) = self.dicom_listen else {
            return Ok(None);
        };
        check_ae_title(&self.ae_title)?;
        uids::check_root(&self.uid_root)?;
        let Some(spool) = self.dicom_spool.clone() else {
            bail!("--dicom-listen needs --dicom-spool DIR, where received instances are kept");
        };
        let mut forward = self
            .forward
            .iter()
            .map(|s| s.parse::<Peer>().map(Destination::Dimse))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for s in &self.forward_stow {
            forward.push(Destination::Stow(s.parse::<StowUrl>()?));
        }
        if forward.is_empty() && self.results_dir.is_none() {
            bail!("--dicom-listen needs --results-dir DIR, --forward AE@HOST:PORT or --forward-stow URL: somewhere for the results to go");
        }
        if self.dicom_max_associations == 0 || self.dicom_workers == 0 {
            bail!("--dicom-max-associations and --dicom-workers must be at least 1");
        }
        if !(4096..=(1 << 24)).contains(&self.dicom_max_pdu) {
            bail!("--dicom-max-pdu must be 4096 to 16777216 bytes");
        }
        if self.dicom_idle_timeout_s == 0 || self.forward_retry_first_s == 0 {
            bail!("--dicom-idle-timeout-s and --forward-retry-first-s must be at least 1");
        }
        let callers = self
            .dicom_callers
            .as_deref()
            .map(Callers::load)
            .transpose()?
            .map(Arc::new);
        let tls = match (&self.dicom_tls_cert, &self.dicom_tls_key) {
            (Some(cert), Some(key)) => Some(super::tls::server_config(
                cert,
                key,
                self.dicom_tls_client_ca.as_deref(),
            )?),
            _ => None,
        };
        let codes = match &self.dicom_codes {
            Some(p) => Codes::load(p)?,
            None => Codes::default(),
        };
        Ok(Some(NodeConfig {
            listen,
            ae_title: self.ae_title.clone(),
            callers,
            tls,
            limits: Limits {
                max_associations: self.dicom_max_associations,
                max_pdu: self.dicom_max_pdu,
                max_instance_bytes: self.dicom_max_instance_bytes,
                idle: Duration::from_secs(self.dicom_idle_timeout_s),
            },
            spool,
            results_dir: self.results_dir.clone(),
            forward,
            retry: Retry {
                first: Duration::from_secs(self.forward_retry_first_s),
                max: Duration::from_secs(self.forward_retry_max_s.max(self.forward_retry_first_s)),
                give_up: Duration::from_secs(self.forward_give_up_s),
            },
            uid_root: self.uid_root.clone(),
            codes,
            workers: self.dicom_workers,
            heatmap: self.dicom_heatmap,
        }))
    }
}
