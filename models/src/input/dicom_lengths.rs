//! A walk over a DICOM file's elements that checks each declared value length against the bytes
//! the file still has, before the file reaches the parser.
//!
//! dicom-rs reserves (and zero-fills) an element's declared length before it reads the value, so
//! a few hundred bytes that declare a 2 GB element cost 2 GB of memory before they are refused.
//! A length no file could hold is refused here, by name, at the cost of one pass over the
//! headers. Whatever this walk does not understand is left to the parser and its own errors:
//! the walk only ever refuses a declared length that runs past the end of the file, or a length
//! that is not a whole number of values of a numeric VR (the parser reads the whole values and
//! then carries on from the wrong offset, where any bytes may read as a huge length).

use std::io::Read;

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

/// A deflated data set is inflated for the walk up to this size; one that inflates further is
/// refused (deflated data sets hold reports and small images, not gigabytes).
const INFLATE_LIMIT: usize = 1 << 30;
const UNDEFINED: u32 = 0xFFFF_FFFF;
const PIXEL_DATA: (u16, u16) = (0x7FE0, 0x0010);
/// The VRs with a 32-bit length.
const KNOWN_LONG: [&[u8; 2]; 13] = [
    b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV",
];

/// `body` starts at the `DICM` magic (or at the first meta element when there is none).
pub(super) fn check(body: &[u8]) -> Result<(), String> {
    check_with(body, INFLATE_LIMIT)
}

/// The transfer syntaxes whose data set is implicit VR, big endian or deflated: a data set
/// that reads as implicit VR under any other is a writer's mistake ([`implicit_despite_meta`]).
const NOT_EXPLICIT_LITTLE: [&str; 4] = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.1.99.1",
];

/// Whether a data set's first element reads as implicit VR: where explicit VR has its two VR
/// letters, it has bytes that are no VR (the low bytes of a length). pydicom tells the two
/// apart the same way.
fn looks_implicit(data_set: &[u8]) -> bool {
    let Some(first) = data_set.get(..6) else {
        return false;
    };
    let group = u16::from_le_bytes([first[0], first[1]]);
    group != 0x0002 && group != 0xFFFE && VR::from_binary([first[4], first[5]]).is_none()
}

/// A file whose meta information declares an explicit VR little endian transfer syntax
/// (native or encapsulated) but whose data set is written in implicit VR, as in pydicom's
/// `SC_rgb_jpeg.dcm`: the declared transfer syntax and where the data set starts in `body`.
pub(super) fn implicit_despite_meta(body: &[u8]) -> Option<(String, usize)> {
    let mut walk = Walk {
        bytes: body,
        pos: if body.starts_with(b"DICM") { 4 } else { 0 },
        explicit: true,
        big_endian: false,
        what: "file meta information",
    };
    let ts = walk.meta().ok()??;
    let rest = body.get(walk.pos..)?;
    (!NOT_EXPLICIT_LITTLE.contains(&ts.as_str()) && looks_implicit(rest)).then_some((ts, walk.pos))
}

fn check_with(body: &[u8], limit: usize) -> Result<(), String> {
    let start = if body.starts_with(b"DICM") { 4 } else { 0 };
    let mut walk = Walk {
        bytes: body,
        pos: start,
        explicit: true,
        big_endian: false,
        what: "file meta information",
    };
    let Some(ts) = walk.meta()? else {
        return Err("the file meta information has no Transfer Syntax UID (0002,0010)".into());
    };
    let rest = body.get(walk.pos..).unwrap_or_default();
    match ts.as_str() {
        "1.2.840.10008.1.2" => data_set(rest, false, false),
        "1.2.840.10008.1.2.2" => data_set(rest, true, true),
        "1.2.840.10008.1.2.1.99" | "1.2.840.10008.1.2.1.99.1" => {
            let mut inflated = Vec::new();
            let read = flate2::read::DeflateDecoder::new(rest)
                .take(limit as u64 + 1)
                .read_to_end(&mut inflated);
            match read {
                // A damaged stream is the parser's to report.
                Err(_) => Ok(()),
                Ok(n) if n > limit => Err(format!(
                    "the deflated data set inflates to more than {limit} bytes from {} bytes",
                    rest.len()
                )),
                Ok(_) => data_set(&inflated, true, false),
            }
        }
        // Read as the parser will be told to read it (`implicit_despite_meta`).
        _ if looks_implicit(rest) => data_set(rest, false, false),
        _ => data_set(rest, true, false),
    }
}

