//! Tells the tests whether this machine's CPU has AVX-512F (the `host_avx512` cfg), AVX-512 VNNI
//! (`host_vnni`), AVX2 with FMA (`host_avx2`) and AVX-VNNI (`host_avx_vnni`): the tests of those
//! tiles are ignored, not passed, without them.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(host_avx512)");
    println!("cargo::rustc-check-cfg=cfg(host_vnni)");
    println!("cargo::rustc-check-cfg=cfg(host_avx2)");
    println!("cargo::rustc-check-cfg=cfg(host_avx_vnni)");
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        println!("cargo::rustc-cfg=host_avx2");
        if std::arch::is_x86_feature_detected!("avxvnni") {
            println!("cargo::rustc-cfg=host_avx_vnni");
        }
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        println!("cargo::rustc-cfg=host_avx512");
        if std::arch::is_x86_feature_detected!("avx512vnni") {
            println!("cargo::rustc-cfg=host_vnni");
        }
    }
}
