//! 12-bit JPEG (DICOM JPEG Extended, process 4, as CT and MR archives hold it), decoded by
//! libjpeg-turbo 3's `tj3Decompress12`: the only foreign code of the input layer, kept to
//! this one call sequence.
#![allow(unsafe_code)]

use std::ffi::CStr;

use turbojpeg_sys as tj;

/// A decoded 12-bit frame: samples 0..=4095, interleaved when `components` is 3.
#[derive(Debug)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    pub components: usize,
    pub samples: Vec<u16>,
}

/// Owns a TurboJPEG decompressor.
struct Handle(tj::tjhandle);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

impl Handle {
    fn error(&self) -> String {
        // SAFETY: tj3GetErrorStr returns a NUL-terminated string owned by the handle (or a
        // static one), valid until the next call on it.
        unsafe {
            let p = tj::tj3GetErrorStr(self.0);
            if p.is_null() {
                "unknown error".into()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        }
    }

    fn get(&self, param: tj::TJPARAM) -> i32 {
        // SAFETY: a valid handle and a parameter id of the library's enum.
        unsafe { tj::tj3Get(self.0, param as CInt) }
    }
}

type CInt = std::os::raw::c_int;

/// Decodes one 12-bit JPEG stream into samples; `gray` asks for one component, else RGB.
pub fn decode(stream: &[u8], gray: bool) -> Result<Frame, String> {
    // SAFETY: tj3Init has no preconditions; a null result is checked.
    let raw = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as CInt) };
    if raw.is_null() {
        return Err("cannot start the 12-bit JPEG decoder".into());
    }
    let h = Handle(raw);
    // SAFETY: the pointer and length describe `stream`, which outlives the call.
    let rc = unsafe { tj::tj3DecompressHeader(h.0, stream.as_ptr(), stream.len() as _) };
    if rc != 0 {
        return Err(format!("12-bit JPEG header: {}", h.error()));
    }
    let (w, ht) = (
        h.get(tj::TJPARAM_TJPARAM_JPEGWIDTH),
        h.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT),
    );
    let precision = h.get(tj::TJPARAM_TJPARAM_PRECISION);
    if w <= 0 || ht <= 0 {
        return Err(format!("12-bit JPEG of size {w}×{ht}"));
    }
    if precision > 12 {
        return Err(format!("a JPEG of {precision}-bit samples, not 12"));
    }
    let (width, height) = (w as u32, ht as u32);
    crate::input::image::check_size(width, height).map_err(|e| e.to_string())?;
    let (components, format) = if gray {
        (1, tj::TJPF_TJPF_GRAY)
    } else {
        (3, tj::TJPF_TJPF_RGB)
    };
    let n = width as usize * height as usize * components;
    let mut out = vec![0i16; n];
    // SAFETY: `out` holds width × height × components samples, the size tj3Decompress12
    // writes for this pixel format with pitch 0 (rows packed); `stream` outlives the call.
    let rc = unsafe {
        tj::tj3Decompress12(
            h.0,
            stream.as_ptr(),
            stream.len() as _,
            out.as_mut_ptr(),
            0,
            format as CInt,
        )
    };
    if rc != 0 {
        return Err(format!("12-bit JPEG: {}", h.error()));
    }
    Ok(Frame {
        width,
        height,
        components,
        samples: out.into_iter().map(|v| v.clamp(0, 4095) as u16).collect(),
    })
}
