//! The C allocator's thresholds for a process that runs passes over large activations.
//!
//! glibc hands out blocks over its mmap threshold (128 KiB, rising to the largest block freed,
//! at most 32 MiB) by `mmap` and gives them back by `munmap`, and trims the heap's top above
//! twice that. A pass of a ViT allocates and frees megabytes of activations per operator, so
//! memory goes back and forth to the kernel every pass: fresh pages fault in, and each unmap
//! interrupts the process's other threads to flush their TLBs. With attention probabilities
//! as extra outputs (`--explain rollout`), ViT-B/16 at batch 1 on 2 threads took 1.2× the plain
//! pass for that alone. Raising both thresholds keeps the freed blocks for the next pass (the
//! process's resident memory stays near its peak). `MAE_HEAP=system` leaves glibc's defaults.

/// Blocks up to this size come from the heap, not from `mmap` of their own.
const MMAP_THRESHOLD: i32 = 256 << 20;
/// Free memory at the heap's top is given back beyond this much.
const TRIM_THRESHOLD: i32 = 1 << 30;

/// Sets the thresholds, unless `MAE_HEAP=system`; returns whether they were set.
pub fn keep_freed_memory() -> bool {
    if std::env::var("MAE_HEAP").is_ok_and(|v| v == "system") {
        return false;
    }
    set_thresholds()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set_thresholds() -> bool {
    use std::os::raw::c_int;
    // <malloc.h>: M_TRIM_THRESHOLD -1, M_MMAP_THRESHOLD -3.
    const M_TRIM_THRESHOLD: c_int = -1;
    const M_MMAP_THRESHOLD: c_int = -3;
    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    // SAFETY: mallopt only sets allocator parameters; it is called at start-up, before any
    // other thread exists, with parameters and values glibc documents.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_thresholds() {
        assert!(super::set_thresholds());
    }
}
