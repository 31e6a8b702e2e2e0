//! Editing `metadata_props` of an ONNX file without decoding the rest: the top-level fields
//! of the `ModelProto` are copied byte for byte (so nothing a decoder does not know is lost),
//! the entries being replaced are dropped, and the new ones appended.

use anyhow::{bail, Context};

/// Field number of `ModelProto.metadata_props`.
const METADATA_PROPS: u64 = 14;

fn read_varint(buf: &[u8], pos: &mut usize) -> anyhow::Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).context("truncated varint")?;
        *pos += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    bail!("varint too long")
}

fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// The key of a serialized `StringStringEntryProto` (field 1).
fn entry_key(entry: &[u8]) -> anyhow::Result<String> {
    let mut pos = 0;
    while pos < entry.len() {
        let tag = read_varint(entry, &mut pos)?;
        match tag & 7 {
            2 => {
                let len = read_varint(entry, &mut pos)? as usize;
                let end = pos.checked_add(len).filter(|&e| e <= entry.len());
                let end = end.context("truncated metadata entry")?;
                if tag >> 3 == 1 {
                    return Ok(String::from_utf8_lossy(&entry[pos..end]).into_owned());
                }
                pos = end;
            }
            0 => {
                read_varint(entry, &mut pos)?;
            }
            _ => bail!("unexpected field in a metadata entry"),
        }
    }
    Ok(String::new())
}

fn encode_entry(out: &mut Vec<u8>, key: &str, value: &str) {
    let mut entry = Vec::new();
    for (field, s) in [(1u64, key), (2, value)] {
        write_varint(&mut entry, field << 3 | 2);
        write_varint(&mut entry, s.len() as u64);
        entry.extend_from_slice(s.as_bytes());
    }
    write_varint(out, METADATA_PROPS << 3 | 2);
    write_varint(out, entry.len() as u64);
    out.extend(entry);
}

/// `model` with the metadata entries of `set` replacing any of the same key.
pub fn set_metadata(model: &[u8], set: &[(String, String)]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(model.len() + 256);
    let mut pos = 0;
    while pos < model.len() {
        let start = pos;
        let tag = read_varint(model, &mut pos).context("not an ONNX model")?;
        let field = tag >> 3;
        match tag & 7 {
            0 => {
                read_varint(model, &mut pos)?;
            }
            1 => pos += 8,
            5 => pos += 4,
            2 => {
                let len = read_varint(model, &mut pos)? as usize;
                let end = pos
                    .checked_add(len)
                    .filter(|&e| e <= model.len())
                    .context("not an ONNX model (truncated field)")?;
                if field == METADATA_PROPS {
                    let key = entry_key(&model[pos..end])?;
                    if set.iter().any(|(k, _)| *k == key) {
                        pos = end;
                        continue;
                    }
                }
                pos = end;
            }
            w => bail!("not an ONNX model (wire type {w} at byte {start})"),
        }
        if pos > model.len() {
            bail!("not an ONNX model (truncated)");
        }
        out.extend_from_slice(&model[start..pos]);
    }
    for (k, v) in set {
        encode_entry(&mut out, k, v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use prost::Message;
    use tract_onnx::pb;

    #[test]
    fn replaces_and_appends_entries() {
        let model = pb::ModelProto {
            ir_version: 8,
            producer_name: "test".into(),
            metadata_props: vec![
                pb::StringStringEntryProto {
                    key: "mae.task".into(),
                    value: "binary".into(),
                },
                pb::StringStringEntryProto {
                    key: "mae.temperature".into(),
                    value: "3".into(),
                },
            ],
            ..Default::default()
        };
        let bytes = model.encode_to_vec();
        let set = vec![
            ("mae.temperature".to_string(), "1.5".to_string()),
            ("mae.threshold".to_string(), "0.3".to_string()),
        ];
        let edited = set_metadata(&bytes, &set).unwrap();
        let back = pb::ModelProto::decode(&edited[..]).unwrap();
        assert_eq!(back.ir_version, 8);
        assert_eq!(back.producer_name, "test");
        let props: Vec<(String, String)> = back
            .metadata_props
            .iter()
            .map(|p| (p.key.clone(), p.value.clone()))
            .collect();
        assert_eq!(
            props,
            vec![
                ("mae.task".into(), "binary".into()),
                ("mae.temperature".into(), "1.5".into()),
                ("mae.threshold".into(), "0.3".into()),
            ]
        );
        assert!(set_metadata(&bytes[..bytes.len() - 3], &set).is_err());
    }
}
