//! The Secondary Capture of one classified image (PS3.3 A.8.1), for viewers that show no SR:
//! the image as the model saw it before resizing (the input layer's 8-bit RGB), enlarged to at
//! least 512 pixels wide, under a black band with the result burned in (class, probability,
//! model and its SHA-256); `BurnedInAnnotation YES`. When the model has an explanation output,
//! the image as the model saw it, with the map over it, stands to the right of the source at the
//! same height, and the band names the map.

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use image::{imageops, Rgb, RgbImage};

use super::dimse::SECONDARY_CAPTURE;
use super::source::{now_da_tm, seq, str_el, to_file_bytes, Source};
use super::uids;
use super::{Classified, Model};
use crate::engine::model::ModelMeta;

/// Series Number of the Secondary Capture series mae-run adds to a study.
pub const SERIES_NUMBER: i32 = 9902;

/// DejaVu Sans (its licence allows embedding), the font mae-train's charts use.
const FONT: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../trainer/assets/DejaVuSans.ttf"
));

const MIN_WIDTH: u32 = 512;

/// An explanation map drawn over the image the model saw, and what it is.
#[derive(Debug, Clone)]
pub struct Heat {
    pub image: RgbImage,
    pub label: String,
}

/// Draws `text` in white from (`x`, `y`) (the top of the line) at `size` pixels.
fn draw_text(img: &mut RgbImage, font: &FontRef<'_>, text: &str, x: f32, y: f32, size: f32) {
    let scaled = font.as_scaled(PxScale::from(size));
    let mut caret = x;
    for ch in text.chars() {
        let id = font.glyph_id(ch);
        let glyph = id.with_scale_and_position(size, point(caret, y + scaled.ascent()));
        caret += scaled.h_advance(id);
        let Some(outlined) = font.outline_glyph(glyph) else {
            continue;
        };
        let b = outlined.px_bounds();
        outlined.draw(|gx, gy, c| {
            let (px, py) = (b.min.x as i64 + gx as i64, b.min.y as i64 + gy as i64);
            if px < 0 || py < 0 || px >= img.width() as i64 || py >= img.height() as i64 {
                return;
            }
            let p = img.get_pixel_mut(px as u32, py as u32);
            for ch in p.0.iter_mut() {
                *ch = (*ch as f32 * (1.0 - c) + 255.0 * c).round() as u8;
            }
        });
    }
}

/// The picture: the image enlarged (nearest neighbour) to at least 512 wide, with `heat` (if
/// any) scaled to its height on its right, under a band of `lines`.
pub fn render(
    img: &RgbImage,
    heat: Option<&RgbImage>,
    lines: &[String],
) -> anyhow::Result<RgbImage> {
    let font = FontRef::try_from_slice(FONT)
        .map_err(|e| anyhow::anyhow!("the embedded font does not load: {e}"))?;
    let (w, h) = img.dimensions();
    let k = MIN_WIDTH.div_ceil(w.max(1)).max(1);
    let mut base = if k > 1 {
        imageops::resize(img, w * k, h * k, imageops::FilterType::Nearest)
    } else {
        img.clone()
    };
    if let Some(heat) = heat {
        let (hw, hh) = heat.dimensions();
        let side_h = base.height();
        let side_w = ((u64::from(hw) * u64::from(side_h)) / u64::from(hh.max(1))).max(1) as u32;
        let side = imageops::resize(heat, side_w, side_h, imageops::FilterType::Triangle);
        let mut both = RgbImage::from_pixel(base.width() + side_w, side_h, Rgb([0, 0, 0]));
        imageops::replace(&mut both, &base, 0, 0);
        imageops::replace(&mut both, &side, i64::from(base.width()), 0);
        base = both;
    }
    let width = base.width();
    let size = (width as f32 / 36.0).max(14.0);
    let line = (size * 1.3).ceil() as u32;
    let band = line * lines.len() as u32 + line / 2;
    let mut out = RgbImage::from_pixel(width, base.height() + band, Rgb([0, 0, 0]));
    imageops::replace(&mut out, &base, 0, i64::from(band));
    for (i, text) in lines.iter().enumerate() {
        let y = (line / 4 + line * i as u32) as f32;
        draw_text(&mut out, &font, text, size * 0.5, y, size);
    }
    Ok(out)
}

/// The lines burned in for `result`, naming the map `heat` when there is one.
pub fn caption(
    result: &Classified,
    meta: &ModelMeta,
    model: &Model,
    heat: Option<&str>,
) -> Vec<String> {
    let class = meta.class_name(result.class_index);
    let p = result
        .probabilities
        .get(result.class_index)
        .copied()
        .unwrap_or(f32::NAN);
    let mut lines = vec![
        format!("mae-run finding: {class} (p = {p:.4})"),
        format!(
            "model {} · sha256 {}",
            model.name,
            &model.sha256[..16.min(model.sha256.len())]
        ),
    ];
    if let Some(label) = heat {
        lines.push(format!("right: {label}, over the image the model saw"));
    }
    lines.push("computer-generated result, not reviewed".to_string());
    lines
}

