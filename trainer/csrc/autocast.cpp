// Mixed precision: libtorch's autocast for one device type, as `torch.autocast` does.
#include <exception>

#include <ATen/autocast_mode.h>

extern "C" {

// device: 0 CPU, 1 CUDA; dtype: 0 bfloat16, 1 float16. Entering clears nothing; leaving
// (enabled = 0) drops the cast cache, as the Python context manager does on exit.
// Returns 0, or -1 when libtorch threw.
int mae_autocast_set(int device, int dtype, int enabled) {
  try {
    at::DeviceType dt = device == 1 ? at::kCUDA : at::kCPU;
    at::autocast::set_autocast_dtype(dt, dtype == 1 ? at::kHalf : at::kBFloat16);
    at::autocast::set_autocast_enabled(dt, enabled != 0);
    if (enabled) {
      at::autocast::increment_nesting();
    } else if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    return 0;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
