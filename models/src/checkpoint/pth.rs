//! Reading PyTorch `.pth` checkpoints written by `torch.save` (the zip format of
//! torch >= 1.6).
//!
//! Such a file is a zip archive with stored entries under one top folder of any name:
//! `<top>/data.pkl` holds the pickled object, whose tensors refer by persistent id to raw
//! little-endian storages at `<top>/data/<key>`; `<top>/byteorder`, when present, says
//! `little`. [`read_pth`] runs the pickle with the safe machine of [`super::pickle`], finds the
//! state dict (the top-level dict when it holds tensors, else the dict under `"model"`,
//! `"state_dict"` or `"model_ema"`, which covers the released and training checkpoints of
//! facebookresearch/mae) and materialises each tensor as a contiguous [`TensorData`],
//! honouring storage offsets, arbitrary strides and storages shared between tensors.
//! Everything else in the file (optimizer state, `argparse.Namespace` args, scaler state…)
//! is parsed but not interpreted.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use zip::read::{ArchiveOffset, Config};
use zip::result::ZipError;
use zip::{CompressionMethod, ZipArchive};

use super::pickle::{self, Global, Value};
use crate::error::{Error, Result};
use crate::tensor::{DType, TensorData};

/// Largest `data.pkl` accepted.
const MAX_PICKLE_BYTES: u64 = 1 << 30;

/// Materialised tensors may exceed the storages read (stride-0 broadcasts, overlapping or
/// repeated views) by a factor and an allowance; more is refused as a likely malicious file.
const EXPANSION_FACTOR: u64 = 4;
const EXPANSION_ALLOWANCE: u64 = 256 << 20;

/// How many rebuild calls may wrap one another (`_rebuild_parameter(_rebuild_tensor_v2(…))`).
const MAX_REBUILD_NESTING: usize = 8;

/// Most dimensions a tensor may have.
const MAX_NDIM: usize = 64;

/// The tensors of a `.pth` checkpoint and what else was found at its top level.
#[derive(Debug, Clone, PartialEq)]
pub struct PthFile {
    /// The state dict's tensors, by dotted name, in the order of the file.
    pub tensors: Vec<(String, TensorData)>,
    /// Keys of the top-level dict, in order (non-string keys in Python-like notation).
    pub top_level_keys: Vec<String>,
    /// The top-level key holding the state dict (`"model"`…); `None` when the top-level dict
    /// is the state dict itself.
    pub state_dict_key: Option<String>,
    /// The top-level `"epoch"`, when it is an integer.
    pub epoch: Option<i64>,
    /// One note per state-dict entry that was skipped because it is not a tensor.
    pub skipped: Vec<String>,
}

impl PthFile {
    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&TensorData> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Tensor names in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|(n, _)| n.as_str())
    }
}

/// Reads the `.pth` checkpoint at `path`.
pub fn read_pth(path: &Path) -> Result<PthFile> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let total_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = Vec::with_capacity(4);
    (&mut file)
        .take(4)
        .read_to_end(&mut head)
        .map_err(|e| Error::io(path, e))?;
    check_magic(&head, path)?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
    read_archive(BufReader::new(file), total_len, path)
}

/// Reads a `.pth` checkpoint held in memory; `path` only names it in messages.
pub fn read_pth_bytes(bytes: &[u8], path: &Path) -> Result<PthFile> {
    check_magic(&bytes[..bytes.len().min(4)], path)?;
    read_archive(Cursor::new(bytes), bytes.len() as u64, path)
}

fn check_magic(head: &[u8], path: &Path) -> Result<()> {
    if head.is_empty() {
        return Err(Error::format(
            path,
            "empty file (0 bytes), not a PyTorch checkpoint",
        ));
    }
    if head[0] == 0x80 {
        return Err(Error::format(
            path,
            "this checkpoint uses PyTorch's legacy (pre-1.6, non-zip) serialisation, which is \
             not supported; re-save it with torch>=1.6: \
             `torch.save(torch.load(path, weights_only=False), path)` in a current torch",
        ));
    }
    if !head.starts_with(b"PK") {
        return Err(Error::format(
            path,
            format!(
                "not a PyTorch checkpoint: expected a zip archive written by torch.save \
                 (starting with \"PK\"), found bytes {head:02x?}"
            ),
        ));
    }
    Ok(())
}

