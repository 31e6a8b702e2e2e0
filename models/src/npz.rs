//! MedMNIST `.npz` files: zip archives (stored or deflated) of `.npy` arrays named
//! `{split}_images` (uint8 `[N, H, W]` or `[N, H, W, 3]`) and `{split}_labels` (`[N]`, `[N, 1]`
//! or `[N, L]`, any integer type), as `numpy.savez_compressed` writes them.
//!
//! Sizes come from the headers, which a damaged file can get wrong: memory grows only with the
//! bytes actually read, never with what a header claims, and every mismatch is an error naming
//! the file and the array.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use image::RgbImage;
use zip::ZipArchive;

use crate::error::{Error, Result};

/// Largest `.npy` header accepted (numpy writes 128 bytes, or a few KB for long shapes).
const MAX_HEADER_BYTES: usize = 1 << 16;
/// Largest array accepted, in bytes.
const MAX_ARRAY_BYTES: u64 = 64 << 30;

/// One split of a MedMNIST file: images as RGB (grayscale replicated) and their label rows.
#[derive(Debug, Clone, PartialEq)]
pub struct NpzSplit {
    pub images: Vec<RgbImage>,
    /// Channels of the stored images: 1 (grayscale, `[N, H, W]` or `[N, H, W, 1]`) or 3.
    pub channels: usize,
    /// One row per image: the class index (`[c]`) or the multi-label 0/1 vector.
    pub labels: Vec<Vec<i64>>,
}

/// The split names (`train`, `val`, `test`, ...) that have both `{split}_images` and
/// `{split}_labels` arrays, in the order of the archive.
pub fn splits(path: &Path) -> Result<Vec<String>> {
    Ok(split_names(&open(path)?))
}

fn split_names<R: Read + Seek>(zip: &ZipArchive<R>) -> Vec<String> {
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .collect();
    let mut out = Vec::new();
    for name in &names {
        let Some(split) = name.strip_suffix("_images.npy") else {
            continue;
        };
        if names.iter().any(|n| n == &format!("{split}_labels.npy")) && !out.contains(&split.into())
        {
            out.push(split.to_string());
        }
    }
    out
}

/// Reads `{split}_images` and `{split}_labels` of a MedMNIST `.npz` file.
pub fn read_split(path: &Path, split: &str) -> Result<NpzSplit> {
    read_split_of(&mut open(path)?, path, split)
}

/// Every split of a `.npz` file held in memory (`name` names it in errors).
pub fn read_bytes(bytes: &[u8], name: &Path) -> Result<Vec<(String, NpzSplit)>> {
    let mut zip = zip_of(std::io::Cursor::new(bytes), name)?;
    split_names(&zip)
        .into_iter()
        .map(|split| {
            let data = read_split_of(&mut zip, name, &split)?;
            Ok((split, data))
        })
        .collect()
}

fn read_split_of<R: Read + Seek>(
    zip: &mut ZipArchive<R>,
    path: &Path,
    split: &str,
) -> Result<NpzSplit> {
    let images = read_array(zip, path, &format!("{split}_images"))?;
    let labels = read_array(zip, path, &format!("{split}_labels"))?;
    let (images, channels) = images_of(&images, path)?;
    let labels = labels_of(&labels, path)?;
    if images.len() != labels.len() {
        return Err(Error::format(
            path,
            format!(
                "'{split}_images' holds {} images but '{split}_labels' {} labels",
                images.len(),
                labels.len()
            ),
        ));
    }
    Ok(NpzSplit {
        images,
        channels,
        labels,
    })
}

fn open(path: &Path) -> Result<ZipArchive<BufReader<File>>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    zip_of(BufReader::new(file), path)
}

fn zip_of<R: Read + Seek>(reader: R, path: &Path) -> Result<ZipArchive<R>> {
    ZipArchive::new(reader).map_err(|e| {
        Error::format(
            path,
            format!("not a .npz file (a zip archive of .npy arrays): {e}"),
        )
    })
}

/// Element types of the arrays we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::U8 | Dtype::I8 => 1,
            Dtype::U16 | Dtype::I16 => 2,
            Dtype::U32 | Dtype::I32 => 4,
            Dtype::U64 | Dtype::I64 => 8,
        }
    }

    /// Parses a numpy `descr` such as `|u1` or `<i8`. Only little-endian (or byte) types.
    fn parse(descr: &str) -> Option<Self> {
        let (order, code) = descr.split_at_checked(1)?;
        let t = match code {
            "u1" => Dtype::U8,
            "i1" => Dtype::I8,
            "b1" => Dtype::U8,
            "u2" => Dtype::U16,
            "i2" => Dtype::I16,
            "u4" => Dtype::U32,
            "i4" => Dtype::I32,
            "u8" => Dtype::U64,
            "i8" => Dtype::I64,
            _ => return None,
        };
        match order {
            "<" | "|" | "=" => Some(t),
            ">" if t.size() == 1 => Some(t),
            _ => None,
        }
    }
}

