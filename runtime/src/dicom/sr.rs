//! The Comprehensive SR of one classified image (PS3.3 A.35.3): the source's Patient and
//! Study, a new series with Modality SR, and a content tree of
//!
//! ```text
//! CONTAINER  Diagnostic Imaging Report (LN 18748-4)
//!   HAS OBS CONTEXT  Observer Type = Device; Device Observer UID, Name (mae-run),
//!                    Manufacturer, Model Name (the model), Serial Number (its SHA-256)
//!   HAS OBS CONTEXT  Algorithm Name (the model), Algorithm Version (mae-run and SHA-256)
//!   CONTAINS CODE    Finding = the predicted class (--dicom-codes, or mae's private scheme)
//!   CONTAINS NUM     one per class: the class's code = its probability (UCUM "1"), as DS and
//!                    exactly as FD
//!   CONTAINS NUM     Decision threshold (for binary and multi-label models)
//!   CONTAINS IMAGE   Source of Measurement = the source SOP instance
//! ```
//!
//! No template is claimed, so readers take the tree as it is.

use dicom_core::{dicom_value, DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::codes::{Code, Codes, PRIVATE_SCHEME};
use super::dimse::COMPREHENSIVE_SR;
use super::source::{now_da_tm, seq, str_el, to_file_bytes, Source};
use super::uids;
use super::{Classified, Model};
use crate::engine::model::ModelMeta;
use mae_models::checkpoint::Task;

/// Series Number of the SR series mae-run adds to a study.
pub const SERIES_NUMBER: i32 = 9901;

fn code_item(code: &Code) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        str_el(tags::CODE_VALUE, VR::SH, &code.value),
        str_el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, &code.scheme),
        str_el(tags::CODE_MEANING, VR::LO, &code.meaning),
    ])
}

/// A content item of `value_type` with its concept name, related to its parent by
/// `relationship` (none for the root).
fn item(relationship: Option<&str>, value_type: &str, concept: &Code) -> InMemDicomObject {
    let mut obj = InMemDicomObject::new_empty();
    if let Some(r) = relationship {
        obj.put(str_el(tags::RELATIONSHIP_TYPE, VR::CS, r));
    }
    obj.put(str_el(tags::VALUE_TYPE, VR::CS, value_type));
    obj.put(seq(
        tags::CONCEPT_NAME_CODE_SEQUENCE,
        vec![code_item(concept)],
    ));
    obj
}

fn text_item(relationship: &str, concept: Code, text: &str) -> InMemDicomObject {
    let mut obj = item(Some(relationship), "TEXT", &concept);
    obj.put(str_el(tags::TEXT_VALUE, VR::UT, text));
    obj
}

fn code_value_item(relationship: &str, concept: Code, value: &Code) -> InMemDicomObject {
    let mut obj = item(Some(relationship), "CODE", &concept);
    obj.put(seq(tags::CONCEPT_CODE_SEQUENCE, vec![code_item(value)]));
    obj
}

/// A probability as a Decimal String of at most 16 characters.
fn ds(v: f64) -> String {
    let s = format!("{v:.14}");
    if s.len() <= 16 {
        s
    } else {
        format!("{v:.8e}")
    }
}

fn num_item(concept: Code, value: f64) -> InMemDicomObject {
    let mut obj = item(Some("CONTAINS"), "NUM", &concept);
    let measured = InMemDicomObject::from_element_iter([
        seq(
            tags::MEASUREMENT_UNITS_CODE_SEQUENCE,
            vec![code_item(&Code::new("1", "UCUM", "no units"))],
        ),
        str_el(tags::NUMERIC_VALUE, VR::DS, &ds(value)),
        DataElement::new(
            tags::FLOATING_POINT_VALUE,
            VR::FD,
            dicom_value!(F64, [value]),
        ),
    ]);
    obj.put(seq(tags::MEASURED_VALUE_SEQUENCE, vec![measured]));
    obj
}

fn dcm(value: &str, meaning: &str) -> Code {
    Code::new(value, "DCM", meaning)
}

/// The observer context: the device (mae-run) and the algorithm (the model).
fn observer(model: &Model, root: &str) -> Vec<InMemDicomObject> {
    let obs = "HAS OBS CONTEXT";
    let mut uid = item(Some(obs), "UIDREF", &dcm("121012", "Device Observer UID"));
    uid.put(str_el(
        tags::UID,
        VR::UI,
        &uids::derive(root, &["device", &model.sha256]),
    ));
    let version = format!("mae-run {} sha256:{}", model.software_version, model.sha256);
    vec![
        code_value_item(
            obs,
            dcm("121005", "Observer Type"),
            &dcm("121007", "Device"),
        ),
        uid,
        text_item(obs, dcm("121013", "Device Observer Name"), "mae-run"),
        text_item(obs, dcm("121014", "Device Observer Manufacturer"), "mae"),
        text_item(
            obs,
            dcm("121015", "Device Observer Model Name"),
            &model.name,
        ),
        text_item(
            obs,
            dcm("121016", "Device Observer Serial Number"),
            &model.sha256,
        ),
        text_item(obs, dcm("111001", "Algorithm Name"), &model.name),
        text_item(obs, dcm("111003", "Algorithm Version"), &version),
    ]
}