fn read_archive<R: Read + Seek>(reader: R, total_len: u64, path: &Path) -> Result<PthFile> {
    // The archive starts at byte 0, as torch.save writes it. The zip crate's default offset
    // detection (`ArchiveOffset::Detect`) takes the central directory to end where the
    // end-of-central-directory record starts, and so misreads archives that put zip64 end
    // records in between while the 32-bit record needs none (torch.save always writes them):
    // when the first central entry is as long as those two records (76 bytes, i.e. a 30-byte
    // name such as `mae_pretrain_vit_base/data.pkl`), it starts the directory one entry late.
    let config = Config {
        archive_offset: ArchiveOffset::Known(0),
    };
    let zip = ZipArchive::with_config(config, reader).map_err(|e| {
        Error::format(
            path,
            format!("not a readable zip archive (truncated or damaged?): {e}"),
        )
    })?;
    let mut names = HashMap::new();
    for i in 0..zip.len() {
        if let Some(Ok(name)) = zip.name_for_index(i) {
            names.entry(name.into_owned()).or_insert(i);
        }
    }
    let pkl_name = names
        .keys()
        .filter(|n| n.as_str() == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| (n.matches('/').count(), n.len(), n.as_str()))
        .cloned()
        .ok_or_else(|| {
            let mut listed: Vec<&str> = names.keys().map(String::as_str).collect();
            listed.sort_unstable();
            let more = listed.len().saturating_sub(8);
            listed.truncate(8);
            Error::Missing {
                path: path.to_path_buf(),
                what: format!(
                    "the data.pkl record of a torch.save zip archive (entries: {listed:?}{})",
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                ),
            }
        })?;
    let prefix = pkl_name[..pkl_name.len() - "data.pkl".len()].to_owned();
    let mut reader = Reader {
        zip,
        names,
        prefix,
        total_len,
        path: path.to_path_buf(),
        storages: HashMap::new(),
        storage_bytes: 0,
        out_bytes: 0,
    };

    let byteorder_name = format!("{}byteorder", reader.prefix);
    if let Some(order) = reader.read_entry(&byteorder_name, 64)? {
        let order = String::from_utf8_lossy(&order);
        if order.trim() != "little" {
            return Err(reader.err(format!(
                "'{byteorder_name}' says the storages are '{}'; only little-endian checkpoints \
                 are supported",
                order.trim()
            )));
        }
    }

    let pkl = reader
        .read_entry(&pkl_name, MAX_PICKLE_BYTES + 1)?
        .ok_or_else(|| reader.err(format!("cannot open '{pkl_name}'")))?;
    if pkl.len() as u64 > MAX_PICKLE_BYTES {
        return Err(reader.err(format!(
            "'{pkl_name}' is larger than {MAX_PICKLE_BYTES} bytes"
        )));
    }
    let root = pickle::unpickle(&pkl).map_err(|e| reader.err(format!("'{pkl_name}': {e}")))?;
    drop(pkl);
    reader.checkpoint(&root)
}

struct Reader<R> {
    zip: ZipArchive<R>,
    names: HashMap<String, usize>,
    prefix: String,
    total_len: u64,
    path: PathBuf,
    storages: HashMap<String, Rc<Vec<u8>>>,
    storage_bytes: u64,
    out_bytes: u64,
}

/// A storage persistent id: `('storage', torch.<X>Storage, key, location, numel)`.
struct StorageRef {
    key: String,
    /// Element type of the storage; `None` for `torch.UntypedStorage` (bytes).
    dtype: Option<DType>,
    numel: u64,
}

impl<R: Read + Seek> Reader<R> {
    fn err(&self, reason: impl Into<String>) -> Error {
        Error::format(&self.path, reason)
    }

    /// Reads at most `limit` bytes of entry `name`; `None` when there is no such entry.
    fn read_entry(&mut self, name: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let Some(&index) = self.names.get(name) else {
            return Ok(None);
        };
        let file = match self.zip.by_index(index) {
            Ok(f) => f,
            Err(ZipError::FileNotFound) => return Ok(None),
            Err(e) => {
                return Err(Error::format(
                    &self.path,
                    format!("cannot open zip entry '{name}': {e}"),
                ))
            }
        };
        let mut buf = Vec::new();
        if file.compression() == CompressionMethod::Stored && file.size() <= self.total_len {
            buf.reserve(usize::try_from(file.size().min(limit)).unwrap_or(0));
        }
        file.take(limit).read_to_end(&mut buf).map_err(|e| {
            Error::format(&self.path, format!("cannot read zip entry '{name}': {e}"))
        })?;
        Ok(Some(buf))
    }

