#![no_main]
//! Fuzz target `http`: see `mae_tests::fuzz::http`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mae_tests::fuzz::http(data);
});
