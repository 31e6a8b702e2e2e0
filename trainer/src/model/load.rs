//! Loading checkpoints (official `.pth`, ours) into a model's variables, with the load report.

use std::collections::BTreeMap;

use mae_models::checkpoint::StateDict;
use mae_models::{DType, LoadReport, ParamSpec, TensorData};
use tch::{nn, Kind, Tensor};

/// A checkpoint tensor as a float32 libtorch tensor on the CPU.
pub fn to_tensor(t: &TensorData) -> Tensor {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    match t.dtype {
        DType::I64 => Tensor::from_slice(
            &t.data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect::<Vec<_>>(),
        )
        .reshape(&shape),
        _ => Tensor::from_slice(&t.to_f32_vec()).reshape(&shape),
    }
}

/// A libtorch tensor as checkpoint data (float32, or int64 for integer tensors).
pub fn from_tensor(t: &Tensor) -> TensorData {
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let t = t.detach().to_device(tch::Device::Cpu).contiguous();
    if t.kind() == Kind::Int64 {
        let v: Vec<i64> = Vec::try_from(t.flatten(0, -1)).unwrap_or_default();
        let data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        return TensorData::new(DType::I64, shape, data).expect("consistent int64 tensor");
    }
    let v: Vec<f32> = Vec::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap_or_default();
    TensorData::from_f32(shape, &v).expect("consistent float tensor")
}

/// All variables of a store as checkpoint tensors, by name.
pub fn state_dict(vs: &nn::VarStore) -> StateDict {
    vs.variables()
        .iter()
        .map(|(k, v)| (k.clone(), from_tensor(v)))
        .collect()
}

/// Resamples a `[1, 1 + g·g, d]` position embedding (class token first) to a `new_grid`²
/// patch grid with bicubic interpolation, as upstream `interpolate_pos_embed` does.
pub fn interpolate_pos_embed(pos: &Tensor, new_grid: i64) -> Tensor {
    let (_, n, d) = pos.size3().expect("pos_embed is [1, n, d]");
    let old_grid = ((n - 1) as f64).sqrt() as i64;
    if old_grid == new_grid {
        return pos.shallow_clone();
    }
    let extra = pos.narrow(1, 0, 1);
    let grid = pos
        .narrow(1, 1, n - 1)
        .reshape([1, old_grid, old_grid, d])
        .permute([0, 3, 1, 2]); // [1, d, g, g]
    let grid = grid
        .upsample_bicubic2d([new_grid, new_grid], false, None, None)
        .permute([0, 2, 3, 1])
        .flatten(1, 2); // [1, g'·g', d]
    Tensor::cat(&[extra, grid], 1)
}

/// Prepares checkpoint tensors for a classifier the way upstream fine-tuning does: drops the
/// MAE decoder, drops a head of another shape, and resizes `pos_embed` to the model's grid.
/// Returns the notes of what it changed.
pub fn adapt_for_classifier(sd: &mut StateDict, expected: &[ParamSpec]) -> Vec<String> {
    let mut notes = Vec::new();
    let decoder: Vec<String> = sd
        .keys()
        .filter(|k| k.starts_with("decoder_") || *k == "mask_token")
        .cloned()
        .collect();
    if !decoder.is_empty() {
        notes.push(format!("dropped {} MAE decoder tensors", decoder.len()));
        for k in decoder {
            sd.remove(&k);
        }
    }
    let want: BTreeMap<&str, &[usize]> = expected
        .iter()
        .map(|p| (p.name.as_str(), p.shape.as_slice()))
        .collect();
    for k in ["head.weight", "head.bias"] {
        if let (Some(t), Some(shape)) = (sd.get(k), want.get(k)) {
            if t.shape.as_slice() != *shape {
                notes.push(format!(
                    "removing key {k} from pretrained checkpoint (shape {:?})",
                    t.shape
                ));
                sd.remove(k);
            }
        }
    }
    if let Some((old, new)) = resize_pos_embed(sd, "pos_embed", &want) {
        notes.push(format!(
            "position interpolate from {old}x{old} to {new}x{new}"
        ));
    }
    notes
}

/// Prepares an MAE pretraining checkpoint for an MAE model whose input size may differ:
/// resizes `pos_embed` and `decoder_pos_embed` to the model's patch grid. Returns the notes
/// of what it changed.
pub fn adapt_for_mae(sd: &mut StateDict, expected: &[ParamSpec]) -> Vec<String> {
    let want: BTreeMap<&str, &[usize]> = expected
        .iter()
        .map(|p| (p.name.as_str(), p.shape.as_slice()))
        .collect();
    ["pos_embed", "decoder_pos_embed"]
        .into_iter()
        .filter_map(|key| {
            let (old, new) = resize_pos_embed(sd, key, &want)?;
            Some(format!(
                "{key}: position interpolate from {old}x{old} to {new}x{new}"
            ))
        })
        .collect()
}

/// Resamples the checkpoint's `[1, 1 + g·g, d]` tensor `key` to the model's grid when only
/// the grid differs; returns the old and new grid sides when it did.
fn resize_pos_embed(
    sd: &mut StateDict,
    key: &str,
    want: &BTreeMap<&str, &[usize]>,
) -> Option<(i64, i64)> {
    let (t, shape) = (sd.get(key)?, *want.get(key)?);
    // [1, 1 + g·g, d]: one table, class token first.
    let table = |s: &[usize]| s.len() == 3 && s[0] == 1 && s[1] > 0;
    if !table(&t.shape) || !table(shape) || t.shape == shape || t.shape[2] != shape[2] {
        return None;
    }
    let old = ((t.shape[1] - 1) as f64).sqrt() as i64;
    let new = ((shape[1] - 1) as f64).sqrt() as i64;
    if old * old + 1 != t.shape[1] as i64 || new * new + 1 != shape[1] as i64 {
        return None;
    }
    let resized = interpolate_pos_embed(&to_tensor(t), new);
    sd.insert(key.into(), from_tensor(&resized));
    Some((old, new))
}

/// Copies every checkpoint tensor whose name and shape match a variable of `vs`, and reports
/// applied, missing, unexpected and shape-mismatched keys.
pub fn load_into(vs: &nn::VarStore, sd: &StateDict) -> LoadReport {
    let vars = vs.variables();
    let mut expected: Vec<ParamSpec> = vars
        .iter()
        .map(|(k, v)| ParamSpec {
            name: k.clone(),
            shape: v.size().iter().map(|&d| d as usize).collect(),
        })
        .collect();
    expected.sort_by(|a, b| a.name.cmp(&b.name));
    let report = LoadReport::compare(
        &expected,
        sd.iter().map(|(k, v)| (k.as_str(), v.shape.as_slice())),
    );
    tch::no_grad(|| {
        for name in &report.applied {
            let src = to_tensor(&sd[name]);
            let mut dst = vars[name].shallow_clone();
            dst.copy_(&src.to_kind(dst.kind()).to_device(dst.device()));
        }
    });
    report
}