    fn checkpoint(&mut self, root: &Value) -> Result<PthFile> {
        let top = match root {
            Value::Dict(d) => d,
            Value::Object(o) => {
                return Err(self.err(format!(
                    "the top-level object is a pickled `{}`, not a dict; save \
                     `model.state_dict()` (or a dict holding it under \"model\") instead",
                    callable_name(&o.callable)
                )))
            }
            other => {
                return Err(self.err(format!(
                    "the top-level object is a {}, not a dict of tensors or a checkpoint dict",
                    other.kind()
                )))
            }
        };
        let entries = top.entries_dedup();
        let top_level_keys: Vec<String> = entries.iter().map(|(k, _)| key_string(k)).collect();
        let epoch = match top.get("epoch") {
            Some(Value::Int(e)) => Some(*e),
            _ => None,
        };

        let (state_dict_key, state_dict) = if entries.iter().any(|(_, v)| is_tensor(v)) {
            (None, &**top)
        } else {
            let found = ["model", "state_dict", "model_ema"]
                .into_iter()
                .find_map(|k| top.get(k).and_then(Value::as_dict).map(|d| (k, d)));
            match found {
                Some((k, d)) => (Some(k.to_owned()), d),
                None => {
                    return Err(Error::Missing {
                        path: self.path.clone(),
                        what: format!(
                            "a state dict: the top-level dict holds no tensors and no \
                             \"model\", \"state_dict\" or \"model_ema\" dict (top-level keys: \
                             {top_level_keys:?})"
                        ),
                    })
                }
            }
        };

        let mut tensors: Vec<(String, TensorData)> = Vec::new();
        let mut skipped = Vec::new();
        for (k, v) in state_dict.entries_dedup() {
            let Some(name) = k.as_str() else {
                skipped.push(format!(
                    "{}: key is a {}, not a str",
                    key_string(k),
                    k.kind()
                ));
                continue;
            };
            match self.tensor(name, v, 0)? {
                Some(t) => tensors.push((name.to_owned(), t)),
                None => skipped.push(format!("{name}: {}, not a tensor", describe(v))),
            }
        }
        Ok(PthFile {
            tensors,
            top_level_keys,
            state_dict_key,
            epoch,
            skipped,
        })
    }

    /// The tensor `v` rebuilds, `None` when `v` is not a tensor.
    fn tensor(&mut self, name: &str, v: &Value, level: usize) -> Result<Option<TensorData>> {
        let Some((g, args)) = rebuild_call(v) else {
            return Ok(None);
        };
        let args = args
            .as_seq()
            .ok_or_else(|| self.err(format!("tensor '{name}': {g} arguments are not a tuple")))?;
        self.rebuild(name, g, args, level).map(Some)
    }

