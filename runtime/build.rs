//! Tells the tests whether this machine's CPU has AVX-512F (the `host_avx512` cfg) and
//! AVX-512 VNNI (`host_vnni`): the tests of those tiles are ignored, not passed, without them.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(host_avx512)");
    println!("cargo::rustc-check-cfg=cfg(host_vnni)");
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        println!("cargo::rustc-cfg=host_avx512");
        if std::arch::is_x86_feature_detected!("avx512vnni") {
            println!("cargo::rustc-cfg=host_vnni");
        }
    }
}
