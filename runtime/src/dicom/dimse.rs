//! DIMSE messages over an association (PS3.7): the command sets of C-ECHO and C-STORE, always
//! encoded in Implicit VR Little Endian (PS3.7 6.3.1), their statuses, and what the node takes:
//! the image storage SOP classes a classifier reads and the transfer syntaxes the input layer
//! decodes.

use anyhow::{bail, Context};
use dicom_core::{dicom_value, DataElement, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;

/// The Verification SOP class (C-ECHO).
pub const VERIFICATION: &str = "1.2.840.10008.1.1";
/// Comprehensive SR Storage: the structured reports mae-run writes.
pub const COMPREHENSIVE_SR: &str = "1.2.840.10008.5.1.4.1.1.88.33";
/// Secondary Capture Image Storage: the images with the result burned in.
pub const SECONDARY_CAPTURE: &str = "1.2.840.10008.5.1.4.1.1.7";
/// Explicit VR Little Endian, in which mae-run writes its results.
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

/// The image storage SOP classes the node accepts: (UID, name).
pub const STORAGE_CLASSES: &[(&str, &str)] = &[
    ("1.2.840.10008.5.1.4.1.1.1", "Computed Radiography"),
    (
        "1.2.840.10008.5.1.4.1.1.1.1",
        "Digital X-Ray for presentation",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.1.1.1",
        "Digital X-Ray for processing",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.1.2",
        "Digital Mammography for presentation",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.1.2.1",
        "Digital Mammography for processing",
    ),
    ("1.2.840.10008.5.1.4.1.1.2", "CT"),
    ("1.2.840.10008.5.1.4.1.1.2.1", "Enhanced CT"),
    ("1.2.840.10008.5.1.4.1.1.4", "MR"),
    ("1.2.840.10008.5.1.4.1.1.4.1", "Enhanced MR"),
    ("1.2.840.10008.5.1.4.1.1.6.1", "Ultrasound"),
    ("1.2.840.10008.5.1.4.1.1.3.1", "Ultrasound Multi-frame"),
    ("1.2.840.10008.5.1.4.1.1.12.1", "X-Ray Angiographic"),
    ("1.2.840.10008.5.1.4.1.1.12.1.1", "Enhanced XA"),
    (SECONDARY_CAPTURE, "Secondary Capture"),
    (
        "1.2.840.10008.5.1.4.1.1.7.1",
        "Multi-frame Single Bit Secondary Capture",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.7.2",
        "Multi-frame Grayscale Byte Secondary Capture",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.7.3",
        "Multi-frame Grayscale Word Secondary Capture",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.7.4",
        "Multi-frame True Color Secondary Capture",
    ),
];

/// The transfer syntaxes the input layer (`mae_models::input::dicom`) decodes, in the order
/// the node prefers them when a caller proposes several: (UID, name). JPEG Extended covers
/// both its 8-bit (process 2) and 12-bit (process 4) forms.
pub const TRANSFER_SYNTAXES: &[(&str, &str)] = &[
    ("1.2.840.10008.1.2", "Implicit VR Little Endian"),
    (EXPLICIT_VR_LE, "Explicit VR Little Endian"),
    ("1.2.840.10008.1.2.2", "Explicit VR Big Endian"),
    (
        "1.2.840.10008.1.2.1.99",
        "Deflated Explicit VR Little Endian",
    ),
    ("1.2.840.10008.1.2.4.50", "JPEG Baseline"),
    ("1.2.840.10008.1.2.4.51", "JPEG Extended"),
    ("1.2.840.10008.1.2.4.57", "JPEG Lossless"),
    ("1.2.840.10008.1.2.4.70", "JPEG Lossless SV1"),
    ("1.2.840.10008.1.2.4.80", "JPEG-LS Lossless"),
    ("1.2.840.10008.1.2.4.81", "JPEG-LS Near-Lossless"),
    ("1.2.840.10008.1.2.4.90", "JPEG 2000 Lossless"),
    ("1.2.840.10008.1.2.4.91", "JPEG 2000"),
    ("1.2.840.10008.1.2.5", "RLE Lossless"),
];

/// Transfer syntaxes whose pixel data lost information in compression.
pub const LOSSY: &[&str] = &[
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91",
];

/// DIMSE statuses (PS3.7 C and PS3.4 B.2.3).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: out of resources (the node could not keep the instance).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: data set does not match SOP class.
    pub const DATA_SET_MISMATCH: u16 = 0xA900;
    /// Error: cannot understand (the data set does not parse).
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// Failure: SOP class not supported on this presentation context.
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Failure: unrecognized operation.
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;

    /// Whether a C-STORE status means the instance was stored (success or a warning).
    pub fn stored(status: u16) -> bool {
        matches!(status, 0x0000 | 0x0001 | 0x0107 | 0x0116 | 0xB000..=0xBFFF)
    }
}