    fn rebuild(
        &mut self,
        name: &str,
        g: &Global,
        args: &[Value],
        level: usize,
    ) -> Result<TensorData> {
        if level > MAX_REBUILD_NESTING {
            return Err(self.err(format!(
                "tensor '{name}': rebuild calls nest deeper than {MAX_REBUILD_NESTING}"
            )));
        }
        let bad_args = |this: &Self| {
            this.err(format!(
                "tensor '{name}': {g} called with {} arguments",
                args.len()
            ))
        };
        match g.name.as_str() {
            "_rebuild_tensor" => {
                if args.len() != 4 {
                    return Err(bad_args(self));
                }
                self.tensor_from_storage(name, &args[0], &args[1], &args[2], &args[3], None)
            }
            "_rebuild_tensor_v2" => {
                if !(6..=7).contains(&args.len()) {
                    return Err(bad_args(self));
                }
                self.tensor_from_storage(name, &args[0], &args[1], &args[2], &args[3], None)
            }
            "_rebuild_tensor_v3" => {
                if !(7..=8).contains(&args.len()) {
                    return Err(bad_args(self));
                }
                let dtype = match args[6].as_global() {
                    Some(d) if d.module == "torch" => dtype_from_name(&d.name),
                    _ => None,
                }
                .ok_or_else(|| {
                    self.err(format!("tensor '{name}': unsupported dtype {:?}", args[6]))
                })?;
                self.tensor_from_storage(name, &args[0], &args[1], &args[2], &args[3], Some(dtype))
            }
            "_rebuild_parameter"
            | "_rebuild_parameter_with_state"
            | "_rebuild_device_tensor_from_cpu_tensor" => {
                let inner = args.first().ok_or_else(|| bad_args(self))?;
                self.tensor(name, inner, level + 1)?.ok_or_else(|| {
                    self.err(format!(
                        "tensor '{name}': {g} wraps a {}, not a tensor",
                        describe(inner)
                    ))
                })
            }
            "_rebuild_from_type_v2" => {
                let (func, inner_args) = match args {
                    [func, _type, inner_args, _state] => (func, inner_args),
                    _ => return Err(bad_args(self)),
                };
                let func = func
                    .as_global()
                    .filter(|f| f.module == "torch._utils")
                    .ok_or_else(|| {
                        self.err(format!(
                            "tensor '{name}': {g} of an unsupported function {func:?}"
                        ))
                    })?;
                let inner_args = inner_args.as_seq().ok_or_else(|| bad_args(self))?;
                self.rebuild(name, func, inner_args, level + 1)
            }
            other => Err(self.err(format!(
                "tensor '{name}': unsupported tensor kind torch._utils.{other} (quantized, sparse, \
                 nested, meta and subclass tensors are not supported)"
            ))),
        }
    }

