#![no_main]
//! Fuzz target `dicom`: see `mae_tests::fuzz::dicom`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mae_tests::fuzz::dicom(data);
});
