#![no_main]
//! Fuzz target `safetensors`: see `mae_tests::fuzz::safetensors`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mae_tests::fuzz::safetensors(data);
});