    fn storage_ref(&self, name: &str, v: &Value) -> Result<StorageRef> {
        let bad = |why: &str| {
            self.err(format!(
                "tensor '{name}': bad storage reference ({why}): {v:?}"
            ))
        };
        let Value::PersistentId(p) = v else {
            return Err(bad("not a persistent id"));
        };
        let [tag, ty, key, _location, numel] = p.pid.as_seq().unwrap_or(&[]) else {
            return Err(bad("expected ('storage', type, key, location, numel)"));
        };
        if tag.as_str() != Some("storage") {
            return Err(bad("tag is not 'storage'"));
        }
        let ty = ty
            .as_global()
            .filter(|g| g.module == "torch")
            .ok_or_else(|| bad("storage type is not a torch global"))?;
        let dtype = match ty.name.as_str() {
            "UntypedStorage" => None,
            n => Some(storage_dtype(n).ok_or_else(|| {
                self.err(format!(
                    "tensor '{name}': unsupported storage type torch.{n}"
                ))
            })?),
        };
        let key = match key {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            _ => return Err(bad("key is not a str")),
        };
        if key.is_empty() || key.contains(['/', '\\']) || key.contains("..") {
            return Err(bad("key is not a plain name"));
        }
        let numel = numel
            .as_int()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| bad("numel is not a non-negative int"))?;
        Ok(StorageRef { key, dtype, numel })
    }

    /// The bytes of storage `r`, read once per key (and again only if a later reference
    /// needs more bytes than were read).
    fn storage(&mut self, name: &str, r: &StorageRef) -> Result<Rc<Vec<u8>>> {
        let elem = r.dtype.map_or(1, DType::size) as u64;
        let need = r.numel.checked_mul(elem).ok_or_else(|| {
            self.err(format!(
                "tensor '{name}': storage '{}' size overflows ({} elements)",
                r.key, r.numel
            ))
        })?;
        if let Some(s) = self.storages.get(&r.key) {
            if s.len() as u64 >= need {
                return Ok(s.clone());
            }
        }
        let entry = format!("{}data/{}", self.prefix, r.key);
        let bytes = self
            .read_entry(&entry, need)?
            .ok_or_else(|| Error::Missing {
                path: self.path.clone(),
                what: format!("storage record '{entry}' of tensor '{name}'"),
            })?;
        if (bytes.len() as u64) < need {
            return Err(self.err(format!(
                "storage record '{entry}' of tensor '{name}' has {} bytes, but its reference \
                 declares {} elements of {elem} bytes ({need} bytes)",
                bytes.len(),
                r.numel
            )));
        }
        let bytes = Rc::new(bytes);
        let previous = self.storages.insert(r.key.clone(), bytes.clone());
        self.storage_bytes =
            self.storage_bytes + need - previous.map_or(0, |p| p.len() as u64).min(need);
        Ok(bytes)
    }

    fn tensor_from_storage(
        &mut self,
        name: &str,
        storage: &Value,
        offset: &Value,
        size: &Value,
        stride: &Value,
        dtype: Option<DType>,
    ) -> Result<TensorData> {
        let r = self.storage_ref(name, storage)?;
        let dtype = dtype.or(r.dtype).unwrap_or(DType::U8);
        let offset = offset
            .as_int()
            .and_then(|o| usize::try_from(o).ok())
            .ok_or_else(|| {
                self.err(format!(
                    "tensor '{name}': storage offset {offset:?} is not a non-negative int"
                ))
            })?;
        let size = self.dims(name, "size", size)?;
        let stride = self.dims(name, "stride", stride)?;
        if size.len() != stride.len() {
            return Err(self.err(format!(
                "tensor '{name}': size {size:?} and stride {stride:?} differ in length"
            )));
        }
        let esize = dtype.size();
        let bytes = self.storage(name, &r)?;
        let storage_elems = bytes.len() / esize;
        let overflow = || {
            self.err(format!(
                "tensor '{name}': size {size:?} with stride {stride:?} overflows"
            ))
        };
        let numel = size
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(overflow)?;
        let nbytes = numel.checked_mul(esize).ok_or_else(overflow)?;
        if numel == 0 {
            return self.finish(name, dtype, size, Vec::new());
        }
        // The furthest element the view reaches must lie inside the storage.
        let last = size
            .iter()
            .zip(&stride)
            .try_fold(offset, |a, (&d, &s)| a.checked_add((d - 1).checked_mul(s)?))
            .ok_or_else(overflow)?;
        if last >= storage_elems {
            return Err(self.err(format!(
                "tensor '{name}': size {size:?}, stride {stride:?} and offset {offset} reach \
                 element {last}, but storage '{}' holds {storage_elems} {dtype} elements",
                r.key
            )));
        }
        let budget = self
            .storage_bytes
            .saturating_mul(EXPANSION_FACTOR)
            .saturating_add(EXPANSION_ALLOWANCE);
        if self.out_bytes.saturating_add(nbytes as u64) > budget {
            return Err(self.err(format!(
                "tensor '{name}': materialising {nbytes} bytes would expand the file's \
                 {} bytes of storage beyond {budget} bytes (stride-0 or overlapping views)",
                self.storage_bytes
            )));
        }
        self.out_bytes += nbytes as u64;
        let data = gather(&bytes, esize, offset, &size, &stride, nbytes)
            .ok_or_else(|| self.err(format!("tensor '{name}': view outside its storage")))?;
        self.finish(name, dtype, size, data)
    }

    fn finish(
        &self,
        name: &str,
        dtype: DType,
        size: Vec<usize>,
        data: Vec<u8>,
    ) -> Result<TensorData> {
        TensorData::new(dtype, size, data)
            .ok_or_else(|| self.err(format!("tensor '{name}': inconsistent byte length")))
    }

    fn dims(&self, name: &str, what: &str, v: &Value) -> Result<Vec<usize>> {
        let bad = || {
            self.err(format!(
                "tensor '{name}': {what} {v:?} is not a tuple of non-negative ints"
            ))
        };
        let items = v.as_seq().ok_or_else(bad)?;
        if items.len() > MAX_NDIM {
            return Err(self.err(format!(
                "tensor '{name}': {} dimensions (at most {MAX_NDIM} supported)",
                items.len()
            )));
        }
        items
            .iter()
            .map(|x| x.as_int().and_then(|i| usize::try_from(i).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(bad)
    }
}

/// Copies the strided view into a contiguous row-major buffer; `None` if an index falls
/// outside `storage` (which the caller has already ruled out).
fn gather(
    storage: &[u8],
    esize: usize,
    offset: usize,
    size: &[usize],
    stride: &[usize],
    nbytes: usize,
) -> Option<Vec<u8>> {
    let Some((&n_inner, outer_size)) = size.split_last() else {
        let start = offset.checked_mul(esize)?;
        return storage
            .get(start..start.checked_add(esize)?)
            .map(<[u8]>::to_vec);
    };
    let s_inner = *stride.last()?;
    let outer_stride = &stride[..stride.len() - 1];
    let mut out = Vec::with_capacity(nbytes);
    let mut idx = vec![0usize; outer_size.len()];
    loop {
        let base = idx
            .iter()
            .zip(outer_stride)
            .fold(offset, |a, (&i, &s)| a + i * s);
        if s_inner == 1 {
            let start = base * esize;
            out.extend_from_slice(storage.get(start..start + n_inner * esize)?);
        } else {
            for j in 0..n_inner {
                let start = (base + j * s_inner) * esize;
                out.extend_from_slice(storage.get(start..start + esize)?);
            }
        }
        // Advance the odometer over the outer dimensions.
        let mut d = idx.len();
        loop {
            if d == 0 {
                return Some(out);
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < outer_size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// `(callable, args)` when `v` is a call of a `torch._utils._rebuild_*` function.
fn rebuild_call(v: &Value) -> Option<(&Global, &Value)> {
    let o = v.as_object()?;
    let g = o.callable.as_global()?;
    (g.module == "torch._utils" && g.name.starts_with("_rebuild_")).then_some((g, &o.args))
}

fn is_tensor(v: &Value) -> bool {
    rebuild_call(v).is_some()
}

fn callable_name(v: &Value) -> String {
    match v {
        Value::Global(g) => g.to_string(),
        other => other.kind().to_owned(),
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Object(o) => format!("a `{}` object", callable_name(&o.callable)),
        Value::Global(g) => format!("the global `{g}`"),
        Value::None => "None".to_owned(),
        other => {
            let kind = other.kind();
            let article = if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
                "an"
            } else {
                "a"
            };
            format!("{article} {kind}")
        }
    }
}

fn key_string(k: &Value) -> String {
    match k {
        Value::Str(s) => s.to_string(),
        other => format!("{other:?}"),
    }
}

fn storage_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::Bf16,
        "DoubleStorage" => DType::F64,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        _ => return None,
    })
}

fn dtype_from_name(name: &str) -> Option<DType> {
    Some(match name {
        "float32" | "float" => DType::F32,
        "float16" | "half" => DType::F16,
        "bfloat16" => DType::Bf16,
        "float64" | "double" => DType::F64,
        "int64" | "long" => DType::I64,
        "int32" | "int" => DType::I32,
        "int16" | "short" => DType::I16,
        "int8" => DType::I8,
        "uint8" => DType::U8,
        "bool" => DType::Bool,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn gather_handles_strides_and_offsets() {
        // storage 0..12 as u8; view of shape [2, 3] transposed from [3, 2] at offset 1.
        let storage: Vec<u8> = (0..12).collect();
        let out = gather(&storage, 1, 1, &[2, 3], &[1, 2], 6).unwrap();
        assert_eq!(out, vec![1, 3, 5, 2, 4, 6]);
        // contiguous rows
        let out = gather(&storage, 1, 2, &[2, 2], &[4, 1], 4).unwrap();
        assert_eq!(out, vec![2, 3, 6, 7]);
        // scalar and stride 0
        assert_eq!(gather(&storage, 1, 5, &[], &[], 1).unwrap(), vec![5]);
        assert_eq!(
            gather(&storage, 1, 7, &[3], &[0], 3).unwrap(),
            vec![7, 7, 7]
        );
        // two-byte elements
        let out = gather(&storage, 2, 1, &[2], &[2], 4).unwrap();
        assert_eq!(out, vec![2, 3, 6, 7]);
        // out of range yields None rather than a panic
        assert!(gather(&storage, 1, 11, &[2], &[1], 2).is_none());
    }

    #[test]
    fn magic_checks() {
        let p = Path::new("x.pth");
        assert!(check_magic(&[], p)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        let e = check_magic(&[0x80, 0x02, 0x8a, 0x0a], p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("legacy") && e.contains("torch>=1.6"), "{e}");
        assert!(check_magic(b"abcd", p).is_err());
        assert!(check_magic(b"PK\x03\x04", p).is_ok());
    }
}
