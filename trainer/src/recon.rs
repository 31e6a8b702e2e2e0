//! Reconstruction grids in the layout of upstream's demo notebook: original | masked |
//! reconstruction | reconstruction with the visible patches pasted back, one row per image,
//! under a caption row. `pretrain --vis-every` and `visualize` draw them.

use std::path::Path;

use image::{Rgb, RgbImage};
use mae_models::preprocess::PreprocessSpec;
use tch::{Device, Kind, Tensor};

use crate::model::mae::{patchify, unpatchify, MaskedAutoencoderViT};

/// Gap between panels, in output pixels.
const GAP: u32 = 4;

/// Renders one row per image of `imgs` (`[k, 3, s, s]`, normalised with `spec`).
pub fn render_grid(
    model: &MaskedAutoencoderViT,
    imgs: &Tensor,
    noise: &Tensor,
    ratio: f64,
    spec: &PreprocessSpec,
) -> RgbImage {
    let p = model.cfg.patch_size as i64;
    let out = tch::no_grad(|| model.forward_with_noise(imgs, noise, ratio));
    let mut pred = out.pred.shallow_clone();
    if model.cfg.norm_pix_loss {
        // Back to pixels with each target patch's own mean and variance.
        let target = patchify(imgs, p);
        let mean = target.mean_dim(-1, true, Kind::Float);
        let var = target.var_dim(-1, true, true);
        pred = pred * (var + 1e-6).sqrt() + mean;
    }
    let recon = unpatchify(&pred, p, 3);
    // [k, L] → [k, 3, s, s], 1 where the patch was removed.
    let l = out.mask.size()[1];
    let mask = unpatchify(
        &out.mask
            .unsqueeze(-1)
            .repeat([1, 1, p * p * 3])
            .reshape([-1, l, p * p * 3]),
        p,
        3,
    );
    let masked = imgs * (1.0 - &mask);
    let pasted = imgs * (1.0 - &mask) + &recon * &mask;
    let panels = [imgs.shallow_clone(), masked, recon, pasted];

    let (k, s) = (imgs.size()[0], imgs.size()[2] as u32);
    let scale = (112 / s).max(1);
    let cell = s * scale;
    let width = 4 * cell + 3 * GAP;
    let height = k as u32 * cell + (k as u32 - 1) * GAP;
    let mut canvas = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    for (col, panel) in panels.iter().enumerate() {
        for row in 0..k {
            let px = to_pixels(&panel.get(row), spec, col == 1);
            for y in 0..cell {
                for x in 0..cell {
                    let v = px.get_pixel(x / scale, y / scale);
                    let cx = col as u32 * (cell + GAP) + x;
                    let cy = row as u32 * (cell + GAP) + y;
                    canvas.put_pixel(cx, cy, *v);
                }
            }
        }
    }
    canvas
}

/// `[3, s, s]` normalised values → 8-bit RGB (masked panels show removed patches grey).
fn to_pixels(t: &Tensor, spec: &PreprocessSpec, grey_zero: bool) -> RgbImage {
    let s = t.size()[1] as u32;
    let v = Vec::<f32>::try_from(t.to_device(Device::Cpu).contiguous().flatten(0, -1))
        .unwrap_or_default();
    let plane = (s * s) as usize;
    RgbImage::from_fn(s, s, |x, y| {
        let i = (y * s + x) as usize;
        let raw = [v[i], v[plane + i], v[2 * plane + i]];
        if grey_zero && raw.iter().all(|&c| c == 0.0) {
            return Rgb([128, 128, 128]);
        }
        let mut px = [0u8; 3];
        for c in 0..3 {
            let val = raw[c] * spec.std[c] + spec.mean[c];
            px[c] = (val * 255.0).round().clamp(0.0, 255.0) as u8;
        }
        Rgb(px)
    })
}

/// Height of the caption row above a grid, in pixels.
pub const CAPTION_H: u32 = 24;

/// Writes `grid` as PNG, atomically, under a caption row naming its four columns.
pub fn save_grid(grid: &RgbImage, mask_ratio: f64, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    let (w, h) = grid.dimensions();
    let cell = (w - 3 * GAP) / 4;
    let titles = [
        "original".to_string(),
        format!("masked {:.0}%", mask_ratio * 100.0),
        "reconstruction".to_string(),
        "recon. + visible".to_string(),
    ];
    let mut img = crate::chart::render((w, h + CAPTION_H), |root| {
        let style = TextStyle::from((crate::chart::FAMILY, 13).into_font())
            .pos(Pos::new(HPos::Center, VPos::Center))
            .color(&BLACK);
        for (col, t) in titles.iter().enumerate() {
            let x = col as u32 * (cell + GAP) + cell / 2;
            root.draw(&Text::new(
                t.as_str(),
                (x as i32, CAPTION_H as i32 / 2),
                style.clone(),
            ))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
        Ok(())
    })?;
    image::imageops::replace(&mut img, grid, 0, i64::from(CAPTION_H));
    crate::chart::save_png(&img, path)
}