const C_STORE_RQ: u16 = 0x0001;
const C_ECHO_RQ: u16 = 0x0030;
const NO_DATA_SET: u16 = 0x0101;

/// A request command set, as far as the node needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Echo {
        message_id: u16,
    },
    Store {
        message_id: u16,
        sop_class: String,
        sop_instance: String,
    },
    /// Any other command: its field, its message id and whether a data set follows.
    Other {
        field: u16,
        message_id: u16,
        has_data: bool,
    },
}

/// A response command set: (command field, status, error comment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub field: u16,
    pub status: u16,
    pub comment: Option<String>,
}

fn read(bytes: &[u8]) -> anyhow::Result<InMemDicomObject> {
    InMemDicomObject::read_dataset_with_ts(bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .context("the command set does not parse")
}

fn uint(obj: &InMemDicomObject, tag: dicom_core::Tag, what: &str) -> anyhow::Result<u16> {
    obj.element(tag)
        .with_context(|| format!("the command set has no {what}"))?
        .to_int::<u16>()
        .with_context(|| format!("the command set's {what} is not a number"))
}

fn text(obj: &InMemDicomObject, tag: dicom_core::Tag, what: &str) -> anyhow::Result<String> {
    Ok(obj
        .element(tag)
        .with_context(|| format!("the command has no {what}"))?
        .to_str()
        .with_context(|| format!("the command's {what} is not text"))?
        .trim_end_matches(['\0', ' '])
        .to_string())
}

/// Reads a request command set.
pub fn parse_request(bytes: &[u8]) -> anyhow::Result<Request> {
    let obj = read(bytes)?;
    let field = uint(&obj, tags::COMMAND_FIELD, "Command Field")?;
    let message_id = uint(&obj, tags::MESSAGE_ID, "Message ID")?;
    Ok(match field {
        C_ECHO_RQ => Request::Echo { message_id },
        C_STORE_RQ => Request::Store {
            message_id,
            sop_class: text(&obj, tags::AFFECTED_SOP_CLASS_UID, "Affected SOP Class UID")?,
            sop_instance: text(
                &obj,
                tags::AFFECTED_SOP_INSTANCE_UID,
                "Affected SOP Instance UID",
            )?,
        },
        field => Request::Other {
            field,
            message_id,
            has_data: uint(&obj, tags::COMMAND_DATA_SET_TYPE, "Command Data Set Type")?
                != NO_DATA_SET,
        },
    })
}

/// Reads a response command set.
pub fn parse_response(bytes: &[u8]) -> anyhow::Result<Response> {
    let obj = read(bytes)?;
    let comment = obj
        .element_opt(tags::ERROR_COMMENT)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok().map(|s| s.trim().to_string()));
    Ok(Response {
        field: uint(&obj, tags::COMMAND_FIELD, "Command Field")?,
        status: uint(&obj, tags::STATUS, "Status")?,
        comment,
    })
}

fn encode(elements: Vec<DataElement<InMemDicomObject>>) -> Vec<u8> {
    let obj = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::with_capacity(128);
    // Writing a command set of plain numbers and UIDs into memory cannot fail.
    let _ = obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased());
    out
}

fn us(tag: dicom_core::Tag, v: u16) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::US, dicom_value!(U16, [v]))
}

fn ui(tag: dicom_core::Tag, v: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::UI, dicom_value!(Str, v))
}

/// A C-ECHO-RQ.
pub fn echo_rq(message_id: u16) -> Vec<u8> {
    encode(vec![
        ui(tags::AFFECTED_SOP_CLASS_UID, VERIFICATION),
        us(tags::COMMAND_FIELD, C_ECHO_RQ),
        us(tags::MESSAGE_ID, message_id),
        us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
    ])
}

/// A C-ECHO-RSP with `status`.
pub fn echo_rsp(message_id: u16, status: u16) -> Vec<u8> {
    encode(vec![
        ui(tags::AFFECTED_SOP_CLASS_UID, VERIFICATION),
        us(tags::COMMAND_FIELD, 0x8000 | C_ECHO_RQ),
        us(tags::MESSAGE_ID_BEING_RESPONDED_TO, message_id),
        us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
        us(tags::STATUS, status),
    ])
}