/// The Secondary Capture of `result` for `source` over `img` (the decoded source image), as
/// a DICOM file; returns (SOP Instance UID, bytes).
pub fn build(
    source: &Source,
    img: &RgbImage,
    heat: Option<&Heat>,
    result: &Classified,
    meta: &ModelMeta,
    model: &Model,
    root: &str,
) -> anyhow::Result<(String, Vec<u8>)> {
    let lines = caption(result, meta, model, heat.map(|h| h.label.as_str()));
    let picture = render(img, heat.map(|h| &h.image), &lines)?;
    let sop_instance = uids::derive(root, &[&source.sop_instance, &model.sha256, "sc"]);
    let series = uids::derive(root, &[&source.series, &model.sha256, "sc-series"]);
    let (date, time) = now_da_tm();
    let mut obj = InMemDicomObject::new_empty();
    source.copy_study(&mut obj);
    let lossy = if source.lossy() { "01" } else { "00" };
    for (tag, vr, v) in [
        (tags::SOP_CLASS_UID, VR::UI, SECONDARY_CAPTURE),
        (tags::SOP_INSTANCE_UID, VR::UI, sop_instance.as_str()),
        (tags::MODALITY, VR::CS, "OT"),
        (tags::SERIES_INSTANCE_UID, VR::UI, series.as_str()),
        (
            tags::SERIES_DESCRIPTION,
            VR::LO,
            "mae-run results (burned in)",
        ),
        (tags::CONVERSION_TYPE, VR::CS, "WSD"),
        (tags::MANUFACTURER, VR::LO, "mae"),
        (tags::SECONDARY_CAPTURE_DEVICE_MANUFACTURER, VR::LO, "mae"),
        (
            tags::SECONDARY_CAPTURE_DEVICE_MANUFACTURER_MODEL_NAME,
            VR::LO,
            "mae-run",
        ),
        (
            tags::SECONDARY_CAPTURE_DEVICE_SOFTWARE_VERSIONS,
            VR::LO,
            model.software_version.as_str(),
        ),
        (tags::IMAGE_TYPE, VR::CS, "DERIVED\\SECONDARY"),
        (tags::BURNED_IN_ANNOTATION, VR::CS, "YES"),
        (tags::LOSSY_IMAGE_COMPRESSION, VR::CS, lossy),
        (tags::CONTENT_DATE, VR::DA, date.as_str()),
        (tags::CONTENT_TIME, VR::TM, time.as_str()),
        (tags::INSTANCE_CREATION_DATE, VR::DA, date.as_str()),
        (tags::INSTANCE_CREATION_TIME, VR::TM, time.as_str()),
        (
            tags::DERIVATION_DESCRIPTION,
            VR::ST,
            "Source image with the mae-run classification burned in",
        ),
        (tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "RGB"),
    ] {
        obj.put(str_el(tag, vr, v));
    }
    let instance_number = source
        .text(tags::INSTANCE_NUMBER)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "1".into());
    obj.put(str_el(tags::INSTANCE_NUMBER, VR::IS, &instance_number));
    obj.put(str_el(
        tags::SERIES_NUMBER,
        VR::IS,
        &SERIES_NUMBER.to_string(),
    ));
    // Type 2C in General Series: the source's, or empty.
    let laterality = source.text(tags::LATERALITY).unwrap_or_default();
    obj.put(str_el(tags::LATERALITY, VR::CS, &laterality));
    obj.put(DataElement::new(
        tags::PATIENT_ORIENTATION,
        VR::CS,
        PrimitiveValue::Empty,
    ));
    obj.put(seq(tags::SOURCE_IMAGE_SEQUENCE, vec![source.reference()]));
    let (w, h) = picture.dimensions();
    for (tag, v) in [
        (tags::SAMPLES_PER_PIXEL, 3u16),
        (tags::PLANAR_CONFIGURATION, 0),
        (tags::ROWS, h as u16),
        (tags::COLUMNS, w as u16),
        (tags::BITS_ALLOCATED, 8),
        (tags::BITS_STORED, 8),
        (tags::HIGH_BIT, 7),
        (tags::PIXEL_REPRESENTATION, 0),
    ] {
        obj.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
    }
    let mut pixels = picture.into_raw();
    if pixels.len() % 2 == 1 {
        pixels.push(0);
    }
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::from(pixels),
    ));
    let bytes = to_file_bytes(obj, &uids::derive(root, &["implementation"]))?;
    Ok((sop_instance, bytes))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn text_is_burned_into_a_band_above_the_image() {
        let img = RgbImage::from_pixel(64, 32, Rgb([10, 20, 30]));
        let out = render(&img, None, &["pneumonia 0.93".into()]).unwrap();
        assert_eq!(out.width(), 512);
        let band = out.height() - 256;
        assert!(band > 14);
        // White strokes in the band; the image below, enlarged, untouched.
        assert!((0..band).any(|y| (0..512).any(|x| out.get_pixel(x, y).0[0] > 200)));
        assert_eq!(out.get_pixel(511, out.height() - 1).0, [10, 20, 30]);
    }

    #[test]
    fn a_heatmap_stands_right_of_the_image_at_its_height() {
        let img = RgbImage::from_pixel(64, 32, Rgb([10, 20, 30]));
        let heat = RgbImage::from_pixel(224, 224, Rgb([200, 0, 0]));
        let out = render(&img, Some(&heat), &["a".into(), "b".into()]).unwrap();
        // The source enlarged to 512×256, the map scaled to 256×256 beside it.
        assert_eq!(out.width(), 512 + 256);
        let band = out.height() - 256;
        assert_eq!(out.get_pixel(511, out.height() - 1).0, [10, 20, 30]);
        assert_eq!(out.get_pixel(512 + 128, band + 128).0, [200, 0, 0]);
        assert_eq!(out.get_pixel(767, out.height() - 1).0, [200, 0, 0]);
    }
}
