//! Tells the tests whether this machine's CPU has AVX-512F (the `host_avx512` cfg): the tests
//! of the AVX-512 tile are ignored, not passed, without it.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(host_avx512)");
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        println!("cargo::rustc-cfg=host_avx512");
    }
}