/// A `.npy` array: element type, shape and raw little-endian data.
#[derive(Debug)]
struct Array {
    name: String,
    descr: String,
    dtype: Option<Dtype>,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn read_array<R: Read + Seek>(zip: &mut ZipArchive<R>, path: &Path, key: &str) -> Result<Array> {
    let entry_name = format!("{key}.npy");
    let entry = match zip.by_name(&entry_name) {
        Ok(e) => e,
        Err(zip::result::ZipError::FileNotFound) => {
            return Err(Error::Missing {
                path: path.to_path_buf(),
                what: format!("array '{key}' (no entry '{entry_name}' in the archive)"),
            })
        }
        Err(e) => {
            return Err(Error::format(
                path,
                format!("cannot open '{entry_name}': {e}"),
            ))
        }
    };
    let err = |reason: String| Error::format(path, format!("'{key}': {reason}"));
    let mut reader = entry.take(MAX_ARRAY_BYTES + MAX_HEADER_BYTES as u64 + 16);
    let (descr, fortran, shape) = read_header(&mut reader).map_err(err)?;
    if fortran {
        return Err(err("arrays in Fortran order are not supported".into()));
    }
    let dtype = Dtype::parse(&descr);
    let elems = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| err(format!("shape {shape:?} is too large")))?;
    let bytes = (elems as u64).saturating_mul(dtype.map_or(1, Dtype::size) as u64);
    if dtype.is_none() {
        return Ok(Array {
            name: key.into(),
            descr,
            dtype,
            shape,
            data: Vec::new(),
        });
    }
    if bytes > MAX_ARRAY_BYTES {
        return Err(err(format!(
            "shape {shape:?} needs {bytes} bytes, more than the {MAX_ARRAY_BYTES} accepted"
        )));
    }
    let mut data = Vec::new();
    (&mut reader)
        .take(bytes)
        .read_to_end(&mut data)
        .map_err(|e| err(format!("cannot read the data: {e}")))?;
    if (data.len() as u64) < bytes {
        return Err(err(format!(
            "shape {shape:?} needs {bytes} bytes of data, the entry holds {} (truncated?)",
            data.len()
        )));
    }
    Ok(Array {
        name: key.into(),
        descr,
        dtype,
        shape,
        data,
    })
}

/// Reads the magic, version and header dict of a `.npy` stream: (descr, fortran_order, shape).
fn read_header(r: &mut impl Read) -> std::result::Result<(String, bool, Vec<usize>), String> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)
        .map_err(|e| format!("not a .npy array: {e}"))?;
    if &magic[..6] != b"\x93NUMPY" {
        return Err(format!(
            "not a .npy array (starts with {:02x?})",
            &magic[..6]
        ));
    }
    let len = match magic[6] {
        1 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).map_err(|e| e.to_string())?;
            u16::from_le_bytes(b) as usize
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            r.read_exact(&mut b).map_err(|e| e.to_string())?;
            u32::from_le_bytes(b) as usize
        }
        v => return Err(format!(".npy format version {v} is not supported")),
    };
    if len > MAX_HEADER_BYTES {
        return Err(format!(".npy header of {len} bytes is too long"));
    }
    let mut header = vec![0u8; len];
    r.read_exact(&mut header)
        .map_err(|e| format!("truncated .npy header: {e}"))?;
    let header = String::from_utf8_lossy(&header);
    parse_header_dict(&header)
}

/// Parses numpy's header, a Python dict literal such as
/// `{'descr': '|u1', 'fortran_order': False, 'shape': (10, 28, 28), }`.
fn parse_header_dict(h: &str) -> std::result::Result<(String, bool, Vec<usize>), String> {
    let value_after = |key: &str| -> std::result::Result<&str, String> {
        let k = h
            .find(&format!("'{key}'"))
            .ok_or_else(|| format!(".npy header has no '{key}': {h}"))?;
        let rest = &h[k + key.len() + 2..];
        let colon = rest
            .find(':')
            .ok_or_else(|| format!("bad .npy header: {h}"))?;
        Ok(rest[colon + 1..].trim_start())
    };
    let d = value_after("descr")?;
    let quote = d.chars().next().filter(|c| *c == '\'' || *c == '"');
    let descr = match quote {
        Some(q) => d[1..]
            .split(q)
            .next()
            .ok_or_else(|| format!("bad 'descr' in .npy header: {h}"))?
            .to_string(),
        None => return Err(format!("unsupported 'descr' (a structured dtype?): {h}")),
    };
    let fortran = value_after("fortran_order")?.starts_with("True");
    let s = value_after("shape")?;
    let s = s
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| format!("bad 'shape' in .npy header: {h}"))?;
    let shape = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| format!("bad dimension '{p}' in .npy header: {h}"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((descr, fortran, shape))
}

