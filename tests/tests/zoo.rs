//! The model zoo's parameter tables equal the state dicts timm builds for the same
//! architectures (names, order and shapes), so official checkpoints load without renaming.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Stdio};

use mae_models::{ModelConfig, Overrides, VitConfig};
use mae_tests::{python, workspace_root};

fn timm_args(c: &VitConfig) -> serde_json::Value {
    serde_json::json!({
        "img_size": c.img_size, "patch_size": c.patch_size, "embed_dim": c.embed_dim,
        "depth": c.depth, "num_heads": c.num_heads, "num_classes": c.num_classes,
        "global_pool": c.global_pool,
    })
}

#[test]
fn vit_presets_match_timm_state_dicts() {
    let mut configs = serde_json::Map::new();
    let mut ours = Vec::new();
    for name in mae_models::config::vit_presets() {
        let cfg = VitConfig::preset(&name).unwrap();
        configs.insert(name.clone(), timm_args(&cfg));
        ours.push((name, cfg));
    }
    // The class-token head and overridden sizes too.
    let o = Overrides {
        img_size: Some(64),
        num_classes: Some(2),
        depth: Some(2),
        ..Default::default()
    };
    let ModelConfig::Vit(mut small) = ModelConfig::preset("vit_small_patch8_64")
        .unwrap()
        .with_overrides(&o)
        .unwrap()
    else {
        unreachable!()
    };
    small.global_pool = false;
    configs.insert("small_cls".into(), timm_args(&small));
    ours.push(("small_cls".into(), small));

    let script = workspace_root().join("tests/fixtures/timm_reference.py");
    let mut child = Command::new(python())
        .arg(&script)
        .arg("table")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input = serde_json::to_vec(&configs).unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "timm reference failed");
    let tables: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    for (name, cfg) in &ours {
        let theirs: Vec<(String, Vec<usize>)> =
            serde_json::from_value(tables[name].clone()).unwrap();
        let mine: Vec<(String, Vec<usize>)> = cfg
            .parameters()
            .into_iter()
            .map(|p| (p.name, p.shape))
            .collect();
        assert_eq!(mine.len(), theirs.len(), "{name}: tensor count");
        for (m, t) in mine.iter().zip(&theirs) {
            assert_eq!(m, t, "{name}: first difference");
        }
    }
}
