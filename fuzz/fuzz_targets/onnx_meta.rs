#![no_main]
//! Fuzz target `onnx_meta`: see `mae_tests::fuzz::onnx_meta`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mae_tests::fuzz::onnx_meta(data);
});