impl Array {
    fn err(&self, path: &Path, reason: impl std::fmt::Display) -> Error {
        Error::format(PathBuf::from(path), format!("'{}': {reason}", self.name))
    }

    /// The element `i` as an i64 (little-endian data, `dtype` known).
    fn get_i64(&self, dtype: Dtype, i: usize) -> i64 {
        let s = dtype.size();
        let b = &self.data[i * s..(i + 1) * s];
        match dtype {
            Dtype::U8 => b[0] as i64,
            Dtype::I8 => b[0] as i8 as i64,
            Dtype::U16 => u16::from_le_bytes([b[0], b[1]]) as i64,
            Dtype::I16 => i16::from_le_bytes([b[0], b[1]]) as i64,
            Dtype::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
            Dtype::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
            Dtype::U64 | Dtype::I64 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                i64::from_le_bytes(a)
            }
        }
    }
}

/// The images of an array, as RGB, and the array's channels.
fn images_of(a: &Array, path: &Path) -> Result<(Vec<RgbImage>, usize)> {
    if a.dtype != Some(Dtype::U8) {
        return Err(a.err(
            path,
            format!("images must be uint8 ('|u1'), found dtype '{}'", a.descr),
        ));
    }
    let (n, h, w, c) = match a.shape[..] {
        [n, h, w] => (n, h, w, 1),
        [n, h, w, 3] => (n, h, w, 3),
        [n, h, w, 1] => (n, h, w, 1),
        _ => {
            return Err(a.err(
                path,
                format!(
                    "images must have shape [N, H, W] or [N, H, W, 3], found {:?}",
                    a.shape
                ),
            ))
        }
    };
    let (Ok(hh), Ok(ww)) = (u32::try_from(h), u32::try_from(w)) else {
        return Err(a.err(path, format!("image size {h}×{w} is too large")));
    };
    let per = h * w * c;
    let mut images = Vec::with_capacity(n.min(a.data.len()));
    for i in 0..n {
        let px = &a.data[i * per..(i + 1) * per];
        let rgb = if c == 3 {
            px.to_vec()
        } else {
            px.iter().flat_map(|&v| [v, v, v]).collect()
        };
        let img = RgbImage::from_raw(ww, hh, rgb)
            .ok_or_else(|| a.err(path, format!("image {i} has the wrong size")))?;
        images.push(img);
    }
    Ok((images, c))
}

fn labels_of(a: &Array, path: &Path) -> Result<Vec<Vec<i64>>> {
    let Some(dtype) = a.dtype else {
        return Err(a.err(
            path,
            format!(
                "labels must be integers (uint8, int32, int64, ...), found dtype '{}'",
                a.descr
            ),
        ));
    };
    let (n, l) = match a.shape[..] {
        [n] => (n, 1),
        [n, l] if l > 0 => (n, l),
        _ => {
            return Err(a.err(
                path,
                format!(
                    "labels must have shape [N], [N, 1] or [N, L], found {:?}",
                    a.shape
                ),
            ))
        }
    };
    Ok((0..n)
        .map(|i| (0..l).map(|j| a.get_i64(dtype, i * l + j)).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn header_dicts() {
        let (d, f, s) =
            parse_header_dict("{'descr': '|u1', 'fortran_order': False, 'shape': (10, 28, 28), }")
                .unwrap();
        assert_eq!((d.as_str(), f, s), ("|u1", false, vec![10, 28, 28]));
        let (d, _, s) =
            parse_header_dict("{'descr': '<i8', 'fortran_order': False, 'shape': (7,), }").unwrap();
        assert_eq!((d.as_str(), s), ("<i8", vec![7]));
        let (_, _, s) =
            parse_header_dict("{'descr': '<f4', 'fortran_order': True, 'shape': (), }").unwrap();
        assert!(s.is_empty());
        assert!(parse_header_dict("{'descr': '<f4'}").is_err());
        assert!(parse_header_dict("{'descr': [('a', '<f4')], 'shape': (1,)}").is_err());
    }

    #[test]
    fn dtypes() {
        assert_eq!(Dtype::parse("|u1"), Some(Dtype::U8));
        assert_eq!(Dtype::parse("<i8"), Some(Dtype::I64));
        assert_eq!(Dtype::parse(">i8"), None);
        assert_eq!(Dtype::parse("<f4"), None);
        assert_eq!(Dtype::parse(""), None);
    }
}
