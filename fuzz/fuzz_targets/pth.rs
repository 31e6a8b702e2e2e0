#![no_main]
//! Fuzz target `pth`: see `mae_tests::fuzz::pth`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mae_tests::fuzz::pth(data);
});
