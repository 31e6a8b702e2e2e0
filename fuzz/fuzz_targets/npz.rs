#![no_main]
//! Fuzz target `npz`: see `mae_tests::fuzz::npz`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mae_tests::fuzz::npz(data);
});