/// A C-STORE-RQ (medium priority) for the instance that follows.
pub fn store_rq(message_id: u16, sop_class: &str, sop_instance: &str) -> Vec<u8> {
    encode(vec![
        ui(tags::AFFECTED_SOP_CLASS_UID, sop_class),
        us(tags::COMMAND_FIELD, C_STORE_RQ),
        us(tags::MESSAGE_ID, message_id),
        us(tags::PRIORITY, 0),
        us(tags::COMMAND_DATA_SET_TYPE, 0),
        ui(tags::AFFECTED_SOP_INSTANCE_UID, sop_instance),
    ])
}

/// A response to the request `field` with `status`, and an error comment when it failed
/// (at most 64 characters, as LO allows).
pub fn response(
    field: u16,
    message_id: u16,
    sop: Option<(&str, &str)>,
    status: u16,
    comment: Option<&str>,
) -> Vec<u8> {
    let mut elements = vec![
        us(tags::COMMAND_FIELD, 0x8000 | field),
        us(tags::MESSAGE_ID_BEING_RESPONDED_TO, message_id),
        us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
        us(tags::STATUS, status),
    ];
    if let Some((class, instance)) = sop {
        elements.push(ui(tags::AFFECTED_SOP_CLASS_UID, class));
        elements.push(ui(tags::AFFECTED_SOP_INSTANCE_UID, instance));
    }
    if let Some(c) = comment {
        let c: String = c
            .chars()
            .filter(|c| *c != '\\' && !c.is_control())
            .take(64)
            .collect();
        elements.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            dicom_value!(Str, c),
        ));
    }
    encode(elements)
}

/// A C-STORE-RSP.
pub fn store_rsp(
    message_id: u16,
    sop_class: &str,
    sop_instance: &str,
    status: u16,
    comment: Option<&str>,
) -> Vec<u8> {
    response(
        C_STORE_RQ,
        message_id,
        Some((sop_class, sop_instance)),
        status,
        comment,
    )
}

/// Whether `uid` is a UID (digits and dots, at most 64 characters): what the node accepts as
/// a SOP Instance UID, since it names the spooled file.
pub fn is_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && !uid.starts_with('.')
        && !uid.ends_with('.')
        && !uid.contains("..")
}

/// The name of a storage SOP class, or `None` when the node does not take it.
pub fn storage_class_name(uid: &str) -> Option<&'static str> {
    STORAGE_CLASSES
        .iter()
        .find(|(u, _)| *u == uid)
        .map(|(_, n)| *n)
}

/// The name of a transfer syntax the node takes.
pub fn transfer_syntax_name(uid: &str) -> Option<&'static str> {
    TRANSFER_SYNTAXES
        .iter()
        .find(|(u, _)| *u == uid)
        .map(|(_, n)| *n)
}

/// Checks a command set that should be a response to `field`.
pub fn expect_response(bytes: &[u8], field: u16) -> anyhow::Result<Response> {
    let r = parse_response(bytes)?;
    if r.field != 0x8000 | field {
        bail!(
            "expected the response to command {field:#06x}, got command {:#06x}",
            r.field
        );
    }
    Ok(r)
}

/// The command field of C-STORE-RQ and C-ECHO-RQ, for [`expect_response`].
pub const STORE: u16 = C_STORE_RQ;
pub const ECHO: u16 = C_ECHO_RQ;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn commands_round_trip() {
        assert_eq!(
            parse_request(&echo_rq(7)).unwrap(),
            Request::Echo { message_id: 7 }
        );
        let rq = store_rq(3, SECONDARY_CAPTURE, "1.2.3.4");
        assert_eq!(
            parse_request(&rq).unwrap(),
            Request::Store {
                message_id: 3,
                sop_class: SECONDARY_CAPTURE.into(),
                sop_instance: "1.2.3.4".into()
            }
        );
        let rsp = store_rsp(3, SECONDARY_CAPTURE, "1.2.3.4", 0xA700, Some("too big"));
        let r = expect_response(&rsp, STORE).unwrap();
        assert_eq!((r.status, r.comment.as_deref()), (0xA700, Some("too big")));
        assert!(expect_response(&rsp, ECHO).is_err());
        assert!(parse_request(b"garbage").is_err());
    }

    #[test]
    fn uids() {
        assert!(is_uid("1.2.840.10008.1.1"));
        for bad in ["", "1..2", "1.2.", "../etc", "1.2/3", &"1".repeat(65)] {
            assert!(!is_uid(bad), "{bad}");
        }
    }
}
