//! The source instance of a result: its header (read up to the pixel data), and the Patient
//! and General Study modules that every result copies, so that it lands in the same study.

use anyhow::{bail, Context};
use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, InMemDicomObject};

/// What the results need of the instance they are about.
#[derive(Debug)]
pub struct Source {
    pub header: DefaultDicomObject,
    pub sop_class: String,
    pub sop_instance: String,
    pub study: String,
    pub series: String,
    pub transfer_syntax: String,
}

/// Patient and General Study attributes copied into every result: (tag, VR, type 2).
const COPIED: &[(Tag, VR, bool)] = &[
    (tags::SPECIFIC_CHARACTER_SET, VR::CS, false),
    (tags::PATIENT_NAME, VR::PN, true),
    (tags::PATIENT_ID, VR::LO, true),
    (tags::ISSUER_OF_PATIENT_ID, VR::LO, false),
    (tags::PATIENT_BIRTH_DATE, VR::DA, true),
    (tags::PATIENT_SEX, VR::CS, true),
    (tags::STUDY_INSTANCE_UID, VR::UI, false),
    (tags::STUDY_DATE, VR::DA, true),
    (tags::STUDY_TIME, VR::TM, true),
    (tags::REFERRING_PHYSICIAN_NAME, VR::PN, true),
    (tags::STUDY_ID, VR::SH, true),
    (tags::ACCESSION_NUMBER, VR::SH, true),
    (tags::STUDY_DESCRIPTION, VR::LO, false),
];

fn trimmed(s: &str) -> String {
    s.trim_end_matches(['\0', ' ']).to_string()
}

impl Source {
    /// Reads the header of a whole DICOM file (preamble, meta, data set).
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Self> {
        if bytes.get(128..132) != Some(b"DICM") {
            bail!("not a DICOM file (no DICM magic after the preamble)");
        }
        // Through the input layer, so that the header is read as the pixels are (a data set
        // in the wrong VR included).
        let header =
            mae_models::input::dicom::read_header(bytes, std::path::Path::new("the instance"))
                .context("cannot read the DICOM header")?;
        let text = |tag: Tag, what: &str| -> anyhow::Result<String> {
            let v = header
                .element(tag)
                .with_context(|| format!("the instance has no {what}"))?
                .to_str()
                .with_context(|| format!("the instance's {what} is not text"))?;
            Ok(trimmed(&v))
        };
        Ok(Self {
            sop_class: text(tags::SOP_CLASS_UID, "SOP Class UID")?,
            sop_instance: text(tags::SOP_INSTANCE_UID, "SOP Instance UID")?,
            study: text(tags::STUDY_INSTANCE_UID, "Study Instance UID")?,
            series: text(tags::SERIES_INSTANCE_UID, "Series Instance UID")?,
            transfer_syntax: trimmed(header.meta().transfer_syntax()),
            header,
        })
    }

    /// A text attribute of the source, trimmed; `None` when absent or not text.
    pub fn text(&self, tag: Tag) -> Option<String> {
        self.header
            .element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok().map(|s| trimmed(&s)))
    }

    /// Copies the Patient and General Study modules into `obj` (type 2 attributes the source
    /// lacks are put empty).
    pub fn copy_study(&self, obj: &mut InMemDicomObject) {
        for &(tag, vr, type2) in COPIED {
            match self.header.element_opt(tag).ok().flatten() {
                Some(e) => {
                    obj.put(DataElement::new(tag, e.vr(), e.value().clone()));
                }
                None if type2 => {
                    obj.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
                }
                None => {}
            }
        }
    }

    /// Whether the source's pixels went through lossy compression.
    pub fn lossy(&self) -> bool {
        super::dimse::LOSSY.contains(&self.transfer_syntax.as_str())
            || self.text(tags::LOSSY_IMAGE_COMPRESSION).as_deref() == Some("01")
    }

    /// An item referencing the source instance (SOP Class and Instance UIDs).
    pub fn reference(&self) -> InMemDicomObject {
        InMemDicomObject::from_element_iter([
            str_el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, &self.sop_class),
            str_el(
                tags::REFERENCED_SOP_INSTANCE_UID,
                VR::UI,
                &self.sop_instance,
            ),
        ])
    }
}

/// A text element.
pub fn str_el(tag: Tag, vr: VR, s: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(s))
}

/// A sequence element of `items`.
pub fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

/// The current local date and time as DA and TM values (UTC, as mae-run keeps no time zone
/// database).
pub fn now_da_tm() -> (String, String) {
    let stamp = crate::dicom::now_utc();
    (
        format!("{:04}{:02}{:02}", stamp.0, stamp.1, stamp.2),
        format!("{:02}{:02}{:02}", stamp.3, stamp.4, stamp.5),
    )
}

/// Writes `obj` as a DICOM file (Explicit VR Little Endian) into memory.
pub fn to_file_bytes(obj: InMemDicomObject, implementation_uid: &str) -> anyhow::Result<Vec<u8>> {
    let file = obj
        .with_meta(
            dicom_object::meta::FileMetaTableBuilder::new()
                .transfer_syntax(super::dimse::EXPLICIT_VR_LE)
                .implementation_class_uid(implementation_uid)
                .implementation_version_name(concat!("MAE_RUN_", env!("CARGO_PKG_VERSION"))),
        )
        .context("cannot build the file meta group")?;
    let mut out = Vec::new();
    file.write_all(&mut out)
        .context("cannot encode the DICOM object")?;
    Ok(out)
}