fn data_set(bytes: &[u8], explicit: bool, big_endian: bool) -> Result<(), String> {
    Walk {
        bytes,
        pos: 0,
        explicit,
        big_endian,
        what: "data set",
    }
    .elements()
}

struct Walk<'a> {
    bytes: &'a [u8],
    pos: usize,
    explicit: bool,
    big_endian: bool,
    what: &'static str,
}

/// One element header: its tag, VR (when explicit), declared length, and where its value starts.
struct Header {
    tag: (u16, u16),
    vr: Option<[u8; 2]>,
    len: u32,
}

impl Walk<'_> {
    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// The next `N` bytes, or `None` (and no move) where the file ends first.
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let b: [u8; N] = self.bytes.get(self.pos..self.pos + N)?.try_into().ok()?;
        self.pos += N;
        Some(b)
    }

    /// The next `N`-byte unsigned number, in the walk's byte order.
    fn uint<const N: usize>(&mut self) -> Option<u32> {
        let b: [u8; N] = self.take()?;
        let fold = |v: u32, x: &u8| (v << 8) | u32::from(*x);
        Some(if self.big_endian {
            b.iter().fold(0, fold)
        } else {
            b.iter().rev().fold(0, fold)
        })
    }

    fn u16(&mut self) -> Option<u16> {
        self.uint::<2>().map(|v| v as u16)
    }

    fn u32(&mut self) -> Option<u32> {
        self.uint::<4>()
    }

    /// The next header, or `None` at the end of the bytes or where the walk loses its way.
    fn header(&mut self) -> Option<Header> {
        let tag = (self.u16()?, self.u16()?);
        if tag.0 == 0xFFFE {
            // Items and delimiters: a length and no VR, in every transfer syntax.
            return Some(Header {
                tag,
                vr: None,
                len: self.u32()?,
            });
        }
        if !self.explicit {
            return Some(Header {
                tag,
                vr: None,
                len: self.u32()?,
            });
        }
        let mut vr: [u8; 2] = self.take()?;
        // As the parser reads them (PS3.5 7.1.2): these VRs have a 16-bit length; every other,
        // an unknown one too (taken as UN), has two reserved bytes and a 32-bit length.
        let short = matches!(
            &vr,
            b"AE"
                | b"AS"
                | b"AT"
                | b"CS"
                | b"DA"
                | b"DS"
                | b"DT"
                | b"FL"
                | b"FD"
                | b"IS"
                | b"LO"
                | b"LT"
                | b"PN"
                | b"SH"
                | b"SL"
                | b"SS"
                | b"ST"
                | b"TM"
                | b"UI"
                | b"UL"
                | b"US"
        );
        let len = if short {
            u32::from(self.u16()?)
        } else {
            if !KNOWN_LONG.contains(&&vr) {
                vr = *b"UN";
            }
            if self.pos + 2 > self.bytes.len() {
                return None;
            }
            self.pos += 2;
            self.u32()?
        };
        Some(Header {
            tag,
            vr: Some(vr),
            len,
        })
    }

    /// The size of one value of the element's VR when it is a binary number (as written, or as
    /// the dictionary has it in implicit VR).
    fn value_size(&self, h: &Header) -> Option<u32> {
        let size = |vr: &[u8]| match vr {
            b"OW" | b"SS" | b"US" => Some(2),
            b"AT" | b"FL" | b"OF" | b"OL" | b"SL" | b"UL" => Some(4),
            b"FD" | b"OD" | b"OV" | b"SV" | b"UV" => Some(8),
            _ => None,
        };
        match h.vr {
            Some(vr) => size(&vr),
            None if h.tag.0 == 0xFFFE => None,
            None => match StandardDataDictionary.by_tag(Tag(h.tag.0, h.tag.1))?.vr() {
                VirtualVr::Exact(vr) if vr != VR::OW => size(vr.to_string().as_bytes()),
                VirtualVr::Xs => Some(2),
                _ => None,
            },
        }
    }

    fn fits(&self, h: &Header) -> Result<(), String> {
        if let Some(size) = self
            .value_size(h)
            .filter(|s| h.len != UNDEFINED && !h.len.is_multiple_of(*s))
        {
            return Err(format!(
                "element ({:04X},{:04X}) in the {} has {} bytes, not a whole number of \
                 {size}-byte values",
                h.tag.0, h.tag.1, self.what, h.len
            ));
        }
        if h.len != UNDEFINED && h.len as usize > self.left() {
            return Err(format!(
                "element ({:04X},{:04X}) in the {} declares {} bytes where the file has {} left",
                h.tag.0,
                h.tag.1,
                self.what,
                h.len,
                self.left()
            ));
        }
        Ok(())
    }

    /// Walks the meta group (always explicit little endian) and returns its transfer syntax. As
    /// the parser does, a meta group that starts with its group length (0002,0000) is read for
    /// that many bytes, whatever the groups of the elements in it.
    fn meta(&mut self) -> Result<Option<String>, String> {
        let mut ts = None;
        let start = self.pos;
        let has_length = self
            .header()
            .is_some_and(|h| h.tag == (0x0002, 0x0000) && h.len == 4);
        let end = match has_length.then(|| self.take().map(u32::from_le_bytes)) {
            Some(Some(length)) => Some(self.pos.saturating_add(length as usize)),
            Some(None) => return Ok(None),
            None => {
                self.pos = start;
                None
            }
        };
        loop {
            let more = match end {
                Some(end) => self.pos < end,
                None => self.bytes.get(self.pos..self.pos + 2) == Some(&[0x02, 0x00][..]),
            };
            if !more {
                return Ok(ts);
            }
            let Some(h) = self.header() else {
                return Ok(ts);
            };
            self.fits(&h)?;
            if h.len == UNDEFINED {
                return Ok(ts);
            }
            self.read_ts(&h, &mut ts);
            self.pos += h.len as usize;
        }
    }

    /// Keeps the value of the Transfer Syntax UID, which `h` has checked to fit.
    fn read_ts(&self, h: &Header, ts: &mut Option<String>) {
        if h.tag == (0x0002, 0x0010) {
            let value = &self.bytes[self.pos..self.pos + h.len as usize];
            let text = String::from_utf8_lossy(value);
            *ts = Some(text.trim_end_matches(['\0', ' ']).trim().to_string());
        }
    }

    fn elements(&mut self) -> Result<(), String> {
        // Inside encapsulated pixel data, items are fragments of bytes, not data sets.
        let mut fragments = false;
        while self.left() >= 8 {
            let Some(h) = self.header() else {
                return Ok(());
            };
            self.fits(&h)?;
            if h.len == UNDEFINED {
                // A sequence or an item of undefined length (its elements follow), or
                // encapsulated pixel data (its fragments follow). An undefined-length UN holds
                // implicit VR data, which this walk does not follow.
                if h.vr == Some(*b"UN") {
                    return Ok(());
                }
                fragments |= h.tag == PIXEL_DATA;
                continue;
            }
            match h.tag {
                (0xFFFE, 0xE0DD) => fragments = false,
                // A fragment: bytes, whatever they look like.
                (0xFFFE, 0xE000) if fragments => self.pos += h.len as usize,
                // An item of a sequence: its elements follow.
                (0xFFFE, 0xE000) => {}
                // A defined-length sequence: its items follow.
                _ if self.nested(&h) => {}
                _ => self.pos += h.len as usize,
            }
        }
        Ok(())
    }

    /// Whether a defined-length element holds items that the walk should enter: an explicit
    /// `SQ`, or, in implicit VR, a value that starts with an item tag.
    fn nested(&self, h: &Header) -> bool {
        match h.vr {
            Some(vr) => &vr == b"SQ",
            None => {
                let item = if self.big_endian {
                    [0xFF, 0xFE, 0xE0, 0x00]
                } else {
                    [0xFE, 0xFF, 0x00, 0xE0]
                };
                h.len >= 8 && self.bytes.get(self.pos..self.pos + 4) == Some(&item[..])
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn el(tag: (u16, u16), vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(tag.0.to_le_bytes());
        out.extend(tag.1.to_le_bytes());
        out.extend(vr);
        if matches!(vr, b"OB" | b"OW" | b"SQ" | b"UN" | b"UT") {
            out.extend([0, 0]);
            out.extend((value.len() as u32).to_le_bytes());
        } else {
            out.extend((value.len() as u16).to_le_bytes());
        }
        out.extend(value);
        out
    }

    fn file(ts: &str, data: &[u8]) -> Vec<u8> {
        let mut out = b"DICM".to_vec();
        let mut uid = ts.as_bytes().to_vec();
        if uid.len() % 2 == 1 {
            uid.push(0);
        }
        out.extend(el((0x0002, 0x0010), b"UI", &uid));
        out.extend(data);
        out
    }

    #[test]
    fn a_length_past_the_end_is_refused_by_tag() {
        let mut data = el((0x0028, 0x0010), b"US", &4u16.to_le_bytes());
        data.extend(el((0x7FE0, 0x0010), b"OW", &[0; 8]));
        let ok = file("1.2.840.10008.1.2.1", &data);
        assert_eq!(check(&ok), Ok(()));
        // Declare 2 GB for the pixel data.
        let mut bad = ok.clone();
        let n = bad.len();
        bad[n - 12..n - 8].copy_from_slice(&0x8000_0000u32.to_le_bytes());
        let err = check(&bad).unwrap_err();
        assert!(
            err.contains("(7FE0,0010)") && err.contains("2147483648"),
            "{err}"
        );
    }

    #[test]
    fn the_meta_group_is_read_for_its_group_length() {
        let uid = b"1.2.840.10008.1.2\0".to_vec();
        let ts = el((0x0002, 0x0010), b"UI", &uid);
        let meta = |extra: &[u8]| {
            let mut body = b"DICM".to_vec();
            let length = (ts.len() + extra.len()) as u32;
            body.extend(el((0x0002, 0x0000), b"UL", &length.to_le_bytes()));
            body.extend(&ts);
            body.extend(extra);
            body
        };
        // A well-formed file: the group length covers the meta elements, an implicit VR data
        // set follows.
        let mut good = meta(&el((0x0002, 0x0013), b"SH", b"MAE "));
        good.extend([0x10, 0x00, 0x10, 0x00, 8, 0, 0, 0]);
        good.extend(b"Doe^John");
        assert_eq!(check(&good), Ok(()));
        // The group length also covers 12 bytes after the transfer syntax. The parser reads
        // them as a meta element (explicit VR): OB of 0x7FFFFFF0 bytes. Read as the implicit
        // data set instead, they would be an element of 0x4F4F bytes, which the padding holds.
        let mut bad = meta(&[
            0x09, 0x00, 0x10, 0x00, b'O', b'O', 0, 0, 0xF0, 0xFF, 0xFF, 0x7F,
        ]);
        bad.extend(vec![0u8; 30_000]);
        let err = check(&bad).unwrap_err();
        assert!(
            err.contains("(0009,0010) in the file meta information"),
            "{err}"
        );
    }

    #[test]
    fn a_numeric_length_of_part_of_a_value_is_refused() {
        // Samples per Pixel as SL with 2 bytes: the parser would read no value and go on two
        // bytes early.
        let data = el((0x0028, 0x0002), b"SL", &[1, 0]);
        let err = check(&file("1.2.840.10008.1.2.1", &data)).unwrap_err();
        assert!(
            err.contains("(0028,0002)") && err.contains("4-byte values"),
            "{err}"
        );
        let fine = el((0x0028, 0x0002), b"US", &[1, 0]);
        assert_eq!(check(&file("1.2.840.10008.1.2.1", &fine)), Ok(()));
        // In implicit VR the dictionary gives the VR: Rows is US.
        let mut implicit = vec![0x28, 0x00, 0x10, 0x00];
        implicit.extend(3u32.to_le_bytes());
        implicit.extend([1, 0, 0]);
        assert!(check(&file("1.2.840.10008.1.2", &implicit)).is_err());
    }

    #[test]
    fn lengths_inside_sequences_and_items_are_checked() {
        let inner = el((0x0008, 0x0100), b"SH", b"AB");
        let mut item = vec![0xFE, 0xFF, 0x00, 0xE0];
        item.extend((inner.len() as u32).to_le_bytes());
        item.extend(&inner);
        let data = el((0x0008, 0x1032), b"SQ", &item);
        let ok = file("1.2.840.10008.1.2.1", &data);
        assert_eq!(check(&ok), Ok(()));
        // The nested element claims more than is left, though its sequence fits.
        let mut bad = ok.clone();
        let n = bad.len();
        bad[n - 4..n - 2].copy_from_slice(&0xFFF0u16.to_le_bytes());
        assert!(check(&bad).unwrap_err().contains("(0008,0100)"));
    }

    #[test]
    fn encapsulated_fragments_are_skipped_not_entered() {
        let mut px = Vec::new();
        for frag in [
            &[][..],
            &[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0x7F][..],
        ] {
            px.extend([0xFE, 0xFF, 0x00, 0xE0]);
            px.extend((frag.len() as u32).to_le_bytes());
            px.extend(frag);
        }
        px.extend([0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        let mut data = vec![0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0];
        data.extend(UNDEFINED.to_le_bytes());
        data.extend(&px);
        // A fragment whose bytes look like an item header with a huge length is only bytes.
        assert_eq!(check(&file("1.2.840.10008.1.2.4.50", &data)), Ok(()));
    }

    #[test]
    fn implicit_and_big_endian_lengths_are_read_in_their_syntax() {
        let mut implicit = vec![0x10, 0x00, 0x10, 0x00];
        implicit.extend(0x7000_0000u32.to_le_bytes());
        implicit.extend(b"Doe^John");
        assert!(check(&file("1.2.840.10008.1.2", &implicit)).is_err());
        let mut fine = vec![0x10, 0x00, 0x10, 0x00];
        fine.extend(8u32.to_le_bytes());
        fine.extend(b"Doe^John");
        assert_eq!(check(&file("1.2.840.10008.1.2", &fine)), Ok(()));
        let mut big = vec![0x00, 0x10, 0x00, 0x10, b'P', b'N'];
        big.extend(0xFFF0u16.to_be_bytes());
        big.extend(b"Doe^John");
        assert!(check(&file("1.2.840.10008.1.2.2", &big)).is_err());
    }

    #[test]
    fn a_deflated_data_set_is_walked_and_capped() {
        use std::io::Write;
        let mut data = el((0x0010, 0x0010), b"PN", b"Doe^John");
        data.extend(vec![0u8; 1 << 16]);
        let deflate = |d: &[u8]| {
            let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), Default::default());
            enc.write_all(d).unwrap();
            enc.finish().unwrap()
        };
        let ts = "1.2.840.10008.1.2.1.99";
        assert_eq!(check(&file(ts, &deflate(&data))), Ok(()));
        let err = check_with(&file(ts, &deflate(&data)), 1 << 12).unwrap_err();
        assert!(err.contains("inflates to more than 4096 bytes"), "{err}");
        let mut bad = el((0x0010, 0x0010), b"PN", b"Doe^John");
        bad[6..8].copy_from_slice(&0xFFF0u16.to_le_bytes());
        assert!(check(&file(ts, &deflate(&bad)))
            .unwrap_err()
            .contains("(0010,0010)"));
    }
}
