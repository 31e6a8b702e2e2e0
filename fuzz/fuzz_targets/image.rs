#![no_main]
//! Fuzz target `image`: see `mae_tests::fuzz::image`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mae_tests::fuzz::image(data);
});