/// The SR of `result` for `source`, as a DICOM file; returns (SOP Instance UID, bytes).
pub fn build(
    source: &Source,
    result: &Classified,
    meta: &ModelMeta,
    model: &Model,
    codes: &Codes,
    root: &str,
) -> anyhow::Result<(String, Vec<u8>)> {
    let sop_instance = uids::derive(root, &[&source.sop_instance, &model.sha256, "sr"]);
    let series = uids::derive(root, &[&source.series, &model.sha256, "sr-series"]);
    let (date, time) = now_da_tm();
    let mut obj = InMemDicomObject::new_empty();
    source.copy_study(&mut obj);
    // SOP Common, SR Document Series, General Equipment, SR Document General.
    for (tag, vr, v) in [
        (tags::SOP_CLASS_UID, VR::UI, COMPREHENSIVE_SR),
        (tags::SOP_INSTANCE_UID, VR::UI, sop_instance.as_str()),
        (tags::MODALITY, VR::CS, "SR"),
        (tags::SERIES_INSTANCE_UID, VR::UI, series.as_str()),
        (tags::SERIES_DESCRIPTION, VR::LO, "mae-run results"),
        (tags::MANUFACTURER, VR::LO, "mae"),
        (tags::MANUFACTURER_MODEL_NAME, VR::LO, "mae-run"),
        (
            tags::SOFTWARE_VERSIONS,
            VR::LO,
            model.software_version.as_str(),
        ),
        (tags::COMPLETION_FLAG, VR::CS, "COMPLETE"),
        (tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED"),
        (tags::CONTENT_DATE, VR::DA, date.as_str()),
        (tags::CONTENT_TIME, VR::TM, time.as_str()),
        (tags::INSTANCE_CREATION_DATE, VR::DA, date.as_str()),
        (tags::INSTANCE_CREATION_TIME, VR::TM, time.as_str()),
    ] {
        obj.put(str_el(tag, vr, v));
    }
    obj.put(DataElement::new(
        tags::SERIES_NUMBER,
        VR::IS,
        PrimitiveValue::from(SERIES_NUMBER.to_string()),
    ));
    let instance_number = source
        .text(tags::INSTANCE_NUMBER)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "1".into());
    obj.put(str_el(tags::INSTANCE_NUMBER, VR::IS, &instance_number));
    obj.put(seq(
        tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE,
        vec![],
    ));
    obj.put(seq(tags::PERFORMED_PROCEDURE_CODE_SEQUENCE, vec![]));
    // mae's private coding scheme, named for readers (PS3.3 C.12.1.1.4).
    obj.put(seq(
        tags::CODING_SCHEME_IDENTIFICATION_SEQUENCE,
        vec![InMemDicomObject::from_element_iter([
            str_el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, PRIVATE_SCHEME),
            str_el(tags::CODING_SCHEME_NAME, VR::ST, "mae-run class names"),
            str_el(tags::CODING_SCHEME_RESPONSIBLE_ORGANIZATION, VR::ST, "mae"),
        ])],
    ));
    // The evidence: the source instance, by study and series.
    let series_item = InMemDicomObject::from_element_iter([
        seq(tags::REFERENCED_SOP_SEQUENCE, vec![source.reference()]),
        str_el(tags::SERIES_INSTANCE_UID, VR::UI, &source.series),
    ]);
    let study_item = InMemDicomObject::from_element_iter([
        seq(tags::REFERENCED_SERIES_SEQUENCE, vec![series_item]),
        str_el(tags::STUDY_INSTANCE_UID, VR::UI, &source.study),
    ]);
    obj.put(seq(
        tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
        vec![study_item],
    ));

    // The content tree; the root's attributes sit in the data set itself.
    let root_item = item(
        None,
        "CONTAINER",
        &Code::new("18748-4", "LN", "Diagnostic imaging report"),
    );
    for e in root_item.into_iter() {
        obj.put(e);
    }
    obj.put(str_el(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"));
    let mut content = observer(model, root);
    let finding = codes.class(result.class_index, &meta.class_name(result.class_index));
    content.push(code_value_item(
        "CONTAINS",
        dcm("121071", "Finding"),
        &finding,
    ));
    for (i, &p) in result.probabilities.iter().enumerate() {
        content.push(num_item(codes.class(i, &meta.class_name(i)), f64::from(p)));
    }
    if meta.task != Task::MultiClass {
        content.push(num_item(
            Code::new("THRESHOLD", PRIVATE_SCHEME, "Decision threshold"),
            meta.decision_threshold(),
        ));
    }
    let mut image = item(
        Some("CONTAINS"),
        "IMAGE",
        &dcm("121112", "Source of Measurement"),
    );
    image.put(seq(tags::REFERENCED_SOP_SEQUENCE, vec![source.reference()]));
    content.push(image);
    obj.put(seq(tags::CONTENT_SEQUENCE, content));
    let bytes = to_file_bytes(obj, &uids::derive(root, &["implementation"]))?;
    Ok((sop_instance, bytes))
}

#[cfg(test)]
mod tests {
    use super::ds;

    #[test]
    fn decimal_strings_fit() {
        for v in [0.0, 1.0, 0.123_456_789_012_345_67, 1e-30, 0.5] {
            let s = ds(v);
            assert!(s.len() <= 16, "{s}");
            let back: f64 = s.parse().unwrap_or(f64::NAN);
            assert!(
                (back - v).abs() <= 1e-13 || (back / v - 1.0).abs() < 1e-7,
                "{s}"
            );
        }
    }
}
